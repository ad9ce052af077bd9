"""End to end on a real local Ray cluster: 2-worker DDP training, MLflow run, registry, evaluation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmrec_dist.config import EvalConfig, load_config
from llmrec_dist.saved_model import MODEL_META_FILE, WEIGHTS_FILE
from llmrec_dist.worker import checkpoint as ckpt
from mlflow_db import sqlite_uri

pytestmark = pytest.mark.integration

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY = ["model.hidden_size=16", "model.num_heads=2", "model.max_len=20", "train.epochs=2",
        "train.batch_size=64", "scaling.num_workers=2", "mlflow.registered_model=tiny-rec",
        "train.profile_steps=2"]


@pytest.fixture(scope="module")
def trained(ray_cluster, synthetic_dataset, tmp_path_factory):
    from llmrec_dist.train.launcher import train

    work = tmp_path_factory.mktemp("train")
    uri = sqlite_uri(work / 'mlflow.db')
    cfg = load_config(QUICKSTART, [f"data.path={synthetic_dataset}", f"train.storage_path={work / 'runs'}",
                                   f"mlflow.tracking_uri={uri}", *TINY])
    return train(cfg), cfg, uri


def test_training_logs_every_epoch_and_registers(trained):
    from mlflow.tracking import MlflowClient

    outcome, cfg, uri = trained
    m = outcome.metrics
    for split in ("valid", "test"):
        for name in ("hr", "ndcg", "mrr"):
            for k in (5, 10, 20):
                assert 0.0 <= m[f"{split}_{name}_at_{k}"] <= 1.0
        assert m[f"{split}_coverage_at_10"] > 0
    assert m["epochs_run"] == 2

    client = MlflowClient(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["scaling.num_workers"] == "2"
    for key in ("train_loss", "valid_ndcg_at_10", "sequences_per_s", "epoch_seconds"):
        assert [h.step for h in client.get_metric_history(outcome.run_id, key)] == [0, 1], key
    assert run.data.metrics["test_ndcg_at_10"] == pytest.approx(m["test_ndcg_at_10"])
    for key in ("checkpoint_mb", "checkpoint_write_seconds", "checkpoint_report_seconds"):
        assert [h.step for h in client.get_metric_history(outcome.run_id, key)] == [0, 1], key
    assert run.data.tags["llmrec.num_nodes"] == "1" and len(run.data.tags["llmrec.worker_nodes"].split(",")) == 2
    assert run.data.tags["llmrec.device"] == "cpu"
    # Start-up, profile and memory figures (what `llmrec-dist bench speed` reads).
    metrics = run.data.metrics
    assert 0 < metrics["ray_init_to_first_step_seconds"] < metrics["startup_seconds"]
    milestones = [metrics[f"startup_{k}_at_s"] for k in (
        "ray_ready", "trainer_built", "loop_start", "model_ready", "eval_rows_ready", "first_batch", "first_step")]
    assert 0 <= milestones[0] and milestones == sorted(milestones)
    assert milestones[-1] == pytest.approx(metrics["ray_init_to_first_step_seconds"])
    assert metrics["profile_steps"] == 2
    assert 0 < metrics["profile_loss_ms"] <= metrics["profile_forward_ms"] < metrics["profile_step_ms"]
    for phase in ("data", "backward", "optimizer", "allreduce"):  # 2 workers: DDP all-reduces gradients
        assert metrics[f"profile_{phase}_ms"] > 0, phase
    assert [h.step for h in client.get_metric_history(outcome.run_id, "profile_step_ms")] == [0]
    assert [h.step for h in client.get_metric_history(outcome.run_id, "valid_seconds")] == [0, 1]
    assert metrics["peak_rss_mb"] == max(metrics["peak_rss_mb_rank0"], metrics["peak_rss_mb_rank1"]) > 100
    run_file = Path(cfg.train.storage_path).resolve() / f"train-{outcome.run_id[:12]}" / "run.json"
    assert json.loads(run_file.read_text())["run_id"] == outcome.run_id  # what --resume reads
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"config.yaml", "dataset_manifest.yaml", "profile.txt"} <= artifacts

    reg = outcome.registration
    assert reg["version"] == "1" or reg["version"] == 1
    assert reg["promoted"]
    champion = client.get_model_version_by_alias("tiny-rec", "champion")
    assert str(champion.version) == str(reg["version"])
    assert champion.run_id == outcome.run_id


def test_checkpoints_hold_resumable_state(trained):
    outcome, _, _ = trained
    final = Path(outcome.checkpoint_path)
    for name in (WEIGHTS_FILE, ckpt.BEST_FILE, MODEL_META_FILE, ckpt.STATE_FILE):
        assert (final / name).is_file(), name
    state = ckpt.read_state(final)
    assert state["finished"] and [row["epoch"] for row in state["history"]] == [0, 1]
    per_epoch = [p for p in final.parent.glob("checkpoint_*") if p.is_dir() and p != final]
    assert per_epoch, "per-epoch checkpoints were kept"
    epoch_state = ckpt.read_state(sorted(per_epoch)[-1])
    assert {"optimizer", "scheduler", "epoch", "history"} <= set(epoch_state)


def test_distributed_evaluation_equals_single_process(trained, synthetic_dataset):
    from llmrec_dist.offline_eval import evaluate_saved_model

    outcome, _, _ = trained
    cfg = EvalConfig()
    single = evaluate_saved_model(Path(outcome.checkpoint_path), str(synthetic_dataset), "test", cfg)
    sharded = evaluate_saved_model(Path(outcome.checkpoint_path), str(synthetic_dataset), "test", cfg,
                                   num_workers=2)
    assert sharded.keys() == single.keys()
    for key in single:
        assert sharded[key] == pytest.approx(single[key], rel=1e-12, abs=1e-12), key
    # and both equal what the training run's own (sharded, in-loop) evaluation reported
    assert single["test_ndcg_at_10"] == pytest.approx(outcome.metrics["test_ndcg_at_10"], rel=1e-9)


def test_cli_train_on_an_existing_cluster_via_ray_address(ray_cluster, synthetic_dataset, tmp_path):
    """`llmrec-dist -v train` in a fresh process joins the running cluster through RAY_ADDRESS. It trains
    with train.exclude_seen over prefixed windows, batched by Ray Data's collate (data.length_buckets=1):
    each batch is (inputs, targets, earlier items). With -v the libraries' log lines reach the console
    (stderr), and stdout holds the JSON summary alone. (One run for all three: a CLI run costs ~30 s.)"""
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": sqlite_uri(tmp_path / 'm.db')}
    cmd = [sys.executable, "-m", "llmrec_dist.cli", "-v", "train", "--config", str(QUICKSTART), "--json",
           f"data.path={synthetic_dataset}", f"train.storage_path={tmp_path / 'runs'}", *TINY,
           "train.epochs=1", "mlflow.registered_model=", "train.exclude_seen=true", "data.windows=true",
           "data.length_buckets=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["metrics"]["epochs_run"] == 1 and summary["metrics"]["test_ndcg_at_10"] > 0
    assert summary["model_uri"] and not summary["registration"]
    # the console names the cluster it joined; Ray's own connect line is on it too (-v) and in the full log
    assert f"Ray: cluster at {address}" in proc.stderr
    assert f"Connecting to existing Ray cluster at address: {address}" in proc.stderr
    assert "INFO llmrec_dist.train.launcher: memory estimate" in proc.stderr and len(proc.stderr.splitlines()) > 20
    log_file = Path(re.findall(r"full log: (\S+\.log)$", proc.stderr, re.M)[-1])  # Ray's forwarded lines may follow
    log_file = log_file if log_file.is_absolute() else tmp_path / log_file
    assert f"Connecting to existing Ray cluster at address: {address}" in log_file.read_text()


def test_cli_resume_refuses_what_it_cannot_continue(tmp_path):
    def train(*args):
        return subprocess.run([sys.executable, "-m", "llmrec_dist.cli", "train", *args],
                              capture_output=True, text=True, timeout=60)

    proc = train("--resume", str(tmp_path))
    assert proc.returncode == 2 and "no readable run.json here" in proc.stderr, proc.stderr
    proc = train("--resume", str(tmp_path), "train.lr=1")
    assert proc.returncode == 2 and "overrides are not allowed" in proc.stderr, proc.stderr
    proc = train("--resume", str(tmp_path), "--config", str(QUICKSTART))
    assert proc.returncode == 2 and "either --config FILE" in proc.stderr, proc.stderr
    proc = train()
    assert proc.returncode == 2 and "either --config FILE" in proc.stderr, proc.stderr


def test_cli_rejects_bad_config_with_dotted_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n  epochz: 3\nmodel:\n  backbone: rnn\n")
    proc = subprocess.run([sys.executable, "-m", "llmrec_dist.cli", "train", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    for needle in ("train.lr: expected a number", "train.epochz: unknown key (did you mean train.epochs?)",
                   "model.backbone: expected one of 'causal'", "data.path: required"):
        assert needle in proc.stderr, proc.stderr


def test_windows_are_cut_before_the_split_alike_on_every_read_path(ray_cluster, synthetic_dataset):
    """data.windows: the driver read, Ray Data's read tasks and the streamed read give the same windowed
    rows, and the workers' row count (which sizes the lr schedule) counts exactly those rows."""
    from llmrec_dist.batching import history_windows
    from llmrec_dist.data.dataset_format import read_manifest, read_split
    from llmrec_dist.train.launcher import train_dataset
    from llmrec_dist.train.training_rows import training_rows

    base = [f"data.path={synthetic_dataset}", "data.windows=true", "model.max_len=8"]
    histories = read_split(synthetic_dataset, "train").column("items").to_pylist()
    expected = [w for h in histories for w in history_windows(h, 9, 8)]
    assert len(expected) > 1.5 * len(histories)  # the synthetic histories are long enough to cut
    manifest = read_manifest(synthetic_dataset)
    for extra in ([], ["data.driver_read_mb=0"], ["data.materialize=false"]):
        cfg = load_config(QUICKSTART, [*base, *extra])
        rows = [list(r["items"]) for r in train_dataset(cfg).iter_rows()]
        assert rows == expected, extra
        assert training_rows(cfg, manifest) == len(expected)
    # train.exclude_seen: the same windows, each with the history before it
    prefixed = [w for h in histories for w in history_windows(h, 9, 8, prefix=True)]
    assert [w[-9:] for w in prefixed] == expected and prefixed != expected
    for extra in ([], ["data.driver_read_mb=0"], ["data.materialize=false"]):
        cfg = load_config(QUICKSTART, [*base, "train.exclude_seen=true", *extra])
        assert [list(r["items"]) for r in train_dataset(cfg).iter_rows()] == prefixed, extra
        assert training_rows(cfg, manifest) == len(expected)
    plain = load_config(QUICKSTART, [f"data.path={synthetic_dataset}", "model.max_len=8"])
    assert training_rows(plain, manifest) == len(histories) == train_dataset(plain).count()
    cloze = load_config(QUICKSTART, [*base, "model.backbone=bidirectional"])
    assert training_rows(cloze, manifest) == sum(len(history_windows(h, 8, 8)) for h in histories)


def test_windowed_training_on_two_workers_steps_through_every_window(ray_cluster, synthetic_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from llmrec_dist.batching import history_windows
    from llmrec_dist.data.dataset_format import read_split
    from llmrec_dist.train.launcher import train

    cfg = load_config(QUICKSTART, [f"data.path={synthetic_dataset}", f"train.storage_path={tmp_path / 'runs'}",
                                   f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'mlflow.db')}", *TINY,
                                   "model.max_len=8", "data.windows=true", "train.epochs=1",
                                   "mlflow.registered_model="])
    windows = sum(len(history_windows(h, 9, 8)) for h in read_split(synthetic_dataset, "train").column("items")
                  .to_pylist())
    outcome = train(cfg)
    assert outcome.metrics["epochs_run"] == 1
    # Ray Data's equal split drops the remainder: each of the 2 workers trains on windows // 2 rows
    (seen,) = MlflowClient(sqlite_uri(tmp_path / 'mlflow.db')).get_metric_history(outcome.run_id, "train_sequences")
    assert seen.value == 2 * (windows // 2)


def test_the_driver_read_and_ray_data_read_give_the_same_blocks(ray_cluster, synthetic_dataset):
    """Small materialised splits are read by the driver (data.driver_read_mb), others by Ray Data
    tasks; both give the training loop the same rows in the same order."""
    from llmrec_dist.train.launcher import train_dataset

    base = [f"data.path={synthetic_dataset}"]
    by_driver = train_dataset(load_config(QUICKSTART, base))
    by_tasks = train_dataset(load_config(QUICKSTART, [*base, "data.driver_read_mb=0"]))
    streamed = train_dataset(load_config(QUICKSTART, [*base, "data.materialize=false"]))
    assert type(by_driver).__name__ == type(by_tasks).__name__ == "MaterializedDataset"
    assert type(streamed).__name__ != "MaterializedDataset"  # read by Ray Data tasks as the loop iterates
    rows = [[list(r["items"]) for r in ds.iter_rows()] for ds in (by_driver, by_tasks)]
    assert len(rows[0]) == 300 and rows[0] == rows[1]


def test_quality_refit_trains_through_the_validation_item_for_the_chosen_epochs(ray_cluster, synthetic_dataset,
                                                                                tmp_path):
    """`bench quality --refit`: after the validated run, the same config trains on the histories through
    each user's validation item (the test split's input) for best epoch + 1 epochs, validates nothing,
    and tests the last epoch's weights (the next test checks they are the ones it saves)."""
    from mlflow.tracking import MlflowClient

    from llmrec_dist.bench.quality import run_quality
    from llmrec_dist.data.dataset_format import items_seen_in_training, read_manifest, read_split
    from llmrec_dist.train.launcher import train_dataset
    from llmrec_dist.train.training_rows import training_rows

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    base = [f"data.path={synthetic_dataset}", f"train.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={uri}",
            *TINY, "mlflow.registered_model=", "train.epochs=3", "train.patience=1"]
    valid, test = read_split(synthetic_dataset, "valid"), read_split(synthetic_dataset, "test")
    through_valid = [h + [t] for h, t in zip(valid.column("items").to_pylist(), valid.column("target").to_pylist())]
    assert test.column("items").to_pylist() == through_valid  # what a refit trains on

    refit_cfg = load_config(QUICKSTART, [*base, "train.refit_epochs=2"])
    assert [list(r["items"]) for r in train_dataset(refit_cfg).iter_rows()] == through_valid
    assert training_rows(refit_cfg, read_manifest(synthetic_dataset)) == len(through_valid)
    seen = items_seen_in_training(synthetic_dataset, "test")
    assert seen[valid.column("target").to_numpy()].all() and not seen[0]
    assert (seen >= items_seen_in_training(synthetic_dataset)).all()

    # the validated run registers its model; the refit, with no validation metric to gate on, does not
    figures = run_quality(load_config(QUICKSTART, [*base, "mlflow.registered_model=refit-rec"]), refit=True)
    versions = MlflowClient(uri).search_model_versions("name='refit-rec'")
    assert [v.run_id for v in versions] == [figures["run_id"]]
    refit = figures["refit"]
    assert refit["refit_epochs"] == figures["best_epoch"] + 1 == refit["epochs_run"]
    assert refit["best_epoch"] == refit["refit_epochs"] - 1  # the last epoch is the model
    assert 0.0 <= refit["test_ndcg_at_10"] <= 1.0
    assert not any(k.startswith("best_valid") or k == "valid_curve" for k in refit)  # nothing validated
    assert len(figures["valid_curve"]) == figures["epochs_run"] == len(figures["valid_curve_seconds"])
    assert 0 < figures["valid_curve_seconds"][0] < figures["valid_curve_seconds"][-1] <= figures["wall_seconds"]
    client = MlflowClient(uri)
    epochs = list(range(refit["refit_epochs"]))
    assert [h.step for h in client.get_metric_history(refit["run_id"], "train_loss")] == epochs
    assert client.get_metric_history(refit["run_id"], "valid_ndcg_at_10") == []
    assert client.get_run(refit["run_id"]).data.params["train.refit_epochs"] == str(refit["refit_epochs"])


def test_train_refit_in_the_config_chains_the_refit_and_returns_it(ray_cluster, synthetic_dataset, tmp_path, capsys,
                                                                    monkeypatch):
    """`train.refit: true`: one `train` call runs the validated run, then the refit it chose (best epoch +
    1 epochs through the validation item) as a second MLflow run tagged with the first; the refit is
    returned and registered (gated on the validated run's validation metric; the validated run registers
    nothing), the CLI summary names the run that chose it, and `bench quality` reports both."""
    from mlflow.tracking import MlflowClient

    import llmrec_dist.train.launcher as launcher
    from llmrec_dist.bench.quality import run_quality
    from llmrec_dist.cli.train import print_outcome
    from llmrec_dist.offline_eval import evaluate_saved_model

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    cfg = load_config(QUICKSTART, [f"data.path={synthetic_dataset}", f"train.storage_path={tmp_path / 'runs'}",
                                   f"mlflow.tracking_uri={uri}", *TINY, "mlflow.registered_model=refit-chain",
                                   "train.epochs=3", "train.patience=1", "train.refit=true"])
    outcomes, real_train = [], launcher.train
    monkeypatch.setattr(launcher, "train", lambda c: outcomes.append(real_train(c)) or outcomes[-1])  # keeps it
    figures = run_quality(cfg)
    outcome, = outcomes
    validated = outcome.validated
    assert (figures["run_id"], figures["refit"]["run_id"]) == (validated.run_id, outcome.run_id)
    assert figures["refit"]["test_ndcg_at_10"] == outcome.metrics["test_ndcg_at_10"]
    assert figures["refit"]["refit_epochs"] == figures["best_epoch"] + 1
    assert len(figures["valid_curve"]) == figures["epochs_run"] and "valid_curve" not in figures["refit"]
    assert validated is not None and validated.run_id != outcome.run_id
    assert "valid_ndcg_at_10" in validated.metrics and not any(k.startswith("valid_") for k in outcome.metrics)
    assert outcome.metrics["refit_epochs"] == validated.metrics["best_epoch"] + 1 == outcome.metrics["epochs_run"]
    client = MlflowClient(uri)
    run = client.get_run(outcome.run_id).data
    assert run.tags["llmrec.refit_of"] == validated.run_id
    assert run.params["train.refit_epochs"] == str(outcome.metrics["refit_epochs"])
    assert "llmrec.refit_of" not in client.get_run(validated.run_id).data.tags
    assert len(client.get_metric_history(outcome.run_id, "train_loss")) == outcome.metrics["refit_epochs"]
    version, = client.search_model_versions("name='refit-chain'")  # the refit alone, holding the alias
    assert version.run_id == outcome.run_id and outcome.registration["promoted"]
    assert float(version.tags["metric_value"]) == validated.metrics["valid_ndcg_at_10"]
    assert client.get_model_version_by_alias("refit-chain", "champion").version == version.version
    # the saved model is the tested one: the refit's last epoch
    saved = evaluate_saved_model(Path(outcome.checkpoint_path), str(synthetic_dataset), "test", EvalConfig())
    assert saved["test_ndcg_at_10"] == pytest.approx(outcome.metrics["test_ndcg_at_10"], rel=1e-9)
    assert ckpt.read_state(Path(outcome.checkpoint_path))["result"]["best_epoch"] == outcome.metrics["refit_epochs"] - 1
    print_outcome(outcome)
    assert f"chosen by run {validated.run_id}: best epoch {int(validated.metrics['best_epoch']) + 1}" in capsys.readouterr().out
