"""A real S3-compatible server on 127.0.0.1 for the ``objectstore`` tests: moto's standalone server
(``moto_server``, from the test extra), one per test, in its own process group.

The tests reach it the way users reach any S3-compatible store: the standard AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), handed to the commands they
run; nothing about access goes into a config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ports import free_port

START_TIMEOUT_S = 60


@dataclasses.dataclass
class S3Server:
    endpoint: str
    env: dict  # this process's environment plus the store's endpoint and credentials
    secret: str  # the secret access key: must appear in no log, config or MLflow param

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.secret)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The objects under ``prefix``, without the empty ``folder/`` markers pyarrow leaves behind it
        when it deletes a folder's last file (no reader sees them as data)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", [])
                      if not (obj["Key"].endswith("/") and obj["Size"] == 0))


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_s3_server(log_dir: Path, auth: bool = False):
    """An :class:`S3Server`; with ``auth`` the server checks credentials (and knows none: every request
    is denied, as with wrong keys against a real store)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server_env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    if auth:
        server_env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    binary = Path(sys.executable).with_name("moto_server")
    log = open(log_dir / f"moto-{port}.log", "wb")
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=server_env, start_new_session=True)
    secret = secrets.token_hex(16)
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "llmrec-test",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("RAY_ADDRESS", None)  # the commands start their own Ray, which inherits this environment
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _up(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start (exit {proc.poll()})")
            time.sleep(0.2)
        yield S3Server(endpoint, env, secret)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
