"""Peak memory of a training worker with a trainable LM tower, measured against the pre-flight estimate.

``llmrec-dist bench lm-memory --config CFG data.path=DIR`` runs one fresh Python process per case
(freezing strategy x per-worker batch size x ``train.lm_items_per_step``). Each builds the worker's model
exactly as the training recipe does (text features, model, AdamW), then runs the phases a worker goes
through, in this order, recording the process's peak resident memory after each:

  setup        text features, model and optimiser built
  steps        the epoch's largest training steps (one worker's epoch cut as training cuts it; the
               ``--steps`` batches with the most distinct items) and two ordinary ones
  evaluation   a refresh of the LM output cache and a validation pass over ``--eval-users`` users
  checkpoint   the weights, best weights and optimiser state written as a checkpoint

and prints the measured peak next to :func:`llmrec_dist.train.memory.estimate_worker_memory`'s
estimate for the same process (no Ray: the worker's Ray overhead is not in either figure), the
seconds per step and the distinct items per step. A least-squares line through the measured peaks
against the LM items of a step gives the slope (MB per item through the LM per step) per strategy.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _peak_mb() -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM, which counts from this process's exec.
    ``ru_maxrss`` also holds the parent's: a child started with fork/vfork + exec inherits its parent's
    peak, so a case run from a larger parent (a test session) reported the parent's peak in every phase."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_case(config: str, overrides: list[str], steps: int = 2, eval_users: int = 2048,
                 threads: int = 2, seed: int = 0) -> dict:
    """Measure one case in this process (call it in a fresh one: :func:`run_case`)."""
    import numpy as np
    import torch

    from llmrec_dist.batching import shuffled_batches
    from llmrec_dist.config import load_config
    from llmrec_dist.data.dataset_format import num_items, read_manifest, read_split
    from llmrec_dist.evaluation import EvalRows, evaluate, load_eval_rows
    from llmrec_dist.model import count_parameters
    from llmrec_dist.sharding import refresh_text_cache
    from llmrec_dist.text_tower import load_text_features
    from llmrec_dist.worker import checkpoint as ckpt
    from llmrec_dist.train.memory import estimate_worker_memory, lm_shape, peak_step
    from llmrec_dist.worker.optim import build_optimizer, build_scheduler
    from llmrec_dist.worker.recipe import TrainingPairs, autocast_for, build_recommender, train_one_epoch
    from llmrec_dist.train.training_rows import windowed_table

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    marks = {"start": _peak_mb()}
    cfg = load_config(config, overrides)
    manifest = read_manifest(cfg.data.path)
    table = read_split(cfg.data.path, cfg.training_split())
    rows = (windowed_table(table, cfg) if cfg.data.windows else table).column("items").to_pylist()
    n_items = num_items(manifest)

    text = load_text_features(cfg)
    model = build_recommender(cfg, manifest, text)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, 1000)
    marks["setup"] = _peak_mb()

    # one worker's epoch, cut as training cuts it; its largest steps by distinct items, then two others
    rng = np.random.default_rng(seed)
    share = rows[::cfg.scaling.num_workers]
    pairs = TrainingPairs(cfg, model.mask_id, seed)
    batches = [pairs(b) for b in shuffled_batches(share, cfg.per_worker_batch_size(), cfg.model.max_len,
                                                   cfg.data.length_buckets, rng)]

    def distinct(batch) -> int:
        both = torch.cat([batch[0].reshape(-1), batch[1].reshape(-1)])
        return int(torch.unique(both[both != 0]).numel())

    order = sorted(range(len(batches)), key=lambda i: -distinct(batches[i]))
    chosen = order[:steps] + order[len(order) // 2:len(order) // 2 + 2]
    device = torch.device("cpu")
    t0 = time.perf_counter()
    stats = train_one_epoch(model, (batches[i] for i in chosen), optimizer, scheduler, cfg, device,
                            autocast_for(cfg, device))
    seconds_per_step = (time.perf_counter() - t0) / len(chosen)
    marks["steps"] = _peak_mb()

    t1 = time.perf_counter()
    refresh_text_cache(model.items)
    refresh_seconds = time.perf_counter() - t1
    valid = load_eval_rows(cfg.data.path, "valid")
    k = min(eval_users, len(valid))
    metrics = evaluate(model, EvalRows(valid.histories[:k], valid.targets[:k], valid.cold[:k]), n_items,
                       cfg.eval, cfg.model.max_len, device)
    marks["evaluation"] = _peak_mb()

    with tempfile.TemporaryDirectory() as tmp:
        weights = ckpt.cpu_state_dict(model)
        ckpt.write_checkpoint(Path(tmp), weights=weights,
                              best_weights=ckpt.cpu_state_dict(model), meta={}, state={
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        checkpoint_mb = ckpt.folder_bytes(Path(tmp)) / 2**20
    marks["checkpoint"] = _peak_mb()

    lm = lm_shape(cfg.model) if cfg.model.item_repr != "id" else None
    tokens = int(text.token_ids.shape[1]) if text is not None else None
    counts = count_parameters(model)
    held = counts["params_total"] - getattr(model.items, "external_params", 0)  # a frozen LM is not held
    step = peak_step(cfg, rows, seed=seed)
    estimate = estimate_worker_memory(cfg, n_items, step, lm, text_tokens=tokens, ray_worker=False,
                                      params={"params_held": held, "params_trainable": counts["params_trainable"]})
    lm_items = None
    if cfg.model.item_repr != "id" and cfg.model.freeze != "frozen":
        from llmrec_dist.model import softmax_negatives

        most = max(distinct(batches[i]) for i in chosen) + softmax_negatives(cfg.model, cfg.train)
        lm_items = min(cfg.train.lm_items_per_step, most) if cfg.train.lm_items_per_step else most
    return {"freeze": cfg.model.freeze if cfg.model.item_repr != "id" else "-", "item_repr": cfg.model.item_repr,
            "batch_per_worker": cfg.per_worker_batch_size(), "lm_items_per_step": cfg.train.lm_items_per_step,
            "lm_items": lm_items, "max_distinct_items": max(distinct(batches[i]) for i in chosen),
            "num_items": n_items, "text_tokens": tokens, "peak_rss_mb": marks["checkpoint"],
            "phase_peaks_mb": marks, "estimate_mb": estimate.total_mb, "estimate": estimate.as_dict(),
            "estimate_error": estimate.total_mb / marks["checkpoint"] - 1,
            "seconds_per_step": seconds_per_step, "refresh_seconds": refresh_seconds,
            "steps_per_epoch": len(batches), "train_loss": stats["loss_sum"] / max(stats["positions"], 1),
            "valid_ndcg_at_10": metrics["ndcg_at_10"], "checkpoint_mb": checkpoint_mb,
            "params_trainable": counts["params_trainable"], "params_total": counts["params_total"],
            "step_shape": dataclasses.asdict(step)}


def run_case(config: str, overrides: list[str], **kwargs) -> dict:
    """:func:`measure_case` in a fresh interpreter, so that the peak belongs to this case alone."""
    code = ("import json, sys; from llmrec_dist.bench.lm_memory import measure_case; "
            "a = json.loads(sys.argv[1]); print(json.dumps(measure_case(a.pop('config'), a.pop('overrides'), **a)))")
    payload = json.dumps({"config": config, "overrides": overrides, **kwargs})
    env = {**os.environ, "OMP_NUM_THREADS": str(kwargs.get("threads", 2)), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"overrides": overrides, "error": tail, "returncode": proc.returncode}
    return {"overrides": overrides, **json.loads(proc.stdout.strip().splitlines()[-1])}


def cases(strategies: list[str], batch_sizes: list[int], lm_items: list[int]) -> list[list[str]]:
    """Overrides of every case: each strategy at each global batch size (1 worker) and, for the strategies
    that run the LM in a step, each ``train.lm_items_per_step``."""
    out = []
    for freeze, batch in itertools.product(strategies, batch_sizes):
        base = [f"model.freeze={freeze}", f"train.batch_size={batch}", "scaling.num_workers=1"]
        if freeze == "id":
            out.append(["model.item_repr=id", f"train.batch_size={batch}", "scaling.num_workers=1"])
        elif freeze == "frozen":
            out.append(base)
        else:
            out.extend(base + [f"train.lm_items_per_step={m}"] for m in lm_items)
    return out


def fitted_slopes(rows: list[dict]) -> dict[str, dict]:
    """Per strategy, the least-squares line of measured peak MB against LM items per step."""
    out = {}
    for freeze in sorted({r["freeze"] for r in rows if r.get("lm_items")}):
        pts = [(r["lm_items"], r["peak_rss_mb"]) for r in rows if r.get("freeze") == freeze and r.get("lm_items")]
        if len({x for x, _ in pts}) < 2:
            continue
        n = len(pts)
        mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        out[freeze] = {"mb_per_lm_item": slope, "intercept_mb": my - slope * mx, "points": n}
    return out


COLUMNS = [("freeze", "freeze", ""), ("batch_per_worker", "batch", "d"), ("lm_items_per_step", "lm_items_per_step", "d"),
           ("lm_items", "LM items/step", ""), ("max_distinct_items", "distinct/step", "d"),
           ("peak_rss_mb", "peak MB", ",.0f"), ("estimate_mb", "estimate MB", ",.0f"),
           ("estimate_error", "est. error", "+.0%"), ("seconds_per_step", "s/step", ".2f"),
           ("steps_per_epoch", "steps/epoch", "d")]
