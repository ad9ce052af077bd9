"""Rating and click pairs from the shared leave-one-out split, by hand on tiny data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from llmrec_dist.pairs import click_labels, eval_pairs, interacted_items, sample_unseen


def tables(with_feedback: bool = True) -> dict[str, pa.Table]:
    # user 1: 3, 1, 2 | valid 4 | test 5 ; user 2: 2, 6 | valid 1 | test 3 (ratings alongside)
    train = {"user_idx": [1, 2], "items": [[3, 1, 2], [2, 6]]}
    valid = {"user_idx": [1, 2], "items": [[3, 1, 2], [2, 6]], "target": [4, 1]}
    test = {"user_idx": [1, 2], "items": [[3, 1, 2, 4], [2, 6, 1]], "target": [5, 3]}
    if with_feedback:
        valid["target_feedback"] = [4.5, 2.0]
        test["target_feedback"] = [3.0, 5.0]
    return {"train": pa.table(train), "valid": pa.table(valid), "test": pa.table(test)}


def test_rating_pairs_are_the_targets_with_their_ratings():
    pairs = eval_pairs(tables(), "test", "rating", num_items=9)
    assert pairs.user_idx.tolist() == [1, 2] and pairs.candidate.tolist() == [5, 3]
    assert pairs.label.tolist() == [3.0, 5.0]
    assert pairs.history(0).tolist() == [3, 1, 2, 4] and pairs.history(1).tolist() == [2, 6, 1]


def test_click_labels_from_ratings_use_the_threshold():
    assert click_labels(np.array([1, 3.5, 4, 5])).tolist() == [0, 0, 1, 1]
    pairs = eval_pairs(tables(), "valid", "click", num_items=9, threshold=4.0)
    assert pairs.candidate.tolist() == [4, 1] and pairs.label.tolist() == [1.0, 0.0]
    assert eval_pairs(tables(), "valid", "click", num_items=9, threshold=2.0).label.tolist() == [1.0, 1.0]


def test_implicit_click_pairs_draw_unseen_negatives_per_positive():
    pairs = eval_pairs(tables(with_feedback=False), "test", "click", num_items=9, ratio=3, seed=5)
    assert len(pairs) == 8 and pairs.user_idx.tolist() == [1] * 4 + [2] * 4
    assert pairs.label.tolist() == [1, 0, 0, 0] * 2 and pairs.candidate[[0, 4]].tolist() == [5, 3]
    seen = {1: {1, 2, 3, 4, 5}, 2: {1, 2, 3, 6}}
    for row in range(8):
        assert pairs.history(row).tolist() == ([3, 1, 2, 4] if row < 4 else [2, 6, 1])
        if pairs.label[row] == 0:
            assert pairs.candidate[row] not in seen[int(pairs.user_idx[row])]
    for user_rows in (pairs.candidate[1:4], pairs.candidate[5:8]):
        assert len(set(user_rows.tolist())) == 3  # distinct
    again = eval_pairs(tables(with_feedback=False), "test", "click", num_items=9, ratio=3, seed=5)
    assert again.candidate.tolist() == pairs.candidate.tolist()  # seeded: every epoch scores the same pairs
    valid = eval_pairs(tables(with_feedback=False), "valid", "click", num_items=9, ratio=3, seed=5)
    assert valid.candidate.tolist() != pairs.candidate.tolist()


def test_interacted_items_include_cold_targets():
    split = tables()
    assert {u: v.tolist() for u, v in interacted_items(split).items()} == {1: [1, 2, 3, 4, 5], 2: [1, 2, 3, 6]}


def test_sample_unseen_is_uniform_over_the_unseen_items():
    draws = sample_unseen([np.array([2, 5])] * 4000, 1, 6, seed=0).ravel()
    counts = np.bincount(draws, minlength=7)
    assert counts[[0, 2, 5]].tolist() == [0, 0, 0]
    assert np.all(np.abs(counts[[1, 3, 4, 6]] / 4000 - 0.25) < 0.03)
    assert sorted(sample_unseen([np.array([1, 2])], 4, 6, seed=1)[0].tolist()) == [3, 4, 5, 6]  # all of them
    with pytest.raises(ValueError, match="only 4 items are unseen"):
        sample_unseen([np.array([1, 2])], 5, 6, seed=1)


def test_wrong_uses_are_refused():
    with pytest.raises(ValueError, match="needs a dataset with explicit feedback"):
        eval_pairs(tables(with_feedback=False), "test", "rating", num_items=9)
    with pytest.raises(ValueError, match="with a rating threshold needs"):
        eval_pairs(tables(with_feedback=False), "test", "click", num_items=9, threshold=4.0)
    with pytest.raises(ValueError, match="valid or test"):
        eval_pairs(tables(), "train", "rating", num_items=9)
    with pytest.raises(ValueError, match="ratio >= 1"):
        eval_pairs(tables(), "test", "click", num_items=9, ratio=0)
