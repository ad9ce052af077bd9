"""Training speed and scaling: the same run with 1 and with 2 Ray workers, each a real
``llmrec-dist train`` command in its own process (so start-up is measured from the command's start).

Per worker count: sequences/s and seconds per epoch of the last epoch (epoch 0 carries the warm-up and
the profiled steps), time from the command's start and from ``ray.init`` to the first optimiser step,
the per-step breakdown of ``train.profile_steps`` profiled steps (data, forward, loss, backward,
all-reduce, optimiser) and of the epoch (training, validation, checkpoint + report), and each worker's
peak RSS. Scaling efficiency = throughput(2 workers) / (2 × throughput(1 worker)), 1 core per worker.
With both worker counts, the machine's own ceiling for that efficiency is measured too (the bare
training step in plain processes, :mod:`llmrec_dist.bench.ceiling`), and the scaling is given as a
share of it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

log = logging.getLogger(__name__)

PROFILE_PHASES = ("data", "forward", "loss", "backward", "allreduce", "optimizer")
# What the run logs as startup_<name>_at_s (seconds after ray.init), in the order they are reached:
# Ray up; Ray Dataset + TorchTrainer built on the driver; rank 0 entered the loop (controller and worker
# group started, recipe imported); model + optimiser built; evaluation rows read; first batch; first step.
STARTUP_MILESTONES = ("ray_ready", "trainer_built", "loop_start", "model_ready", "eval_rows_ready",
                      "first_batch", "first_step")


def train_command(config: str, overrides: list[str], workers: int, epochs: int, profile_steps: int) -> list[str]:
    return [sys.executable, "-c", "import sys; from llmrec_dist.cli import main; sys.exit(main())",
            "train", "--config", config, *overrides, f"scaling.num_workers={workers}",
            f"train.epochs={epochs}", "train.patience=0", "mlflow.registered_model=",
            f"mlflow.run_name=bench-speed-{workers}w", f"train.profile_steps={profile_steps}", "--json"]


def parse_outcome(stdout: str) -> dict:
    """The ``--json`` outcome: the last top-level JSON object printed (Ray's log lines come before)."""
    start = stdout.rfind("\n{\n")
    text = stdout[start + 1:] if start >= 0 else stdout if stdout.startswith("{") else ""
    if not text:
        raise ValueError("no JSON outcome in the train command's output")
    return json.loads(text)


def run_figures(tracking_uri: str, run_id: str) -> dict:
    """The figures of one run, read back from MLflow."""
    from llmrec_dist.tracking import client

    c = client(tracking_uri)
    metrics = c.get_run(run_id).data.metrics

    def last(key):
        history = sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        return history[-1].value if history else None

    out = {
        "sequences_per_s": last("sequences_per_s"),
        "epoch_seconds": last("epoch_seconds"),
        "train_seconds": last("train_seconds"),
        "valid_seconds": last("valid_seconds"),
        "checkpoint_report_seconds": last("checkpoint_report_seconds"),
        "startup_seconds": metrics.get("startup_seconds"),
        "ray_init_to_first_step_seconds": metrics.get("ray_init_to_first_step_seconds"),
        "peak_rss_mb": metrics.get("peak_rss_mb"),
        "peak_rss_mb_per_worker": [metrics[k] for k in sorted(
            (k for k in metrics if k.startswith("peak_rss_mb_rank")), key=lambda k: int(k.rsplit("rank", 1)[1]))],
        "profile_ms_per_step": {p: metrics[f"profile_{p}_ms"] for p in PROFILE_PHASES
                                if f"profile_{p}_ms" in metrics},
        "profile_step_ms": metrics.get("profile_step_ms"),
        "startup_milestones_s": {name: metrics[f"startup_{name}_at_s"] for name in STARTUP_MILESTONES
                                 if f"startup_{name}_at_s" in metrics},
        "test_ndcg_at_10": metrics.get("test_ndcg_at_10"),
    }
    return out


def run_speed(config: str, overrides: list[str], workers=(1, 2), epochs: int = 2, profile_steps: int = 20,
              ceiling_steps: int = 20) -> dict:
    rows = []
    for w in workers:
        cmd = train_command(config, overrides, w, epochs, profile_steps)
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"train with {w} worker(s) failed (exit {proc.returncode}):\n" + "\n".join(tail))
        outcome = parse_outcome(proc.stdout)
        row = {"workers": w, "command_seconds": wall, "run_id": outcome["run_id"],
               **run_figures(outcome["tracking_uri"], outcome["run_id"])}
        rows.append(row)
        log.info("speed: %s", json.dumps(row))
    figures = {"rows": rows, "epochs": epochs, "profile_steps": profile_steps, **scaling(rows)}
    if ceiling_steps and "scaling_efficiency_1_to_2" in figures:
        from llmrec_dist.bench.ceiling import run_ceiling

        figures["machine_ceiling"] = run_ceiling(config, overrides, steps=ceiling_steps)
        figures.update(against_ceiling(figures))
    return figures


def against_ceiling(figures: dict) -> dict:
    """The measured scaling as a share of the machine's ceiling (:mod:`llmrec_dist.bench.ceiling`):
    what DDP, Ray Data and Ray's processes keep of what the bare training step could reach."""
    ceiling = figures.get("machine_ceiling", {}).get("ceiling_1_to_2")
    if not ceiling or "scaling_efficiency_1_to_2" not in figures:
        return {}
    return {"scaling_share_of_ceiling": figures["scaling_efficiency_1_to_2"] / ceiling}


def scaling(rows: list[dict]) -> dict:
    """Scaling efficiency from 1 to 2 workers: throughput₂ / (2 × throughput₁)."""
    by = {r["workers"]: r.get("sequences_per_s") for r in rows}
    if by.get(1) and by.get(2):
        return {"scaling_efficiency_1_to_2": by[2] / (2 * by[1]), "speedup_1_to_2": by[2] / by[1]}
    return {}


COLUMNS = [("workers", "workers", "d"), ("sequences_per_s", "seq/s", ".1f"), ("epoch_seconds", "s/epoch", ".1f"),
           ("train_seconds", "train s", ".1f"), ("valid_seconds", "valid s", ".1f"),
           ("startup_seconds", "start→1st step s", ".1f"),
           ("ray_init_to_first_step_seconds", "ray.init→1st step s", ".1f"),
           ("peak_rss_mb", "peak RSS MB", ",.0f"), ("command_seconds", "command s", ".0f")]


def profile_table(rows: list[dict]) -> list[dict]:
    """One row per (workers, phase): ms per step and share of the profiled step."""
    out = []
    for r in rows:
        step = r.get("profile_step_ms") or 0
        for phase, ms in r.get("profile_ms_per_step", {}).items():
            out.append({"workers": r["workers"], "phase": phase, "ms_per_step": ms,
                        "share": ms / step if step else None})
    return out


def startup_table(rows: list[dict]) -> list[dict]:
    """One row per (workers, milestone): when it was reached and how long since the previous one."""
    out = []
    for r in rows:
        previous = 0.0
        for name, at in r.get("startup_milestones_s", {}).items():
            out.append({"workers": r["workers"], "milestone": name, "at_s": at, "took_s": at - previous})
            previous = at
    return out


STARTUP_COLUMNS = [("workers", "workers", "d"), ("milestone", "after ray.init", ""), ("at_s", "at s", ".1f"),
                   ("took_s", "took s", ".1f")]
PROFILE_COLUMNS = [("workers", "workers", "d"), ("phase", "phase", ""), ("ms_per_step", "ms/step", ".1f"),
                   ("share", "share of step", ".1%")]
