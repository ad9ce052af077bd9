"""train.exclude_seen: the training softmax leaves out the items a position has in view, as evaluation
leaves a user's history out of the ranking. Pairs listed by hand; losses computed by hand on a model
whose item vectors are all zero (so every logit is 0, or -log q for sampled softmax)."""

import dataclasses
import math

import pytest
import torch

from llmrec_dist.batching import next_item_batch
from llmrec_dist.config import ModelConfig, config_from_dict
from llmrec_dist.model import build_model
from llmrec_dist.train.recipe import build_recommender

TINY = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, max_len=6, dropout=0.0)
LLAMA = dataclasses.replace(TINY, block="llama", activation="silu")


def pairs(model, inputs, targets):
    inputs, targets = torch.tensor(inputs), torch.tensor(targets)
    rows, where = model.seen_entries(inputs, targets, targets != 0)
    return sorted(zip(rows.tolist(), inputs.reshape(-1)[where].tolist()))


def test_causal_positions_leave_out_their_input_item_and_those_before_it():
    model = build_model(TINY, 10, exclude_seen=True)
    # softmax rows: (0, 1) → 0, (0, 2) → 1, (1, 0) → 2, (1, 1) → 3, (1, 2) → 4
    found = pairs(model, [[0, 1, 2], [3, 1, 3]], [[0, 2, 4], [1, 3, 5]])
    assert found == [(0, 1),  # sees 1 (target 2)
                     (1, 1), (1, 2),  # sees 1, 2 (target 4)
                     (2, 3),  # sees 3 (target 1)
                     (3, 1),  # sees 3, 1 (target 3: a repeat stays rankable)
                     (4, 1), (4, 3), (4, 3)]  # sees 3, 1, 3 (target 5); the repeated 3 twice


def test_cloze_positions_leave_out_every_unmasked_item_of_the_row():
    model = build_model(dataclasses.replace(TINY, backbone="bidirectional"), 10, exclude_seen=True)
    # masked positions 1 and 3 hold PAD in the inputs; both see items 1 and 3, before and after them
    assert pairs(model, [[1, 0, 3, 0]], [[0, 2, 0, 4]]) == [(0, 1), (0, 3), (1, 1), (1, 3)]


def zero_item_model(cfg, num_items, **kwargs):
    model = build_model(cfg, num_items, **kwargs).eval()
    with torch.no_grad():
        model.items.embedding.weight.zero_()  # every logit is 0 (PAD: -inf)
    return model


@pytest.mark.parametrize("cfg", [TINY, LLAMA], ids=["standard", "llama"])
def test_full_softmax_loss_by_hand(cfg):
    seq, tgt = next_item_batch([[1, 2, 3, 4, 5], [6, 7, 8]], cfg.max_len)
    plain = zero_item_model(cfg, 10)
    assert plain(seq, tgt)["loss"].item() == pytest.approx(math.log(10), abs=1e-6)
    # position t of a row has t + 1 items in view, none of them its target: ln(10 - t - 1) each
    by_hand = sum(math.log(n) for n in (9, 8, 7, 6, 9, 8)) / 6
    model = zero_item_model(cfg, 10, exclude_seen=True)
    assert model(seq, tgt)["loss"].item() == pytest.approx(by_hand, abs=1e-6)


def test_a_repeated_target_stays_rankable():
    seq, tgt = next_item_batch([[1, 2, 1]], TINY.max_len)  # targets 2 (sees 1), then 1 (sees 1, 2: keeps 1)
    model = zero_item_model(TINY, 5, exclude_seen=True)
    assert model(seq, tgt)["loss"].item() == pytest.approx((math.log(4) + math.log(4)) / 2, abs=1e-6)


def test_sampled_softmax_loss_by_hand():
    """With 2,000 negatives over 10 items every item is a candidate (a miss has probability 0.9^2000);
    logits are -log q(c), q(c) = (targets of c + M/N) / (T + M)."""
    n, m = 10, 2000
    seq, tgt = next_item_batch([[1, 2, 3, 4, 5], [6, 7, 2]], TINY.max_len)
    targets = [[2, 3, 4, 5], [7, 2]]
    inputs = [[1, 2, 3, 4], [6, 7]]
    flat = [t for row in targets for t in row]
    logit = {c: -math.log((flat.count(c) + m / n) / (len(flat) + m)) for c in range(1, n + 1)}

    def position_loss(target, seen):
        rankable = [c for c in logit if c == target or c not in seen]
        return -logit[target] + math.log(sum(math.exp(logit[c]) for c in rankable))

    for exclude in (False, True):
        by_hand = [position_loss(t, set(row[:i + 1]) if exclude else set())
                   for row, tr in zip(inputs, targets) for i, t in enumerate(tr)]
        model = zero_item_model(TINY, n, num_negatives=m, exclude_seen=exclude)
        assert model(seq, tgt)["loss"].item() == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


def test_the_config_key_reaches_the_model():
    manifest = {"counts": {"items": 10}}
    for value in (False, True):
        cfg = config_from_dict({"data": {"path": "x"}, "train": {"exclude_seen": value}})
        assert build_recommender(cfg, manifest, text=None).exclude_seen is value
    with pytest.raises(Exception, match=r"train.exclude_seen: expected true/false; got 'often'"):
        config_from_dict({"data": {"path": "x"}, "train": {"exclude_seen": "often"}})
