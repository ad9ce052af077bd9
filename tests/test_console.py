"""What a command prints: our lines on the console, everything else in a log file (llmrec_dist.console),
one line per epoch read from MLflow (llmrec_dist.train.progress), one line for a failure, and a local
Ray whose workers are not starved by a normal-priority job (llmrec_dist.ray_setup)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmrec_dist import console
from llmrec_dist.cli import main as cli_main
from llmrec_dist.train.progress import EpochLines, epoch_line, metric_label
from mlflow_db import sqlite_uri

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY = ["model.item_repr=id", "model.hidden_size=16", "model.num_heads=2", "model.max_len=20", "train.epochs=2",
        "train.patience=0", "train.batch_size=64", "scaling.num_workers=2", "mlflow.registered_model=tiny-console"]


@pytest.fixture
def session(tmp_path):
    """A quiet console session, closed (and everything restored) after the test."""
    s = console.start("test", verbose=False, path=tmp_path / "test.log")
    yield s
    console.close()


# ------------------------------------------------------------------------------ the per-epoch line
def test_metric_labels():
    assert metric_label("valid_ndcg_at_10") == "valid NDCG@10"
    assert metric_label("valid_hr_at_20") == "valid HR@20"
    assert metric_label("valid_mrr_at_5") == "valid MRR@5"
    assert metric_label("valid_coverage_at_10") == "valid coverage@10"
    assert metric_label("train_loss") == "train loss"


def test_epoch_line_golden():
    figures = {"train_loss": 7.41234, "valid_ndcg_at_10": 0.052149, "epoch_seconds": 31.24,
               "sequences_per_s": 1412.4}
    assert epoch_line(2, 8, figures, "valid_ndcg_at_10") == \
        "epoch 3/8  loss 7.412  valid NDCG@10 0.0521  31.2 s  1,412 seq/s"
    assert epoch_line(0, 12, figures, "valid_ndcg_at_10").startswith("epoch  1/12  loss")


def test_epoch_line_leaves_out_what_is_missing():
    assert epoch_line(0, 3, {"train_loss": 5.0, "epoch_seconds": 2.0}, None) == "epoch 1/3  loss 5.000  2.0 s"
    assert epoch_line(0, 3, {"train_loss": 5.0}, "valid_ndcg_at_10") == "epoch 1/3  loss 5.000"


def test_epoch_lines_read_each_epoch_once_from_mlflow(tmp_path):
    from llmrec_dist.tracking import RunLogger, start_run

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    run_id = start_run(uri, "console")
    logger = RunLogger(uri, run_id)
    epoch = {"train_loss": 6.0, "epoch_seconds": 3.0, "sequences_per_s": 100.0, "valid_ndcg_at_10": 0.1}
    logger.metrics(epoch, step=0)  # logged before: a resumed run's first epoch is not repeated
    lines = []
    watcher = EpochLines(uri, run_id, epochs=3, metric="valid_ndcg_at_10", echo=lines.append, interval=3600)
    with watcher:
        logger.metrics({**epoch, "train_loss": 5.0}, step=1)
        watcher.poll()
        watcher.poll()
        logger.metrics({**epoch, "train_loss": 4.0}, step=2)
    assert lines == ["epoch 2/3  loss 5.000  valid NDCG@10 0.1000  3.0 s  100 seq/s",
                     "epoch 3/3  loss 4.000  valid NDCG@10 0.1000  3.0 s  100 seq/s"]


# ------------------------------------------------------------------------------ logging routes
def test_quiet_console_shows_our_warnings_only_and_the_file_has_everything(session, capsys):
    own = logging.getLogger("llmrec_dist.somewhere")
    library = logging.getLogger("somelib.inner")
    own.info("an info line of ours")
    own.warning("a warning of ours")
    library.warning("a library's warning")
    library.error("a library's error")
    console.say("a line we print")
    import warnings

    warnings.warn("a library warning", UserWarning, stacklevel=1)
    out, err = capsys.readouterr()
    assert out == "a line we print\n"
    assert err == "warning: a warning of ours\n"
    text = session.path.read_text()
    for expected in ("an info line of ours", "a warning of ours", "a library's warning", "a library's error",
                     "a line we print", "a library warning"):
        assert expected in text, expected


def test_verbose_console_shows_everything_once(tmp_path, capsys):
    console.start("test", verbose=True, path=tmp_path / "v.log")
    try:
        logging.getLogger("somelib").debug("a library's debug line")
        console.say("said once")
    finally:
        console.close()
    out, err = capsys.readouterr()
    assert "a library's debug line" in err and "said once" not in err and out == "said once\n"


def test_a_library_that_prints_on_its_own_is_sent_to_the_file_and_restored(session, capsys):
    lib = logging.getLogger("selfish.lib")
    handler = logging.StreamHandler(sys.stderr)
    lib.addHandler(handler)
    lib.propagate = False
    lib.setLevel(logging.INFO)
    try:
        console.quiet_libraries()
        lib.info("Started a local instance")
        assert "Started a local instance" not in capsys.readouterr().err
        assert "Started a local instance" in session.path.read_text()
        console.close()
        assert lib.propagate is False and handler in lib.handlers
    finally:
        lib.removeHandler(handler)
        lib.propagate = True


def test_close_restores_logging_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    console.start("test", path=tmp_path / "x.log")
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    console.close()
    assert root.handlers == handlers and root.level == level
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    assert console.active() is None


# ------------------------------------------------------------------------------ failures
def _worker_failure():
    from ray.train import WorkerGroupError

    try:
        raise ValueError("item 3 has no text")
    except ValueError as err:
        inner = err
    return WorkerGroupError("[Rank 0]\nTraceback (most recent call last):\n  File x\nValueError: item 3 has no text",
                            {1: RuntimeError("later"), 0: inner})


def test_one_line_cause_reaches_the_error_at_the_bottom():
    assert console.one_line_cause(_worker_failure()) == "ValueError: item 3 has no text (worker rank 0)"
    try:
        try:
            raise KeyError("x")
        except KeyError as err:
            raise RuntimeError("while loading") from err
    except RuntimeError as err:
        assert console.one_line_cause(err) == "KeyError: 'x'"

    class Wrapped(Exception):
        pass

    traceback_text = "ray::f() (pid=1)\nTraceback (most recent call last):\n  File \"a.py\", line 1\nWrapped: disk full"
    assert console.one_line_cause(Wrapped(traceback_text)) == "Wrapped: disk full"
    assert len(console.one_line_cause(RuntimeError("x" * 1000))) <= 300


def test_a_failed_run_prints_one_line_and_the_log_keeps_the_traceback(tmp_path, capsys, monkeypatch,
                                                                      synthetic_dataset):
    import llmrec_dist.train.launcher as launcher

    def failing_train(*args, **kwargs):
        raise _worker_failure()

    monkeypatch.setattr(launcher, "train", failing_train)
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path / "logs"))
    code = cli_main(["train", "--config", str(QUICKSTART), f"data.path={synthetic_dataset}"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    found = re.fullmatch(r"llmrec-dist train: failed: ValueError: item 3 has no text \(worker rank 0\); "
                         r"full log: (\S+\.log)", lines[0])
    assert found, lines[0]
    log_text = Path(found.group(1)).read_text()
    assert "Traceback" in log_text and "WorkerGroupError" in log_text


# ------------------------------------------------------------------------------ Ray start-up
@pytest.fixture
def fake_ray_init(monkeypatch):
    """ray.init replaced by a recorder of its arguments and of the environment it saw."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(
        (kw, {k: os.environ.get(k) for k in ("RAY_worker_niceness",)})))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_a_local_ray_starts_its_workers_at_niceness_0(fake_ray_init, monkeypatch, session):
    from llmrec_dist.ray_setup import init_ray

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    init_ray(2, 1)
    kwargs, env = fake_ray_init[0]
    assert env["RAY_worker_niceness"] == "0"
    assert "RAY_worker_niceness" not in os.environ  # only for the Ray it started
    assert kwargs["log_to_driver"] is False and kwargs["configure_logging"] is False
    assert session.used_ray


def test_the_users_niceness_wins_and_a_cluster_keeps_its_own(fake_ray_init, monkeypatch):
    from llmrec_dist.ray_setup import init_ray

    monkeypatch.setenv("RAY_worker_niceness", "10")
    init_ray(2, 1)
    assert fake_ray_init[-1][1]["RAY_worker_niceness"] == "10"
    assert fake_ray_init[-1][0]["log_to_driver"] is True  # no command session: as before
    monkeypatch.delenv("RAY_worker_niceness")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    init_ray(2, 1)
    assert fake_ray_init[-1][1]["RAY_worker_niceness"] is None


NICENESS = """
import os, ray
from llmrec_dist.ray_setup import init_ray
init_ray(1, 0.5)
print("worker niceness", ray.get(ray.remote(num_cpus=0.5)(lambda: os.nice(0)).remote()))
"""


@pytest.mark.integration
def test_a_real_local_ray_worker_runs_at_the_drivers_niceness(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    proc = subprocess.run([sys.executable, "-c", NICENESS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"worker niceness {os.nice(0)}" in proc.stdout


# ------------------------------------------------------------------------------ a real run, end to end
def _train_cli(tmp_path, dataset, ray_cluster, *flags):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env.pop(console.LOG_DIR_ENV, None)  # the default: ./llmrec_logs under the working directory
    cmd = [sys.executable, "-m", "llmrec_dist.cli", *flags, "train", "--config", str(QUICKSTART),
           f"data.path={dataset}", f"train.storage_path={tmp_path / 'runs'}",
           f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'mlflow.db')}", *TINY]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.integration
def test_train_prints_a_few_lines_and_names_its_log(ray_cluster, synthetic_dataset, tmp_path):
    proc = _train_cli(tmp_path, synthetic_dataset, ray_cluster)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    lines = printed.strip().splitlines()
    assert len(lines) <= 20, printed
    assert "Traceback" not in printed and "TrainingReport" not in printed and "INFO" not in printed
    assert [line for line in lines if line.startswith("epoch ")] == [
        line for line in lines if re.fullmatch(r"epoch [12]/2  loss \d+\.\d{3}  valid NDCG@10 0\.\d{4}  "
                                               r"\d+\.\d s  [\d,]+ seq/s", line)]
    assert sum(line.startswith("epoch ") for line in lines) == 2, printed
    assert re.search(r"^  test: hr@10=", proc.stdout, re.M) and "  model: " in proc.stdout
    found = re.search(r"^full log: (llmrec_logs/train-\S+\.log)$", proc.stderr, re.M)
    assert found, proc.stderr
    log_text = (tmp_path / found.group(1)).read_text()
    assert "INFO llmrec_dist.train.launcher: memory estimate" in log_text  # ours
    assert "INFO mlflow." in log_text or "INFO alembic" in log_text or "INFO ray" in log_text  # a library's
    assert "epoch 2/2  loss" in log_text  # the console lines too


# -v on a real run (the libraries' lines on the console): test_train_integration.py's
# test_cli_train_on_an_existing_cluster_via_ray_address, one CLI run for several checks.


# ------------------------------------------------------------------------------ tune: one line per trial
def test_one_line_per_finished_trial():
    from types import SimpleNamespace

    from llmrec_dist.sweep.progress import TrialLines

    lines = []
    callback = TrialLines(lines.append, "valid_ndcg_at_10", ["train.lr"], total=3)

    def trial(trial_id, final, best):
        return SimpleNamespace(trial_id=trial_id, config={"train": {"lr": 0.001, "epochs": 4}},
                               last_result={"final": 1} if final else {"epochs_done": 1},
                               metric_analysis={"valid_ndcg_at_10": {"max": best}} if best is not None else {},
                               get_pickled_error=lambda: ValueError("bad batch"), get_error=lambda: None)

    callback.on_trial_complete(1, [], trial("a_00000", True, 0.05213))
    callback.on_trial_complete(2, [], trial("a_00001", False, 0.01))
    callback.on_trial_error(3, [], trial("a_00002", False, None))
    assert lines == [
        "trial 1/3 a_00000  completed     valid_ndcg_at_10 0.0521  {'train.lr': 0.001}",
        "trial 2/3 a_00001  early_stopped valid_ndcg_at_10 0.0100  {'train.lr': 0.001}",
        "trial 3/3 a_00002  failed (ValueError: bad batch) valid_ndcg_at_10 -  {'train.lr': 0.001}"]
