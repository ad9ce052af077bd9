"""DP-SGD end to end on a real local Ray: 2 workers without DDP (the noisy sums all-reduced once per step),
the privacy spent in MLflow, the registered version's (epsilon, delta), the private champion gate, the
package without popularity counts, the membership-inference audit, and an LM tower (LoRA, BERT4Rec-style)
trained privately."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from llmrec_dist.config import load_config
from llmrec_dist.data.dataset_format import read_items, read_split
from llmrec_dist.privacy import held_out
from llmrec_dist.saved_model import ITEMS_FILE, WEIGHTS_FILE
from text_fixtures import make_tiny_encoder
from mlflow_db import sqlite_uri

pytestmark = pytest.mark.integration

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TINY = ["model.hidden_size=16", "model.num_heads=2", "model.max_len=20", "train.epochs=2", "train.patience=0",
        "train.batch_size=32", "scaling.num_workers=2", "train.negatives_from=catalogue"]


@pytest.fixture(scope="module")
def private_run(ray_cluster, synthetic_dataset, tmp_path_factory):
    from llmrec_dist.train.launcher import train

    work = tmp_path_factory.mktemp("dp")
    uri = sqlite_uri(work / 'mlflow.db')
    base = [f"data.path={synthetic_dataset}", f"train.storage_path={work / 'runs'}", f"mlflow.tracking_uri={uri}",
            "mlflow.registered_model=dp-rec", "data.holdout_users=0.2", *TINY]
    cfg = load_config(QUICKSTART, [*base, "privacy.epsilon=8"])
    return train(cfg), cfg, uri, base


def test_a_private_run_logs_its_privacy_and_tags_its_version(private_run):
    from mlflow.tracking import MlflowClient

    outcome, cfg, uri, _ = private_run
    client = MlflowClient(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    keys = read_split(str(cfg.data.path), "train").column("user_key").to_pylist()
    members = int((~held_out(keys, 0.2)).sum())
    params = run.data.params
    assert int(params["privacy.users"]) == members < len(keys)          # the held-out users are not trained on
    assert float(params["privacy.sample_rate"]) == pytest.approx(32 / members)
    assert float(params["privacy.delta_used"]) == pytest.approx(1 / members)
    assert float(params["privacy.noise_multiplier_used"]) > 0
    spent = [h.value for h in sorted(client.get_metric_history(outcome.run_id, "privacy_epsilon"), key=lambda h: h.step)]
    assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 8.0 + 1e-6
    assert outcome.metrics["privacy_epsilon"] == pytest.approx(spent[1])
    version = client.get_model_version("dp-rec", str(outcome.registration["version"]))
    assert float(version.tags["privacy_epsilon"]) == pytest.approx(spent[1], rel=1e-5)
    assert float(version.tags["privacy_delta"]) == pytest.approx(1 / members, rel=1e-5)
    assert outcome.registration["promoted"]


def test_the_private_package_carries_no_popularity_and_serves(private_run):
    from llmrec_dist.saved_model import resolve_model_folder
    from llmrec_dist.registry.recommender import Recommender

    outcome, cfg, uri, _ = private_run
    folder = resolve_model_folder(outcome.model_uri, uri)
    assert pq.read_table(folder / ITEMS_FILE).column("popularity").to_pylist() == [0] * read_items(
        str(cfg.data.path)).num_rows
    rec = Recommender.from_folder(folder)
    items = read_items(str(cfg.data.path)).column("item_id").to_pylist()
    top = rec.recommend([items[:5]], k=5)[0]["item_ids"]
    assert len(top) == 5 and not set(top) & set(items[:5])


def test_a_model_without_dp_does_not_take_the_private_champions_alias(private_run):
    from llmrec_dist.train.launcher import train

    outcome, _, _, base = private_run
    plain = train(load_config(QUICKSTART, [*base, "train.epochs=1"]))
    assert plain.registration["version"] == outcome.registration["version"] + 1
    assert not plain.registration["promoted"] and "differential privacy" in plain.registration["reason"]


def test_the_membership_audit_reads_members_and_held_out_users(private_run):
    from llmrec_dist.bench.privacy import audit

    outcome, cfg, _, _ = private_run
    figures = audit(outcome.checkpoint_path, cfg)
    keys = read_split(str(cfg.data.path), "train").column("user_key").to_pylist()
    assert figures["non_members"] == int(held_out(keys, 0.2).sum()) > 20
    assert figures["members"] + figures["non_members"] == len(keys)
    assert 0.0 <= figures["attack_auc"] <= 1.0 and np.isfinite(figures["member_loss"])


def test_an_lm_tower_with_lora_trains_privately_on_two_workers(ray_cluster, tmp_path_factory):
    from llmrec_dist.data.prepare import prepare_dataset
    from llmrec_dist.train.launcher import train

    root = tmp_path_factory.mktemp("dp-text")
    data = root / "data"
    prepare_dataset("synthetic", data, synthetic={"n_users": 200, "n_items": 60}, seed=2)
    encoder = make_tiny_encoder(root / "tiny-bert", read_items(str(data)).column("text").to_pylist())
    cfg = load_config(QUICKSTART, [f"data.path={data}", f"train.storage_path={root / 'runs'}",
                                   f"mlflow.tracking_uri={sqlite_uri(root / 'mlflow.db')}", *TINY, "train.epochs=1",
                                   "model.item_repr=id+text", "model.freeze=lora", "model.lora_r=4",
                                   "model.backbone=bidirectional", f"model.text_encoder={encoder}",
                                   "model.text_max_len=16", "train.lm_items_per_step=16", "privacy.epsilon=4"])
    outcome = train(cfg)
    assert 0 < outcome.metrics["privacy_epsilon"] <= 4.0 + 1e-6
    weights = load_file(str(Path(outcome.checkpoint_path) / WEIGHTS_FILE))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)  # LoRA's B starts at zero: it trained
