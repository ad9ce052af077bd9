"""Faults a cluster has, injected for real on the session's local Ray:

- a training worker process is SIGKILLed mid-run: Ray Train restarts the worker group from the latest
  checkpoint (``train.max_failures``), the run ends with every epoch logged exactly once, and its metrics
  equal an uninterrupted run with the same seed;
- the driver is SIGKILLed mid-run: ``llmrec-dist train --resume FOLDER`` continues from the latest
  checkpoint in the same MLflow run, with the same end result.

Run only these (and the multi-node tests) with ``pytest -m "cluster or fault"``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmrec_dist.config import load_config
from llmrec_dist.faults import train_with_worker_kill, wait_for_step
from mlflow_db import sqlite_uri

pytestmark = [pytest.mark.fault, pytest.mark.integration]

EPOCHS = 3
# Small but not instant: an epoch lasts a few seconds, so a kill lands inside a run, not after it.
CONFIG = {
    "model": {"item_repr": "id", "hidden_size": 32, "num_heads": 2, "num_layers": 2, "max_len": 30,
              "dropout": 0.2},
    "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 3e-3, "patience": 0, "seed": 7, "max_failures": 2},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    "mlflow": {"experiment": "faults", "registered_model": ""},
}
QUALITY = ("valid_ndcg_at_10", "valid_hr_at_10", "valid_mrr_at_10", "train_loss")
FINAL = ("test_ndcg_at_10", "test_hr_at_10", "test_mrr_at_10", "best_valid_ndcg_at_10")


def _config_file(folder: Path, dataset: Path, tracking_uri: str) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(CONFIG))
    raw["data"] = {"path": str(dataset)}
    raw["train"]["storage_path"] = str(folder / "runs")
    raw["mlflow"]["tracking_uri"] = tracking_uri
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_same_run_as(baseline, client, run_id: str) -> None:
    """Every epoch logged exactly once and the quality metrics equal the uninterrupted run's."""
    base_client, base_run = baseline
    for key in QUALITY:
        got, want = _history(client, run_id, key), _history(base_client, base_run, key)
        assert [s for s, _ in got] == list(range(EPOCHS)), (key, got)
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-7), key
    metrics, base = client.get_run(run_id).data.metrics, base_client.get_run(base_run).data.metrics
    for key in FINAL:
        assert metrics[key] == pytest.approx(base[key], rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def fault_dataset(tmp_path_factory):
    from llmrec_dist.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("fault-data") / "synthetic"
    prepare_dataset("synthetic", out, synthetic={"n_users": 600, "n_items": 120}, seed=3)
    return out


@pytest.fixture(scope="module")
def baseline(ray_cluster, fault_dataset, tmp_path_factory):
    """The uninterrupted run every faulty run must reproduce."""
    from mlflow.tracking import MlflowClient

    from llmrec_dist.train.launcher import train

    work = tmp_path_factory.mktemp("baseline")
    uri = sqlite_uri(work / 'mlflow.db')
    started = time.perf_counter()
    outcome = train(load_config(_config_file(work, fault_dataset, uri)))
    outcome.seconds = time.perf_counter() - started
    client = MlflowClient(uri)
    assert [s for s, _ in _history(client, outcome.run_id, "valid_ndcg_at_10")] == list(range(EPOCHS))
    return client, outcome.run_id, outcome


def test_a_killed_worker_restarts_from_the_checkpoint_and_matches_an_uninterrupted_run(
        baseline, ray_cluster, fault_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    cfg = load_config(_config_file(tmp_path, fault_dataset, uri))
    client = MlflowClient(uri)
    started = time.perf_counter()
    # SIGKILL one of the 2 workers once epoch 0 is checkpointed and logged: it dies during epoch 1.
    outcome, run_id, _ = train_with_worker_kill(cfg, ray_cluster.get_runtime_context().gcs_address,
                                                after_epoch=0)
    seconds = time.perf_counter() - started

    _assert_same_run_as(baseline[:2], client, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    resumed = _history(client, run_id, "resumed_at_epoch")
    assert resumed and all(1 <= step < EPOCHS for step, _ in resumed), resumed
    assert outcome.metrics["epochs_run"] == EPOCHS
    print(f"\nworker failure: {seconds:.1f} s vs {baseline[2].seconds:.1f} s uninterrupted "
          f"(+{seconds - baseline[2].seconds:.1f} s), resumed at epoch {resumed[0][0]}")


def test_a_killed_driver_resumes_the_same_mlflow_run(baseline, ray_cluster, fault_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    config = _config_file(tmp_path, fault_dataset, uri)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "llmrec_dist.cli", "train", "--config", str(config)],
                                  cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.time() + 300
        folder = None
        while folder is None and time.time() < deadline and driver.poll() is None:
            found = re.search(r"llmrec-dist train --resume (\S+)\)", log_path.read_text())
            folder = found and found.group(1)
            time.sleep(0.2)
        assert folder, log_path.read_text()[-3000:]
        client = MlflowClient(uri)
        run_id = client.search_runs([client.get_experiment_by_name("faults").experiment_id])[0].info.run_id
        wait_for_step(client, run_id, "valid_ndcg_at_10", 1, alive=lambda: driver.poll() is None)
        assert driver.poll() is None, log_path.read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody closed it

    resumed = subprocess.run([sys.executable, "-m", "llmrec_dist.cli", "train", "--resume", folder],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run {run_id}" in resumed.stdout

    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "no second, orphan run"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["llmrec.resumes"] == "1"
    resumed_at = _history(client, run_id, "resumed_at_epoch")
    # It went on from a checkpoint, not from scratch. (The last epoch logged may be newer than the last
    # checkpoint Ray Train recorded before the kill; that epoch runs again and is not logged twice.)
    assert resumed_at and resumed_at[0][0] >= 1, resumed_at
    _assert_same_run_as(baseline[:2], client, run_id)

    again = subprocess.run([sys.executable, "-m", "llmrec_dist.cli", "train", "--resume", folder],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already finished" in again.stderr, again.stderr[-2000:]


def test_a_private_run_restarted_after_a_worker_kill_keeps_counting_its_privacy(ray_cluster, fault_dataset,
                                                                                tmp_path):
    """The accountant is restored from the checkpoint: the restarted run ends having spent the whole
    planned epsilon (a fresh accountant would report the epsilon of the epochs after the restart only)."""
    from mlflow.tracking import MlflowClient

    from llmrec_dist.privacy import epsilon_after

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    cfg = load_config(_config_file(tmp_path, fault_dataset, uri),
                      ["privacy.epsilon=6", "train.negatives_from=catalogue", "train.batch_size=60"])
    outcome, run_id, _ = train_with_worker_kill(cfg, ray_cluster.get_runtime_context().gcs_address, after_epoch=0)
    client = MlflowClient(uri)
    assert _history(client, run_id, "resumed_at_epoch")
    spent = _history(client, run_id, "privacy_epsilon")
    assert [s for s, _ in spent] == list(range(EPOCHS)) and spent[0][1] < spent[1][1] < spent[2][1]
    params = client.get_run(run_id).data.params
    planned = epsilon_after(float(params["privacy.noise_multiplier_used"]), float(params["privacy.sample_rate"]),
                            EPOCHS * int(params["privacy.steps_per_epoch"]), float(params["privacy.delta_used"]),
                            "prv")
    assert outcome.metrics["privacy_epsilon"] == pytest.approx(planned, rel=1e-3) and planned <= 6.0 + 1e-6
