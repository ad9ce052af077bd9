"""Shared fixtures: one local Ray per test session, and small prepared datasets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmrec_dist.ray_setup import WORKER_ENV
from ports import free_port, port_flags


@pytest.fixture(scope="session", autouse=True)
def command_logs_in_tmp(tmp_path_factory):
    """Commands the tests run (in this process or in a child) write their log files here, not into the
    checkout's ./llmrec_logs."""
    from llmrec_dist.console import LOG_DIR_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOG_DIR_ENV, str(tmp_path_factory.mktemp("llmrec_logs")))
        yield


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray for the whole session (start-up dominates small tests).

    4 logical CPUs on a 2-core machine: two 1-CPU training workers plus room for Ray Data, as
    llmrec_dist's own local start-up does. Started with `ray start` on a known port so that every Ray
    process gets RAY_ADDRESS: Ray Train's placement-group cleaner (which frees the resources of a sweep
    trial that ASHA killed) finds its cluster through the State API, and without RAY_ADDRESS it gives
    up when another Ray instance runs on the same machine.
    """
    import ray

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address}
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w")
    # Every port chosen free, so that another Ray on the machine (a benchmark, say) does not collide.
    ports = port_flags("dashboard", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent",
                       "metrics-export", "ray-client-server")
    # Its own temp dir: `ray start` records its address in <temp dir>/ray_current_cluster, and in the
    # default /tmp/ray any ray.init() on the machine would join this cluster (and other clusters' Ray
    # Train processes would query its State API about their own actors).
    temp_dir = f"/tmp/ray-tests-{address.split(':')[1]}"
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}",
         f"--port={address.split(':')[1]}", *ports, "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats",
         "--block"],
        # No drain on SIGTERM: Ray waits up to 30 s for a draining node's leases (the session's
        # long-lived actors never return theirs) before it stops; nothing here needs a graceful drain.
        env={**env, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=address, runtime_env={"env_vars": {**WORKER_ENV, "RAY_ADDRESS": address}},
                         log_to_driver=False)
                break
            except ConnectionError:
                if time.time() > deadline or head.poll() is not None:
                    raise
                time.sleep(1)
        yield ray
    finally:
        ray.shutdown()
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic dataset shared by the integration tests (read-only: do not modify)."""
    from llmrec_dist.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_dataset("synthetic", out, synthetic={"n_users": 300, "n_items": 80}, seed=1)
    return out
