"""deploy/: the KubeRay manifests (RayCluster, RayJobs) and the image they run, checked for structure and
for agreement with the project: the fields KubeRay's v1 API defines (a typo is an error), one image and
one Ray version everywhere, GPU workers that autoscale, the shared volume mounted where the jobs write,
and every job's entry point, config and overrides runnable as written.

Fast and offline: no Kubernetes cluster is reachable here, so nothing is applied.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from llmrec_dist.config import load_config
from llmrec_dist.sweep.search import load_sweep

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
APP = "/home/ray/llmrec_dist"   # where deploy/Dockerfile puts the repository
SHARED = "/shared"

# The spec fields of KubeRay's ray.io/v1 API (https://ray-project.github.io/kuberay/reference/api/).
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
                "scaleStrategy", "suspend", "idleTimeoutSeconds"}
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "clusterSelector", "rayClusterSpec", "submitterPodTemplate",
               "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "submissionMode",
               "suspend", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "metadata",
               "backoffLimit", "submitterConfig", "managedBy", "deletionStrategy"}


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(DEPLOY.glob("*.yaml"))}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return _manifests()


def _by_kind(manifests, kind):
    return [m for m in manifests.values() if m["kind"] == kind]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_every_manifest_is_a_kuberay_v1_resource_with_known_fields(manifests):
    assert {m["kind"] for m in manifests.values()} == {"RayCluster", "RayJob"}
    for name, m in manifests.items():
        assert m["apiVersion"] == "ray.io/v1", name
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", m["metadata"]["name"]), name
        allowed = RAYCLUSTER_SPEC if m["kind"] == "RayCluster" else RAYJOB_SPEC
        assert set(m["spec"]) <= allowed, (name, set(m["spec"]) - allowed)
    (cluster,) = _by_kind(manifests, "RayCluster")
    assert set(cluster["spec"]["headGroupSpec"]) <= HEAD_GROUP
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP


def test_the_cluster_runs_this_ray_on_one_image_with_autoscaling_gpu_workers(manifests):
    (cluster,) = _by_kind(manifests, "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__       # the Ray the project is tested with
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"    # drivers only, as in cluster.yaml
    images = {c["image"] for c in _containers(head["template"])}
    (gpu,) = spec["workerGroupSpecs"]
    assert spec["enableInTreeAutoscaling"] and gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] >= 1
    for container in _containers(gpu["template"]):
        images.add(container["image"])
        resources = container["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    for job in _by_kind(manifests, "RayJob"):
        images |= {c["image"] for c in _containers(job["spec"]["submitterPodTemplate"])}
    assert len(images) == 1, images                     # one image: the same Ray and packages everywhere


def test_every_pod_mounts_the_shared_volume_it_declares(manifests):
    (cluster,) = _by_kind(manifests, "RayCluster")
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in
                                                                 cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        volumes = {v["name"] for v in template["spec"]["volumes"]}
        for container in _containers(template):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get(SHARED) in volumes
            env = {e["name"]: e["value"] for e in container["env"]}
            assert env["HF_HUB_OFFLINE"] == "1" and env["MLFLOW_TRACKING_URI"].startswith("http")


@pytest.mark.parametrize("name", [p.name for p in sorted(DEPLOY.glob("rayjob-*.yaml"))])
def test_each_rayjob_targets_the_cluster_and_runs_a_job_entry_point_as_written(manifests, name):
    job = manifests[name]
    (cluster,) = _by_kind(manifests, "RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(f"{APP}/jobs/")
    script = ROOT / argv[1][len(APP) + 1:]
    assert script.is_file(), script
    assert argv[2] == "--config" and argv[3].startswith(f"{APP}/configs/")
    config, overrides = ROOT / argv[3][len(APP) + 1:], argv[4:]
    if script.name == "tune.py":
        sweep = load_sweep(str(config), overrides)
        cfg, outputs = sweep.base, [sweep.search.storage_path]
    else:
        cfg = load_config(config, overrides)
        outputs = []
    for path in [cfg.data.path, cfg.train.storage_path, *outputs]:
        assert path.startswith(f"{SHARED}/"), path      # every pod sees it
    if cfg.scaling.use_gpu:
        (gpu,) = cluster["spec"]["workerGroupSpecs"]
        per_pod = int(_containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"])
        assert cfg.scaling.num_workers * cfg.scaling.gpus_per_worker <= per_pod * gpu["maxReplicas"]


def test_the_image_is_built_from_the_clusters_ray_with_the_repository_where_the_jobs_look():
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    base = re.search(r"^FROM (\S+)", dockerfile, flags=re.M).group(1)
    cluster_yaml = yaml.safe_load((ROOT / "cluster.yaml").read_text(encoding="utf-8"))
    assert base == cluster_yaml["docker"]["image"] and f":{ray.__version__}-" in base
    assert re.search(rf"^COPY .* \. {APP}$", dockerfile, flags=re.M)
    assert "torch==2.13.0" in dockerfile and f'-e "{APP}[text]"' in dockerfile


def test_no_credentials_in_the_manifests():
    for path in DEPLOY.iterdir():
        text = path.read_text(encoding="utf-8").lower()
        for word in ("secret_access_key", "aws_access_key_id", "password", "api_key", "token:"):
            assert word not in text, (path.name, word)
