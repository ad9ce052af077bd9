"""LM item towers trained with 2 DDP workers on a real local Ray: each freezing strategy, cold items,
the BERT4Rec-style backbone, and the registered package."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from llmrec_dist.config import load_config
from llmrec_dist.data.dataset_format import read_items
from llmrec_dist.saved_model import WEIGHTS_FILE
from text_fixtures import make_tiny_encoder
from mlflow_db import sqlite_uri

pytestmark = pytest.mark.integration

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY = ["model.hidden_size=16", "model.num_heads=2", "model.max_len=20", "train.epochs=2", "train.patience=0",
        "train.batch_size=64", "train.num_negatives=32", "model.text_max_len=16", "scaling.num_workers=2",
        "train.lr=3e-3", "train.lm_lr=1e-3"]
# (an ID-only model's training and cold metrics are covered by test_train_integration.py and
# test_cold_items.py; each run here costs ~20 s)
RUNS = {
    "frozen": ["model.item_repr=id+text", "model.freeze=frozen", "model.fusion=gate"],
    "top_k": ["model.item_repr=text", "model.freeze=top_k", "model.freeze_k=1"],
    "full": ["model.item_repr=id+text", "model.freeze=full", "model.backbone=bidirectional"],
    # staged fine-tuning: the LoRA run goes on from the frozen run's registered model (train.init_from)
    "lora": ["model.item_repr=id+text", "model.freeze=lora", "model.fusion=gate", "model.lora_r=4",
             "train.init_from={frozen}"],
}


@pytest.fixture(scope="module")
def cold_world(tmp_path_factory):
    from llmrec_dist.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("text-int")
    data = root / "data"
    prepare_dataset("synthetic", data, synthetic={"n_users": 300, "n_items": 80}, seed=1, cold_items=0.1)
    texts = read_items(str(data)).column("text").to_pylist()
    return root, data, make_tiny_encoder(root / "tiny-bert", texts)


@pytest.fixture(scope="module")
def runs(ray_cluster, cold_world):
    from llmrec_dist.train.launcher import train

    root, data, encoder = cold_world
    out = {}
    for name, extra in RUNS.items():
        cfg = load_config(QUICKSTART, [f"data.path={data}", f"train.storage_path={root / 'runs'}",
                                       f"mlflow.tracking_uri={sqlite_uri(root / 'mlflow.db')}",
                                       f"mlflow.registered_model=text-{name.replace('_', '')}",
                                       f"model.text_encoder={encoder}", *TINY,
                                       *(x.format(frozen=out.get("frozen") and out["frozen"].model_uri) for x in extra)])
        out[name] = train(cfg)
    return out


def _weights(outcome):
    return load_file(str(Path(outcome.checkpoint_path) / WEIGHTS_FILE))


def test_every_strategy_trains_and_reports_cold_metrics(runs):
    from mlflow.tracking import MlflowClient

    for name, outcome in runs.items():
        m = outcome.metrics
        assert m["epochs_run"] == 2, name
        assert m["test_cold_users"] > 0 and "test_cold_ndcg_at_10" in m, name
        params = MlflowClient(outcome.tracking_uri).get_run(outcome.run_id).data.params
        total, trainable = int(params["params_total"]), int(params["params_trainable"])
        if name == "full":
            assert trainable == total, name
        else:
            assert 0 < trainable < total, f"{name}: part of the LM is frozen or cached, so it must not train"


def test_frozen_weights_never_move_and_trainable_ones_do(runs, cold_world):
    _, _, encoder = cold_world
    base = load_file(str(encoder / "model.safetensors"))
    frozen = _weights(runs["frozen"])
    assert not any(k.startswith(("items.lm.", "items.top_layers.")) for k in frozen)

    top = _weights(runs["top_k"])
    top_keys = [k for k in top if k.startswith("items.top_layers.0.")]
    assert top_keys
    moved = [k for k in top_keys if not top[k].equal(base[k.replace("items.top_layers.0.", "encoder.layer.1.")])]
    assert moved, "the trainable top layer did not move"

    full = _weights(runs["full"])
    lm = {k[len("items.lm."):]: v for k, v in full.items() if k.startswith("items.lm.")}
    assert sum(not v.equal(base[k]) for k, v in lm.items() if k in base) > len(lm) // 2

    lora = _weights(runs["lora"])
    frozen_base, adapters = {}, {}
    for key, value in lora.items():
        if not key.startswith("items.lm."):
            continue
        name = key[len("items.lm.base_model.model."):]
        (adapters if "lora_" in name else frozen_base)[name.replace(".base_layer", "")] = value
    assert frozen_base and all(v.equal(base[k]) for k, v in frozen_base.items()), "LoRA base weights moved"
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapters.items()), "LoRA adapters did not train"


def test_a_continued_run_starts_where_its_saved_model_ended(runs):
    """train.init_from: the LoRA run starts from the frozen run's registered (best-epoch) model, so its
    validation before training (init_valid_*) is the frozen run's best; the LM starts pretrained."""
    from mlflow.tracking import MlflowClient

    frozen, lora = runs["frozen"], runs["lora"]
    client = MlflowClient(frozen.tracking_uri)
    best = max(m.value for m in client.get_metric_history(frozen.run_id, "valid_ndcg_at_10"))
    start = client.get_run(lora.run_id).data
    assert start.params["train.init_from"] == frozen.model_uri
    assert start.metrics["init_valid_ndcg_at_10"] == pytest.approx(best, abs=1e-6)
    assert "init_valid_ndcg_at_10" not in client.get_run(frozen.run_id).data.metrics


def test_a_start_model_that_cannot_fit_is_refused_before_any_run(runs, cold_world, tmp_path):
    import json
    import shutil

    from llmrec_dist.saved_model import resolve_model_folder
    from llmrec_dist.train.launcher import TrainError, train

    root, data, encoder = cold_world
    other = shutil.copytree(resolve_model_folder(runs["frozen"].model_uri, runs["frozen"].tracking_uri),
                            tmp_path / "other-data")
    meta = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**meta, "dataset_hash": "sha256:another"}))
    db = tmp_path / "mlflow.db"
    for start, message in ((tmp_path / "nowhere", r"train\.init_from: .*nowhere: not a folder"),
                           (other, r"train\.init_from: .*other-data was trained on dataset sha256:another")):
        cfg = load_config(QUICKSTART, [f"data.path={data}", f"mlflow.tracking_uri={sqlite_uri(db)}",
                                       f"model.text_encoder={encoder}", "model.item_repr=id+text",
                                       f"train.init_from={start}", *TINY])
        with pytest.raises(TrainError, match=message):
            train(cfg)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri(db))
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()]), "no run may be opened"


def test_registered_lora_model_serves_like_the_evaluated_one(runs, cold_world):
    import mlflow
    import pandas as pd

    from llmrec_dist.offline_eval import evaluate_here
    from llmrec_dist.saved_model import resolve_model_folder
    from llmrec_dist.config import EvalConfig

    _, data, _ = cold_world
    outcome = runs["lora"]
    folder = resolve_model_folder(outcome.model_uri, outcome.tracking_uri)
    offline = evaluate_here(folder, str(data), "test", EvalConfig())
    assert offline["test_ndcg_at_10"] == pytest.approx(outcome.metrics["test_ndcg_at_10"], abs=1e-6)
    assert offline["test_cold_ndcg_at_10"] == pytest.approx(outcome.metrics["test_cold_ndcg_at_10"], abs=1e-6)
    from llmrec_dist.tracking import use_tracking_uri

    with use_tracking_uri(outcome.tracking_uri):
        model = mlflow.pyfunc.load_model(outcome.model_uri)
    items = read_items(str(data)).column("item_id").to_pylist()
    out = model.predict(pd.DataFrame({"history": [items[:5]], "k": [7]}))
    assert len(out.iloc[0]["item_ids"]) == 7
