"""Shared fixtures: one local Ray per test session, and small prepared datasets."""

from __future__ import annotations

import os

import pytest

from llmrec_dist.ray_setup import WORKER_ENV


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (start-up dominates small tests).

    4 logical CPUs on a 2-core machine: two 1-CPU training workers plus room for Ray Data, as
    llmrec_dist's own local start-up does.
    """
    import ray

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=4, num_gpus=0,
             runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset shared by the integration tests (read-only: do not modify)."""
    from llmrec_dist.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_dataset("synthetic", out, synthetic={"n_users": 300, "n_items": 80}, seed=1)
    return out
