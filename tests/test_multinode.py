"""A real 2-node Ray cluster on this machine (a head started with `ray start --head`, one more node with
`ray start --address`), and a training run submitted to it the way a cluster job is (RAY_ADDRESS).

The nodes are sized so that the two training workers cannot share one: the head offers 3 CPUs and the
second node 2, and each worker asks for 2. The dataset and the checkpoints are given as ``file://`` URIs,
the path form of shared storage, so the run goes through the same code paths as with s3:// or gs://.
The text tower's cache is built once by the driver, next to the dataset, and read by the workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ports import free_port, port_flags
from text_fixtures import make_tiny_encoder
from mlflow_db import sqlite_uri

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
RAY = str(Path(sys.executable).with_name("ray"))


def _node_ports() -> list[str]:
    return port_flags("node-manager", "object-manager", "metrics-export", "dashboard-agent-listen",
                      "dashboard-agent-grpc", "runtime-env-agent")


def _alive_nodes(address: str) -> list[str]:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(address, [node ids], dashboard URL) of a head + 1 worker node, torn down afterwards."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = f"/tmp/ray-2node-{port}"
    logs = tmp_path_factory.mktemp("two-nodes")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # no 30 s drain on SIGTERM (as the session's Ray in conftest)
    env.update(RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    common = ["--node-ip-address=127.0.0.1", "--num-gpus=0", "--object-store-memory=300000000",
              "--disable-usage-stats", "--block"]
    head_ports = port_flags("dashboard", "ray-client-server")
    dashboard = f"http://127.0.0.1:{head_ports[0].split('=')[1]}"
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=3",
         "--dashboard-host=127.0.0.1", *head_ports, *_node_ports(), *common],
        env=env, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    procs = [head]
    try:
        deadline = time.time() + 120
        while not _alive_nodes(address):
            assert time.time() < deadline and head.poll() is None, (logs / "head.log").read_text()[-3000:]
            time.sleep(1)
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", "--num-cpus=2", *_node_ports(), *common],
            env=env, stdout=open(logs / "node.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        while len(nodes := _alive_nodes(address)) < 2:
            assert time.time() < deadline and worker.poll() is None, (logs / "node.log").read_text()[-3000:]
            time.sleep(1)
        yield address, nodes, dashboard
    finally:
        for proc in reversed(procs):  # `ray start --block` stops what it started on SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_training_spans_both_nodes_with_uri_paths(two_nodes, tmp_path):
    from mlflow.tracking import MlflowClient

    from llmrec_dist.data.prepare import prepare_dataset

    address, node_ids, _ = two_nodes
    data = tmp_path / "shared" / "data"
    prepare_dataset("synthetic", data, synthetic={"n_users": 200, "n_items": 60}, seed=5)
    import pyarrow.parquet as pq

    texts = pq.read_table(data / "items.parquet").column("text").to_pylist()
    encoder = make_tiny_encoder(tmp_path / "tiny-bert", texts)
    uri = sqlite_uri(tmp_path / 'mlflow.db')
    storage = (tmp_path / "shared" / "runs").as_uri()
    cmd = [sys.executable, "-m", "llmrec_dist.cli", "train", "--config", str(QUICKSTART), "--json",
           f"data.path={data.as_uri()}", f"train.storage_path={storage}", f"mlflow.tracking_uri={uri}",
           "mlflow.registered_model=", "model.item_repr=id+text", "model.freeze=frozen",
           f"model.text_encoder={encoder}", "model.hidden_size=16", "model.num_heads=2", "model.max_len=20",
           "train.epochs=2", "train.patience=0", "train.batch_size=64",
           "scaling.num_workers=2", "scaling.cpus_per_worker=2"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": address})
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["metrics"]["epochs_run"] == 2
    assert 0 <= summary["metrics"]["test_ndcg_at_10"] <= 1

    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    placed = run.data.tags["llmrec.worker_nodes"].split(",")
    assert len(placed) == 2 and set(placed) == set(node_ids), (placed, node_ids)  # one worker per node
    assert run.data.tags["llmrec.num_nodes"] == "2"
    assert run.data.tags["llmrec.text_cache"] == "hit"  # the driver built it; the workers read it
    caches = list((data / "cache" / "text").iterdir())
    assert len(caches) == 1, caches
    run_folder = tmp_path / "shared" / "runs" / f"train-{summary['run_id'][:12]}"
    assert (run_folder / "run.json").is_file()
    assert list(run_folder.glob("checkpoint_*")), "checkpoints were written to the storage URI"
    print(f"\n2-node training run: {seconds:.1f} s (command start to exit)")


def test_ray_job_submit_with_a_working_dir_runs_the_train_entry_point(two_nodes, tmp_path):
    """The cluster path of docs/cluster.md and deploy/rayjob-*.yaml: `ray job submit --working-dir DIR --
    python jobs/train.py --config configs/...` against the job API of the 2-node cluster. The working
    directory (a copy of the repository's jobs/ and configs/) is uploaded through the runtime_env, the
    job's relative paths resolve in it, and the run trains on both nodes."""
    from mlflow.tracking import MlflowClient

    from llmrec_dist.data.prepare import prepare_dataset

    address, node_ids, dashboard = two_nodes
    root = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "job"
    shutil.copytree(root / "jobs", workdir / "jobs")
    shutil.copytree(root / "configs", workdir / "configs")
    data = tmp_path / "shared" / "data"
    prepare_dataset("synthetic", data, synthetic={"n_users": 200, "n_items": 60}, seed=6)
    uri = sqlite_uri(tmp_path / 'mlflow.db')
    cmd = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(workdir), "--",
           # the cluster's Python (a pod's image has one; here `python` on PATH may be another)
           sys.executable, "jobs/train.py", "--config", "configs/quickstart.yaml", "--json",
           f"data.path={data.as_uri()}", f"train.storage_path={(tmp_path / 'shared' / 'runs').as_uri()}",
           f"mlflow.tracking_uri={uri}",
           "mlflow.registered_model=", "model.hidden_size=16", "model.num_heads=2", "model.max_len=20",
           "train.epochs=1", "train.batch_size=64", "scaling.num_workers=2", "scaling.cpus_per_worker=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    said = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "INFO" not in line)
    assert proc.returncode == 0 and "succeeded" in said, said[-4000:]
    run_id = re.search(r'"run_id": "([0-9a-f]+)"', proc.stdout).group(1)  # the job's --json summary
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["test_ndcg_at_10"] <= 1
    assert set(run.data.tags["llmrec.worker_nodes"].split(",")) == set(node_ids)
