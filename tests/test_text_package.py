"""Registry packages of LM-tower models: every freezing strategy exports to a plain encoder that scores
exactly like the trained model; the catalogue can be refreshed with new items without retraining."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pandas as pd
import pytest
import torch

from llmrec_dist.config import ModelConfig
from llmrec_dist.model import build_model
from llmrec_dist.saved_model import TEXT_ENCODER_DIR
from llmrec_dist.registry.package import build_model_package
from llmrec_dist.registry.recommender import Recommender
from llmrec_dist.text_tower import prepare_text_features, text_cache_dir
from llmrec_dist.worker.checkpoint import cpu_state_dict, write_checkpoint
from registry_fixtures import NUM_ITEMS, item_id, item_text, write_dataset
from text_fixtures import make_tiny_encoder

HISTORIES = [[1, 2, 3], [10, 4], [7]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("textpkg")
    manifest = write_dataset(root / "dataset")
    texts = [item_text(i) for i in range(1, NUM_ITEMS + 1)] + ["brand new gadget for space castles"]
    encoder = make_tiny_encoder(root / "enc", texts)
    return root, manifest, encoder


def trained_checkpoint(root, manifest, encoder, freeze, item_repr="id+text", fusion="gate"):
    cfg = ModelConfig(item_repr=item_repr, text_encoder=str(encoder), freeze=freeze, freeze_k=1, fusion=fusion,
                      hidden_size=16, num_heads=2, num_layers=1, max_len=20, dropout=0.0)
    texts = [item_text(i) for i in range(1, NUM_ITEMS + 1)]
    torch.manual_seed(0)
    features = prepare_text_features(cfg, texts, cache_dir=text_cache_dir(str(root / "dataset")))
    model = build_model(cfg, NUM_ITEMS, text=features)
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    meta = {"model": dataclasses.asdict(cfg), "num_items": NUM_ITEMS, "dataset_hash": manifest["content_hash"]}
    weights = cpu_state_dict(model)
    folder = write_checkpoint(root / f"ckpt-{freeze}-{item_repr}", weights=weights, best_weights=weights,
                              meta=meta, state={})
    return model.eval(), folder


@pytest.mark.parametrize("freeze", ["frozen", "top_k", "full", "lora"])
def test_package_scores_like_the_trained_model(world, freeze):
    root, manifest, encoder = world
    model, ckpt = trained_checkpoint(root, manifest, encoder, freeze)
    package = build_model_package(ckpt, root / "dataset", root / f"pkg-{freeze}")
    meta = json.loads((package / "model.json").read_text())
    assert meta["trained_freeze"] == freeze and meta["model"]["freeze"] == "frozen"
    config = json.loads((package / TEXT_ENCODER_DIR / "config.json").read_text())
    assert config["model_type"] == "bert" and "peft" not in json.dumps(config)  # LoRA merged away
    rec = Recommender.from_folder(package)
    seq = torch.tensor([[0, 1, 2, 3], [0, 0, 10, 4], [0, 0, 0, 7]])
    torch.testing.assert_close(rec.model.score_next(seq), model.score_next(seq), rtol=1e-4, atol=1e-4)
    top = rec.recommend([[item_id(i) for i in h] for h in HISTORIES], k=5)
    assert all(len(r["item_ids"]) == 5 for r in top)


def test_new_items_are_recommendable_from_text_alone(world):
    root, manifest, encoder = world
    _, ckpt = trained_checkpoint(root, manifest, encoder, "frozen", item_repr="text", fusion="sum")
    rec = Recommender.from_folder(build_model_package(ckpt, root / "dataset", root / "pkg-text"))
    catalogue = pd.DataFrame({"item_id": [item_id(i) for i in range(2, NUM_ITEMS + 1)] + ["twin-of-5", "new-1"],
                              "text": [item_text(i) for i in range(2, NUM_ITEMS + 1)]
                              + [item_text(5), "brand new gadget for space castles"]})
    own = rec.use_diversity_space("text").diversity_vectors()  # MMR on the model's own LM output
    torch.testing.assert_close(own, rec.text_vectors(str(encoder)), rtol=1e-4, atol=1e-5)  # frozen: the encoder's
    fresh = rec.with_catalogue(catalogue)
    assert fresh.num_items == NUM_ITEMS + 2
    assert fresh.diversity_space == "text"  # kept, over the new catalogue's texts
    torch.testing.assert_close(fresh.diversity_vectors()[fresh.index["twin-of-5"]], own[5])
    history = [item_id(9), item_id(3)]
    full = fresh.recommend([history], k=fresh.num_items - 3)[0]
    scores = dict(zip(full["item_ids"], full["scores"]))
    assert scores["twin-of-5"] == pytest.approx(scores[item_id(5)], rel=1e-5)  # same text → same vector
    assert "new-1" in scores and item_id(1) not in scores                      # new in, retired out
    # retired items are still understood in a history
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.recommend([[item_id(1), "new-1"]], k=3)


def test_id_model_refuses_a_new_catalogue(tmp_path):
    from registry_fixtures import make_package

    rec = Recommender.from_folder(make_package(tmp_path))
    with pytest.raises(ValueError, match="text item tower"):
        rec.with_catalogue(pd.DataFrame({"item_id": ["x"], "text": ["y"]}))


def test_recommend_cli_takes_an_updated_catalogue(world, tmp_path, capsys):
    from llmrec_dist.cli import main

    root, manifest, encoder = world
    _, ckpt = trained_checkpoint(root, manifest, encoder, "frozen", item_repr="text", fusion="sum")
    package = build_model_package(ckpt, root / "dataset", tmp_path / "pkg")
    catalogue = tmp_path / "catalogue.csv"
    pd.DataFrame({"item_id": [item_id(i) for i in range(1, NUM_ITEMS + 1)] + ["0042"],
                  "text": [item_text(i) for i in range(1, NUM_ITEMS + 1)] + [item_text(5)]}).to_csv(catalogue, index=False)
    code = main(["recommend", "--model", str(package), "--history", f"{item_id(9)},{item_id(3)}",
                 "-k", str(NUM_ITEMS - 2), "--catalogue", str(catalogue), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    ids = [r["item_id"] for r in out["recommendations"]]
    assert "0042" in ids  # the new id, read as a string (leading zeros kept)
    assert next(r["text"] for r in out["recommendations"] if r["item_id"] == "0042") == item_text(5)

    bad = tmp_path / "bad.csv"
    bad.write_text("id,title\n1,x\n")
    assert main(["recommend", "--model", str(package), "--history", "", "--catalogue", str(bad)]) == 2
    assert "lacks column(s) item_id, text" in capsys.readouterr().err
