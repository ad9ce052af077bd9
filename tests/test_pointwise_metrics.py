"""Rating and click metrics, by hand on tiny data."""

from __future__ import annotations

import math

import pytest
import torch

from llmrec_dist.metrics import auc, gauc, higher_is_better, log_loss, mae, rmse

T = torch.tensor


def test_rmse_and_mae_by_hand():
    predictions, targets = T([3.0, 4.5, 1.0, 5.0]), T([4.0, 4.5, 2.0, 3.0])
    # errors -1, 0, -1, 2: squares 1, 0, 1, 4 -> mean 1.5; absolute 1, 0, 1, 2 -> mean 1.0
    assert rmse(predictions, targets) == pytest.approx(math.sqrt(1.5))
    assert mae(predictions, targets) == pytest.approx(1.0)


def test_log_loss_by_hand():
    logits, labels = T([0.0, math.log(3.0), -math.log(3.0)]), T([1.0, 1.0, 1.0])
    # probabilities 1/2, 3/4, 1/4 -> -(log 1/2 + log 3/4 + log 1/4) / 3
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.25)) / 3
    assert log_loss(logits, labels) == pytest.approx(expected)
    assert math.isfinite(log_loss(T([-100.0]), T([1.0])))  # a confident mistake is costly, not infinite


def test_auc_by_hand_with_ties():
    scores, labels = T([0.9, 0.8, 0.8, 0.3, 0.1]), T([1.0, 0.0, 1.0, 0.0, 1.0])
    # positives 0.9, 0.8, 0.1 against negatives 0.8, 0.3: 0.9 beats both (2), 0.8 ties one and beats one
    # (1.5), 0.1 beats none (0) -> 3.5 / 6
    assert auc(scores, labels) == pytest.approx(3.5 / 6)
    assert auc(T([1.0, 2.0]), T([0.0, 1.0])) == 1.0 and auc(T([2.0, 1.0]), T([0.0, 1.0])) == 0.0
    assert auc(T([5.0, 5.0, 5.0]), T([1.0, 0.0, 1.0])) == 0.5  # all tied: chance
    assert math.isnan(auc(T([1.0, 2.0]), T([1.0, 1.0])))


def test_gauc_weights_users_by_pairs_and_skips_one_class_users():
    scores = T([0.9, 0.1, 0.5, 0.2, 0.8, 0.7, 0.6])
    labels = T([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    users = T([1, 1, 2, 2, 3, 3, 4])
    # user 1: AUC 1 over 2 pairs; user 2: 0 over 2; user 3: 1 over 2; user 4: one class, skipped
    assert gauc(scores, labels, users) == pytest.approx((1 * 2 + 0 * 2 + 1 * 2) / 6)
    # the global AUC mixes users: positives 0.9, 0.2, 0.8, 0.6 vs negatives 0.1, 0.5, 0.7
    assert auc(scores, labels) == pytest.approx((3 + 1 + 3 + 2) / 12)
    assert math.isnan(gauc(T([1.0, 2.0]), T([1.0, 1.0]), T([1, 2])))


def test_directions_and_shapes():
    assert higher_is_better("valid_ndcg_at_10") and higher_is_better("valid_auc") and higher_is_better("gauc")
    assert not any(higher_is_better(m) for m in ("valid_rmse", "test_mae", "logloss"))
    with pytest.raises(ValueError, match="shapes"):
        rmse(T([1.0, 2.0]), T([1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        auc(T([]), T([]))


def test_auc_equals_the_pairwise_count_on_random_data():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (300,), generator=generator).double()  # many ties
    labels = (torch.rand(300, generator=generator) < 0.3).double()
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auc(scores, labels) == pytest.approx(pairwise.item(), abs=1e-12)


def test_the_champion_gate_knows_each_metric_direction():
    from types import SimpleNamespace

    from llmrec_dist.registry.promotion import _decide

    def holder(key, value):
        return SimpleNamespace(version="3", tags={"dataset_hash": "sha256:d", "metric_key": key, "metric_value": repr(value)})

    assert _decide(holder("valid_ndcg_at_10", 0.20), "champion", "valid_ndcg_at_10", 0.21, "sha256:d")[0]
    assert not _decide(holder("valid_ndcg_at_10", 0.20), "champion", "valid_ndcg_at_10", 0.19, "sha256:d")[0]
    promoted, reason = _decide(holder("valid_rmse", 0.90), "champion", "valid_rmse", 0.85, "sha256:d")
    assert promoted and "beats version 3" in reason
    promoted, reason = _decide(holder("valid_rmse", 0.90), "champion", "valid_rmse", 0.95, "sha256:d")
    assert not promoted and "does not beat 0.9" in reason
    assert not _decide(holder("valid_rmse", 0.90), "champion", "valid_rmse", 0.90, "sha256:d")[0]  # ties keep
    assert _decide(holder("valid_logloss", 0.5), "champion", "valid_logloss", 0.4, "sha256:d")[0]
