"""sim_backend: everything that speaks Label Studio — the ML backend server (Flask), the API client, label configs,
task parsing, image loading, masks ↔ regions, settings. It imports sim_model, never training."""
