"""training: Label Studio export, SIM training, evaluation, retraining, S_k scores and the model registry."""
