"""The driver side of training: Ray, the TorchTrainer and the MLflow run around it (launcher), the memory
pre-flight, the epoch lines, the rows an epoch trains on. What runs inside each worker is
:mod:`llmrec_dist.worker`."""
