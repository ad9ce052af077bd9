"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local one sized to fit."""

from __future__ import annotations

import math
import os

# Read by Ray and by the workers it starts, so they must be set before ray.init.
WORKER_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
}


def local_cpus_needed(num_workers: int, cpus_per_worker: float) -> int:
    """Logical CPUs a local Ray must advertise: the workers plus one left for Ray Data's read tasks.

    On a 2-core machine two 1-CPU workers would otherwise leave Ray Data nothing and the read
    backpressures forever (../shared/STACK-NOTES.md), so we oversubscribe logical CPUs instead.
    """
    return max(os.cpu_count() or 1, math.ceil(num_workers * cpus_per_worker) + 1)


def init_ray(num_workers: int, cpus_per_worker: float, use_gpu: bool = False,
             local_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` or start a local Ray advertising ``local_cpus`` logical CPUs
    (default: enough for one run of ``num_workers`` workers, see :func:`local_cpus_needed`)."""
    import ray

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=True)
        return
    # The dashboard (+2-3 s) serves the State API that Ray Train's placement-group cleaner polls;
    # without it the logs fill with "Failed to query Ray Train Controller actor state".
    # address="local": always a new local Ray. Without it ray.init() would join any cluster that
    # `ray start` left on this machine (/tmp/ray/ray_current_cluster) and then refuse num_cpus.
    kwargs = {"address": "local", "num_cpus": local_cpus or local_cpus_needed(num_workers, cpus_per_worker),
              "runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": True}
    if not use_gpu:
        kwargs["num_gpus"] = 0
    ray.init(**kwargs)
