"""The per-worker side of training: what runs inside each Ray Train worker (the recipe, its checkpoint
files, its optimiser). The driver side (Ray, the TorchTrainer, the MLflow run) is :mod:`llmrec_dist.train`."""
