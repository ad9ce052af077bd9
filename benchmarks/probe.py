"""Learning-speed probe: a few epochs of the causal model in ONE process (no Ray), for comparing
configurations on validation before paying for a full distributed run.

    python benchmarks/probe.py --config configs/bench_movielens.yaml data.path=data/ml-1m \
        model.init_std=0.125 --epochs 3

Prints validation NDCG@10 (full ranking, seen items excluded, on the first ``--eval-users`` users) and
the training loss (per target position, as training logs it) after each epoch, as one JSON line per
epoch. Same model, optimiser, batches (length buckets) and metrics as `llmrec-dist train`. The
warm-up is the configured run's (train.warmup_ratio of train.epochs, so the probe follows the first
epochs of that run); after it the lr stays at its peak instead of decaying. One process sees every
row. Test data is never read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from llmrec_dist.batching import shuffled_batches
from llmrec_dist.config import ConfigError, load_config
from llmrec_dist.data.layout import num_items, read_manifest, read_split
from llmrec_dist.evaluation import EvalRows, evaluate, load_eval_rows
from llmrec_dist.text_tower import load_text_features
from llmrec_dist.train.optim import build_optimizer, build_scheduler
from llmrec_dist.train.recipe import (TrainingPairs, autocast_for, build_recommender, steps_per_epoch,
                                      train_one_epoch)
from llmrec_dist.train.rows import windowed_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (causal backbone; ID or frozen text items)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=DIR model.init_std=0.02")
    p.add_argument("--epochs", type=int, default=3, help="epochs to train (default 3)")
    p.add_argument("--eval-users", type=int, default=2000, help="validation users scored (default 2000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as err:
        raise SystemExit(f"probe: {err}") from None
    if cfg.model.backbone != "causal" or (cfg.model.item_repr != "id" and cfg.model.freeze != "frozen"):
        raise SystemExit("probe: only the causal backbone over ID or frozen-text items")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    try:
        manifest = read_manifest(cfg.data.path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"probe: {err}") from None
    train = read_split(cfg.data.path, "train")
    train = (windowed_table(train, cfg) if cfg.data.windows else train).column("items").to_pylist()
    valid = load_eval_rows(cfg.data.path, "valid")
    n = min(args.eval_users, len(valid))
    valid = EvalRows(valid.histories[:n], valid.targets[:n], valid.cold[:n])
    catalogue = num_items(manifest)
    model = build_recommender(cfg, manifest, load_text_features(cfg, manifest))
    optimizer = build_optimizer(model, cfg.train)
    # the configured run's warm-up (one worker), then the peak lr: a probe has no end to decay towards
    scheduler = build_scheduler(optimizer, dataclasses.replace(cfg.train, schedule="constant"),
                                steps_per_epoch(cfg, len(train), world_size=1))
    device = torch.device("cpu")
    pairs = TrainingPairs(cfg, model.mask_id, cfg.train.seed)  # the recipe's batches (and earlier items)
    rows, start = [], time.time()
    for epoch in range(args.epochs):
        batches = (pairs(batch) for batch in shuffled_batches(
            train, cfg.train.batch_size, cfg.model.max_len, cfg.data.length_buckets, rng))
        stats = train_one_epoch(model, batches, optimizer, scheduler, cfg, device, autocast_for(cfg, device))
        metrics = evaluate(model, valid, catalogue, cfg.eval, cfg.model.max_len, device)
        row = {"epoch": epoch, "steps": scheduler.last_epoch,
               "train_loss": round(stats["loss_sum"] / max(stats["positions"], 1), 4),
               "valid_ndcg_at_10": round(metrics["ndcg_at_10"], 4), "seconds": round(time.time() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
