"""Hyperparameter sweeps with Ray Tune: one distributed training run per trial, ASHA early stopping,
an MLflow parent run with one child run per trial, and the best trial registered behind the alias gate."""
