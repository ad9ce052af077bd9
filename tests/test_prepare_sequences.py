"""prepare --source sequences: one row per user with its items in time order, plus an items table."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import prepare_dataset
from test_prepare_cli import run_cli

# u9 has two items and is dropped by min_interactions=3; u1 repeats 'a' (kept, the order is the data).
SEQUENCES = [("u2", "b 0012 c d"), ("u1", "a c a b"), ("u9", "a b")]
ITEMS = [("a", "Apple", "red"), ("b", "Bean", ""), ("c", "Corn", "yellow"), ("d", "Date", "sweet"),
         ("0012", "Twelve", "dozen"), ("12", "Twelve again", "")]


def write_files(folder, suffix=".tsv", sequences=SEQUENCES, items=ITEMS):
    """A sequences file (columns user, seq) and an items file (columns sku, name, blurb) of that type."""
    sep = "\t" if suffix == ".tsv" else ","
    seq = folder / f"seq{suffix}"
    seq.write_text(f"user{sep}seq\n" + "".join(f"{u}{sep}{s}\n" for u, s in sequences))
    cat = folder / f"items{suffix}"
    cat.write_text(f"sku{sep}name{sep}blurb\n" + "".join(sep.join(row) + "\n" for row in items))
    return seq, cat


def options(seq, cat, **extra):
    return {"sequences": str(seq), "items": str(cat), "user_col": "user", "items_col": "seq",
            "item_id_col": "sku", "text_cols": ["name", "blurb"], **extra}


def cli_args(seq, cat, out, *extra):
    return ("--source", "sequences", "--sequences", str(seq), "--items", str(cat), "--user-col", "user",
            "--items-col", "seq", "--item-id-col", "sku", "--text-cols", "name,blurb", "--output", str(out),
            "--min-interactions", "3", *extra)


def split_rows(ds, split):
    return [(r["user_idx"], r["items"], r.get("target")) for r in dataset_format.read_split(ds, split).to_pylist()]


@pytest.mark.parametrize("suffix", [".tsv", ".csv"])
def test_split_tables_by_hand(tmp_path, suffix):
    seq, cat = write_files(tmp_path, suffix)
    manifest = prepare_dataset("sequences", tmp_path / "ds", min_interactions=3, num_shards=1,
                               sequences=options(seq, cat))
    ds = tmp_path / "ds"
    items = dataset_format.read_items(ds).to_pylist()
    # Ids stay strings; they sort numerically when all are integers, else as strings:
    # "0012" < "12" < "a" < "b" < "c" < "d". Item "12" has no interaction and is not kept.
    assert [(r["item_idx"], r["item_id"], r["text"]) for r in items] == [
        (1, "0012", "Twelve. dozen"), (2, "a", "Apple. red"), (3, "b", "Bean"), (4, "c", "Corn. yellow"),
        (5, "d", "Date. sweet"),
    ]
    # users sorted by id: u1 -> 1, u2 -> 2. u1 = a c a b, u2 = b 0012 c d: last -> test, second-last -> valid.
    assert split_rows(ds, "train") == [(1, [2, 4], None), (2, [3, 1], None)]
    assert split_rows(ds, "valid") == [(1, [2, 4], 2), (2, [3, 1], 4)]
    assert split_rows(ds, "test") == [(1, [2, 4, 2], 3), (2, [3, 1, 4], 5)]
    assert [r["popularity"] for r in items] == [1, 1, 1, 1, 0]

    source = manifest["source"]
    assert (source["type"], source["variant"]) == ("sequences", "sequences")
    assert [(f["role"], f["name"]) for f in source["files"]] == [("sequences", seq.name), ("items", cat.name)]
    assert all(len(f["sha256"]) == 64 for f in source["files"])
    assert source["parameters"] == {"user_col": "user", "items_col": "seq", "item_id_col": "sku",
                                    "text_cols": ["name", "blurb"], "encoding": "utf-8"}
    assert manifest["split"]["time_order"] == "file_order"
    assert manifest["counts"] == {"users": 2, "items": 5, "interactions": 8, "train_interactions": 4,
                                  "raw_interactions": 10, "raw_users": 3, "raw_items": 5}
    dataset_format.verify_dataset(ds)


def test_parquet_string_column_and_item_k_core(tmp_path):
    pq.write_table(pa.table({"uid": [3, 1, 2, 4], "seq": ["10 20 30", "10 20 30 40", "40 10 20", "30 10 20"]}),
                   tmp_path / "seq.parquet")
    pq.write_table(pa.table({"item": [10, 20, 30, 40], "title": ["T10", "T20", "T30", "T40"]}),
                   tmp_path / "items.parquet")
    opts = {"sequences": str(tmp_path / "seq.parquet"), "items": str(tmp_path / "items.parquet"),
            "user_col": "uid", "items_col": "seq", "item_id_col": "item", "text_cols": "title"}
    # k-core 3: item 40 (2 interactions) goes, which leaves user 2 with two items, and it goes too.
    manifest = prepare_dataset("sequences", tmp_path / "ds", min_interactions=3, item_min_interactions=3,
                               sequences=opts)
    assert manifest["counts"]["users"] == 3 and manifest["counts"]["interactions"] == 9
    assert [r["item_id"] for r in dataset_format.read_items(tmp_path / "ds").to_pylist()] == ["10", "20", "30"]
    assert split_rows(tmp_path / "ds", "test") == [(1, [1, 2], 3), (2, [1, 2], 3), (3, [3, 1], 2)]


def test_parquet_list_column_refused(tmp_path):
    pq.write_table(pa.table({"user_id": ["u"], "items": [["a", "b", "c"]]}), tmp_path / "seq.parquet")
    _, cat = write_files(tmp_path, ".csv")
    with pytest.raises(PrepareError, match=r"seq\.parquet: column 'items' has Parquet type list<"):
        prepare_dataset("sequences", tmp_path / "ds", sequences={"sequences": str(tmp_path / "seq.parquet"),
                                                                  "items": str(cat), "item_id_col": "sku",
                                                                  "text_cols": "name"})
    assert not (tmp_path / "ds").exists()


def test_cold_items(tmp_path):
    seq, cat = write_files(
        tmp_path, sequences=[(f"u{u}", " ".join(f"i{(u + k) % 20}" for k in range(5))) for u in range(30)],
        items=[(f"i{i}", f"Item {i}", "") for i in range(20)],
    )
    manifest = prepare_dataset("sequences", tmp_path / "ds", cold_items=0.2, sequences=options(seq, cat))
    assert manifest["cold_items"]["items"] == 4 and manifest["cold_items"]["test_targets"] > 0
    assert sum(r["cold"] for r in dataset_format.read_items(tmp_path / "ds").to_pylist()) == 4


def test_option_checks(tmp_path):
    seq, cat = write_files(tmp_path)
    with pytest.raises(ValueError, match="source 'sequences' needs sequences=.* with sequences"):
        prepare_dataset("sequences", tmp_path / "ds", sequences={"items": str(cat)})
    with pytest.raises(ValueError, match="unknown sequences option.* time_col"):
        prepare_dataset("sequences", tmp_path / "ds", sequences={**options(seq, cat), "time_col": "t"})
    with pytest.raises(ValueError, match="sequences options are only used by source 'sequences'"):
        prepare_dataset("generic", tmp_path / "ds", sequences=options(seq, cat))
    assert not (tmp_path / "ds").exists()


def test_cli_happy_path(tmp_path, capsys):
    seq, cat = write_files(tmp_path)
    assert run_cli(*cli_args(seq, cat, tmp_path / "ds", "--user-hash-key", "k")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"prepared {tmp_path / 'ds'} (sequences) in ")
    assert "2 users, 5 items, 8 interactions (4 train; 10 read), 2 shards per split, sha256:" in out
    assert dataset_format.read_manifest(tmp_path / "ds")["split"]["time_order"] == "file_order"


@pytest.mark.parametrize(
    ("sequences", "items", "where", "problem"),
    [
        pytest.param([("u1", "a b c"), ("u2", "b c d"), ("u1", "c d a")], ITEMS, "seq.tsv:3",
                     "user id 'u1' in column 'user' is also on row 1; a sequences file has one row per user",
                     id="user-twice"),
        pytest.param([("u1", "a b c"), ("u2", "  ")], ITEMS, "seq.tsv:2",
                     "no item ids in column 'seq'", id="empty-sequence"),
        pytest.param([("u1", "a b c"), ("u2", "b zz c")], ITEMS, "seq.tsv:2",
                     "item id 'zz' is not in the items table", id="unknown-item"),
        pytest.param([("u1", "a b c"), ("u2", "a\tb")], ITEMS, "seq.tsv:2",
                     "expected 2 fields separated by '\\t', found 3", id="extra-field"),
        pytest.param([("u1", "a b c")], [*ITEMS, ("a", "Again", "")], "items.tsv:7",
                     "duplicate item id 'a' in column 'sku' (first seen at row 1)", id="duplicate-item"),
    ],
)
def test_cli_bad_input_one_line(tmp_path, capsys, sequences, items, where, problem):
    seq, cat = write_files(tmp_path, sequences=sequences, items=items)
    assert run_cli(*cli_args(seq, cat, tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"llmrec-dist prepare: error: {tmp_path / where}: {problem}")
    assert not (tmp_path / "ds").exists()


def test_cli_bad_encoding_missing_column_missing_file(tmp_path, capsys):
    seq, cat = write_files(tmp_path)
    seq.write_bytes(b"user\tseq\nu1\ta b c\nJ\xe9r\ta b c\n")
    assert run_cli(*cli_args(seq, cat, tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"error: {seq}:2: not valid utf-8 text at byte offset 19" in err and "--encoding" in err

    seq.write_text("user\tsequence\nu1\ta b c\n")
    assert run_cli(*cli_args(seq, cat, tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(f"error: {seq}: missing column(s) 'seq'; columns found: 'user', 'sequence'")
    assert len(err.strip().splitlines()) == 1

    assert run_cli(*cli_args(tmp_path / "nope.tsv", cat, tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"llmrec-dist prepare: error: {tmp_path / 'nope.tsv'}: file not found"
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "sequences", "--sequences", "s.tsv", "--items", "i.tsv", "--time-col", "t"],
         "--time-col is only used with --source generic"),
        (["--source", "sequences", "--items", "i.tsv"], "--sequences is required with --source sequences"),
        (["--source", "generic", "--interactions", "e.csv", "--items", "i.csv", "--sequences", "s.tsv"],
         "--sequences is only used with --source sequences"),
        (["--source", "generic", "--interactions", "e.csv", "--items", "i.csv", "--items-col", "seq"],
         "--items-col is only used with --source sequences"),
        (["--source", "synthetic", "--user-col", "u"], "--user-col is only used with --source generic or sequences"),
    ],
)
def test_flags_of_the_wrong_source(tmp_path, capsys, argv, message):
    assert run_cli(*argv, "--output", str(tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"llmrec-dist prepare: error: {message}"
    assert not (tmp_path / "ds").exists()
