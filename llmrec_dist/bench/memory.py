"""Catalogue-size scaling of the output head: full softmax vs sampled softmax.

For each catalogue size N (synthetic, Zipf-distributed item popularity) and each loss, one fresh Python
process builds the SASRec model of the ml-1m reference settings (hidden 64, 2 blocks, max length 200)
and runs a few training steps (forward, loss, backward, AdamW) on one worker's batch (64 sequences × 200
positions). It reports seconds per step and the process's peak RSS. Full softmax materialises
``positions × N`` logits (and as much again for their gradient), so it is only run where that fits in
half the machine's memory; elsewhere the table shows the estimate. Sampled softmax scores the step's
distinct targets plus ``num_negatives`` uniform negatives.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
BYTES = 4  # fp32


def full_softmax_bytes(positions: int, num_items: int) -> int:
    """Logits, their softmax and their gradient: three ``positions × (N + 1)`` fp32 tensors."""
    return 3 * positions * (num_items + 1) * BYTES


def zipf_sequences(num_items: int, batch: int, length: int, seed: int = 0):
    """``batch`` sequences of ``length`` + 1 item ids drawn with popularity ∝ 1 / rank."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_items + 1)
    p /= p.sum()
    return rng.choice(np.arange(1, num_items + 1), size=(batch, length + 1), p=p)


def measure_head(num_items: int, loss: str, batch: int = 64, length: int = 200, steps: int = 3,
                 hidden: int = 64, num_negatives: int = 256, threads: int = 1) -> dict:
    """Train ``steps`` steps in this process and return seconds per step (after one warm-up step),
    the peak RSS and the RSS before the model existed. Call it in a fresh process (see :func:`run_one`)."""
    import torch

    from llmrec_dist.config import ModelConfig
    from llmrec_dist.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = ModelConfig(hidden_size=hidden, num_layers=2, num_heads=1, max_len=length, dropout=0.2)
    model = build_model(cfg, num_items, num_negatives=num_negatives if loss == "sampled" else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seqs = torch.from_numpy(zipf_sequences(num_items, batch, length))
    inputs, targets = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = model(inputs, targets)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {"num_items": num_items, "loss": loss, "positions": batch * length,
            "seconds_per_step": sum(times[1:]) / steps, "peak_rss_mb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, "baseline_rss_mb": base_mb,
            "params": params, "final_loss": float(out["loss"])}


def run_one(num_items: int, loss: str, **kwargs) -> dict:
    """:func:`measure_head` in a fresh interpreter, so that peak RSS belongs to this one case."""
    code = ("import json, sys; from llmrec_dist.bench.memory import measure_head; "
            "print(json.dumps(measure_head(**json.loads(sys.argv[1]))))")
    args = json.dumps({"num_items": num_items, "loss": loss, **kwargs})
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(kwargs.get("threads", 1))})
    if proc.returncode != 0:
        return {"num_items": num_items, "loss": loss, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_memory_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def head_scaling(sizes=DEFAULT_SIZES, batch: int = 64, length: int = 200, steps: int = 3,
                 num_negatives: int = 256) -> dict:
    """Both losses at every size; full softmax skipped where its logits would not fit in half the
    available memory. Returns the rows and the crossover: the smallest size where sampled softmax is
    faster per step, and the smallest where full softmax does not fit."""
    budget = available_memory_bytes() // 2
    rows = []
    for n in sizes:
        for loss in ("full", "sampled"):
            estimate = full_softmax_bytes(batch * length, n) if loss == "full" else None
            if estimate is not None and estimate > budget:
                row = {"num_items": n, "loss": loss, "skipped": "does not fit",
                       "logits_gib_estimate": estimate / 2**30}
            else:
                row = run_one(n, loss, batch=batch, length=length, steps=steps, num_negatives=num_negatives)
                if estimate is not None:
                    row["logits_gib_estimate"] = estimate / 2**30
            rows.append(row)
            log.info("softmax head: %s", json.dumps(row))
    return {"rows": rows, **crossover(rows), "memory_budget_gib": budget / 2**30,
            "batch_sequences": batch, "sequence_length": length, "num_negatives": num_negatives}


def crossover(rows: list[dict]) -> dict:
    """Where sampled softmax takes over: the first size at which it is faster per step than full
    softmax, and the first at which full softmax does not fit."""
    by = {(r["num_items"], r["loss"]): r for r in rows}
    sizes = sorted({r["num_items"] for r in rows})
    faster = no_fit = None
    for n in sizes:
        full, sampled = by.get((n, "full"), {}), by.get((n, "sampled"), {})
        if no_fit is None and full.get("skipped"):
            no_fit = n
        if faster is None and "seconds_per_step" in sampled and (
                full.get("skipped") or sampled["seconds_per_step"] < full.get("seconds_per_step", 0)):
            faster = n
    return {"sampled_faster_from": faster, "full_does_not_fit_from": no_fit}


COLUMNS = [("num_items", "items", ","), ("loss", "loss", ""), ("seconds_per_step", "s/step", ".3f"),
           ("peak_rss_mb", "peak RSS MB", ",.0f"), ("logits_gib_estimate", "full logits GiB (est.)", ".2f"),
           ("skipped", "note", "")]
