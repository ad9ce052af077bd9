"""Fairness and popularity-bias figures against hand-computed values; the report's files and metric names."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmrec_dist import fairness
from llmrec_dist.fairness_report import build_report, metric_label, render_markdown, report_metrics, write_report


def test_per_user_ndcg_and_hr():
    ranks = np.array([0, 1, 9, 10])
    assert fairness.ndcg_at_k(ranks, 10) == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0])
    assert fairness.hr_at_k(ranks, 10).tolist() == [1.0, 1.0, 1.0, 0.0]


def test_history_length_buckets():
    assert fairness.bucket_labels((10, 20, 50, 100)) == ["<10", "10-19", "20-49", "50-99", "100+"]
    assert fairness.bucket_labels((5, 6)) == ["<5", "5", "6+"]
    lengths = [0, 9, 10, 19, 20, 99, 100, 500]
    assert fairness.length_buckets(lengths).tolist() == ["<10", "<10", "10-19", "10-19", "20-49", "50-99",
                                                         "100+", "100+"]
    with pytest.raises(ValueError, match="increasing"):
        fairness.bucket_labels((20, 10))


def test_group_table_gap_and_ratio_leave_small_groups_out():
    groups = np.array(["a", "a", "b", "b", "b", "c"], dtype=object)
    rows = fairness.group_table(groups, {"m": np.array([1, 0, 1, 1, 0, 0.0])}, min_users=2)
    assert [(r["group"], r["users"], r["small"]) for r in rows] == [("b", 3, False), ("a", 2, False),
                                                                   ("c", 1, True)]
    assert [r["m"] for r in rows] == pytest.approx([2 / 3, 0.5, 0.0])
    gap = fairness.gap_and_ratio(rows, "m")  # c (mean 0) is small, so it is not the worst
    assert gap["gap"] == pytest.approx(1 / 6) and gap["ratio"] == pytest.approx(4 / 3)
    assert (gap["best"], gap["worst"], gap["groups_compared"]) == ("b", "a", 2)
    ordered = fairness.group_table(groups, {"m": np.zeros(6)}, 2, order=["c", "x", "a"])
    assert [r["group"] for r in ordered] == ["c", "a", "b"]


def test_gap_without_two_large_groups_or_with_a_zero_min():
    rows = fairness.group_table(np.array(["a"] * 3 + ["b"], dtype=object), {"m": np.ones(4)}, min_users=2)
    assert fairness.gap_and_ratio(rows, "m")["gap"] is None
    rows = fairness.group_table(np.array(["a", "a", "b", "b"], dtype=object), {"m": np.array([1, 1, 0, 0.0])}, 2)
    assert fairness.gap_and_ratio(rows, "m") == {"gap": 1.0, "ratio": None, "best": "a", "worst": "b",
                                                 "groups_compared": 2}


def test_gini():
    assert fairness.gini(np.array([1, 1, 1, 1])) == 0.0
    assert fairness.gini(np.array([0, 0, 0, 1])) == pytest.approx(0.75)  # 1 - 1/n: one item takes all
    assert fairness.gini(np.array([3, 1, 2])) == pytest.approx(2 / 9)  # mean |xi - xj| / (2 mean) = 8/9 / 4
    assert fairness.gini(np.zeros(3)) == 0.0
    with pytest.raises(ValueError):
        fairness.gini(np.array([-1, 1]))


def test_short_head_holds_80_percent_of_interactions():
    # items 1..5 with 50, 30, 10, 10, 0 of 100 interactions: 1 and 2 reach 80 exactly.
    assert fairness.short_head(np.array([0, 50, 30, 10, 10, 0])).tolist() == [False, True, True, False, False, False]
    # 50 + 29 = 79 < 80, so item 3 joins; ties (items 3 and 4 at 10 or 11) go by item_idx.
    assert np.flatnonzero(fairness.short_head(np.array([0, 50, 29, 10, 10, 1]))).tolist() == [1, 2, 3]
    assert not fairness.short_head(np.zeros(4)).any()


def test_exposure_and_coverage():
    top = np.array([[1, 2], [2, 3]])
    assert fairness.exposure(top, 5).tolist() == [1, 2, 1, 0, 0]
    assert fairness.coverage(top, 5) == pytest.approx(0.6)


def test_popularity_bias_by_hand():
    popularity = np.array([0, 50, 30, 10, 10, 0])  # head {1, 2}; tail {3, 4, 5}
    top = np.array([[1, 2], [3, 5]])
    out = fairness.popularity_bias(top, [np.array([1, 3]), np.array([4])], popularity)
    assert out["mean_popularity_recommended"] == pytest.approx((40 + 5) / 2)
    assert out["mean_popularity_history"] == pytest.approx((30 + 10) / 2)
    assert out["popularity_ratio"] == pytest.approx(22.5 / 20)
    assert out["long_tail_share_recommended"] == pytest.approx(2 / 4)
    assert out["long_tail_share_history"] == pytest.approx(2 / 3)
    assert out["coverage"] == pytest.approx(4 / 5)
    assert out["gini_exposure"] == pytest.approx(0.2)  # exposure 1,1,1,0,1: (−2 + 0 + 2 + 4) / (5 · 4)
    assert out["short_head_items"] == 2


def test_metric_labels_are_valid_mlflow_names():
    assert [metric_label(t) for t in ("<18", "56+", "academic/educator", "K-12 student", "(unknown)")] == [
        "lt18", "56plus", "academic_educator", "K-12_student", "unknown"]


def _report():
    ranks = np.array([0, 3, 20, 1] * 6)  # 24 users
    top = np.tile(np.array([[1, 2], [2, 3], [1, 3], [4, 1]]), (6, 1))
    histories = [np.array([1, 2])] * 24
    groupings = {"history_length": fairness.length_buckets(np.array([5] * 20 + [30] * 4)),
                 "gender": np.array(["F", "M"] * 12, dtype=object)}
    return build_report(ranks, top, histories, np.array([0, 5, 3, 1, 1]), groupings, k=2, min_users=5)


def test_build_report_and_its_metrics():
    report = _report()
    # ranks 0, 3, 20, 1 repeat: NDCG@2 = (1 + 0 + 0 + 1/log2 3) / 4; F has ranks 0 and 20, M 3 and 1.
    assert report["overall"]["ndcg_at_2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    gender = report["groupings"]["gender"]
    assert {r["group"]: r["ndcg_at_2"] for r in gender["groups"]} == pytest.approx({"F": 0.5, "M": 0.5 / math.log2(3)})
    assert gender["ndcg_at_2"]["gap"] == pytest.approx(0.5 - 0.5 / math.log2(3))
    history = report["groupings"]["history_length"]
    assert [(r["group"], r["users"], r["small"]) for r in history["groups"]] == [("<10", 20, False),
                                                                               ("20-49", 4, True)]
    assert history["ndcg_at_2"]["gap"] is None  # one large group only
    metrics = report_metrics(report)
    assert metrics["fair_gap_gender"] == pytest.approx(gender["ndcg_at_2"]["gap"])
    assert "fair_gap_history_length" not in metrics
    assert metrics["fair_ndcg_at_2_history_length_lt10"] == pytest.approx(history["groups"][0]["ndcg_at_2"])
    assert {"fair_popularity_ratio", "fair_long_tail_share_top2", "fair_coverage_at_2",
            "fair_gini_exposure_at_2"} <= set(metrics)


def test_report_files(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(report))
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = render_markdown(report)
    assert "## By gender" in text and "| 20-49 | 4 |" in text and "small" in text
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind
