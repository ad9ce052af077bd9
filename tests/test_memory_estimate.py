"""The pre-flight memory estimate of a training worker (llmrec_dist.train.memory).

- a config that cannot fit is refused before Ray starts or an MLflow run exists, in one line that
  names the keys to lower and ``--force``; ``--force`` starts anyway; ``--estimate-memory`` prints the
  breakdown and starts nothing;
- the estimate against the peaks ``bench lm-memory`` measures in a fresh process, for tiny models;
- a training step's memory does not grow with the catalogue (10^3 → 10^5 items) when the LM runs on
  ``train.lm_items_per_step`` items of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmrec_dist.config import load_config
from llmrec_dist.data.dataset_format import read_manifest
from text_fixtures import make_tiny_encoder

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY_TEXT = ["model.item_repr=text", "model.hidden_size=16", "model.num_heads=2", "model.max_len=20",
             "model.text_max_len=16", "train.batch_size=64", "train.num_negatives=32", "train.epochs=1",
             "scaling.num_workers=2", "mlflow.registered_model="]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic dataset, a tiny BERT over its texts and a "huge" encoder: the same tokenizer
    with the config.json of a 24-layer BERT with a 2^20-wide feed-forward (3.2 billion parameters) and
    no weights at all. The estimate reads only the config, so it runs; a worker would need about 400
    GiB."""
    from transformers import BertConfig

    from llmrec_dist.data.dataset_format import read_items
    from llmrec_dist.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("memory")
    data = root / "data"
    prepare_dataset("synthetic", data, synthetic={"n_users": 300, "n_items": 80}, seed=1)
    tiny = make_tiny_encoder(root / "tiny-bert", read_items(str(data)).column("text").to_pylist())
    huge = root / "huge-bert"
    huge.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, huge / name)
    BertConfig(vocab_size=BertConfig.from_pretrained(tiny).vocab_size, hidden_size=64, num_hidden_layers=24,
               num_attention_heads=2, intermediate_size=2**20, max_position_embeddings=64).save_pretrained(huge)
    assert sorted(p.name for p in huge.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    return {"root": root, "data": data, "tiny": tiny, "huge": huge}


@pytest.fixture
def no_ray(monkeypatch):
    """Record any attempt to start or join Ray: the launcher's ``init_ray`` raises instead. Also makes
    sure the check runs as for a local Ray (no RAY_ADDRESS)."""
    import ray

    from llmrec_dist.train import launcher

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("Ray would start here")

    monkeypatch.setattr(launcher, "init_ray", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    initialised = ray.is_initialized()  # a session that already ran Ray tests has one
    yield attempts
    assert ray.is_initialized() == initialised


@pytest.fixture
def cli(capsys):
    """``llmrec-dist`` in this process: (exit code, stdout, stderr). The root logger's handlers and level
    are restored afterwards (``main`` configures logging)."""
    from llmrec_dist.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(argv))
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def train_args(world, tmp_path, *extra: str) -> list[str]:
    return ["train", "--config", str(QUICKSTART), f"data.path={world['data']}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.storage_path={tmp_path / 'runs'}",
            *TINY_TEXT, *extra]  # a plain URI: the tests check that no database gets created


def test_a_config_that_cannot_fit_is_refused_before_anything_starts(world, tmp_path, cli, no_ray):
    code, out, err = cli(*train_args(world, tmp_path, f"model.text_encoder={world['huge']}", "model.freeze=lora",
                                     "train.lm_items_per_step=256"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("llmrec-dist train:")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("llmrec-dist train: not started: the config needs about ")
    assert "largest: LM activations (" in line
    for key in ("train.lm_checkpoint_items", "train.lm_items_per_step", "model.text_max_len", "model.text_encoder",
                "scaling.num_workers"):
        assert key in line, key
    assert line.endswith("or pass --force to start anyway")
    assert not no_ray  # Ray was never started
    assert not (tmp_path / "mlflow.db").exists()  # nor any MLflow run created
    assert not (tmp_path / "runs").exists()


def test_the_check_is_against_the_local_budget_and_force_skips_it(world, tmp_path, monkeypatch, no_ray):
    """A tiny model with the budget made smaller than it: refused naming the budget; with ``force`` the
    run goes on to start Ray (refused here, so it ends there), its MLflow run tagged with the estimate."""
    from mlflow.tracking import MlflowClient

    from llmrec_dist.train import memory
    from llmrec_dist.train.launcher import train
    from llmrec_dist.train.memory import MemoryPreflightError

    monkeypatch.setattr(memory, "local_worker_budget_mb", lambda workers: (100.0, f"a test budget, {workers} workers"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # plain: the refusal must create no database
    cfg = load_config(QUICKSTART, [f"data.path={world['data']}", f"mlflow.tracking_uri={uri}",
                                   f"train.storage_path={tmp_path / 'runs'}", *TINY_TEXT,
                                   f"model.text_encoder={world['tiny']}", "model.freeze=full"])
    with pytest.raises(MemoryPreflightError, match=r"a worker can use about 0\.1 GiB \(a test budget, 2 workers\)"):
        train(cfg)
    assert not no_ray and not (tmp_path / "mlflow.db").exists()

    with pytest.raises(RuntimeError, match="Ray would start here"):
        train(cfg, force=True)
    assert len(no_ray) == 1
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert float(run.data.tags["llmrec.memory_estimate_mb"]) > 100


def test_estimate_memory_prints_the_breakdown_and_starts_nothing(world, tmp_path, cli, no_ray):
    from llmrec_dist.train.memory import estimate_for_dataset

    args = train_args(world, tmp_path, f"model.text_encoder={world['huge']}", "model.freeze=lora",
                      "train.lm_items_per_step=256")
    code, out, err = cli(*args, "--estimate-memory")
    assert code == 0, err
    assert not [line for line in err.splitlines() if line.startswith("llmrec-dist train:")]
    cfg = load_config(QUICKSTART, args[3:])
    estimate = estimate_for_dataset(cfg, read_manifest(str(world["data"])))
    lines = out.splitlines()
    assert lines[0] == f"estimated peak per worker: {estimate.total_mb:,.0f} MB"
    assert lines[1] == f"  process (Python, torch, Ray): {estimate.process_mb:,.0f} MB"
    for name, mb in estimate.held.items():
        assert f"  held: {name}: {mb:,.0f} MB" in lines
    assert [line for line in lines if line.endswith("<- the peak")] == [
        f"  training step: {sum(estimate.phases['training step'].values()):,.0f} MB  <- the peak"]
    assert any(line.startswith("    LM activations (") for line in lines)
    assert lines[-1].startswith("a worker can use about ") and "2 workers" in lines[-1]
    assert not no_ray and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# the estimate against measured peaks (bench lm-memory: one fresh process per case)
# ---------------------------------------------------------------------------------------------

TOLERANCE = 0.35


@pytest.fixture(scope="module")
def bench_config(world) -> str:
    path = world["root"] / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"path": str(world["data"])},
        "model": {"item_repr": "text", "text_encoder": str(world["tiny"]), "hidden_size": 16, "num_heads": 2,
                  "max_len": 20, "text_max_len": 16},
        "train": {"batch_size": 64, "num_negatives": 32, "lm_items_per_step": 16},
        "scaling": {"num_workers": 1}}))
    return str(path)


@pytest.mark.parametrize("freeze", ["frozen", "full", "lora"])
def test_the_estimate_is_within_35_percent_of_the_measured_peak_of_a_tiny_model(bench_config, freeze):
    """``estimate_error`` = estimate / measured peak - 1, for a tiny BERT on a small synthetic dataset,
    measured by ``bench lm-memory`` in a fresh process (no Ray in either figure). Tolerance: 35%. Tiny
    models are dominated by the process constant (``PROCESS_MB``: Python, torch, transformers): 610-630 MB
    measured here (torch 2.13, transformers 5.25) against 790 MB estimated, +26-29%. So this checks the
    constant and that no component is wildly off, not each component's accuracy.

    The frozen case runs while this process holds 1.5 GiB more: a child's peak must be its own, not the
    parent's (a fork/exec child inherits its parent's ``ru_maxrss``; the benchmark reads VmHWM)."""
    from llmrec_dist.bench.lm_memory import run_case

    ballast = None
    if freeze == "frozen":
        ballast = bytearray(1536 * 2**20)
        ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page: resident
    try:
        case = run_case(bench_config, [f"model.freeze={freeze}"], steps=2, eval_users=64, threads=1)
    finally:
        del ballast
    assert "error" not in case, case
    phases = case["phase_peaks_mb"]
    assert list(phases) == ["start", "setup", "steps", "evaluation", "checkpoint"]
    assert list(phases.values()) == sorted(phases.values()) and phases["checkpoint"] > phases["start"]
    assert case["peak_rss_mb"] == phases["checkpoint"] < 1536
    assert case["lm_items"] == (None if freeze == "frozen" else 16)
    assert abs(case["estimate_error"]) <= TOLERANCE, (case["estimate_mb"], case["peak_rss_mb"])


# ---------------------------------------------------------------------------------------------
# a step's memory does not grow with the catalogue
# ---------------------------------------------------------------------------------------------

# One catalogue size in a fresh process: a `full` tiny-BERT tower over N items (the LM output cache
# filled at random: its content does not matter here), then a few training steps. The peak resident
# memory is reset (/proc/self/clear_refs) once the model and optimiser are built, so what is measured
# is the steps' own increase. With "control", the same is measured for a full softmax over the
# catalogue, a step that does grow with it.
STEP_MEMORY = r'''
import ctypes, gc, json, sys
import torch
from llmrec_dist.config import ModelConfig, TrainConfig
from llmrec_dist.model import build_model
from llmrec_dist.text_tower import TextFeatures, load_text_encoder, tokenize_items
from llmrec_dist.worker.optim import build_optimizer

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(key + ":"))

def reset_peak():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    return status("VmRSS")

a = json.loads(sys.argv[1])
torch.set_num_threads(1)
n, words = a["n_items"], a["words"]
texts = [" ".join(words[(i // len(words) ** k) % len(words)] for k in range(3)) for i in range(n)]
lm, tokenizer = load_text_encoder(a["encoder"])
ids, mask = tokenize_items(tokenizer, texts, 16)
hidden = lm.config.hidden_size
features = TextFeatures("full", hidden, sum(p.numel() for p in lm.parameters()), ids, mask,
                        pooled=torch.randn(n + 1, hidden), lm=lm)
cfg = ModelConfig(item_repr="text", text_encoder=a["encoder"], hidden_size=16, num_heads=2, max_len=20,
                  dropout=0.0, freeze="full")
out = {}
for name, negatives in [("sampled", a["negatives"])] + ([("full", 0)] if a["control"] else []):
    torch.manual_seed(0)
    model = build_model(cfg, n, text=features, num_negatives=negatives, lm_items_per_step=a["lm_items"])
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    draw = torch.Generator().manual_seed(0)
    base = reset_peak()
    for _ in range(a["steps"]):
        model.train()
        seq = torch.randint(1, n + 1, (a["batch"], 21), generator=draw)
        loss = model(seq[:, :-1], seq[:, 1:])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out[name] = status("VmHWM") - base
    del model, opt
print(json.dumps(out))
'''
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three four five six seven "
         "eight nine ten eleven twelve thirteen fourteen fifteen sixteen").split()  # 42^3 > 10^5 texts


def step_memory(encoder: Path, n_items: int, control: bool) -> dict:
    args = {"n_items": n_items, "words": WORDS, "encoder": str(encoder), "negatives": 64, "lm_items": 16,
            "batch": 8, "steps": 3, "control": control}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STEP_MEMORY, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_a_steps_memory_stays_flat_as_the_catalogue_grows(tmp_path):
    """Sampled softmax, ``train.lm_items_per_step=16``, a trainable (``full``) tiny BERT: the peak
    resident memory that 3 training steps add on top of the built model is about the same for 10^3 and
    10^5 items (at most 1.5 x + 50 MB). The model's held memory grows with the catalogue (token ids, the
    LM output cache); a step must not. Measured here: 16.7 and 16.6 MB. The control shows the bound
    would catch a step that does grow: a full softmax over the 10^5 items adds about 260 MB."""
    encoder = make_tiny_encoder(tmp_path / "tiny-bert", [" ".join(WORDS)])
    small = step_memory(encoder, 1_000, control=False)
    large = step_memory(encoder, 100_000, control=True)
    bound = 1.5 * small["sampled"] + 50
    assert small["sampled"] > 0
    assert large["sampled"] <= bound, (small, large)
    assert large["full"] > bound, (small, large)  # the measurement sees a step that scales
