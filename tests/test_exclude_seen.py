"""train.exclude_seen: the training softmax leaves out the items a position has in view, as evaluation
leaves a user's history out of the ranking. Pairs listed by hand; losses computed by hand on a model
whose item vectors are all zero (so every logit is 0, or -log q for sampled softmax)."""

import dataclasses
import math

import pytest
import torch

import pyarrow as pa

from llmrec_dist.batching import earlier_items, history_windows, next_item_batch
from llmrec_dist.config import ModelConfig, config_from_dict
from llmrec_dist.model import build_model
from llmrec_dist.worker.recipe import TrainingPairs, build_recommender
from llmrec_dist.train.training_rows import windowed_table

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


def tiny_config(**train):
    model = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "max_len": 6, "dropout": 0.0}
    return config_from_dict({"data": {"path": "x"}, "model": model, "train": {"exclude_seen": True, **train}})


# A row longer than the model reads (max_len 6: a causal window of 7 items), then a short one.
LONG_ROW = [5, 9, 1, 2, 3, 4, 5, 6, 7]  # window [1 .. 7] (inputs 1..6, targets 2..7), earlier [5, 9]
SHORT_ROW = [6, 8, 2]


def test_training_batches_carry_the_items_before_the_window():
    seq, tgt, earlier = TrainingPairs(tiny_config(), mask_id=11, seed=0)([LONG_ROW, SHORT_ROW])
    assert seq.tolist() == [[1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 6, 8]]
    assert tgt.tolist() == [[2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 8, 2]]
    assert earlier.tolist() == [[5, 9], [0, 0]]
    assert len(TrainingPairs(tiny_config(exclude_seen=False), mask_id=11, seed=0)([LONG_ROW])) == 2
    assert earlier_items([[1, 2]], window=3).tolist() == [[0]]  # nothing before: one PAD column
    cloze = TrainingPairs(config_from_dict({"data": {"path": "x"}, "model": {"backbone": "bidirectional",
                                            "max_len": 3}, "train": {"exclude_seen": True}}), 99, 0)
    assert cloze([[1, 2, 3, 4, 5]])[2].tolist() == [[1, 2]]  # a cloze window is max_len items


def test_window_rows_keep_their_prefix_only_when_the_softmax_needs_it():
    items = [1, 2, 3, 4, 5, 6, 7]
    assert history_windows(items, 3, 2, prefix=True) == [items, items[:5], items[:3]]
    table = pa.table({"items": pa.array([list(range(1, 17))], type=pa.list_(pa.int32()))})
    plain = windowed_table(table, tiny_config(exclude_seen=False)).column("items").to_pylist()
    prefixed = windowed_table(table, tiny_config()).column("items").to_pylist()
    assert plain == [list(range(10, 17)), list(range(4, 11)), list(range(1, 5))]
    assert prefixed == [list(range(1, 17)), list(range(1, 11)), list(range(1, 5))]
    # the model reads the same windows either way; the prefix only adds the earlier items
    batches = [TrainingPairs(tiny_config(exclude_seen=e), 11, 0)(rows)
               for e, rows in ((False, plain), (True, prefixed))]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1][:2]))
    assert batches[1][2].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 0, 0, 1, 2, 3], [0] * 9]


def test_earlier_items_are_left_out_but_a_target_among_them_stays():
    seq, tgt, earlier = TrainingPairs(tiny_config(), mask_id=11, seed=0)([LONG_ROW])
    model = zero_item_model(TINY, 10, exclude_seen=True)
    # position t sees items 1..t+1 and the earlier 5 and 9; at t = 3 the target 5 is among them and
    # stays; from t = 4 item 5 is in view as well: rankable 10 - 3, 10 - 4, 10 - 5, 10 - 5, 10 - 6, 10 - 7
    by_hand = sum(math.log(n) for n in (7, 6, 5, 5, 4, 3)) / 6
    assert model(seq, tgt, earlier)["loss"].item() == pytest.approx(by_hand, abs=1e-6)
    in_row_only = sum(math.log(n) for n in (9, 8, 7, 6, 5, 4)) / 6
    assert model(seq, tgt)["loss"].item() == pytest.approx(in_row_only, abs=1e-6)


def test_sampled_softmax_loss_by_hand():
    """With 2,000 negatives over 10 items every item is a candidate (a miss has probability 0.9^2000);
    logits are -log q(c), q(c) = (targets of c + M/N) / (T + M)."""
    n, m = 10, 2000
    seq, tgt, earlier = TrainingPairs(tiny_config(), mask_id=11, seed=0)([LONG_ROW, SHORT_ROW])
    inputs, targets, before = [[1, 2, 3, 4, 5, 6], [6, 8]], [[2, 3, 4, 5, 6, 7], [8, 2]], [{5, 9}, set()]
    flat = [t for row in targets for t in row]
    logit = {c: -math.log((flat.count(c) + m / n) / (len(flat) + m)) for c in range(1, n + 1)}

    def position_loss(target, seen):
        rankable = [c for c in logit if c == target or c not in seen]
        return -logit[target] + math.log(sum(math.exp(logit[c]) for c in rankable))

    for exclude in (False, True):
        by_hand = [position_loss(t, set(row[:i + 1]) | early if exclude else set())
                   for row, tr, early in zip(inputs, targets, before) for i, t in enumerate(tr)]
        model = zero_item_model(TINY, n, num_negatives=m, exclude_seen=exclude)
        assert model(seq, tgt, earlier)["loss"].item() == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


def test_the_config_key_reaches_the_model():
    manifest = {"counts": {"items": 10}}
    for value in (False, True):
        cfg = config_from_dict({"data": {"path": "x"}, "train": {"exclude_seen": value, "negatives_from": "catalogue"}})
        assert build_recommender(cfg, manifest, text=None).exclude_seen is value
    with pytest.raises(Exception, match=r"train.exclude_seen: expected true/false; got 'often'"):
        config_from_dict({"data": {"path": "x"}, "train": {"exclude_seen": "often"}})
