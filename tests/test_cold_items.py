"""Cold items: ``prepare --cold-items`` and the cold-subset metrics of ``evaluate``."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmrec_dist.cli import prepare as prepare_cli
from llmrec_dist.config import EvalConfig
from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import prepare_dataset
from llmrec_dist.evaluation import EvalRows, evaluate, load_eval_rows
from test_prepare import HAND_BUILT

SMALL = {"n_users": 150, "n_items": 60}

# Items 1..5 (ids 10..50); users 2, 7, 9 -> user_idx 1, 2, 3. The valid/test targets are only items
# 4 and 5. Before cold items: user 1 trains on [2, 1, 3], valid -> 5, test -> 4 (history [2, 1, 3, 5]);
# user 2 trains on [1, 2, 3], valid -> 4, test -> 5; user 3 trains on [5], valid -> 4, test -> 5.
# cold_items=0.4 makes round(0.4 * 5) = 2 items cold: the first two of the seed's permutation of 1..5.
TARGETS_45 = """\
user_id,item_id,timestamp
7,10,1
7,20,2
7,30,3
7,40,4
7,50,5
2,20,1
2,10,2
2,30,3
2,50,4
2,40,5
9,50,1
9,40,2
9,50,3
"""

# test_prepare.HAND_BUILT prepared with min_interactions=3 by the code before cold items existed.
HAND_BUILT_HASH = "sha256:48d89488cfbf0592979cdc833afbbef7c4d02134d869b8461bf75f6f0e6e86ca"


def generic(tmp_path, interactions: str, name: str = "ds", **kwargs):
    (tmp_path / "interactions.csv").write_text(interactions)
    ids = sorted({line.split(",")[1] for line in interactions.splitlines()[1:]})
    (tmp_path / "items.csv").write_text("item_id,text\n" + "".join(f"{i},T{i}\n" for i in ids))
    files = {"interactions": str(tmp_path / "interactions.csv"), "items": str(tmp_path / "items.csv")}
    kwargs.setdefault("min_interactions", 3)
    return prepare_dataset("generic", tmp_path / name, generic=files, **kwargs), tmp_path / name


def rows(dataset, split):
    return dataset_format.read_split(dataset, split).to_pylist()


def cold_set(dataset) -> set[int]:
    return {r["item_idx"] for r in dataset_format.read_items(dataset).to_pylist() if r["cold"]}


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def test_exact_rows_by_hand(tmp_path):
    # the rule: seed 1 permutes items 1..5 as [5, 1, 2, 3, 4], so items 5 (a target) and 1 (not a
    # target, but in both train sequences of users 1 and 2) are cold
    assert np.random.default_rng(1).permutation(np.arange(1, 6)).tolist() == [5, 1, 2, 3, 4]
    manifest, ds = generic(tmp_path, TARGETS_45, cold_items=0.4, num_shards=2, seed=1)
    items = dataset_format.read_items(ds).to_pylist()
    assert [r["cold"] for r in items] == [True, False, False, False, True]
    assert [r["popularity"] for r in items] == [0, 2, 2, 0, 0]  # train: [2, 3] twice
    # user 3's train sequence [5] held only a cold item: its train row is gone, valid/test stay
    assert [(r["user_idx"], r["items"]) for r in rows(ds, "train")] == [(1, [2, 3]), (2, [2, 3])]
    assert [(r["user_idx"], r["items"], r["target"], r["cold"]) for r in rows(ds, "valid")] == [
        (1, [2, 3], 5, True), (2, [2, 3], 4, False), (3, [], 4, False)]
    # test histories lose a cold valid item (user 1's 5, user 3's first 5) but keep a warm one (4)
    assert [(r["user_idx"], r["items"], r["target"], r["cold"]) for r in rows(ds, "test")] == [
        (1, [2, 3], 4, False), (2, [2, 3, 4], 5, True), (3, [4], 5, True)]
    # item 1, cold but no target, appears nowhere in the splits
    assert all(1 not in r["items"] and r.get("target") != 1 for s in dataset_format.SPLITS for r in rows(ds, s))
    assert manifest["cold_items"] == {
        "fraction": 0.4, "seed": 1, "chosen_from": "all items", "items": 2,
        "valid_targets": 1, "test_targets": 2, "train_interactions_removed": 3, "train_rows_dropped": 1,
    }
    assert manifest["counts"]["train_interactions"] == 4 and manifest["counts"]["users"] == 3
    assert manifest["counts"]["items"] == 5
    assert dataset_format.num_train_rows(manifest) == 2
    # shards cut users 1-2 | 3 for every split; train's second part is empty but readable
    parts = {s: [pq.read_table(f).column("user_idx").to_pylist() for f in dataset_format.split_files(ds, s)]
             for s in dataset_format.SPLITS}
    assert parts == {"train": [[1, 2], []], "valid": [[1, 2], [3]], "test": [[1, 2], [3]]}
    assert pq.read_schema(dataset_format.split_files(ds, "train")[1]).remove_metadata() == dataset_format.TRAIN_SCHEMA
    assert dataset_format.verify_dataset(ds)["content_hash"] == manifest["content_hash"]


@pytest.fixture(scope="module")
def cold_pair(tmp_path_factory):
    """The same synthetic data prepared without and with 10 % cold items."""
    folder = tmp_path_factory.mktemp("cold")
    plain = prepare_dataset("synthetic", folder / "plain", synthetic=SMALL, seed=1, num_shards=3)
    cold = prepare_dataset("synthetic", folder / "cold", synthetic=SMALL, seed=1, num_shards=3, cold_items=0.1)
    return (plain, folder / "plain"), (cold, folder / "cold")


def test_cold_items_only_remain_as_targets(cold_pair):
    (_, plain_ds), (manifest, ds) = cold_pair
    n = manifest["counts"]["items"]
    cold = cold_set(ds)
    assert len(cold) == manifest["cold_items"]["items"] == math.floor(0.1 * n + 0.5) > 0
    # drawn from all items 1..n: the first ones of the seed's permutation
    assert cold == set(np.random.default_rng(1).permutation(np.arange(1, n + 1))[: len(cold)].tolist())
    in_sequences = {i for s in dataset_format.SPLITS for r in rows(ds, s) for i in r["items"]}
    assert not cold & in_sequences
    targets = {r["target"] for s in ("valid", "test") for r in rows(ds, s)}
    assert cold & targets  # the cold-start subset is not empty
    # a cold item that is no target appears nowhere in any split
    assert not (cold - targets) & (in_sequences | targets)
    for split in ("valid", "test"):
        flags = [(r["cold"], r["target"] in cold) for r in rows(ds, split)]
        assert all(a == b for a, b in flags)
        assert sum(a for a, _ in flags) == manifest["cold_items"][f"{split}_targets"] > 0
    # every sequence is the plain one with the cold items filtered out; targets are unchanged
    for split in dataset_format.SPLITS:
        expected = [(r["user_idx"], [i for i in r["items"] if i not in cold], r.get("target"))
                    for r in rows(plain_ds, split)]
        if split == "train":
            expected = [e for e in expected if e[1]]
        assert [(r["user_idx"], r["items"], r.get("target")) for r in rows(ds, split)] == expected
    dropped = manifest["counts"]["users"] - len(rows(ds, "train"))
    assert manifest["cold_items"]["train_rows_dropped"] == dropped
    assert dataset_format.num_train_rows(manifest) == len(rows(ds, "train"))
    # popularity counts only what training sees
    train_counts = np.bincount([i for r in rows(ds, "train") for i in r["items"]], minlength=n + 1)[1:]
    assert dataset_format.read_items(ds).column("popularity").to_pylist() == train_counts.tolist()
    assert manifest["counts"]["train_interactions"] == train_counts.sum()
    removed = manifest["cold_items"]["train_interactions_removed"]
    assert removed > 0 and manifest["counts"]["train_interactions"] + removed == sum(
        len(r["items"]) for r in rows(plain_ds, "train"))
    # part k of every split holds users of the same range
    ranges = {s: [pq.read_table(f).column("user_idx").to_pylist() for f in dataset_format.split_files(ds, s)]
              for s in dataset_format.SPLITS}
    for train_part, valid_part in zip(ranges["train"], ranges["valid"]):
        assert set(train_part) <= set(valid_part) and valid_part == sorted(valid_part)
    assert dataset_format.verify_dataset(ds)["content_hash"] == manifest["content_hash"]


def test_choice_is_seeded_deterministic_and_nested(cold_pair, tmp_path):
    (_, _), (manifest, ds) = cold_pair
    again = prepare_dataset("synthetic", tmp_path / "again", synthetic=SMALL, seed=1, cold_items=0.1)
    assert again["content_hash"] == manifest["content_hash"] and cold_set(tmp_path / "again") == cold_set(ds)
    fewer = prepare_dataset("synthetic", tmp_path / "fewer", synthetic=SMALL, seed=1, cold_items=0.05)
    assert cold_set(tmp_path / "fewer") < cold_set(ds) and fewer["content_hash"] != manifest["content_hash"]
    # another seed on non-synthetic data only changes the choice (same interactions)
    one, ds1 = generic(tmp_path, HAND_BUILT + "".join(f"9,{i},{i}\n" for i in (60, 70, 80)), name="g1",
                       cold_items=0.5, seed=1)
    two, ds2 = generic(tmp_path, HAND_BUILT + "".join(f"9,{i},{i}\n" for i in (60, 70, 80)), name="g2",
                       cold_items=0.5, seed=1)
    assert one["content_hash"] == two["content_hash"] and cold_set(ds1) == cold_set(ds2)
    seeds = {frozenset(cold_set(generic(tmp_path, HAND_BUILT + "9,60,7\n", name=f"s{s}", cold_items=0.4,
                                        seed=s)[1])) for s in range(6)}
    assert len(seeds) > 1


def test_no_cold_items_is_unchanged(cold_pair, tmp_path):
    (plain, plain_ds), _ = cold_pair
    assert plain["cold_items"] == {
        "fraction": 0.0, "seed": None, "chosen_from": "all items", "items": 0,
        "valid_targets": 0, "test_targets": 0, "train_interactions_removed": 0, "train_rows_dropped": 0,
    }
    assert not any(dataset_format.read_items(plain_ds).column("cold").to_pylist())
    assert not any(r["cold"] for s in ("valid", "test") for r in rows(plain_ds, s))
    assert dataset_format.num_train_rows(plain) == plain["counts"]["users"] == len(rows(plain_ds, "train"))
    # the content hash of a dataset without cold items is the one from before the cold columns
    manifest, _ = generic(tmp_path, HAND_BUILT, name="hb")
    assert manifest["content_hash"] == HAND_BUILT_HASH


def test_datasets_without_cold_columns_still_read_and_verify(cold_pair, tmp_path):
    import shutil

    (plain, plain_ds), (cold, cold_ds) = cold_pair
    legacy = tmp_path / "legacy"
    shutil.copytree(plain_ds, legacy)
    splits = dataset_format.split_files(legacy, "valid") + dataset_format.split_files(legacy, "test")
    for file in [legacy / dataset_format.ITEMS_FILE] + splits:
        table = pq.read_table(file)
        pq.write_table(table.drop_columns(["cold"]), file)
    assert "cold" not in pq.read_schema(legacy / dataset_format.ITEMS_FILE).names
    assert dataset_format.verify_dataset(legacy)["content_hash"] == plain["content_hash"]
    assert not any(dataset_format.read_items(legacy).column("cold").to_pylist())
    rows_ = load_eval_rows(str(legacy), "test")
    assert rows_.cold.dtype == bool and len(rows_) == plain["counts"]["users"] and not rows_.cold.any()
    # a cold dataset: load_eval_rows gives the file's flags, sharded by rank
    flags = [r["cold"] for r in rows(cold_ds, "test")]
    assert load_eval_rows(str(cold_ds), "test").cold.tolist() == flags
    assert load_eval_rows(str(cold_ds), "test", rank=1, world_size=2).cold.tolist() == flags[1::2]


def test_flipping_a_cold_flag_changes_the_hash(cold_pair, tmp_path):
    import shutil

    (plain, plain_ds), _ = cold_pair
    ds = tmp_path / "ds"
    shutil.copytree(plain_ds, ds)
    file = dataset_format.split_files(ds, "test")[0]
    table = pq.read_table(file)
    flags = [True] + [False] * (table.num_rows - 1)
    pq.write_table(table.set_column(table.column_names.index("cold"), "cold", pa.array(flags)), file)
    with pytest.raises(ValueError, match="does not match its manifest"):
        dataset_format.verify_dataset(ds)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "lots"])
def test_bad_fraction_is_refused_before_any_work(tmp_path, fraction):
    with pytest.raises(ValueError, match=r"cold_items must be a (fraction in \[0, 1\)|number)"):
        prepare_dataset("synthetic", tmp_path / "ds", synthetic=SMALL, cold_items=fraction)
    assert not (tmp_path / "ds").exists()


def test_fraction_that_gives_no_cold_items(tmp_path):
    with pytest.raises(PrepareError, match=r"cold_items=0\.05 of 5 items rounds to 0 cold items"):
        generic(tmp_path, TARGETS_45, cold_items=0.05)
    assert not (tmp_path / "ds").exists()


def test_empty_cold_subset_is_an_error(tmp_path):
    # seed 7 permutes items 1..5 as [3, 1, 5, 2, 4]: 0.4 makes items 3 and 1 cold, neither of them
    # a valid/test target (only 4 and 5 are), so no valid/test row would have a cold target
    assert np.random.default_rng(7).permutation(np.arange(1, 6)).tolist() == [3, 1, 5, 2, 4]
    with pytest.raises(PrepareError, match=r"cold_items=0\.4 with seed 7: none of the 2 cold items \(of 5\) "
                       r"is a valid or test target.*larger fraction or another --seed"):
        generic(tmp_path, TARGETS_45, cold_items=0.4, seed=7)
    assert not (tmp_path / "ds").exists()
    # a larger fraction with the same seed adds item 5 (a superset), which is a target
    manifest, ds = generic(tmp_path, TARGETS_45, cold_items=0.6, seed=7)
    assert cold_set(ds) == {1, 3, 5}
    assert (manifest["cold_items"]["valid_targets"], manifest["cold_items"]["test_targets"]) == (1, 2)
    # so does another seed with the same fraction: seed 5 permutes them as [5, 4, 2, 3, 1]
    assert np.random.default_rng(5).permutation(np.arange(1, 6)).tolist()[:2] == [5, 4]
    assert cold_set(generic(tmp_path, TARGETS_45, name="s5", cold_items=0.4, seed=5)[1]) == {4, 5}


def test_no_train_data_left_is_an_error(tmp_path):
    # both users train on item 50 only; 0.9 of the 3 items rounds to 3, so every item is cold
    data = "user_id,item_id,timestamp\n1,50,1\n1,40,2\n1,30,3\n2,50,1\n2,30,2\n2,50,3\n"
    with pytest.raises(PrepareError, match="every train interaction is of a cold item"):
        generic(tmp_path, data, cold_items=0.9, seed=0)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llmrec-dist")
    prepare_cli.add_parser(parser.add_subparsers(dest="verb", required=True))
    return prepare_cli.run(parser.parse_args(["prepare", *argv]))


@pytest.mark.parametrize("value", ["1", "-0.1", "1.5", "nan", "ten"])
def test_cli_rejects_bad_fraction(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--source", "synthetic", "--output", str(tmp_path / "ds"), "--cold-items", value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--cold-items" in err and ("0 <= FRACTION < 1" in err or "expected a number" in err)
    assert not (tmp_path / "ds").exists()


def test_cli_cold_items_summary_and_help(tmp_path, capsys):
    out = tmp_path / "ds"
    assert run_cli("--source", "synthetic", "--output", str(out), "--synthetic-users", "120",
                   "--synthetic-items", "60", "--cold-items", "0.1", "--seed", "4") == 0
    summary = capsys.readouterr().out
    manifest = dataset_format.verify_dataset(out)
    cold = manifest["cold_items"]
    assert cold["fraction"] == 0.1 and cold["seed"] == 4
    assert cold["items"] == math.floor(0.1 * manifest["counts"]["items"] + 0.5) == len(cold_set(out))
    assert f"cold items: {cold['items']} (0.1 of the items, seed 4)" in summary
    with pytest.raises(SystemExit):
        run_cli("--help")
    assert "--cold-items FRACTION" in capsys.readouterr().out


def test_cli_seed_needs_synthetic_or_cold_items(tmp_path, capsys):
    (tmp_path / "i.csv").write_text(TARGETS_45)
    (tmp_path / "t.csv").write_text("item_id,text\n10,a\n20,b\n30,c\n40,d\n50,e\n")
    base = ["--source", "generic", "--interactions", str(tmp_path / "i.csv"), "--items", str(tmp_path / "t.csv"),
            "--min-interactions", "3", "--seed", "3"]
    assert run_cli(*base, "--output", str(tmp_path / "a")) == 2
    assert "--seed is only used with --source synthetic or --cold-items" in capsys.readouterr().err
    assert run_cli(*base, "--output", str(tmp_path / "b"), "--cold-items", "0.4") == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["cold_items"]["seed"] == 3


# ---------------------------------------------------------------------------------------------
# evaluate: cold-subset metrics
# ---------------------------------------------------------------------------------------------

# Scores of items 0..4 by the last item of the history (item 0 is padding).
FIXED = torch.tensor([
    [0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.9, 0.8, 0.1, 0.5],
    [0.0, 0.1, 0.9, 0.3, 0.2],
    [0.0, 0.7, 0.6, 0.9, 0.4],
    [0.0, 0.0, 0.0, 0.0, 0.0],
])


class _NoTower(torch.nn.Module):
    def all_items(self):
        return None


class LastItemModel(torch.nn.Module):
    """Scores depend only on the last history item: ``FIXED[last]`` (same interface as the recommender)."""

    def __init__(self):
        super().__init__()
        self.items = _NoTower()

    def score_next(self, seq: torch.Tensor, table=None) -> torch.Tensor:
        return FIXED[seq[:, -1]]


def hand_rows(cold=(False, True, True, False), freq=None) -> EvalRows:
    # exclude_seen ranks (0-based): 0 (target 2 tops 3, 4), 1 (3 above 4), 2 (1, 2 above 4), 0
    histories = [np.array(h) for h in ([1], [2], [3], [3])]
    return EvalRows(histories, np.array([2, 4, 4, 1]), np.array(cold), None if freq is None else np.array(freq))


CFG = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=3)


def test_cold_metrics_by_hand():
    out = evaluate(LastItemModel(), hand_rows(), num_items=4, cfg=CFG, max_len=5, prefix="test_")
    ranks_all, ranks_cold = [0, 1, 2, 0], [1, 2]
    for name, ranks in (("test_", ranks_all), ("test_cold_", ranks_cold)):
        assert out[f"{name}hr_at_1"] == pytest.approx(np.mean([r < 1 for r in ranks]))
        assert out[f"{name}hr_at_3"] == pytest.approx(1.0)
        assert out[f"{name}ndcg_at_3"] == pytest.approx(np.mean([1 / math.log2(r + 2) for r in ranks]))
        assert out[f"{name}mrr_at_3"] == pytest.approx(np.mean([1 / (r + 1) for r in ranks]))
        assert out[f"{name}users"] == len(ranks)
    assert out["test_cold_ndcg_at_3"] == pytest.approx((1 / math.log2(3) + 0.5) / 2)
    assert "test_coverage_at_1" in out and not any(k.startswith("test_cold_coverage") for k in out)
    # the overall metrics are those of an evaluation without cold rows, which has no cold keys
    plain = evaluate(LastItemModel(), hand_rows(cold=(False,) * 4), 4, CFG, 5, prefix="test_")
    assert not any("cold" in k for k in plain)
    assert plain == {k: v for k, v in out.items() if "cold" not in k}
    assert EvalRows(hand_rows().histories, hand_rows().targets).cold.tolist() == [False] * 4
    # batching does not matter; without exclude_seen the cold ranks are 2 (2, 3 above 4) and 3
    one = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=1)
    assert evaluate(LastItemModel(), hand_rows(), 4, one, 5, prefix="test_") == pytest.approx(out)
    keep_seen = EvalConfig(ks=[1, 3], exclude_seen=False, coverage_k=1, batch_size=2)
    seen = evaluate(LastItemModel(), hand_rows(), 4, keep_seen, 5)
    assert seen["cold_mrr_at_3"] == pytest.approx((1 / 3 + 0) / 2) and seen["cold_hr_at_3"] == 0.5


class WidthRecordingModel(LastItemModel):
    """LastItemModel that records the width of every batch it is asked to score."""

    def __init__(self):
        super().__init__()
        self.widths = []

    def score_next(self, seq: torch.Tensor, table=None) -> torch.Tensor:
        self.widths.append(seq.shape[1])
        return super().score_next(seq, table)


def test_evaluation_batches_rows_of_similar_length():
    # histories of lengths 1, 5, 2, 6 in user order; batches of 2 by length are {1, 2} and {5, 6}
    histories = [np.array(h) for h in ([1], [2, 3, 2, 3, 1], [3, 2], [1, 1, 1, 1, 1, 3])]
    rows = EvalRows(histories, np.array([2, 4, 4, 4]), np.array([False, True, False, True]))
    model = WidthRecordingModel()
    two = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=2)
    out = evaluate(model, rows, 4, two, max_len=4, prefix="test_")
    assert model.widths == [2, 4]  # in user order: [4, 4] (lengths 1, 5 and 2, 6; max_len 4)
    one = EvalConfig(ks=[1, 3], exclude_seen=True, coverage_k=1, batch_size=1)
    assert evaluate(LastItemModel(), rows, 4, one, 4, prefix="test_") == pytest.approx(out)
    # by hand, seen items excluded: row 0 ranks 2 over 4, 3; row 1 has only 4 left; row 2 ranks 4 over 1;
    # row 3 (last item 3) ranks 2 above 4: ranks 0, 0, 0, 1; the cold rows are 1 and 3
    assert out["test_hr_at_1"] == pytest.approx(0.75) and out["test_cold_mrr_at_3"] == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# evaluate over 2 gloo processes == single process (cold and training-frequency keys included)
# ---------------------------------------------------------------------------------------------


class HashModel(torch.nn.Module):
    """Deterministic, tie-free scores that depend on the last history item (also when it is padding)."""

    def __init__(self, num_items: int):
        super().__init__()
        self.num_items = num_items
        self.items = _NoTower()

    def score_next(self, seq: torch.Tensor, table=None) -> torch.Tensor:
        items = torch.arange(self.num_items + 1, dtype=torch.float64)
        return torch.cos(items[None, :] * 0.37 + seq[:, -1:].to(torch.float64) * 1.3)


HAND_FREQ = [0, 3, 7, 25]  # training frequency of each hand row's target: one row per bucket


def _ddp_worker(rank: int, world: int, init: str, dataset: str, num_items: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = EvalConfig(ks=[1, 5, 10], coverage_k=10, batch_size=16)
        results = {"dataset": evaluate(HashModel(num_items), load_eval_rows(dataset, "test", rank, world),
                                       num_items, cfg, 20, prefix="test_")}
        # rank 0 holds both cold rows of the hand-made case, rank 1 none (and a rank with no rows at all);
        # each frequency bucket (0, 1-4, 5-19, 20+) has its one row on one rank only
        whole = hand_rows(freq=HAND_FREQ)
        mine = [1, 2] if rank == 0 else [0, 3]
        rows = EvalRows([whole.histories[i] for i in mine], whole.targets[mine], whole.cold[mine], whole.freq[mine])
        results["hand"] = evaluate(LastItemModel(), rows, 4, CFG, 5, prefix="test_")
        empty = EvalRows([], np.zeros(0, dtype=np.int64), freq=np.zeros(0)) if rank == 1 else whole
        results["empty_rank"] = evaluate(LastItemModel(), empty, 4, CFG, 5, prefix="test_")
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(cold_pair, tmp_path):
    import torch.multiprocessing as mp

    _, (manifest, ds) = cold_pair
    n = manifest["counts"]["items"]
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_ddp_worker, args=(2, init, str(ds), n, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    cfg = EvalConfig(ks=[1, 5, 10], coverage_k=10, batch_size=16)
    single = evaluate(HashModel(n), load_eval_rows(str(ds), "test"), n, cfg, 20, prefix="test_")
    assert "test_cold_ndcg_at_10" in single and single["test_cold_users"] == manifest["cold_items"]["test_targets"]
    buckets = ("0", "1_4", "5_19", "20_plus")
    # the cold targets were never trained on: they are among the rows of bucket 0
    assert sum(single.get(f"test_freq_{b}_users", 0) for b in buckets) == single["test_users"]
    assert single["test_freq_0_users"] >= single["test_cold_users"]
    # no target of this data is trained on 1-4 times: that bucket is left out, on every rank alike
    assert "test_freq_1_4_users" not in single and single["test_freq_20_plus_users"] > 0
    assert ranks[0]["dataset"] == pytest.approx(single, rel=1e-12)
    hand = evaluate(LastItemModel(), hand_rows(freq=HAND_FREQ), 4, CFG, 5, prefix="test_")
    assert all(hand[f"test_freq_{b}_users"] == 1 for b in buckets)
    assert hand["test_freq_5_19_mrr_at_3"] == pytest.approx(1 / 3)  # row 2: rank 2
    assert ranks[0]["hand"] == pytest.approx(hand) and ranks[0]["empty_rank"] == pytest.approx(hand)
