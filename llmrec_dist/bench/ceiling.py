"""The machine's own ceiling for 1 → 2 worker scaling: the training step with no Ray, no DDP, no data
pipeline and no all-reduce, in plain processes of one thread each (``scaling.cpus_per_worker``).

Three cases, each in fresh interpreters, on the same rows of the train split:

- ``solo_full``: one process steps the full batch (``train.batch_size``), as the 1-worker run does;
- ``solo_half``: one process steps half of each of those batches (every other row), as one of two
  workers does, with the other core idle;
- ``pair_half``: two processes at once, one half each; they start their timed steps together (a file
  barrier) and keep stepping untimed until both are done, so each is timed under the other's load.

``ceiling = pair_half / (2 × solo_full)`` is the best scaling efficiency the training step itself can
reach on this machine. It splits into the cost of the smaller per-worker batch (``batch_effect =
solo_half / solo_full``) and that of two processes sharing the machine's caches, memory bandwidth and
hypervisor (``contention = pair_half / (2 × solo_half)``). What `bench speed` measures below the
ceiling is the framework's: DDP's all-reduce, Ray Data, Ray's own processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

BARRIER_TIMEOUT_S = 600.0


def _wait_for(folder: Path, prefix: str, count: int) -> None:
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(folder.glob(prefix + "*"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: fewer than {count} {prefix}* files after {BARRIER_TIMEOUT_S:.0f} s")
        time.sleep(0.01)


def half_batches(rows: list, batch_size: int, max_len: int, length_buckets: int, seed: int, part: int,
                 parts: int):
    """The training batches of one epoch (shuffled, length-bucketed, as the recipe makes them), each
    cut to its rows ``part::parts``: every part gets rows of the same lengths."""
    import numpy as np

    from llmrec_dist.batching import shuffled_batches

    for batch in shuffled_batches(rows, batch_size, max_len, length_buckets, np.random.default_rng(seed)):
        if len(batch) == batch_size:  # the short last batch of a chunk would time a different size
            yield batch[part::parts]


def measure_steps(config: str, overrides: list[str], steps: int, warmup: int = 2, part: int = 0, parts: int = 1,
                  barrier: str = "", peers: int = 1) -> dict:
    """Time ``steps`` training steps (forward, loss, backward, clipping, optimiser) of ``config`` in this
    process after ``warmup`` untimed ones. With ``barrier`` (a folder shared by ``peers`` processes) the
    timed steps start when every peer is ready, and this process keeps stepping until every peer is done.
    Call it in a fresh interpreter (see :func:`run_case`)."""
    import torch

    from llmrec_dist.batching import next_item_batch
    from llmrec_dist.config import load_config
    from llmrec_dist.data.dataset_format import read_manifest, read_split
    from llmrec_dist.text_tower import load_text_features
    from llmrec_dist.worker.optim import build_optimizer, build_scheduler
    from llmrec_dist.worker.recipe import autocast_for, build_recommender, train_one_epoch

    cfg = load_config(config, overrides)
    if cfg.model.backbone != "causal":
        raise ValueError("the ceiling is measured for the causal backbone")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    manifest = read_manifest(cfg.data.path)
    rows = read_split(cfg.data.path, "train").column("items").to_pylist()
    model = build_recommender(cfg, manifest, load_text_features(cfg))
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, dataclasses.replace(cfg.train, schedule="constant", warmup_ratio=0.0),
                                steps_per_epoch=1)
    device, amp = torch.device("cpu"), autocast_for(cfg, torch.device("cpu"))
    batches = itertools.cycle(list(itertools.islice(
        half_batches(rows, cfg.train.batch_size, cfg.model.max_len, cfg.data.length_buckets, cfg.train.seed,
                     part, parts), warmup + steps)))

    def run(n: int) -> dict:
        pairs = (next_item_batch(b, cfg.model.max_len) for b in itertools.islice(batches, n))
        return train_one_epoch(model, pairs, optimizer, scheduler, cfg, device, amp)

    run(warmup)
    folder = Path(barrier) if barrier else None
    if folder:
        (folder / f"ready-{part}").touch()
        _wait_for(folder, "ready-", peers)
    started = time.perf_counter()
    stats = run(steps)
    seconds = time.perf_counter() - started
    if folder:
        (folder / f"done-{part}").touch()
        while len(list(folder.glob("done-*"))) < peers:  # keep the load on until every peer is timed
            run(1)
    return {"part": part, "parts": parts, "rows_per_step": stats["sequences"] / steps, "steps": steps,
            "seconds": seconds, "sequences_per_s": stats["sequences"] / seconds, "ms_per_step": 1000 * seconds / steps}


def run_case(config: str, overrides: list[str], steps: int, parts: int, processes: int, warmup: int = 2) -> list[dict]:
    """:func:`measure_steps` in ``processes`` fresh interpreters at once (parts 0 .. processes-1 of
    ``parts``); one result per process."""
    code = ("import json, sys; from llmrec_dist.bench.ceiling import measure_steps; "
            "print(json.dumps(measure_steps(**json.loads(sys.argv[1]))))")
    with tempfile.TemporaryDirectory(prefix="llmrec-ceiling-") as barrier:
        procs = []
        for part in range(processes):
            args = {"config": config, "overrides": overrides, "steps": steps, "warmup": warmup, "part": part,
                    "parts": parts, "barrier": barrier if processes > 1 else "", "peers": processes}
            procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        results = []
        for proc in procs:
            out, err = proc.communicate()
            if proc.returncode != 0:
                for other in procs:
                    other.kill()
                tail = "\n".join(err.strip().splitlines()[-5:])
                raise RuntimeError(f"ceiling case ({processes} process(es), 1/{parts} batch) failed "
                                   f"(exit {proc.returncode}):\n{tail}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def ceiling_figures(solo_full: float, solo_half: float, pair_half: float) -> dict:
    """Sequences/s of the three cases → the ceiling and its two factors."""
    return {"solo_full_sequences_per_s": solo_full, "solo_half_sequences_per_s": solo_half,
            "pair_half_sequences_per_s": pair_half, "ceiling_1_to_2": pair_half / (2 * solo_full),
            "batch_effect": solo_half / solo_full, "contention": pair_half / (2 * solo_half)}


def run_ceiling(config: str, overrides: list[str], steps: int = 20, warmup: int = 2) -> dict:
    """The three cases, one after the other; see the module docstring."""
    solo_full = run_case(config, overrides, steps, parts=1, processes=1, warmup=warmup)
    solo_half = run_case(config, overrides, steps, parts=2, processes=1, warmup=warmup)
    pair = run_case(config, overrides, steps, parts=2, processes=2, warmup=warmup)
    figures = ceiling_figures(solo_full[0]["sequences_per_s"], solo_half[0]["sequences_per_s"],
                              sum(r["sequences_per_s"] for r in pair))
    figures["cases"] = {"solo_full": solo_full, "solo_half": solo_half, "pair_half": pair}
    figures["steps"] = steps
    log.info("ceiling: %s", json.dumps({k: v for k, v in figures.items() if k != "cases"}))
    return figures


COLUMNS = [("case", "case", ""), ("processes", "processes", "d"), ("rows_per_step", "rows/step", ".0f"),
           ("ms_per_step", "ms/step", ".0f"), ("sequences_per_s", "seq/s", ".1f")]


def case_table(figures: dict) -> list[dict]:
    """One row per case: processes, rows per step, ms per step (slowest process), total seq/s."""
    out = []
    for name, results in figures["cases"].items():
        out.append({"case": name, "processes": len(results), "rows_per_step": results[0]["rows_per_step"],
                    "ms_per_step": max(r["ms_per_step"] for r in results),
                    "sequences_per_s": sum(r["sequences_per_s"] for r in results)})
    return out
