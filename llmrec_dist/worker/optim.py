"""Optimiser and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmrec_dist.config import TrainConfig


def lm_learning_rate(cfg: TrainConfig) -> float:
    return cfg.lm_lr or cfg.lr * cfg.lm_lr_ratio


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms and embeddings are not decayed; trainable LM weights (``top_k`` layers,
    ``full``) get their own, lower learning rate."""
    holder = model if hasattr(model, "lm_parameters") else getattr(model, "items", None)  # cross-encoder / tower
    lm_params = getattr(holder, "lm_parameters", lambda: [])()
    lm_ids = {id(p) for p in lm_params}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in lm_ids:
            continue
        if param.ndim < 2 or "embedding" in name or name.endswith("wpe.weight"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lm_params:
        groups.append({"params": lm_params, "weight_decay": cfg.weight_decay, "lr": lm_learning_rate(cfg)})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def warmup_then(total_steps: int, warmup_ratio: float, schedule: str = "cosine", floor: float = 0.1):
    """Multiplier of the peak lr: linear warm-up over ``warmup_ratio`` of ``total_steps``, then
    ``cosine`` decay to ``floor`` x peak at ``total_steps``, or ``constant`` at the peak."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train.schedule: unknown {schedule!r}; valid: cosine, constant")
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, steps_per_epoch * cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then(total, cfg.warmup_ratio, cfg.schedule))
