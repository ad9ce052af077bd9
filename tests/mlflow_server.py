"""A real `mlflow server` (SQLite backend, served artifacts) on 127.0.0.1 for the tests that need one.

A test module takes it as its own module-scoped fixture: ``mlflow_server = mlflow_server_fixture``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ports import free_port
from mlflow_db import sqlite_uri

SERVER_START_TIMEOUT_S = 180  # generous: a loaded 2-core machine can take minutes


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_mlflow_server(root: Path, artifacts: str | None = None, env: dict | None = None):
    """URL of an `mlflow server` on 127.0.0.1 (SQLite under ``root``, artifacts served from
    ``artifacts``: ``root/artifacts`` or a URI such as ``s3://bucket/mlflow``); stopped (whole process
    group) on exit. ``env``: the server's environment (default: this process's, without MLFLOW_*)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    command += ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", sqlite_uri(root / 'db.sqlite'),
                "--serve-artifacts", "--artifacts-destination", artifacts or str(root / "artifacts")]
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("MLFLOW_")}
    # No background job consumers (seven extra processes, ~10 s of start-up) and no telemetry.
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server did not become healthy (exit {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn/gunicorn workers
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory):
    """URL of a fresh `mlflow server` on 127.0.0.1 for the test module."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url
