"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local one sized to fit."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

# Read by Ray and by the workers it starts, so they must be set before ray.init.
WORKER_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train's controller polls its workers this often (default 2 s) and moves on (workers started, run
    # finished, worker group shut down) only at a poll: measured here, a 2-epoch run on a tiny model took
    # 25.4 s at the default and 18.3 s at 0.5 s. A poll is one small remote call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def worker_env() -> dict:
    """The environment variables Ray's processes get (its runtime env): :data:`WORKER_ENV`, and MLflow's
    own logging set-up, which a command's driver turns off (llmrec_dist.console) but the workers keep:
    the levels it sets keep SQLAlchemy from logging every statement of rank 0's MLflow calls."""
    return {**WORKER_ENV, "MLFLOW_CONFIGURE_LOGGING": "true"}

# Ray starts its worker processes at niceness 15 (its `worker_niceness` setting) and its own daemons at
# 0. Beside any normal-priority process on the same cores, the training workers, the Ray Train
# controller and the actors it starts then get almost no CPU: on a 2-core machine the quickstart took
# 6 min next to a 2-thread job at niceness 0 and 77 s next to the same job at 15; the controller's 5 s
# resource request to Ray's AutoscalingCoordinator (an actor that must start first) times out on the way
# ("Failed to send resource request", GetTimeoutError). A local Ray that we start runs only our own work,
# so its workers run at the niceness of the command that started it. A cluster (RAY_ADDRESS) keeps its own
# setting.
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0"}


def local_cpus_needed(num_workers: int, cpus_per_worker: float) -> int:
    """Logical CPUs a local Ray must advertise: the workers plus one left for Ray Data's read tasks.

    On a 2-core machine two 1-CPU workers would otherwise leave Ray Data nothing and the read
    backpressures forever, so we oversubscribe logical CPUs instead.
    """
    return max(os.cpu_count() or 1, math.ceil(num_workers * cpus_per_worker) + 1)


def init_ray(num_workers: int, cpus_per_worker: float, use_gpu: bool = False,
             local_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` or start a local Ray advertising ``local_cpus`` logical CPUs
    (default: enough for one run of ``num_workers`` workers, see :func:`local_cpus_needed`)."""
    import ray

    from llmrec_dist import console

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if session := console.active():
        session.used_ray = True
    if ray.is_initialized():
        return
    # In a command (llmrec_dist.console): Ray's driver-side lines ("Started a local Ray instance", the
    # token-auth warning) go to the log file, and the workers' output (every rank's TrainingReport,
    # Ray Data's plans, the controller's warnings) stays in Ray's session logs unless -v.
    quiet = {"configure_logging": False, "log_to_driver": console.verbose()} if console.active() else \
        {"log_to_driver": True}
    console.quiet_libraries()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": worker_env()}, **quiet)
        console.quiet_libraries()
        return
    # The dashboard (+2-3 s) serves the State API that Ray Train's placement-group cleaner polls;
    # without it the logs fill with "Failed to query Ray Train Controller actor state".
    # address="local": always a new local Ray. Without it ray.init() would join any cluster that
    # `ray start` left on this machine (/tmp/ray/ray_current_cluster) and then refuse num_cpus.
    kwargs = {"address": "local", "num_cpus": local_cpus or local_cpus_needed(num_workers, cpus_per_worker),
              "runtime_env": {"env_vars": worker_env()}, **quiet}
    if not use_gpu:
        kwargs["num_gpus"] = 0
    with local_ray_env():
        ray.init(**kwargs)
    console.quiet_libraries()


@contextmanager
def local_ray_env():
    """:data:`LOCAL_RAY_ENV` in the environment while a local Ray starts (its raylet reads it then and
    its workers inherit the effect); a value the user set wins."""
    added = [key for key in LOCAL_RAY_ENV if key not in os.environ]
    os.environ.update({key: LOCAL_RAY_ENV[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def describe_ray() -> str:
    """One line: where the work runs and where Ray keeps its logs (the workers' output among them)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    what = (f"cluster at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS")
            else "a local instance") + f" ({cpus:g} CPUs" + (f", {gpus:g} GPUs)" if gpus else ")")
    logs = session_log_dir()
    where = "" if not logs else \
        f"; its logs{' (on the head node)' if os.environ.get('RAY_ADDRESS') else ''}: {logs}"
    return f"Ray: {what}{where}"


def session_log_dir() -> str | None:
    """The logs folder of the Ray session this process is connected to, or None. Ray has no public
    call for it (Ray Train and Ray Data read it the same way); the documented layout is
    <temp dir>/session_<time>/logs."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:
        return None
