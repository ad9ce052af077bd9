"""Helpers shared by the registry tests: a tiny hand-written dataset and a tiny random checkpoint.

The dataset is written by hand (items.parquet + manifest.json, empty splits) so the registry tests
do not depend on ``prepare``; the content hash is the real one of that content.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from llmrec_dist.config import ModelConfig
from llmrec_dist.data.dataset_format import (
    FORMAT_VERSION,
    ITEMS_FILE,
    ITEMS_SCHEMA,
    SPLIT_SCHEMAS,
    SPLITS,
    compute_content_hash,
    write_manifest,
    write_parquet,
)
from llmrec_dist.model import build_model
from llmrec_dist.worker.checkpoint import cpu_state_dict, write_checkpoint

NUM_ITEMS = 30
TINY_MODEL = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, max_len=20, dropout=0.0)


def item_id(idx: int) -> str:
    return f"item-{idx:03d}"


def item_text(idx: int) -> str:
    return f"Item number {idx}, " + "a rather long description " * (1 + idx % 4)


def popularity(num_items: int = NUM_ITEMS) -> np.ndarray:
    """Counts with ties (item 3 and item 7 both 50) so tie-breaking is exercised."""
    pop = (np.arange(1, num_items + 1) * 7919) % 97
    pop[2], pop[6] = 200, 200  # items 3 and 7 tie at the top: item 3 (lower idx) first
    return pop.astype(np.int64)


def write_dataset(folder: Path, num_items: int = NUM_ITEMS, salt: str = "") -> dict:
    """Write items.parquet + manifest.json; ``salt`` changes the texts and so the content hash."""
    folder.mkdir(parents=True, exist_ok=True)
    idx = np.arange(1, num_items + 1, dtype=np.int32)
    items = pa.table({"item_idx": idx,
                      "item_id": [item_id(i) for i in idx],
                      "text": [item_text(i) + salt for i in idx],
                      "popularity": popularity(num_items)}, schema=ITEMS_SCHEMA)
    write_parquet(items, folder / ITEMS_FILE)
    splits = {s: SPLIT_SCHEMAS[s].empty_table() for s in SPLITS}
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": "registry-test",
        "counts": {"items": num_items, "users": 0},
        "shards": {s: [] for s in SPLITS},
        "content_hash": compute_content_hash(items, splits),
    }
    write_manifest(folder, manifest)
    return manifest


def write_tiny_checkpoint(folder: Path, dataset_hash: str, num_items: int = NUM_ITEMS,
                          seed: int = 0, model_cfg: ModelConfig = TINY_MODEL) -> Path:
    """A random tiny model saved the way training saves its final checkpoint."""
    torch.manual_seed(seed)
    model = build_model(model_cfg, num_items)
    weights = cpu_state_dict(model)
    meta = {"model": dataclasses.asdict(model_cfg), "num_items": num_items, "dataset_hash": dataset_hash}
    return write_checkpoint(folder, weights=weights, best_weights=weights, meta=meta, state={})


def make_package(root: Path, seed: int = 0, salt: str = "", exclude_seen: bool = True,
                 model_cfg: ModelConfig = TINY_MODEL) -> Path:
    """Dataset + checkpoint + package under ``root``; returns the package folder."""
    from llmrec_dist.config import EvalConfig
    from llmrec_dist.registry.package import build_model_package

    manifest = write_dataset(root / "dataset", salt=salt)
    ckpt = write_tiny_checkpoint(root / "checkpoint", manifest["content_hash"], seed=seed, model_cfg=model_cfg)
    return build_model_package(ckpt, root / "dataset", root / "package",
                               EvalConfig(exclude_seen=exclude_seen))


def click_record(feedback_input: bool = False) -> dict:
    """The ``task`` record a click model's checkpoint carries (as :func:`llmrec_dist.pointwise.task_record` writes it)."""
    return {"type": "click", "loss": "auto", "huber_delta": 1.0, "click_threshold": 0.0, "negatives": 4,
            "eval_negatives": 1, "feedback_input": feedback_input, "item_bias": True, "range": [0.0, 1.0],
            "eval_seed": 0}


def make_reranker_package(root: Path, dataset: Path, seed: int = 5, feedback_input: bool = False,
                          model_cfg: ModelConfig = TINY_MODEL) -> Path:
    """A tiny random click model (the bi-encoder) on ``dataset``, packaged under ``root/package``."""
    import json

    from llmrec_dist.pointwise import wrap_model
    from llmrec_dist.registry.package import build_model_package

    manifest = json.loads((dataset / "manifest.json").read_text())
    torch.manual_seed(seed)
    record = click_record(feedback_input)
    model = wrap_model(build_model(model_cfg, NUM_ITEMS), record)
    with torch.no_grad():  # a visible item bias, so the scores are not all alike
        model.item_bias.weight[1:].copy_(torch.linspace(-2, 2, NUM_ITEMS)[:, None])
    weights = cpu_state_dict(model)
    meta = {"model": dataclasses.asdict(model_cfg), "num_items": NUM_ITEMS,
            "dataset_hash": manifest["content_hash"], "task": record}
    ckpt = write_checkpoint(root / "checkpoint", weights=weights, best_weights=weights, meta=meta, state={})
    return build_model_package(ckpt, dataset, root / "package")
