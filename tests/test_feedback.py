"""Explicit feedback in prepared datasets (format_version 2): ratings and 0/1 labels kept per event,
parallel to the histories, through filters, the leave-one-out split and cold items; hostile values
refused with file, row and column; format_version 1 datasets still read."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import prepare_dataset

RATED = """\
user_id,item_id,timestamp,stars,clicked
7,30,300,3.5,1
7,10,100,5,0
7,20,200,1,1
7,40,400,4,1
7,50,500,2.5,0
2,20,10,4,1
2,10,10,2,0
2,40,30,5,1
2,30,20,3,1
2,50,40,1,0
"""


def rated_files(tmp_path, interactions: str = RATED):
    (tmp_path / "interactions.csv").write_text(interactions)
    (tmp_path / "items.csv").write_text("item_id,text\n" + "".join(f"{i},T{i}\n" for i in (10, 20, 30, 40, 50)))
    return {"interactions": str(tmp_path / "interactions.csv"), "items": str(tmp_path / "items.csv")}


def prepare_rated(tmp_path, name="ds", interactions: str = RATED, **options):
    generic = {**rated_files(tmp_path, interactions), **options}
    kwargs = {k: generic.pop(k) for k in ("cold_items", "seed") if k in generic}
    return prepare_dataset("generic", tmp_path / name, generic=generic, min_interactions=3, num_shards=1,
                           **kwargs), tmp_path / name


def by_user(dataset, split):
    return {r["user_idx"]: r for r in dataset_format.read_split(dataset, split, feedback=True).to_pylist()}


def test_ratings_follow_the_events_through_the_split(tmp_path):
    manifest, ds = prepare_rated(tmp_path, rating_col="stars", rating_range="1,5")
    assert manifest["format_version"] == 2
    assert manifest["feedback"] == {"kind": "rating", "column": "stars", "min": 1.0, "max": 5.0, "range": "declared"}
    train, valid, test = (by_user(ds, s) for s in dataset_format.SPLITS)
    # user "2" -> 1: events in time order 20 (t=10), 10 (t=10, file order), 30, 40, 50
    assert (train[1]["items"], train[1]["feedback"]) == ([2, 1, 3], [4.0, 2.0, 3.0])
    assert (valid[1]["feedback"], valid[1]["target"], valid[1]["target_feedback"]) == ([4.0, 2.0, 3.0], 4, 5.0)
    assert (test[1]["feedback"], test[1]["target"], test[1]["target_feedback"]) == ([4.0, 2.0, 3.0, 5.0], 5, 1.0)
    # user "7" -> 2: 10 (5), 20 (1), 30 (3.5), 40 (4), 50 (2.5)
    assert (test[2]["items"], test[2]["feedback"], test[2]["target_feedback"]) == ([1, 2, 3, 4], [5.0, 1.0, 3.5, 4.0], 2.5)
    assert dataset_format.verify_dataset(ds)["content_hash"] == manifest["content_hash"]
    # The readers that do not ask for feedback see the layout of format_version 1.
    assert dataset_format.read_split(ds, "train").column_names == ["user_idx", "user_key", "items"]


def test_feedback_is_part_of_the_content_hash(tmp_path):
    plain, _ = prepare_rated(tmp_path, name="plain")
    rated, ds = prepare_rated(tmp_path, name="rated", rating_col="stars")
    assert plain["feedback"] is None and plain["content_hash"] != rated["content_hash"]
    assert rated["feedback"]["range"] == "observed" and (rated["feedback"]["min"], rated["feedback"]["max"]) == (1.0, 5.0)
    # a changed rating is a changed dataset
    import pyarrow as pa
    import pyarrow.parquet as pq
    file = dataset_format.split_files(ds, "test")[0]
    table = pq.read_table(file)
    changed = table.set_column(table.column_names.index("target_feedback"), "target_feedback",
                               pa.array([5.0] * table.num_rows, pa.float32()))
    pq.write_table(changed, file)
    with pytest.raises(dataset_format.DatasetError, match="does not match its manifest"):
        dataset_format.verify_dataset(ds)


def test_labels(tmp_path):
    manifest, ds = prepare_rated(tmp_path, label_col="clicked")
    assert manifest["feedback"] == {"kind": "label", "column": "clicked", "min": 0.0, "max": 1.0, "range": "declared"}
    assert by_user(ds, "test")[1]["feedback"] == [1.0, 0.0, 1.0, 1.0]


def test_cold_items_drop_the_same_events_from_the_feedback(tmp_path):
    lines = ["user_id,item_id,timestamp,stars"]
    rng = np.random.default_rng(0)
    for user in range(30):
        for t, item in enumerate(rng.choice(np.arange(10, 60, 10), size=5, replace=True)):
            lines.append(f"{user},{item},{t},{1 + (user * 7 + t * 3 + item) % 5}")
    manifest, ds = prepare_rated(tmp_path, interactions="\n".join(lines) + "\n", rating_col="stars",
                                 cold_items=0.2, seed=0)
    assert manifest["cold_items"]["items"] == 1
    raw = {}
    for line in lines[1:]:
        user, item, t, stars = line.split(",")
        raw.setdefault(user, []).append((int(t), item, float(stars)))
    id_of = {r["item_idx"]: r["item_id"] for r in dataset_format.read_items(ds).to_pylist()}
    cold_ids = {r["item_id"] for r in dataset_format.read_items(ds).to_pylist() if r["cold"]}
    rating_of = {(item, stars) for events in raw.values() for _, item, stars in events}
    for split in dataset_format.SPLITS:
        for row in by_user(ds, split).values():
            assert len(row["items"]) == len(row["feedback"])
            assert not {id_of[i] for i in row["items"]} & cold_ids
            # each (item, rating) pair is one that was in the input
            assert all((id_of[i], f) in rating_of for i, f in zip(row["items"], row["feedback"]))
    assert dataset_format.verify_dataset(ds)


@pytest.mark.parametrize(("cell", "options", "expected"), [
    ("abc", {"rating_col": "stars"}, r"interactions\.csv:3: column 'stars': 'abc' is not a rating"),
    ("", {"rating_col": "stars"}, r"interactions\.csv:3: column 'stars': an empty value is not a rating"),
    ("nan", {"rating_col": "stars"}, r"interactions\.csv:3: column 'stars': 'nan' is not a rating"),
    ("inf", {"rating_col": "stars"}, r"interactions\.csv:3: column 'stars': 'inf' is not a rating"),
    ("7", {"rating_col": "stars", "rating_range": "1,5"},
     r"interactions\.csv:3: column 'stars': rating '7' is outside the declared range \[1, 5\]"),
    ("2", {"label_col": "clicked"}, r"interactions\.csv:3: column 'clicked': label '2' is not 0 or 1"),
])
def test_hostile_feedback_names_file_row_and_column(tmp_path, cell, options, expected):
    lines = RATED.splitlines()
    fields = lines[3].split(",")
    fields[3 if "rating_col" in options else 4] = cell
    lines[3] = ",".join(fields)
    with pytest.raises(PrepareError, match=expected):
        prepare_rated(tmp_path, interactions="\n".join(lines) + "\n", **options)
    assert not (tmp_path / "ds").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["interactions.csv", "items.csv"]


def test_missing_feedback_column(tmp_path):
    with pytest.raises(PrepareError, match=r"interactions\.csv: missing column\(s\) 'rating'"):
        prepare_rated(tmp_path, rating_col="rating")


@pytest.mark.parametrize(("options", "expected"), [
    ({"rating_col": "stars", "label_col": "clicked"}, "not both"),
    ({"rating_range": "1,5"}, "rating_range needs rating_col"),
    ({"rating_col": "stars", "rating_range": "5,1"}, "LOW <= HIGH"),
    ({"rating_col": "stars", "rating_range": "one,five"}, "two numbers"),
])
def test_bad_feedback_options(tmp_path, options, expected):
    with pytest.raises(ValueError, match=expected):
        prepare_rated(tmp_path, **options)


def test_format_version_1_datasets_read_without_feedback(tmp_path):
    manifest, ds = prepare_rated(tmp_path)
    old = {k: v for k, v in manifest.items() if k != "feedback"}
    (ds / "manifest.json").write_text(json.dumps({**old, "format_version": 1}))
    assert dataset_format.feedback_of(dataset_format.verify_dataset(ds)) is None
    with pytest.raises(dataset_format.DatasetError, match="has no explicit feedback"):
        dataset_format.read_split(ds, "valid", feedback=True)
    (ds / "manifest.json").write_text(json.dumps({**manifest, "feedback": {"kind": "stars"}}))
    with pytest.raises(dataset_format.DatasetError, match="feedback: expected null or an object with kind"):
        dataset_format.read_manifest(ds)


def test_cli_flags(tmp_path):
    files = rated_files(tmp_path)
    base = [sys.executable, "-m", "llmrec_dist.cli", "prepare", "--source", "generic", "--min-interactions", "3",
            "--interactions", files["interactions"], "--items", files["items"]]
    done = subprocess.run(base + ["--rating-col", "stars", "--rating-range", "1,5", "--output", str(tmp_path / "ds")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "explicit feedback: rating from column 'stars', 1 to 5 (declared)" in done.stdout
    bad = subprocess.run(base + ["--label-col", "clicked", "--rating-range", "1,5", "--output", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "llmrec-dist prepare: error: --rating-range needs --rating-col"
    seq = subprocess.run([sys.executable, "-m", "llmrec_dist.cli", "prepare", "--source", "synthetic",
                          "--rating-col", "stars", "--output", str(tmp_path / "y")], capture_output=True, text=True)
    assert seq.returncode == 2 and "--rating-col is only used with --source generic" in seq.stderr
