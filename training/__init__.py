"""training: the commands that train and publish models — train, evaluate, retrain, export, scores, predictions,
the registry CLI, benchmarks over training. The top floor: it imports sim_model and sim_backend."""
