"""Popularity-aware evaluation: metrics by the target's training frequency (``eval.freq_buckets``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmrec_dist.bench import common, report, towers
from llmrec_dist.config import ConfigError, EvalConfig, config_from_dict, describe, parse_override
from llmrec_dist.data import dataset_format
from llmrec_dist.evaluation import EvalRows, evaluate, freq_bucket_names, load_eval_rows, row_subsets
from test_cold_items import TARGETS_45, _NoTower, generic


class IndexModel(torch.nn.Module):
    """Item ``j`` scores ``j / 10`` for every user: with seen items excluded, a target's 0-based rank is
    the number of items above it that are not in the history."""

    def __init__(self, num_items: int = 6):
        super().__init__()
        self.num_items = num_items
        self.items = _NoTower()

    def score_next(self, seq: torch.Tensor, table=None) -> torch.Tensor:
        return (torch.arange(self.num_items + 1, dtype=torch.float32) / 10).expand(len(seq), -1)


# Training frequency (popularity) of items 0..6; the edges of [1, 5, 20] on both sides of each bucket.
POPULARITY = np.array([0, 0, 1, 4, 5, 19, 20])
# (history, target) -> rank with seen items excluded (items above the target not in the history):
CASES = [
    ([6], 5),           # A: nothing left above 5                  rank 0, freq 19 -> 5_19
    ([1], 4),           # B: 5, 6 above 4                          rank 2, freq 5  -> 5_19
    ([2], 1),           # C: 3, 4, 5, 6 above 1                    rank 3, freq 0  -> 0
    ([3, 4, 5, 6], 2),  # D: nothing left above 2                  rank 0, freq 1  -> 1_4
    ([4, 5], 3),        # E: 6 above 3                             rank 1, freq 4  -> 1_4
    ([2], 6),           # F: the top item                          rank 0, freq 20 -> 20_plus
    ([2, 3, 4, 5], 1),  # G: 6 above 1                             rank 1, freq 0  -> 0
]
RANKS = {"0": [3, 1], "1_4": [0, 1], "5_19": [0, 2], "20_plus": [0]}
CFG = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=3)


def golden_rows(with_freq: bool = True) -> EvalRows:
    targets = np.array([t for _, t in CASES])
    return EvalRows([np.array(h) for h, _ in CASES], targets, freq=POPULARITY[targets] if with_freq else None)


def expected(ranks: list[int], prefix: str) -> dict[str, float]:
    out = {}
    for k in (1, 3):
        out[f"{prefix}hr_at_{k}"] = np.mean([r < k for r in ranks])
        out[f"{prefix}ndcg_at_{k}"] = np.mean([1 / math.log2(r + 2) if r < k else 0 for r in ranks])
        out[f"{prefix}mrr_at_{k}"] = np.mean([1 / (r + 1) if r < k else 0 for r in ranks])
    return out | {f"{prefix}users": len(ranks)}


def test_bucket_names():
    assert freq_bucket_names([1, 5, 20]) == ["0", "1_4", "5_19", "20_plus"]
    assert freq_bucket_names([2, 10]) == ["0_1", "2_9", "10_plus"]
    assert freq_bucket_names([1, 2]) == ["0", "1", "2_plus"]
    assert freq_bucket_names([]) == []


def test_rows_fall_in_the_bucket_of_their_frequency():
    subsets = dict(row_subsets(golden_rows(), [1, 5, 20]))
    assert list(subsets) == ["cold_", "freq_0_", "freq_1_4_", "freq_5_19_", "freq_20_plus_"]
    assert {name: np.flatnonzero(member).tolist() for name, member in subsets.items()} == {
        "cold_": [], "freq_0_": [2, 6], "freq_1_4_": [3, 4], "freq_5_19_": [0, 1], "freq_20_plus_": [5]}
    # no frequencies: the same subsets (the same all-reduce size on every rank), all empty
    unknown = row_subsets(golden_rows(with_freq=False), [1, 5, 20])
    assert [name for name, _ in unknown] == list(subsets) and not any(m.any() for _, m in unknown)
    assert [name for name, _ in row_subsets(golden_rows(), [])] == ["cold_"]


def test_bucket_metrics_by_hand():
    out = evaluate(IndexModel(), golden_rows(), num_items=6, cfg=CFG, max_len=5, prefix="test_")
    want = expected([0, 2, 3, 0, 1, 0, 1], "test_")
    for name, ranks in RANKS.items():
        want |= expected(ranks, f"test_freq_{name}_")
    assert "test_coverage_at_1" in out and not any("cold" in k for k in out)
    assert {k: v for k, v in out.items() if k != "test_coverage_at_1"} == pytest.approx(want)
    # spelled out for two buckets
    assert out["test_freq_0_ndcg_at_3"] == pytest.approx((0 + 1 / math.log2(3)) / 2)
    assert out["test_freq_0_mrr_at_3"] == pytest.approx(0.25) and out["test_freq_0_hr_at_1"] == 0.0
    assert out["test_freq_5_19_ndcg_at_3"] == pytest.approx(0.75)
    assert out["test_freq_5_19_mrr_at_3"] == pytest.approx(2 / 3)
    assert (out["test_freq_20_plus_hr_at_1"], out["test_freq_20_plus_users"]) == (1.0, 1)
    assert sum(out[f"test_freq_{name}_users"] for name in RANKS) == out["test_users"] == 7
    assert not any(k.startswith("test_freq_") and "coverage" in k for k in out)
    # batching does not change anything
    one = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=1)
    assert evaluate(IndexModel(), golden_rows(), 6, one, 5, prefix="test_") == pytest.approx(out)


def test_cold_and_bucket_subsets_together():
    rows = golden_rows()
    rows.cold = np.array([t == 1 for _, t in CASES])  # item 1 (C, G) is a cold item: frequency 0
    out = evaluate(IndexModel(), rows, 6, CFG, 5, prefix="test_")
    cold = {k.replace("test_cold_", ""): v for k, v in out.items() if k.startswith("test_cold_")}
    zero = {k.replace("test_freq_0_", ""): v for k, v in out.items() if k.startswith("test_freq_0_")}
    assert cold == zero and cold["users"] == 2


def test_an_empty_bucket_is_left_out():
    # edges [1, 5, 20, 50]: 20-49 holds F (20); no row has a target trained on 50 times or more
    cfg = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=3, freq_buckets=[1, 5, 20, 50])
    out = evaluate(IndexModel(), golden_rows(), 6, cfg, 5, prefix="valid_")
    assert out["valid_freq_20_49_users"] == 1 and out["valid_freq_20_49_ndcg_at_3"] == 1.0
    assert not any(k.startswith("valid_freq_50_plus") for k in out)
    assert sorted({k.split("_")[2] for k in out if k.startswith("valid_freq_")}) == ["0", "1", "20", "5"]
    # with the rows of frequency 1-4 gone that bucket disappears too
    keep = [0, 1, 2, 5, 6]
    rows = golden_rows()
    subset = EvalRows([rows.histories[i] for i in keep], rows.targets[keep], freq=rows.freq[keep])
    assert not any(k.startswith("freq_1_4") for k in evaluate(IndexModel(), subset, 6, CFG, 5))


def test_no_buckets_without_edges_or_frequencies():
    with_buckets = evaluate(IndexModel(), golden_rows(), 6, CFG, 5, prefix="test_")
    overall = {k: v for k, v in with_buckets.items() if "freq" not in k}
    off = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=3, freq_buckets=[])
    assert evaluate(IndexModel(), golden_rows(), 6, off, 5, prefix="test_") == overall
    assert evaluate(IndexModel(), golden_rows(with_freq=False), 6, CFG, 5, prefix="test_") == overall


def test_one_all_reduce_of_a_size_set_by_the_config(monkeypatch):
    """Whatever rows a rank has (frequencies or not, some buckets empty), it makes one all-reduce of
    the same size, so ranks never wait on different collectives."""
    import torch.distributed as dist

    sizes = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda state, op=None: sizes.append(state.shape))
    rows = golden_rows()
    few = EvalRows(rows.histories[:1], rows.targets[:1], freq=rows.freq[:1])
    for case in (rows, golden_rows(with_freq=False), few):
        evaluate(IndexModel(), case, 6, CFG, 5)
    # overall: 3 metrics x 2 ks + users + coverage over items 0..6; then cold and 4 buckets, no coverage
    assert sizes == [torch.Size([7 + 7 + 5 * 7])] * 3


def test_eval_rows_checks_the_frequency_shape():
    rows = golden_rows()
    assert rows.freq.dtype == np.int64 and golden_rows(with_freq=False).freq is None
    with pytest.raises(ValueError, match=r"freq has shape \(2,\), expected \(7,\)"):
        EvalRows(rows.histories, rows.targets, freq=np.array([1, 2]))


def test_load_eval_rows_reads_the_train_popularity(tmp_path):
    # TARGETS_45 (test_cold_items): user 1 trains on [2, 1, 3], user 2 on [1, 2, 3], user 3 on [5], so
    # items 1-5 have popularity 2, 2, 2, 0, 1; the test targets are 4, 5, 5
    _, ds = generic(tmp_path, TARGETS_45)
    assert dataset_format.read_items(ds).column("popularity").to_pylist() == [2, 2, 2, 0, 1]
    assert dataset_format.item_popularity(ds).tolist() == [0, 2, 2, 2, 0, 1]
    rows = load_eval_rows(str(ds), "test")
    assert rows.targets.tolist() == [4, 5, 5] and rows.freq.tolist() == [0, 1, 1]
    assert load_eval_rows(str(ds), "test", rank=1, world_size=2).freq.tolist() == [1]
    assert load_eval_rows(str(ds), "valid").freq.tolist() == [1, 0, 0]  # valid targets 5, 4, 4
    # the train split's counts, also for items that appear in valid/test histories only (item 4)
    assert 4 in dataset_format.read_split(ds, "test").column("items").to_pylist()[1]
    assert dataset_format.items_seen_in_training(ds).tolist() == [False, True, True, True, False, True]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def test_config_default_override_and_doc():
    assert EvalConfig().freq_buckets == [1, 5, 20]
    assert config_from_dict({"data": {"path": "x"}}).flat()["eval.freq_buckets"] == [1, 5, 20]
    assert config_from_dict({"data": {"path": "x"}, "eval": {"freq_buckets": []}}).eval.freq_buckets == []
    assert parse_override("eval.freq_buckets=[]") == (["eval", "freq_buckets"], [])
    assert config_from_dict({"data": {"path": "x"}, "eval": {"freq_buckets": [2, 10]}}).eval.freq_buckets == [2, 10]
    line = next(line for line in describe().splitlines() if "eval.freq_buckets" in line)
    assert "default [1, 5, 20]" in line and "test_freq" not in line and "{split}_freq_1_4_" in line


@pytest.mark.parametrize("value,problem", [
    ([5, 1], "eval.freq_buckets: must be strictly increasing positive integers (e.g. [1, 5, 20]), or [] for "
             "none; got [5, 1]"),
    ([1, 1, 5], "eval.freq_buckets: must be strictly increasing positive integers (e.g. [1, 5, 20]), or [] "
                "for none; got [1, 1, 5]"),
    ([0, 5], "eval.freq_buckets: must be strictly increasing positive integers (e.g. [1, 5, 20]), or [] for "
             "none; got [0, 5]"),
    ([-3], "eval.freq_buckets: must be strictly increasing positive integers (e.g. [1, 5, 20]), or [] for "
           "none; got [-3]"),
    ([1, 2.5], "eval.freq_buckets: item 1: expected an integer; got 2.5"),
    (["a"], "eval.freq_buckets: item 0: expected an integer; got 'a'"),
    (5, "eval.freq_buckets: expected a list of an integer; got 5"),
])
def test_config_refuses_bad_edges(value, problem):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"path": "x"}, "eval": {"freq_buckets": value}})
    assert err.value.problems == [problem]


# ---------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------


def test_towers_table_gets_a_column_per_bucket():
    keys = common.freq_ndcg_at_10([1, 5, 20])
    assert keys == ["test_freq_0_ndcg_at_10", "test_freq_1_4_ndcg_at_10", "test_freq_5_19_ndcg_at_10",
                    "test_freq_20_plus_ndcg_at_10"]
    base = {"item_repr": "id", "freeze": "-", "test_ndcg_at_10": 0.2, "test_cold_ndcg_at_10": None,
            "test_hr_at_10": 0.3, "epochs": 2, "s_per_epoch": 1.0, "seq_per_s": 5.0, "params_trainable": 10,
            "params_total": 10}
    row = {**base, **dict(zip(keys, [0.01, 0.1, None, 0.3]))}
    columns = towers.table_columns([row])
    assert [h for _, h, _ in columns] == ["item_repr", "freeze", "NDCG@10", "cold", "freq 0", "freq 1-4",
                                          "freq 5-19", "freq 20+", "HR@10", "ep", "s/ep", "seq/s", "trainable",
                                          "total"]
    assert common.table([row], columns).splitlines()[1].split() == [
        "id", "-", "0.2000", "-", "0.0100", "0.1000", "-", "0.3000", "0.3000", "2", "1.0", "5.0", "10", "10"]
    assert towers.table_columns([base]) == towers.COLUMNS  # rows from before the buckets


def test_report_shows_buckets_only_when_the_file_has_them(tmp_path):
    keys = common.freq_ndcg_at_10([1, 5, 20])
    figures = {"test_ndcg_at_10": 0.2, "best_epoch": 3, "epochs_run": 4, "wall_seconds": 60}
    common.write_result(tmp_path, "quality", label="old", config={}, figures=figures)
    common.write_result(tmp_path, "quality", label="new", config={},
                        figures={**figures, **dict(zip(keys, [0.01, 0.1, None, 0.3]))})
    text = report.render(common.read_results(tmp_path))
    assert "| quality: old | NDCG@10 0.2000 · HR@10 – · MRR@10 – | best epoch 3 of 4, 1 min |" in text
    assert ("| quality: new | NDCG@10 0.2000 · HR@10 – · MRR@10 – | best epoch 3 of 4, 1 min; NDCG@10 by "
            "training frequency 0: 0.0100 · 1-4: 0.1000 · 5-19: – · 20+: 0.3000 |") in text
    row = {"item_repr": "text", "freeze": "lora", "test_ndcg_at_10": 0.2, "test_cold_ndcg_at_10": 0.05,
           "s_per_epoch": 12.0, "params_trainable": 1000, keys[0]: 0.05}
    common.write_result(tmp_path, "towers", config={}, figures={"rows": [row]})
    text = report.render(common.read_results(tmp_path))
    assert ("| towers: text lora | NDCG@10 0.2000 · cold 0.0500 | 12 s/epoch; 1,000 trainable; NDCG@10 by "
            "training frequency 0: 0.0500 |") in text
