"""Checkpoint folders: what a training run saves each epoch and what a model package is built from.

Layout of one checkpoint folder (the first two files are the saved-model format, :mod:`llmrec_dist.saved_model`):
  model.safetensors       weights of this epoch (unwrapped module)
  model.json              {"model": ModelConfig fields, "num_items": N, "dataset_hash": ...}
  best_model.safetensors  best weights so far by the validation metric (what gets evaluated/registered)
  state.pt                optimiser, scheduler, epoch, best metric, history (tensors and plain types
                          only: loaded with torch.load(weights_only=True)); randomness is re-seeded
                          from (seed, epoch, rank) each epoch, so no RNG state is needed
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmrec_dist.saved_model import BEST_FILE, MODEL_META_FILE, WEIGHTS_FILE

STATE_FILE = "state.pt"


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, str(path))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_weights(model: nn.Module, path: Path) -> None:
    model.load_state_dict(read_weights(path))


def write_checkpoint(folder: Path, *, weights: dict, best_weights: dict, meta: dict,
                     state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(weights, folder / WEIGHTS_FILE)
    save_weights(best_weights, folder / BEST_FILE)
    (folder / MODEL_META_FILE).write_text(json.dumps(meta, indent=2))
    torch.save(state, folder / STATE_FILE)
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
