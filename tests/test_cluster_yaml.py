"""cluster.yaml: valid for Ray's cluster launcher, shaped as docs/cluster.md describes, and every job command of
the cluster guide (docs/cluster.md) and of the README's short cluster section runnable as written (flags,
configs, overrides, shared paths).

Fast and offline: nothing here starts Ray, talks to a cloud or installs anything.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
HEAD = "head_cpu"
GPU_WORKER = "gpu_worker"
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def _project_requirement(name: str) -> Requirement:
    """The requirement on ``name`` in pyproject.toml's dependencies."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed package's metadata says the same
        dependencies = importlib.metadata.requires("llmrec_dist") or []
    else:
        pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        dependencies = pyproject["project"]["dependencies"]
    return next(r for r in map(Requirement, dependencies) if r.name == name and r.marker is None)


def _ray_up_view(cluster: dict) -> dict:
    """The config as `ray up` sees it before it talks to the cloud: Ray's provider defaults filled in,
    setup commands merged, per-type worker bounds set (ray.autoscaler._private.commands._bootstrap_config)."""
    return prepare_config(copy.deepcopy(cluster))


# ------------------------------------------------------------------------------------- Ray's own checks
def test_valid_for_the_ray_cluster_launcher(cluster):
    validate_config(_ray_up_view(cluster))  # Ray's ray-schema.json, via jsonschema; raises if invalid


def test_the_schema_check_rejects_a_typo(cluster):
    """The validation above is live: a misspelt key of a node type fails it."""
    bad = copy.deepcopy(cluster)
    bad["available_node_types"][GPU_WORKER]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(_ray_up_view(bad))


def test_states_that_it_was_not_launched_from_ci():
    header = CLUSTER_YAML.read_text(encoding="utf-8").split("\ncluster_name:")[0]
    assert "validates this file against Ray's own schema" in header
    assert "NOT been launched on a cloud" in header


# ------------------------------------------------------------------------------------- node types
def test_head_runs_no_training(cluster):
    config = _ray_up_view(cluster)
    assert config["head_node_type"] == HEAD
    head = config["available_node_types"][HEAD]
    # 0 CPUs (and no GPU) advertised: Ray Train workers, trial drivers and Ray Data tasks go elsewhere.
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head["max_workers"] == 0


def test_gpu_workers_have_gpus_and_autoscale(cluster):
    config = _ray_up_view(cluster)
    workers = config["available_node_types"][GPU_WORKER]
    assert workers["resources"]["GPU"] >= 1 and workers["resources"]["CPU"] >= 1
    assert 0 == workers["min_workers"] < workers["max_workers"] <= config["max_workers"]
    assert set(config["available_node_types"]) == {HEAD, GPU_WORKER}


# ------------------------------------------------------------------------------------- installing the package
def _pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if c.lstrip().startswith("pip install")]


def test_setup_installs_pinned_torch_before_the_package(cluster):
    installs = _pip_installs(cluster["setup_commands"])
    torch_at = next(i for i, c in enumerate(installs) if re.search(r"\btorch==", c))
    package_at = next(i for i, c in enumerate(installs) if "llmrec_dist[text]" in c)
    assert torch_at < package_at, "torch is installed first, pinned, so the package's resolve keeps it"
    pinned = re.search(r"\btorch==([\w.+]+)", installs[torch_at]).group(1)
    torch_req = _project_requirement("torch")
    assert torch_req.specifier.contains(pinned), f"torch=={pinned} is outside pyproject's {torch_req}"
    assert f"pip install torch=={pinned}" in (ROOT / "README.md").read_text(encoding="utf-8"), \
        "the cluster installs the torch the README tells users to install"


def test_setup_installs_the_mounted_repository_editable(cluster):
    package = next(c for c in _pip_installs(cluster["setup_commands"]) if "llmrec_dist[text]" in c)
    mounted = next(remote for remote, local in cluster["file_mounts"].items()
                   if (ROOT / local).resolve() == ROOT)
    assert f'pip install -e "{mounted}[text]"' in package


def test_setup_pins_ray_to_the_image(cluster):
    image_version = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py\d+-(?:gpu|cu\d+)",
                                 cluster["docker"]["image"]).group(1)
    package = next(c for c in _pip_installs(cluster["setup_commands"]) if "llmrec_dist[text]" in c)
    assert re.search(rf'"ray\[[\w,]+\]=={re.escape(image_version)}"', package), \
        "pip must not move the image's Ray (it has to equal the Ray that runs `ray up` / `ray job submit`)"
    ray_req = _project_requirement("ray")
    assert ray_req.specifier.contains(image_version)


def test_file_mounts_exist_in_the_repository(cluster):
    assert cluster["file_mounts"], "the repository is mounted on every node"
    for remote, local in cluster["file_mounts"].items():
        path = ROOT / local  # `ray up` runs from the repository root
        assert path.exists(), f"file_mounts[{remote}]: {local} does not exist in the repository"
        assert path.is_dir(), f"file_mounts[{remote}]: mount a directory (file mounts go stale in Docker)"
    assert any((ROOT / local / "pyproject.toml").is_file() for local in cluster["file_mounts"].values())


@pytest.mark.parametrize("key", COMMAND_LISTS)
def test_commands_are_valid_shell(cluster, key):
    for command in cluster.get(key, []):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{key}: {command!r}: {result.stderr}"


# ------------------------------------------------------------------------------------- runtime environment
def test_every_node_logs_to_an_mlflow_server(cluster):
    """Rank 0 may run on any node, so every `ray start` exports an http:// tracking URI (no SQLite file)."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert re.search(r"export MLFLOW_TRACKING_URI=http://\S.*?:5000;", start), \
            f"{key}: `ray start` gets no MLFLOW_TRACKING_URI of the server on port 5000"
    head_server = " ".join(cluster["head_start_ray_commands"])
    assert "mlflow server --host 0.0.0.0 --port 5000" in head_server
    assert "sqlite:///" not in " ".join(cluster["worker_start_ray_commands"])


def test_nodes_are_offline_for_the_hugging_face_hub(cluster):
    assert "--env HF_HUB_OFFLINE=1" in cluster["docker"]["run_options"]


# ------------------------------------------------------------------------------------- the documented commands
CLUSTER_GUIDE = "docs/cluster.md"


def _cluster_section(doc: str) -> str:
    """The whole cluster guide, or the README's short `## Running on a Ray cluster` section."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    if doc == CLUSTER_GUIDE:
        return text
    return text.split("## Running on a Ray cluster", 1)[1].split("\n## ", 1)[0]


def _cluster_commands(doc: str) -> list[str]:
    section = _cluster_section(doc)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # line continuations
        commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return commands


def _job_commands(doc: str) -> list[tuple[str, list[str]]]:
    """(verb, arguments) of every `python jobs/<verb>.py ...` in ``doc``'s cluster commands."""
    jobs = []
    for command in _cluster_commands(doc):
        tokens = shlex.split(command, comments=True)
        for i, token in enumerate(tokens[:-1]):
            if token == "python" and (m := re.fullmatch(r"jobs/(\w+)\.py", tokens[i + 1])):
                jobs.append((m.group(1), tokens[i + 2:]))
    return jobs


def _volumes(cluster: dict) -> list[str]:
    """Container paths that are host mounts (the shared filesystem)."""
    return [opt.split(":")[1] for opt in cluster["docker"]["run_options"] if opt.startswith("--volume ")]


def _shared(cluster: dict, location: str) -> bool:
    """Does every node see ``location``: an object-store URI or a path on a volume mounted on every node?"""
    return "://" in location or any(location == v or location.startswith(v.rstrip("/") + "/")
                                    for v in _volumes(cluster))


def test_cluster_guide_submits_prepare_train_and_tune():
    verbs = [verb for verb, _ in _job_commands(CLUSTER_GUIDE)]
    assert {"prepare", "train", "tune"} <= set(verbs)
    commands = "\n".join(_cluster_commands(CLUSTER_GUIDE))
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray job logs", "ray job stop",
                 "ray down cluster.yaml"):
        assert step in commands, f"{CLUSTER_GUIDE} lacks `{step}`"


def test_readme_cluster_section_submits_a_training_job_and_links_the_guide():
    assert [verb for verb, _ in _job_commands("README.md")] == ["train"]
    commands = "\n".join(_cluster_commands("README.md"))
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray down cluster.yaml"):
        assert step in commands, f"the README's cluster section lacks `{step}`"
    assert f"]({CLUSTER_GUIDE})" in _cluster_section("README.md")


JOBS = [(doc, verb, args) for doc in (CLUSTER_GUIDE, "README.md") for verb, args in _job_commands(doc)]


@pytest.mark.parametrize("doc,verb,args", JOBS, ids=[f"{doc}-{i}-{verb}" for i, (doc, verb, _) in enumerate(JOBS)])
def test_documented_job_command_is_valid(cluster, doc, verb, args):
    """Every job command parses with the CLI's own parser; its config and overrides validate with the
    project's loaders; its workers fit the GPU nodes; every location it reads or writes is shared by all
    nodes."""
    from llmrec_dist.cli import build_parser
    from llmrec_dist.config import load_config
    from llmrec_dist.sweep.search import load_sweep

    script = (ROOT / "jobs" / f"{verb}.py").read_text(encoding="utf-8")
    assert f'main(["{verb}", *sys.argv[1:]])' in script, f"jobs/{verb}.py is not the `{verb}` entry point"
    parsed = build_parser().parse_args([verb, *args])  # SystemExit on an unknown flag
    if verb == "prepare":
        locations = [parsed.output] + ([parsed.input] if parsed.input else [])
    elif getattr(parsed, "resume", None):
        locations = [parsed.resume]
    else:
        config_file = ROOT / parsed.config
        assert config_file.parent == ROOT / "configs" and config_file.is_file(), parsed.config
        if verb == "tune":
            sweep = load_sweep(str(config_file), parsed.overrides)
            cfg, locations = sweep.base, [sweep.search.storage_path]
        else:
            cfg, locations = load_config(config_file, parsed.overrides), []
        locations += [cfg.data.path, cfg.train.storage_path]
        assert cfg.mlflow.tracking_uri == "", "the cluster's MLFLOW_TRACKING_URI must apply"
        # The head advertises no CPU: every worker must fit one GPU node, and a run (or trial) the group.
        gpu_type = cluster["available_node_types"][GPU_WORKER]
        s = cfg.scaling
        assert s.use_gpu and s.gpus_per_worker <= gpu_type["resources"]["GPU"]
        assert s.cpus_per_worker <= gpu_type["resources"]["CPU"]
        assert s.num_workers * s.gpus_per_worker <= gpu_type["resources"]["GPU"] * gpu_type["max_workers"]
    for location in locations:
        assert _shared(cluster, location), f"{doc}: {verb}: {location} is not on storage every node reads"
