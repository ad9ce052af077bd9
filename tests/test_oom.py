"""A worker killed for lack of memory stops the run without a retry (llmrec_dist.train.oom).

- unit: which errors count as a memory kill, the detail Ray's message gives, the Ray Train callback and
  finding its error inside what ``fit()`` raises;
- integration (the session's real local Ray): a training loop whose rank 0 raises a real
  ``ray.exceptions.OutOfMemoryError`` ends ``fit()`` after one start, where an ordinary error is retried
  ``train.max_failures`` times.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import ray.exceptions
from ray.core.generated.common_pb2 import ActorDiedErrorContext

from llmrec_dist.config import load_config
from mlflow_db import sqlite_uri
from llmrec_dist.train.oom import (
    StopOnOutOfMemory,
    WorkerOutOfMemory,
    find_worker_oom,
    is_memory_kill,
    memory_kill_detail,
    out_of_memory_line,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
# What Ray's memory monitor says when it kills a task or actor (Ray 2.x wording, node figures made up).
KILLED = ("Task was killed due to the node running low on memory.\n"
          "Memory on the node (IP: 10.0.0.1, ID: x) where the task was running was 22.40GB / 23.54GB (0.951), "
          "which exceeds the memory usage threshold of 0.95. Ray killed this worker (ID: y) because it was the "
          "most recently scheduled task.")


def actor_died(message: str) -> ray.exceptions.ActorDiedError:
    """A real ActorDiedError as Ray builds it for a system-level death (the worker process killed)."""
    return ray.exceptions.ActorDiedError(ActorDiedErrorContext(error_message=message, class_name="RayTrainWorker",
                                                               actor_id=b"\x01" * 16, pid=4242))


# ---------------------------------------------------------------------------------------------
# unit
# ---------------------------------------------------------------------------------------------


def test_memory_kills_are_recognised_and_ordinary_errors_are_not():
    oom = ray.exceptions.OutOfMemoryError("the node is running low on memory")
    assert is_memory_kill(oom)
    assert is_memory_kill(ray.exceptions.OutOfMemoryError("no telling words at all"))  # by its type alone
    died = actor_died(KILLED)
    assert str(died).startswith(ray.exceptions.ActorDiedError.BASE_ERROR_MSG) and is_memory_kill(died)
    assert is_memory_kill(RuntimeError(KILLED))  # the message alone (Ray wraps the worker's error)
    try:  # wrapped: the memory kill is the cause of what the caller sees
        try:
            raise oom
        except ray.exceptions.OutOfMemoryError as inner:
            raise RuntimeError("worker group failed") from inner
    except RuntimeError as outer:
        assert is_memory_kill(outer)

    assert not is_memory_kill(None)
    assert not is_memory_kill(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_memory_kill(ValueError("loss is NaN at step 3"))
    assert not is_memory_kill(actor_died("The actor died because its process exited with code 1."))
    assert not is_memory_kill(ray.exceptions.ActorDiedError())


def test_the_detail_is_the_nodes_memory_when_ray_gives_it():
    assert memory_kill_detail(ray.exceptions.OutOfMemoryError(KILLED)) == "the node used 22.40 of 23.54 GB"
    assert memory_kill_detail(actor_died(KILLED)) == "the node used 22.40 of 23.54 GB"
    # no figures: the line that says what happened, else the first line
    assert memory_kill_detail(RuntimeError("worker 3 stopped\nkilled by the memory monitor\n...")) == \
        "killed by the memory monitor"
    assert memory_kill_detail(ray.exceptions.OutOfMemoryError("boom\nmore")) == "boom"


def test_the_callback_stops_memory_kills_only():
    callback = StopOnOutOfMemory()
    assert callback.after_exception(None, {0: RuntimeError("boom"), 1: ValueError("nan")}) is None
    assert callback.after_exception(None, {}) is None
    with pytest.raises(WorkerOutOfMemory) as caught:
        callback.after_exception(None, {3: ray.exceptions.OutOfMemoryError(KILLED), 0: RuntimeError("boom"),
                                        1: actor_died(KILLED)})
    # the lowest rank killed for memory is named, with the node's figures
    assert caught.value.rank == 1 and caught.value.detail == "the node used 22.40 of 23.54 GB"
    assert str(caught.value) == "worker 1 was killed for lack of memory: the node used 22.40 of 23.54 GB"


def test_the_stop_is_found_inside_what_fit_raises():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    stop = WorkerOutOfMemory(0, "the node used 22.40 of 23.54 GB")
    assert find_worker_oom(stop) is stop
    assert find_worker_oom(ControllerError(stop)) is stop
    # it travels from the controller to the driver pickled, inside the ControllerError
    received = find_worker_oom(pickle.loads(pickle.dumps(ControllerError(stop))))
    assert (type(received), received.rank, received.detail, str(received)) == (
        WorkerOutOfMemory, 0, "the node used 22.40 of 23.54 GB", str(stop))
    try:  # and further down a chain of causes
        try:
            raise ControllerError(stop)
        except ControllerError as inner:
            raise RuntimeError("fit() failed") from inner
    except RuntimeError as outer:
        assert find_worker_oom(outer) is stop
    assert find_worker_oom(None) is None
    assert find_worker_oom(ControllerError(RuntimeError("the controller crashed"))) is None
    # a memory kill that no callback turned into a stop is not one (it was retried as any failure)
    assert find_worker_oom(WorkerGroupError("rank 0 died", {0: ray.exceptions.OutOfMemoryError(KILLED)})) is None


def test_the_console_line_gives_the_peak_the_estimate_and_the_keys():
    stop = WorkerOutOfMemory(1, "the node used 22.40 of 23.54 GB")
    line = out_of_memory_line(stop, peak_mb=3072.0, estimate_mb=2560.0)
    assert "\n" not in line
    assert line.startswith("stopped: worker 1 was killed for lack of memory: the node used 22.40 of 23.54 GB; ")
    assert "its last reported peak was 3.0 GiB" in line and "the pre-flight estimate was 2.5 GiB per worker" in line
    assert "Nothing was retried" in line and "train.lm_items_per_step" in line and "--estimate-memory" in line
    bare = out_of_memory_line(stop, peak_mb=None, estimate_mb=None)
    assert "peak" not in bare and "estimate was" not in bare


def test_the_driver_turns_the_stop_into_one_line_with_the_last_logged_peak(tmp_path):
    """What ``train()`` raises for ``fit()``'s error (the CLI prints it after "llmrec-dist train:", exit 2):
    the peak is the last ``peak_rss_mb`` rank 0 logged in the run, the estimate the pre-flight one."""
    from ray.train.v2.api.exceptions import ControllerError

    from llmrec_dist.tracking import client, start_run
    from llmrec_dist.train.launcher import OutOfMemoryStop, TrainError, _oom_stop
    from llmrec_dist.train.memory import MemoryEstimate

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    run_id = start_run(uri, "oom")
    for step, mb in enumerate([1000.0, 3072.0]):
        client(uri).log_metric(run_id, "peak_rss_mb", mb, step=step)
    stop = WorkerOutOfMemory(0, "the node used 22.40 of 23.54 GB")
    estimate = MemoryEstimate(process_mb=2560.0)
    line = _oom_stop(ControllerError(stop), uri, run_id, estimate)
    assert isinstance(line, OutOfMemoryStop) and isinstance(line, TrainError)
    assert str(line) == out_of_memory_line(stop, 3072.0, 2560.0)
    assert _oom_stop(RuntimeError("boom"), uri, run_id, estimate) is None


# ---------------------------------------------------------------------------------------------
# integration: a real local Ray, a real Ray Train run
# ---------------------------------------------------------------------------------------------


def _failing_loop(starts: str, kind: str):
    """A per-worker loop that records each start in the file ``starts`` and then fails on rank 0:
    ``kind`` "oom" raises what Ray raises for a memory kill, "error" an ordinary RuntimeError. Built
    here as a closure so that Ray pickles it by value (the workers cannot import this test module)."""

    def loop(loop_config: dict) -> None:
        import ray.exceptions
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        with open(starts, "a") as handle:
            handle.write(f"{rank}\n")
        if rank == 0:
            if kind == "oom":
                raise ray.exceptions.OutOfMemoryError(loop_config["message"])
            raise RuntimeError("an ordinary failure: retried like any other")

    return loop


@pytest.mark.integration
@pytest.mark.parametrize("kind,starts", [("oom", 1), ("error", 3)])
def test_a_memory_kill_is_not_retried_where_an_ordinary_failure_is(ray_cluster, synthetic_dataset, tmp_path,
                                                                   kind, starts):
    """``train.max_failures=2``: an ordinary failure starts the worker group 3 times; a memory kill
    once, and ``fit()`` raises an error holding the :class:`WorkerOutOfMemory` of rank 0."""
    from llmrec_dist.data.dataset_format import read_manifest
    from llmrec_dist.train.launcher import build_trainer

    cfg = load_config(QUICKSTART, [f"data.path={synthetic_dataset}", f"train.storage_path={tmp_path / 'runs'}",
                                   "scaling.num_workers=1", "train.batch_size=64", "train.max_failures=2",
                                   "mlflow.registered_model="])
    record = tmp_path / "starts.txt"
    trainer = build_trainer(cfg, read_manifest(synthetic_dataset), run_id=f"oom-test-{kind}", tracking_uri="unused", run_name=f"oom-{kind}",
                            loop=_failing_loop(str(record), kind), extra_loop_config={"message": KILLED})
    error = None
    try:
        result = trainer.fit()
        error = result.error
    except Exception as err:  # noqa: BLE001 - what fit() raises is what is under test
        error = err
    assert error is not None, "the run failed on every attempt, yet fit() reported success"
    assert record.read_text().split() == ["0"] * starts
    oom = find_worker_oom(error)
    if kind == "oom":
        assert oom is not None, repr(error)
        assert oom.rank == 0 and oom.detail == "the node used 22.40 of 23.54 GB"
    else:
        assert oom is None, repr(error)
        assert "an ordinary failure" in str(error)
