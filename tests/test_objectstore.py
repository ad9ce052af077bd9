"""Object storage end to end, against a real S3-compatible server on 127.0.0.1 (moto's, one per test):
``prepare --output s3://`` published whole or not at all, ``train`` and ``tune`` reading the shards from
S3 with checkpoints (and ``--resume``) under ``train.storage_path=s3://``, the text cache next to the
dataset on S3, an MLflow server whose artifact store is the same S3, and a registry consumer that
loads the champion through it without any credentials of its own. Access goes through the standard
AWS environment only; the secret key is looked for, and must not be, in every log, config and MLflow
param. The store's failures (unreachable, no bucket, denied, a truncated object) are one line naming
the URI.

The commands run as a user runs them (``python -m llmrec_dist.cli``), each starting its own local Ray
from the environment it is given. Run only these with ``pytest -m objectstore``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmrec_dist import storage
from llmrec_dist.data import dataset_format
from llmrec_dist.data.prepare import prepare_dataset
from mlflow_server import running_mlflow_server
from ports import free_port
from s3_server import running_s3_server
from text_fixtures import make_tiny_encoder
from mlflow_db import sqlite_uri

pytestmark = [pytest.mark.objectstore, pytest.mark.integration]

SYNTHETIC = ["--source", "synthetic", "--synthetic-users", "120", "--synthetic-items", "60"]
DATASET_FILES = ["items.parquet", "manifest.json", *(f"{split}/part-0000{i}.parquet"
                                                     for split in dataset_format.SPLITS for i in (0, 1))]


def cli(env: dict, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmrec_dist.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_refusal(done: subprocess.CompletedProcess, *needles: str) -> str:
    """The command refused with exit 2 and one line on stderr that holds every needle."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def s3(tmp_path):
    with running_s3_server(tmp_path) as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The store's endpoint and credentials in this process too (for in-process prepare and reads)."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.setenv(key, s3.env[key])
    return s3


# --------------------------------------------------------------------------------------------- prepare
def test_prepare_to_s3_publishes_the_whole_dataset_and_replaces_one_only_with_overwrite(s3, tmp_path):
    bucket = s3.create_bucket("data")
    done = cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--output", f"{bucket}/ds")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s3.keys("data") == [f"ds/{name}" for name in sorted(DATASET_FILES)]  # and no staging prefix left
    first = json.loads(s3.client().get_object(Bucket="data", Key="ds/manifest.json")["Body"].read())

    one_line_refusal(cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--output", f"{bucket}/ds"),
                     "s3://data/ds", "already exists", "--overwrite")
    done = cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--seed", "3", "--output", f"{bucket}/ds", "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads(s3.client().get_object(Bucket="data", Key="ds/manifest.json")["Body"].read())
    assert second["content_hash"] != first["content_hash"]
    assert s3.keys("data") == [f"ds/{name}" for name in sorted(DATASET_FILES)]

    s3.client().put_object(Bucket="data", Key="other/notes.txt", Body=b"not a dataset")
    one_line_refusal(cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--output", f"{bucket}/other", "--overwrite"),
                     "s3://data/other", "not a prepared dataset")
    assert s3.keys("data", "other/") == ["other/notes.txt"]


def test_a_prepare_that_fails_while_publishing_leaves_nothing_under_the_prefix(s3_env, tmp_path, monkeypatch):
    bucket = s3_env.create_bucket("data")
    options = {"n_users": 120, "n_items": 60}
    prepare_dataset("synthetic", f"{bucket}/old", synthetic=options)
    old = s3_env.keys("data", "old/")
    copy = storage.copy

    def copy_half_then_fail(source, location, files):
        copy(source, location, files[: len(files) // 2])
        raise OSError("connection reset in the middle of the copy")

    monkeypatch.setattr(storage, "copy", copy_half_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        prepare_dataset("synthetic", f"{bucket}/new", synthetic=options)
    assert s3_env.keys("data", "new") == [] and s3_env.keys("data", ".new") == []  # nothing, not even staging

    def upload_fails(folder, location, files):
        raise OSError("disk went away")

    monkeypatch.setattr(storage, "upload", upload_fails)
    with pytest.raises(OSError, match="disk went away"):
        prepare_dataset("synthetic", f"{bucket}/old", synthetic=options, seed=5, overwrite=True)
    assert s3_env.keys("data", "old/") == old  # the old dataset stays whole until the new one is uploaded
    assert dataset_format.verify_dataset(f"{bucket}/old")["counts"]["users"] == 120


# --------------------------------------------------------------------------------------------- failures
def test_the_stores_failures_are_one_line_naming_the_uri(s3, tmp_path):
    bucket = s3.create_bucket("data")
    assert cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--output", f"{bucket}/ds").returncode == 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"item_repr": "id", "hidden_size": 16, "num_heads": 2},
                                      "train": {"epochs": 1}, "mlflow": {"registered_model": ""}}))
    train = ("train", "--config", str(config), f"train.storage_path={tmp_path / 'runs'}",
             f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'mlflow.db')}")

    missing = one_line_refusal(cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--output", "s3://nobucket/ds"),
                               "s3://nobucket/ds", "bucket 'nobucket' does not exist")
    one_line_refusal(cli(s3.env, tmp_path, *train, "data.path=s3://nobucket/ds"), "s3://nobucket/ds")
    one_line_refusal(cli(s3.env, tmp_path, *train, f"data.path={bucket}/nothing-here"),
                     "s3://data/nothing-here", "no manifest.json")

    nowhere = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    one_line_refusal(cli(nowhere, tmp_path, "prepare", *SYNTHETIC, "--output", f"{bucket}/ds2"),
                     "s3://data/ds2", "cannot reach the object store at http://127.0.0.1:")
    one_line_refusal(cli(nowhere, tmp_path, *train, f"data.path={bucket}/ds"),
                     "s3://data/ds", "cannot reach the object store")

    with running_s3_server(tmp_path, auth=True) as guarded:  # knows no key: everything is denied
        denied = one_line_refusal(cli(guarded.env, tmp_path, "prepare", *SYNTHETIC, "--output", "s3://data/ds"),
                                  "s3://data/ds", "access denied")
        one_line_refusal(cli(guarded.env, tmp_path, *train, "data.path=s3://data/ds"), "s3://data/ds", "access denied")

    shard = "ds/train/part-00001.parquet"
    whole = s3.client().get_object(Bucket="data", Key=shard)["Body"].read()
    s3.client().put_object(Bucket="data", Key=shard, Body=whole[: len(whole) // 2])
    one_line_refusal(cli(s3.env, tmp_path, *train, f"data.path={bucket}/ds"), f"s3://data/{shard}", "prepare --overwrite")
    for line in (missing, denied):
        assert s3.secret not in line


# --------------------------------------------------------------------------------------------- round trip
def _wait(condition, what: str, alive, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive(), what
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_prepare_train_resume_register_and_load_all_through_s3(s3, tmp_path):
    """The round trip: prepare to S3 → train an ID+text model from S3 (text cache on S3), its driver
    killed after a checkpoint → ``--resume`` from the S3 run folder → registered in an MLflow server whose
    artifacts live on the same S3 → loaded as ``models:/…@champion`` by a consumer with no AWS access."""
    from mlflow.tracking import MlflowClient

    bucket = s3.create_bucket("llmrec")
    assert cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--output", f"{bucket}/ds").returncode == 0
    with_store = s3.env
    texts = json.loads(  # the tiny encoder's vocabulary comes from the item texts, read back from S3
subprocess.run(
        [sys.executable, "-c", "import json; from llmrec_dist.data.dataset_format import read_item_texts; "
                               f"print(json.dumps(read_item_texts('{bucket}/ds')))"],
        env=with_store, capture_output=True, text=True, check=True).stdout)
    encoder = make_tiny_encoder(tmp_path / "tiny-bert", texts, hidden=16, layers=1)
    with running_mlflow_server(tmp_path, artifacts=f"{bucket}/mlflow", env=with_store) as tracking:
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "data": {"path": f"{bucket}/ds"},
            "model": {"item_repr": "id+text", "text_encoder": str(encoder), "freeze": "frozen", "text_max_len": 8,
                      "hidden_size": 16, "num_heads": 2, "num_layers": 1, "max_len": 20},
            # 10 short epochs: the driver is killed after the first checkpoint, well before the last one
            "train": {"epochs": 10, "batch_size": 16, "patience": 0, "storage_path": f"{bucket}/runs"},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "mlflow": {"tracking_uri": tracking, "experiment": "s3", "registered_model": "s3-rec"}}))
        log_path = tmp_path / "driver.log"
        with open(log_path, "w") as log:
            driver = subprocess.Popen([sys.executable, "-m", "llmrec_dist.cli", "train", "--config", str(config)],
                                      cwd=tmp_path, env=with_store, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            alive = lambda: driver.poll() is None  # noqa: E731
            found = {}

            def started():
                match = re.search(r"train --resume (s3://\S+)\)", log_path.read_text())
                found["folder"] = match and match.group(1)
                return bool(match)

            _wait(started, "the run folder", alive)
            folder = found["folder"]
            assert folder.startswith(f"{bucket}/runs/train-")
            prefix = folder.removeprefix(f"{bucket}/")
            # The first epoch's checkpoint recorded on S3 by Ray Train's controller: a resume starts after it.
            _wait(lambda: f"{prefix}/checkpoint_manager_snapshot.json" in s3.keys("llmrec", prefix),
                  "a checkpoint on S3", alive)
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        assert any(key.startswith(f"{prefix}/checkpoint_") for key in s3.keys("llmrec", prefix))
        assert [k for k in s3.keys("llmrec", "ds/cache/text/") if k.endswith(".safetensors")], "no text cache on S3"

        resumed = cli(with_store, tmp_path, "train", "--resume", folder)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "registered s3-rec version 1" in resumed.stdout
        client = MlflowClient(tracking)
        run_id = client.search_runs([client.get_experiment_by_name("s3").experiment_id])[0].info.run_id
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "resumed_at_epoch")][0] >= 1
        model_keys = s3.keys("llmrec", "mlflow/")
        assert any(k.endswith("/model.safetensors") for k in model_keys), model_keys  # the package is on S3

        # A consumer with the tracking URI only: no AWS credentials or endpoint; the server serves the artifacts.
        consumer = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
        consumer["MLFLOW_TRACKING_URI"] = tracking
        item_ids = json.loads(subprocess.run(
            [sys.executable, "-c", "import json, mlflow, pandas as pd; "
                                   "m = mlflow.pyfunc.load_model('models:/s3-rec@champion'); "
                                   "out = m.predict(pd.DataFrame({'history': [['i1', 'i2', 'i3']], 'k': [5]})); "
                                   "print(json.dumps([str(i) for i in out.iloc[0]['item_ids']]))"],
            env=consumer, capture_output=True, text=True, timeout=300, cwd=tmp_path).stdout.strip().splitlines()[-1])
        assert len(item_ids) == 5 and not {"i1", "i2", "i3"} & set(item_ids)

        # The secret key is nowhere: logs, the run's params and tags, the run state on S3, the artifacts' text.
        run = client.get_run(run_id)
        texts_seen = [log_path.read_text(), resumed.stdout, resumed.stderr, json.dumps(run.data.params),
                      json.dumps(run.data.tags), (tmp_path / "server.log").read_text(errors="replace")]
        texts_seen += [p.read_text(errors="replace") for p in Path(os.environ["LLMREC_LOG_DIR"]).glob("train-*.log")]
        for key in s3.keys("llmrec"):
            if key.endswith((".json", ".yaml", ".txt", ".py", "MLmodel")):
                texts_seen.append(s3.client().get_object(Bucket="llmrec", Key=key)["Body"].read().decode())
        assert not [t for t in texts_seen if s3.secret in t]


def test_a_sweep_reads_its_shards_from_s3_and_keeps_its_state_there(s3, tmp_path):
    bucket = s3.create_bucket("llmrec")
    assert cli(s3.env, tmp_path, "prepare", *SYNTHETIC, "--output", f"{bucket}/ds").returncode == 0
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"path": f"{bucket}/ds"},
        "model": {"item_repr": "id", "hidden_size": 16, "num_heads": 2, "num_layers": 1, "max_len": 20},
        "train": {"epochs": 1, "batch_size": 32, "patience": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "mlflow": {"tracking_uri": sqlite_uri(tmp_path / 'mlflow.db'), "experiment": "s3-sweep",
                   "registered_model": ""},
        "search": {"space": {"train.lr": {"grid": [1e-3, 3e-3]}}, "num_samples": 1, "max_concurrent_trials": 2,
                   "scheduler": "none",
                   "storage_path": f"{bucket}/sweeps", "name": "lr"}}))
    done = cli(s3.env, tmp_path, "tune", "--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    keys = s3.keys("llmrec", "sweeps/lr/")
    assert "sweeps/lr/sweep.json" in keys, keys
    assert any(k.startswith("sweeps/lr/tune/") for k in keys), keys  # Ray Tune's experiment state
    assert len({k.split("/")[3] for k in keys if k.startswith("sweeps/lr/trials/")}) == 2, keys  # one per trial
    assert done.stdout.count("completed") >= 2 or "2 trials" in done.stdout, done.stdout[-3000:]
