"""Ranking metrics against rankings worked out by hand."""

import math

import pytest
import torch

from llmrec_dist.metrics import RankingAccumulator, mask_seen, target_ranks

NEG = float("-inf")


def scores_of(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_rank_with_and_without_seen_items():
    # items 0..5; item 0 is padding. target 2 (0.5); history holds item 1 (0.9).
    scores = scores_of([9.0, 0.9, 0.5, 0.7, 0.1, 0.3])
    targets = torch.tensor([2])
    history = torch.tensor([[0, 1]])
    # seen excluded: 3 (0.7) > 2 (0.5) → rank 1 (0-based)
    acc = RankingAccumulator([1, 5], num_items=5, coverage_k=2)
    acc.update(scores, targets, history)
    r = acc.result()
    assert r["hr_at_1"] == 0.0 and r["hr_at_5"] == 1.0
    assert r["ndcg_at_5"] == pytest.approx(1 / math.log2(3))
    assert r["mrr_at_5"] == pytest.approx(1 / 2)
    # seen kept: 1 (0.9), 3 (0.7) above → rank 2; padding never ranks even with score 9.0
    acc = RankingAccumulator([1, 5], num_items=5, coverage_k=2)
    acc.update(scores, targets, None)
    r = acc.result()
    assert r["ndcg_at_5"] == pytest.approx(1 / math.log2(4))
    assert r["mrr_at_5"] == pytest.approx(1 / 3)
    # top-2 without seen = {1, 3}: 2 of 5 items
    assert r["coverage_at_2"] == pytest.approx(2 / 5)


def test_target_in_history_stays_rankable():
    scores = scores_of([0.0, 0.2, 0.8, 0.5])
    masked = mask_seen(scores, torch.tensor([[2, 3]]), torch.tensor([2]))
    assert masked[0].tolist() == pytest.approx([NEG, 0.2, 0.8, NEG])
    assert target_ranks(masked, torch.tensor([2])).item() == 0


def test_ties_count_against_the_target():
    # a constant model must not look perfect
    scores = torch.ones(1, 11)
    ranks = target_ranks(mask_seen(scores, torch.tensor([[0]]), torch.tensor([4])), torch.tensor([4]))
    assert ranks.item() == 9  # 10 real items, all tied: 9 others rank above


def test_two_users_average_and_sharded_sum_equals_whole():
    scores = scores_of([0.0, 0.1, 0.9, 0.3, 0.2], [0.0, 0.4, 0.3, 0.2, 0.1])
    targets = torch.tensor([3, 1])  # ranks: user0 → 1 (0.9 above), user1 → 0
    whole = RankingAccumulator([1, 2], 4, coverage_k=1)
    whole.update(scores, targets, None)
    r = whole.result()
    assert r["hr_at_1"] == 0.5 and r["hr_at_2"] == 1.0
    assert r["ndcg_at_2"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert r["mrr_at_2"] == pytest.approx((0.5 + 1) / 2)
    assert r["users"] == 2
    # two shards combined by summing their states (what the all-reduce does)
    parts = []
    for i in range(2):
        acc = RankingAccumulator([1, 2], 4, coverage_k=1)
        acc.update(scores[i:i + 1], targets[i:i + 1], None)
        parts.append(acc.state())
    assert whole.result(parts[0] + parts[1]) == pytest.approx(r)


def test_empty_evaluation_is_an_error():
    with pytest.raises(ValueError, match="no users"):
        RankingAccumulator([10], 5, 10).result()


def test_without_coverage():
    # a subset accumulator (e.g. cold targets) skips coverage; its state is only the sums
    acc = RankingAccumulator([1], 4, coverage_k=None)
    acc.update(scores_of([0.0, 0.1, 0.9, 0.3, 0.2]), torch.tensor([2]), None)
    assert acc.state_size() == len(acc.state()) == 4 and acc.count() == 1  # hr, ndcg, mrr, count
    assert acc.result() == {"hr_at_1": 1.0, "ndcg_at_1": 1.0, "mrr_at_1": 1.0, "users": 1}
