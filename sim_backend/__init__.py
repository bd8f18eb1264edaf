"""sim_backend: the Label Studio ML backend (Flask) that turns drawn boxes into polygon/brush masks."""
