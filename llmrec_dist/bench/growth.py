"""Cost growth with data size: generate, ``prepare --stream`` and one training epoch at 10^6..10^8 interactions.

Each step runs as its own process, as a user runs it, and is measured from outside: wall time and the
process's peak RSS (``os.wait4``) for the generator and ``prepare``; for training, the ``train`` command's
wall time and, from the MLflow run, the epoch's training seconds, sequences/s, validation seconds over
``eval.max_users`` users of the full catalogue, and every worker's peak RSS. Sizes above
``--train-max`` are prepared but not trained for a whole epoch (it would take hours on a small machine):
their epoch is extrapolated from the largest trained size, and says so; their evaluation is still
measured, by a run that trains on ``EVAL_ONLY_USERS`` users only (``data.holdout_users`` leaves the
rest out) and then validates ``eval.max_users`` users over the whole catalogue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = [("interactions", "interactions", ","), ("users", "users", ","), ("items", "items", ","),
           ("generate_seconds", "generate s", ".1f"), ("prepare_seconds", "prepare s", ".1f"),
           ("prepare_rows_per_s", "prepare rows/s", ",.0f"), ("prepare_peak_mb", "prepare peak MB", ",.0f"),
           ("train_seconds", "epoch train s", ".1f"), ("train_interactions_per_s", "train interactions/s", ",.0f"),
           ("worker_peak_mb", "worker peak MB", ",.0f"), ("eval_users_per_s", "eval users/s", ".1f")]


EVAL_ONLY_USERS = 10_000


def measured(command: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``command``; its wall seconds, exit code, peak RSS (MB, this process and the children it
    waited for) and the tail of its output."""
    started = time.perf_counter()
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(command, stdin=devnull, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd)
        output = proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - started, "code": proc.returncode,
            "peak_mb": usage.ru_maxrss / 1024, "tail": output[-2000:]}


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmrec_dist.cli", *args]


def run_size(interactions: int, items: int, work: Path, config: str | None, overrides: list[str],
             train: bool, seed: int = 0) -> dict:
    users = max(1, interactions // 10)
    raw, data = work / f"raw-{interactions}", work / f"data-{interactions}"
    row: dict = {"interactions": interactions, "users": users, "items": items}
    if not (raw / "items.parquet").exists():
        step = measured(_python(
            "import json; from llmrec_dist.data.streaming import generate_interactions; "
            f"print(json.dumps(generate_interactions({str(raw)!r}, users={users}, items={items}, "
            f"interactions={interactions}, seed={seed})))"))
        if step["code"]:
            raise RuntimeError(f"generating {interactions:,} interactions failed:\n{step['tail']}")
        row.update(generate_seconds=step["seconds"], generate_peak_mb=step["peak_mb"])
    step = measured(_cli("prepare", "--source", "generic", "--stream", "--interactions", str(raw / "interactions"),
                         "--items", str(raw / "items.parquet"), "--text-cols", "title", "--output", str(data),
                         "--overwrite"))
    if step["code"]:
        raise RuntimeError(f"prepare at {interactions:,} interactions failed:\n{step['tail']}")
    manifest = json.loads((data / "manifest.json").read_text())
    row.update(prepare_seconds=step["seconds"], prepare_peak_mb=step["peak_mb"],
               prepare_rows_per_s=manifest["counts"]["raw_interactions"] / step["seconds"],
               prepared=manifest["counts"], parts_per_split=len(manifest["shards"]["train"]),
               dataset_mb=sum(f.stat().st_size for f in data.rglob("*.parquet")) / 2**20)
    row["trained"] = train
    if config is None:
        return row
    share = max(0.0, 1 - EVAL_ONLY_USERS / manifest["counts"]["users"])
    holdout = [] if train else [f"data.holdout_users={share:.6f}"]
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    name = f"growth-{interactions}" + ("" if train else "-eval")
    step = measured(_cli("train", "--config", config, *overrides, *holdout, f"data.path={data}", "train.epochs=1",
                         f"train.storage_path={work / 'runs'}", f"mlflow.tracking_uri={tracking}",
                         "mlflow.experiment=llmrec-bench-growth", f"mlflow.run_name={name}",
                         "mlflow.registered_model="))
    if step["code"]:
        raise RuntimeError(f"training at {interactions:,} interactions failed:\n{step['tail']}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("llmrec-bench-growth")
    run = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    m = run.data.metrics
    peaks = [v for k, v in m.items() if k.startswith("peak_rss_mb_rank")]
    valid_users = m.get("valid_users")
    if train:
        row.update(train_command_seconds=step["seconds"], train_seconds=m["train_seconds"],
                   train_sequences=m["train_sequences"], sequences_per_s=m["sequences_per_s"],
                   train_interactions_per_s=manifest["counts"]["train_interactions"] / m["train_seconds"])
    else:
        row["eval_only_trained_sequences"] = m["train_sequences"]
    row.update(worker_peak_mb=max(peaks) if peaks else None, worker_peaks_mb=peaks,
               valid_seconds=m.get("valid_seconds"), valid_users=valid_users,
               eval_users_per_s=(valid_users / m["valid_seconds"]) if valid_users and m.get("valid_seconds") else None,
               valid_ndcg_at_10=m.get("valid_ndcg_at_10"), run_id=run.info.run_id)
    return row


def growth_summary(rows: list[dict]) -> dict:
    """Ratios from the smallest to the largest size: time per interaction (1.0 = linear) and peak RSS."""
    prepared = [r for r in rows if "prepare_seconds" in r]
    out: dict = {}
    if len(prepared) >= 2:
        a, b = prepared[0], prepared[-1]
        scale = b["interactions"] / a["interactions"]
        out["prepare_time_ratio_per_interaction"] = (b["prepare_seconds"] / a["prepare_seconds"]) / scale
        out["prepare_peak_ratio"] = b["prepare_peak_mb"] / a["prepare_peak_mb"]
        out["prepare_peak_goal_met"] = out["prepare_peak_ratio"] <= 1.2
    trained = [r for r in rows if r.get("trained")]
    if len(trained) >= 2:
        a, b = trained[0], trained[-1]
        scale = b["interactions"] / a["interactions"]
        out["train_time_ratio_per_interaction"] = (b["train_seconds"] / a["train_seconds"]) / scale
        out["worker_peak_ratio"] = b["worker_peak_mb"] / a["worker_peak_mb"]
    if trained:
        last = trained[-1]
        out["extrapolated_epoch_seconds"] = {
            str(r["interactions"]): r["prepared"]["train_interactions"] / last["train_interactions_per_s"]
            for r in rows if not r.get("trained")}
    return out
