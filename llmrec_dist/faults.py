"""Fault injection for tests and the recovery benchmark: find a run's training worker processes through
Ray's State API and kill one, as a crashed process or a lost node would.

``python jobs/bench_fault_recovery.py --config configs/ml1m_sasrec.yaml data.path=DIR train.epochs=3``
runs the config twice, uninterrupted and with one worker SIGKILLed after the first checkpointed epoch,
and prints the wall time lost, the restart epoch and the per-epoch checkpoint size and write times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from llmrec_dist.config import load_config


def training_worker_pids(address: str) -> list[int]:
    """PIDs of the live Ray Train workers of the cluster at ``address`` (its GCS address)."""
    from ray.util.state import list_actors

    actors = list_actors(address=address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def _poll(found, alive, timeout: float, what: str):
    """``found()``'s first truthy value, polled every 0.2 s while ``alive()``; TimeoutError naming ``what``."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        value = found()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} (waited {timeout:.0f} s or the run ended)")


def wait_for_run_file(storage_path: str | Path, alive=lambda: True, timeout: float = 600) -> dict:
    """The ``run.json`` of the one training run under a local ``storage_path`` (written at its start)."""
    def found():
        files = list(Path(storage_path).glob("train-*/run.json"))
        return json.loads(files[0].read_text()) if files else None

    return _poll(found, alive, timeout, f"no run.json appeared under {storage_path}")


def wait_for_step(client, run_id: str, key: str, step: int, alive=lambda: True, timeout: float = 600) -> None:
    """Block until MLflow run ``run_id`` has ``key`` logged at ``step`` or later."""
    _poll(lambda: any(m.step >= step for m in client.get_metric_history(run_id, key)), alive, timeout,
          f"{key} never reached step {step} in run {run_id}")


def wait_for_checkpoint(run_folder: str | Path, epoch: int, alive=lambda: True, timeout: float = 600) -> None:
    """Block until Ray Train's controller has recorded the checkpoint of ``epoch`` (its
    ``checkpoint_manager_snapshot.json`` in the run folder): from then on a restart resumes after it.
    A checkpoint reported by the workers is recorded a moment later, by the controller."""
    snapshot = Path(run_folder) / "checkpoint_manager_snapshot.json"

    def recorded():
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # not written yet, or being rewritten
            return False
        return latest.get("metrics", {}).get("epoch", -1) >= epoch

    _poll(recorded, alive, timeout, f"Ray Train never recorded the checkpoint of epoch {epoch} in {run_folder}")


def train_with_worker_kill(cfg, address: str, after_epoch: int = 0):
    """Train ``cfg`` (local storage path) and SIGKILL one training worker once epoch ``after_epoch`` is
    checkpointed and logged. Returns (outcome, run_id, killed pid)."""
    from llmrec_dist.tracking import client
    from llmrec_dist.train.launcher import run_name, train

    result, errors = {}, []

    def run():
        try:
            result["outcome"] = train(cfg)
        except BaseException as err:  # re-raised in the caller's thread below
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    alive = lambda: not errors  # noqa: E731
    state = wait_for_run_file(cfg.train.storage_path, alive)
    wait_for_step(client(state["tracking_uri"]), state["run_id"], cfg.selection_metric(), after_epoch, alive)
    wait_for_checkpoint(Path(cfg.train.storage_path) / run_name(state["run_id"]), after_epoch, alive)
    pids = training_worker_pids(address)
    if not pids:
        raise RuntimeError("no live training worker to kill")
    os.kill(pids[-1], signal.SIGKILL)
    thread.join()
    if errors:
        raise errors[0]
    return result["outcome"], state["run_id"], pids[-1]


def _epoch_series(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def main(argv: list[str] | None = None) -> int:
    import ray

    from llmrec_dist.ray_setup import init_ray
    from llmrec_dist.tracking import client
    from llmrec_dist.train.launcher import train

    parser = argparse.ArgumentParser(
        prog="bench_fault_recovery", description="Time lost to one injected worker failure: the config "
        "trained uninterrupted, then again with one training worker SIGKILLed after the first epoch.")
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--workdir", default="bench-fault-recovery", help="storage and MLflow folder")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.path=DIR")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    figures = {}
    for label in ("uninterrupted", "worker_killed"):
        cfg = load_config(args.config, [*args.overrides, f"train.storage_path={work / label}",
                                        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                                        "mlflow.registered_model=", "train.patience=0",
                                        f"mlflow.run_name=fault-bench-{label}"])
        init_ray(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
        started = time.perf_counter()
        if label == "uninterrupted":
            outcome = train(cfg)
        else:
            outcome, _, _ = train_with_worker_kill(cfg, ray.get_runtime_context().gcs_address)
        c = client(outcome.tracking_uri)
        figures[label] = {
            "wall_s": round(time.perf_counter() - started, 1), "run_id": outcome.run_id,
            "test_ndcg_at_10": outcome.metrics["test_ndcg_at_10"],
            "resumed_at_epoch": [int(v) for v in _epoch_series(c, outcome.run_id, "resumed_at_epoch")],
            **{name: [round(v, digits) for v in _epoch_series(c, outcome.run_id, key)] for name, key, digits in (
                ("epoch_seconds", "epoch_seconds", 1),
                ("checkpoint_mb", "checkpoint_mb", 2), ("checkpoint_write_s", "checkpoint_write_seconds", 3),
                ("checkpoint_report_s", "checkpoint_report_seconds", 3))},
        }
        print(json.dumps({label: figures[label]}), flush=True)
    lost = figures["worker_killed"]["wall_s"] - figures["uninterrupted"]["wall_s"]
    print(f"\ntime lost to one worker failure: {lost:.1f} s "
          f"({figures['worker_killed']['wall_s']:.1f} s vs {figures['uninterrupted']['wall_s']:.1f} s); "
          f"same test NDCG@10: {figures['worker_killed']['test_ndcg_at_10']:.6f} vs "
          f"{figures['uninterrupted']['test_ndcg_at_10']:.6f}")
    return 0
