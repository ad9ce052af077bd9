"""The rating/click cross-encoder on a tiny random BERT: the sequence pair it reads, what each freezing
strategy trains, its training pairs, and its package (served through the Reranker like the bi-encoder)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from llmrec_dist.config import ModelConfig
from llmrec_dist.cross_encoder import PairTokens, build_cross_encoder, cross_training_batch
from llmrec_dist.pointwise import LabelRule
from registry_fixtures import NUM_ITEMS, item_text, write_dataset
from text_fixtures import make_tiny_encoder

TEXTS = ["red apple", "green pear", "blue sky sea"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    texts = TEXTS + [item_text(i) for i in range(1, NUM_ITEMS + 1)]
    return make_tiny_encoder(tmp_path_factory.mktemp("bert"), texts, dropout=0.0)


def record(task: str = "click", **changes) -> dict:
    return {"type": task, "loss": "auto", "huber_delta": 1.0, "click_threshold": 0.0, "negatives": 2,
            "eval_negatives": 1, "feedback_input": False, "item_bias": True, "architecture": "cross_encoder",
            "history_items": 5, "pair_max_len": 48, "pairs_per_row": 2,
            "range": [1.0, 5.0] if task == "rating" else [0.0, 1.0], "eval_seed": 0, **changes}


def model_cfg(encoder, freeze: str = "full", **changes) -> ModelConfig:
    return ModelConfig(text_encoder=str(encoder), freeze=freeze, text_max_len=8, dropout=0.0, freeze_k=1,
                       **changes)


def test_the_pair_is_the_recent_items_then_the_candidate(encoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    tokens = PairTokens(tokenizer, TEXTS, text_max_len=8, pair_max_len=48, history_items=5)
    ids, mask, types = tokens.encode([[1, 2]], [3])
    assert tokenizer.decode(ids[0]) == "[CLS] red apple [UNK] green pear [SEP] blue sky sea [SEP]"
    assert types[0].tolist() == [0] * 7 + [1] * 4 and mask[0].tolist() == [1] * 11
    # only the last history_items items; padding ids (0) are not items
    recent = PairTokens(tokenizer, TEXTS, 8, 48, history_items=1)
    assert tokenizer.decode(recent.encode([[0, 1, 2]], [3])[0][0]) == "[CLS] green pear [SEP] blue sky sea [SEP]"
    # too long: the oldest text is cut first, the candidate is kept
    tight = PairTokens(tokenizer, TEXTS, 8, pair_max_len=3 + 3 + 3, history_items=5)
    assert tokenizer.decode(tight.encode([[1, 2]], [3])[0][0]) == "[CLS] [UNK] green pear [SEP] blue sky sea [SEP]"
    # two pairs pad to the longer one
    ids, mask, _ = tokens.encode([[1], [1, 2]], [2, 3])
    assert ids.shape == (2, 11) and mask[0].sum() == 7  # [CLS] red apple [SEP] green pear [SEP]


@pytest.mark.parametrize("freeze, trains", [("frozen", "head"), ("top_k", "last layer"), ("full", "all"),
                                            ("lora", "adapters")])
def test_each_freezing_strategy_trains_what_it_says(encoder, freeze, trains):
    model = build_cross_encoder(model_cfg(encoder, freeze), record(), TEXTS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lm = {name for name in trainable if name.startswith("lm.")}
    assert {"head.1.weight", "head.1.bias"} <= trainable
    if freeze == "frozen":
        assert lm == set()
    elif freeze == "top_k":
        assert lm and all(".layer.1." in name for name in lm)
    elif freeze == "full":
        assert lm == {name for name, _ in model.named_parameters() if name.startswith("lm.")}
    else:
        assert lm and all("lora_" in name for name in lm)
    assert (model.lm_parameters() != []) == (freeze in ("top_k", "full"))  # the LM's own learning rate


def test_predict_scores_one_or_several_candidates_and_clips_ratings(encoder):
    torch.manual_seed(0)
    model = build_cross_encoder(model_cfg(encoder), record("rating"), TEXTS, offset=3.0).eval()
    rule = LabelRule("rating", low=1.0, high=5.0)
    one = model.predict([np.array([1, 2]), np.array([2])], None, torch.tensor([3, 1]), rule)
    several = model.predict([np.array([1, 2]), np.array([2])], None, torch.tensor([[3, 2], [1, 3]]), rule)
    assert one.shape == (2,) and several.shape == (2, 2)
    assert torch.allclose(several[:, 0], one, atol=1e-6)
    direct = model.score_pairs(*model.tokens.encode([[1, 2]], [3])).clamp(1.0, 5.0)
    assert one[0].item() == pytest.approx(direct.item(), abs=1e-6)
    with torch.no_grad():
        model.head[1].bias.fill_(100.0)
    assert torch.all(model.predict([np.array([1])], None, torch.tensor([2]), rule) == 5.0)


def test_training_pairs_follow_the_labels_of_the_bi_encoder(encoder):
    from transformers import AutoTokenizer

    tokens = PairTokens(AutoTokenizer.from_pretrained(encoder), TEXTS, 8, 48, 5)
    rows, ratings = [[1, 2, 3], [3, 1]], [[4.0, 2.0, 5.0], [1.0, 3.0]]
    ids, mask, types, labels = cross_training_batch(rows, ratings, LabelRule("rating", low=1, high=5),
                                                    np.random.default_rng(0), np.array([1, 2, 3]), tokens, 5)
    assert sorted(labels.tolist()) == [2.0, 3.0, 5.0]  # every position after the first, its own rating
    clicks = cross_training_batch(rows, ratings, LabelRule("click", threshold=4.0), np.random.default_rng(0),
                                  np.array([1, 2, 3]), tokens, 5)[3]
    assert sorted(clicks.tolist()) == [0.0, 0.0, 1.0]
    # implicit click: a positive and `negatives` unseen items per position, at most pairs_per_row positions
    long_row = [[1, 2, 1, 2, 1, 2]]
    ids, _, _, implicit = cross_training_batch(long_row, None, LabelRule("click", negatives=1),
                                               np.random.default_rng(0), np.array([1, 2, 3]), tokens, 2)
    assert implicit.tolist() == [1.0, 0.0, 1.0, 0.0]
    negative_text = ids[1][(ids[1] > 4)]  # the candidate segment of the negative pair is item 3's text
    assert set(tokens.items[3]) <= set(negative_text.tolist())


@pytest.mark.parametrize("freeze", ["frozen", "top_k", "full", "lora"])
def test_the_package_serves_what_was_trained(encoder, freeze, tmp_path):
    """A trained cross-encoder (weights moved off their init) → package → Reranker: same scores; LoRA is
    merged into a plain encoder in text_encoder/."""
    from llmrec_dist.registry.package import build_model_package
    from llmrec_dist.registry.reranker import Reranker
    from llmrec_dist.worker.checkpoint import cpu_state_dict, write_checkpoint

    manifest = write_dataset(tmp_path / "dataset")
    texts = [item_text(i) for i in range(1, NUM_ITEMS + 1)]
    cfg = model_cfg(encoder, freeze)
    task = record()
    torch.manual_seed(1)
    model = build_cross_encoder(cfg, task, texts)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    meta = {"model": dataclasses.asdict(cfg), "num_items": NUM_ITEMS, "dataset_hash": manifest["content_hash"],
            "task": task}
    weights = cpu_state_dict(model)
    ckpt = write_checkpoint(tmp_path / "ckpt", weights=weights, best_weights=weights, meta=meta, state={})
    package = build_model_package(ckpt, tmp_path / "dataset", tmp_path / "package")
    saved = json.loads((package / "model.json").read_text())
    assert saved["model"]["freeze"] == "frozen" and saved["trained_freeze"] == freeze
    assert (package / "text_encoder" / "config.json").is_file()
    served = Reranker.from_folder(package)
    histories = [["item-001", "item-002"], ["item-007"]]
    candidates = [["item-003", "item-010", "item-020"], ["item-001", "item-030"]]
    got = served.score(histories, candidates)
    model.eval()
    for history, wanted, scores in zip(histories, candidates, got):
        idx = [int(i.split("-")[1]) for i in history]
        expected = torch.sigmoid(model.predict([np.array(idx)], None,
                                               torch.tensor([[int(c.split("-")[1]) for c in wanted]]), None))[0]
        assert scores == pytest.approx(expected.numpy(), abs=1e-5)
