"""Sweeps on a real local Ray with a tiny BERT item tower: the MLflow parent/child runs, ASHA stopping
the trials that must stop, the best trial registered, the champion gate, and --resume after the driver
was killed."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmrec_dist.data.dataset_format import read_items
from llmrec_dist.registry.promotion import champion_info
from llmrec_dist.sweep.driver import STATE_FILE, SweepError, run_sweep
from llmrec_dist.sweep.search import load_sweep
from llmrec_dist.tracking import client
from text_fixtures import make_tiny_encoder
from mlflow_db import sqlite_uri

pytestmark = pytest.mark.integration

GOOD_LR, BAD_LR = 3e-3, 1e-7


@pytest.fixture(scope="module")
def world(tmp_path_factory, synthetic_dataset):
    root = tmp_path_factory.mktemp("sweep")
    encoder = make_tiny_encoder(root / "tiny-bert", read_items(str(synthetic_dataset)).column("text").to_pylist())
    return root, synthetic_dataset, encoder


def write_sweep(root: Path, data: Path, encoder: Path, name: str, space: dict, **search) -> Path:
    cfg = {
        "data": {"path": str(data)},
        "model": {"item_repr": "id+text", "text_encoder": str(encoder), "text_max_len": 12, "hidden_size": 16,
                  "num_layers": 1, "num_heads": 2, "max_len": 20, "lora_r": 4},
        "train": {"epochs": 2, "batch_size": 64, "patience": 0, "num_negatives": 32, "lm_lr": 1e-3,
                  "storage_path": str(root / "runs")},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "mlflow": {"experiment": "sweeps", "tracking_uri": sqlite_uri(root / 'mlflow.db'),
                   "registered_model": "sweep-model"},
        "search": {"space": space, "scheduler": "asha", "grace_period": 1, "max_concurrent_trials": 2,
                   "storage_path": str(root / "sweeps"), "name": name, **search},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def children(uri: str, parent_run_id: str):
    c = client(uri)
    exp = c.get_run(parent_run_id).info.experiment_id
    return c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


@pytest.fixture(scope="module")
def good_sweep(ray_cluster, world):
    """2 lrs x 2 strategies; the tiny lr trials start only after a good trial has passed the rung at
    epoch 1 (grid order is lr-major, 2 trials at a time), so ASHA must stop them there."""
    root, data, encoder = world
    path = write_sweep(root, data, encoder, "good", {"train.lr": {"grid": [GOOD_LR, BAD_LR]},
                                                     "model.freeze": {"grid": ["frozen", "lora"]}})
    return run_sweep(load_sweep(str(path)))


def test_parent_and_one_child_per_trial_with_its_params(good_sweep):
    outcome = good_sweep
    c = client(outcome.tracking_uri)
    parent = c.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.params["search.space"])["train.lr"] == {"grid": [GOOD_LR, BAD_LR]}
    artifacts = {a.path for a in c.list_artifacts(outcome.parent_run_id)}
    assert {"results.csv", "results.md", "sweep.yaml", "metric_per_trial.png", "lr_by_freeze.png"} <= artifacts
    runs = children(outcome.tracking_uri, outcome.parent_run_id)
    combos = sorted((float(r.data.params["train.lr"]), r.data.params["model.freeze"]) for r in runs)
    assert combos == sorted((lr, f) for lr in (GOOD_LR, BAD_LR) for f in ("frozen", "lora"))
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:  # per-epoch validation metrics in every child
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "valid_ndcg_at_10")]
        assert steps == list(range(len(steps))) and steps
    # The results table is sorted by the metric, best first.
    table = Path(c.download_artifacts(outcome.parent_run_id, "results.csv")).read_text().splitlines()
    values = [float(line.split(",")[5]) for line in table[1:]]
    assert len(values) == 4 and values == sorted(values, reverse=True)


def test_asha_stopped_the_trials_that_had_to_stop(good_sweep):
    by_lr = {}
    for row in good_sweep.rows:
        by_lr.setdefault(row.params["train.lr"], []).append(row)
    assert [r.status for r in by_lr[BAD_LR]] == ["early_stopped", "early_stopped"]
    assert all(r.epochs == 1 for r in by_lr[BAD_LR])
    assert any(r.status == "completed" and r.epochs == 2 for r in by_lr[GOOD_LR])
    tags = {r.info.run_id: r.data.tags["llmrec.trial_status"]
            for r in children(good_sweep.tracking_uri, good_sweep.parent_run_id)}
    assert sorted(tags.values()) == sorted(r.status for r in good_sweep.rows)


def test_the_registered_version_is_the_best_trials(good_sweep):
    outcome = good_sweep
    runs = children(outcome.tracking_uri, outcome.parent_run_id)
    best_run = max(runs, key=lambda r: max(m.value for m in client(outcome.tracking_uri)
                                           .get_metric_history(r.info.run_id, "valid_ndcg_at_10")))
    assert outcome.best.run_id == best_run.info.run_id and outcome.best.params["train.lr"] == GOOD_LR
    reg = outcome.registration
    assert reg["promoted"] and reg["version"] == 1
    champion = champion_info(outcome.tracking_uri, "sweep-model")
    assert champion["version"] == 1 and champion["run_id"] == best_run.info.run_id
    assert champion["metric_value"] == pytest.approx(outcome.best.best_value)
    assert "test_ndcg_at_10" in outcome.test_metrics


def test_a_trial_larger_than_the_cluster_is_refused_before_anything_runs(ray_cluster, world):
    root, data, encoder = world
    path = write_sweep(root, data, encoder, "too-big", {"train.lr": {"grid": [GOOD_LR, BAD_LR]}})
    sweep = load_sweep(str(path), ["scaling.num_workers=8"])
    with pytest.raises(SweepError, match=r"a trial asks for 8 worker\(s\) x 1 CPU .* the cluster has 4 CPUs"):
        run_sweep(sweep)
    assert not (root / "sweeps" / "too-big").exists()


def _ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_killed_sweep_resumes_without_rerunning_finished_trials_and_keeps_the_champion(good_sweep, world):
    """A worse sweep (tiny lrs), one trial at a time, its driver killed once the first trial has
    finished; --resume runs only the second. Its best registers as version 2, the alias stays on 1."""
    root, data, encoder = world
    path = write_sweep(root, data, encoder, "worse", {"train.lr": {"grid": [BAD_LR, 2 * BAD_LR]}},
                       scheduler="none", max_concurrent_trials=1)
    folder = root / "sweeps" / "worse"
    env = {**os.environ, "RAY_ADDRESS": _ray_address(), "TUNE_GLOBAL_CHECKPOINT_S": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(root / "worse-driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "llmrec_dist.cli", "tune", "--config", str(path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            states = glob.glob(str(folder / "tune" / "experiment_state-*.json"))
            if states and Path(states[0]).read_text().count("TERMINATED") >= 1:
                break
            time.sleep(1)
        assert driver.poll() is None, f"the driver ended before it could be killed: {(root / 'worse-driver.log').read_text()[-3000:]}"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    state = json.loads((folder / STATE_FILE).read_text())
    uri, parent_id = state["tracking_uri"], state["parent_run_id"]
    before = {r.info.run_id: r for r in children(uri, parent_id)}
    finished = [r for r in before.values() if r.info.status == "FINISHED"]
    assert len(finished) == 1
    done_run = finished[0]
    done_steps = len(client(uri).get_metric_history(done_run.info.run_id, "valid_ndcg_at_10"))
    done_trial = done_run.data.tags["llmrec.trial_id"]
    done_checkpoints = sorted(p.name for p in (folder / "trials" / done_trial).glob("checkpoint_*"))

    outcome = run_sweep(resume=str(folder))

    assert outcome.parent_run_id == parent_id and client(uri).get_run(parent_id).info.status == "FINISHED"
    after = children(uri, parent_id)
    assert len(after) == 2 and set(before) <= {r.info.run_id for r in after}  # no orphan, no duplicate
    assert [r.status for r in outcome.rows] == ["completed", "completed"]
    # The finished trial was not run again: same checkpoints, same metric history.
    assert sorted(p.name for p in (folder / "trials" / done_trial).glob("checkpoint_*")) == done_checkpoints
    assert len(client(uri).get_metric_history(done_run.info.run_id, "valid_ndcg_at_10")) == done_steps
    # A worse sweep registers its best, but the champion stays with the better one.
    assert outcome.registration["version"] == 2 and not outcome.registration["promoted"]
    assert champion_info(uri, "sweep-model")["version"] == 1


def test_a_sweep_over_epsilon_registers_the_best_trial_with_its_privacy(ray_cluster, world):
    """privacy.epsilon is a knob like any other: each trial trains with DP-SGD at its epsilon, and the
    best trial's registered version carries that trial's (epsilon, delta)."""
    root, data, encoder = world
    path = write_sweep(root, data, encoder, "private", {"privacy.epsilon": {"grid": [2.0, 8.0]}},
                       scheduler="none")
    raw = yaml.safe_load(path.read_text())
    raw["train"].update({"epochs": 1, "negatives_from": "catalogue"})
    raw["mlflow"]["registered_model"] = "sweep-private"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    outcome = run_sweep(load_sweep(str(path)))
    c = client(outcome.tracking_uri)
    spent = {}
    for run in children(outcome.tracking_uri, outcome.parent_run_id):
        target = float(run.data.params["privacy.epsilon"])
        spent[target] = run.data.metrics["privacy_epsilon"]
        assert 0 < spent[target] <= target + 1e-6
    assert set(spent) == {2.0, 8.0}
    version = c.get_model_version("sweep-private", str(outcome.registration["version"]))
    best_target = float(outcome.best.params["privacy.epsilon"])
    assert float(version.tags["privacy_epsilon"]) == pytest.approx(spent[best_target], rel=1e-5)
