"""llmrec_dist: distributed training of Transformer / language-model recommenders on Ray."""

__version__ = "0.1.0"
