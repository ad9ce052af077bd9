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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llmrec_dist.batching import shuffled_batches
from llmrec_dist.config import ConfigError, load_config
from llmrec_dist.data.dataset_format import num_items, read_manifest, read_split
from llmrec_dist.evaluation import EvalRows, evaluate, load_eval_rows
from llmrec_dist.saved_model import MODEL_META_FILE, WEIGHTS_FILE, init_from_saved
from llmrec_dist.sharding import refresh_text_cache
from llmrec_dist.text_tower import load_text_features
from llmrec_dist.worker.optim import build_optimizer, build_scheduler
from llmrec_dist.worker.recipe import (TrainingPairs, autocast_for, build_recommender, steps_per_epoch,
                                      train_one_epoch)
from llmrec_dist.train.training_rows import windowed_table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (causal backbone; any item tower and freezing strategy)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=DIR model.init_std=0.02")
    p.add_argument("--epochs", type=int, default=3, help="epochs to train (default 3)")
    p.add_argument("--eval-users", type=int, default=2000, help="validation users scored (default 2000)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--save", default="", help="write the trained model to this folder (model.json + "
                                                "model.safetensors, a checkpoint that train.init_from reads)")
    p.add_argument("--init-from", default="", help="start from a saved model folder, as train.init_from does "
                                                   "(e.g. a --save of a frozen run, continued with model.freeze=top_k)")
    p.add_argument("--cold-report", action="store_true",
                   help="after training, where the items that occur in no training history stand: their "
                        "mean score percentile for the validation users (0 = top, 1 = bottom) against the "
                        "others', the cosine of their LM text vectors with the pretrained ones, and their "
                        "item-vector norms (the cold-item collapse diagnosis)")
    return p.parse_intermixed_args(argv)


@torch.no_grad()
def cold_report(model, cfg, manifest, valid: EvalRows) -> dict:
    """Unseen ("cold") items against the items of the training histories, after training."""
    from llmrec_dist.data.dataset_format import items_seen_in_training
    from llmrec_dist.metrics import rankable_scores
    from llmrec_dist.batching import eval_batch

    model.eval()
    seen = torch.from_numpy(items_seen_in_training(cfg.data.path))
    unseen = ~seen
    unseen[0] = False
    refresh_text_cache(model.items)
    table = model.items.all_items()
    idx = np.arange(min(512, len(valid)))
    batch = eval_batch([valid.histories[i] for i in idx], valid.targets[idx], cfg.model.max_len, True)
    scores = rankable_scores(model.score_next(batch["seq"], table).float(), batch["targets"], batch["history"])
    finite = torch.isfinite(scores)
    order = scores.masked_fill(~finite, float("-inf")).argsort(dim=1, descending=True)
    pct = torch.empty_like(scores)
    pct.scatter_(1, order, torch.linspace(0, 1, scores.shape[1]).expand_as(scores).contiguous())
    pct = pct.masked_fill(~finite, float("nan"))
    # where each validation row's own target ranks (0 = top, 1 = bottom), cold targets apart
    target_pct = []
    for start in range(0, len(valid), 256):
        rows = np.arange(start, min(start + 256, len(valid)))
        b = eval_batch([valid.histories[i] for i in rows], valid.targets[rows], cfg.model.max_len, True)
        sc = rankable_scores(model.score_next(b["seq"], table).float(), b["targets"], b["history"])
        higher = (sc > sc.gather(1, b["targets"][:, None])).sum(1).float()
        target_pct.append(higher / torch.isfinite(sc).sum(1).float())
    target_pct = torch.cat(target_pct)
    cold_rows = torch.from_numpy(valid.cold)
    out = {"cold_target_percentile": float(target_pct[cold_rows].mean()) if cold_rows.any() else None,
           "warm_target_percentile": float(target_pct[~cold_rows].mean()),
           "unseen_items": int(unseen.sum()),
           "unseen_score_percentile": float(pct[:, unseen].nanmean()),
           "seen_score_percentile": float(pct[:, seen].nanmean()),
           "unseen_vector_norm": float(table[unseen].norm(dim=1).mean()),
           "seen_vector_norm": float(table[seen].norm(dim=1).mean())}
    items = model.items
    if getattr(items, "trainable_lm", False):  # how far the LM's text vectors moved from the pretrained ones
        from llmrec_dist.text_tower import load_text_features

        pretrained = load_text_features(cfg).pooled
        cos = torch.nn.functional.cosine_similarity(items.pooled, pretrained, dim=1)
        out["unseen_text_cosine_to_pretrained"] = float(cos[unseen].mean())
        out["seen_text_cosine_to_pretrained"] = float(cos[seen].mean())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def save_checkpoint(model, cfg, manifest, folder: Path) -> None:
    """The trained model as a checkpoint folder (what ``train.init_from`` and ``evaluate`` read)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    meta = {"model": cfg.to_dict()["model"], "num_items": num_items(manifest), "dataset_hash": manifest["content_hash"]}
    (folder / MODEL_META_FILE).write_text(json.dumps(meta, indent=2))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as err:
        raise SystemExit(f"probe: {err}") from None
    if cfg.model.backbone != "causal":
        raise SystemExit("probe: only the causal backbone")
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
    valid = EvalRows(valid.histories[:n], valid.targets[:n], valid.cold[:n], None if valid.freq is None else valid.freq[:n])
    catalogue = num_items(manifest)
    model = build_recommender(cfg, manifest, load_text_features(cfg))
    if args.init_from:
        init_from_saved(model, Path(args.init_from), manifest["content_hash"], key="--init-from")
    optimizer = build_optimizer(model, cfg.train)
    # the configured run's warm-up (one worker), then the peak lr: a probe has no end to decay towards
    scheduler = build_scheduler(optimizer, dataclasses.replace(cfg.train, schedule="constant"),
                                steps_per_epoch(cfg, len(train), world_size=1))
    device = torch.device("cpu")
    pairs = TrainingPairs(cfg, model.mask_id, cfg.train.seed)  # the recipe's batches (and earlier items)
    rows, start = [], time.time()
    for epoch in range(args.epochs):
        refresh_text_cache(model.items)  # a trainable LM tower's output cache, as the recipe does
        batches = (pairs(batch) for batch in shuffled_batches(
            train, cfg.train.batch_size, cfg.model.max_len, cfg.data.length_buckets, rng))
        stats = train_one_epoch(model, batches, optimizer, scheduler, cfg, device, autocast_for(cfg, device))
        metrics = evaluate(model, valid, catalogue, cfg.eval, cfg.model.max_len, device)
        row = {"epoch": epoch, "steps": scheduler.last_epoch,
               "train_loss": round(stats["loss_sum"] / max(stats["positions"], 1), 4),
               "valid_ndcg_at_10": round(metrics["ndcg_at_10"], 4), "seconds": round(time.time() - start, 1),
               **{k: round(v, 4) for k, v in metrics.items() if k.startswith(("cold_ndcg_at_10", "freq_"))
                  and k.endswith("ndcg_at_10")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.save:
        save_checkpoint(model, cfg, manifest, Path(args.save))
    if args.cold_report:
        print(json.dumps({"cold_report": cold_report(model, cfg, manifest, valid)}), flush=True)
    return rows


if __name__ == "__main__":
    main()
