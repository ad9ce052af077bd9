"""Data larger than memory: the streaming generator and ``prepare --stream`` give, user for user, what the
in-memory prepare gives; their memory stays flat as the input grows; the content hash is computed one
part at a time; evaluation reads only its rank's rows, a fixed user subset when asked, in batches sized
to the catalogue."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import prepare_dataset
from llmrec_dist.data.streaming import generate_interactions, prepare_streaming
from llmrec_dist.evaluation import SCORE_BUDGET, eval_batch_rows, load_eval_rows


def rows_by_user(path) -> dict:
    """Every split row as (split, user_key) -> (history item ids, target item id): numbering-free."""
    ids = dataset_format.read_items(path).column("item_id").to_pylist()
    out = {}
    for split in dataset_format.SPLITS:
        for row in dataset_format.read_split(path, split).to_pylist():
            out[(split, row["user_key"])] = ([ids[i - 1] for i in row["items"]],
                                             ids[row["target"] - 1] if "target" in row else None)
    return out


def items_by_id(path) -> dict:
    table = dataset_format.read_items(path)
    return {r["item_id"]: (r["text"], r["popularity"]) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated")
    info = generate_interactions(folder, users=1500, items=800, interactions=16000, seed=3, users_per_file=400)
    return folder, info


def test_the_generator_writes_its_files_block_by_block_and_is_seeded(generated, tmp_path):
    folder, info = generated
    table = pq.read_table(folder / "interactions")
    assert info["files"] == 4 and len(table) == info["interactions"] >= 1500 * 5
    counts = np.bincount(table.column("user_id").to_numpy())
    assert len(counts) == 1500 and counts.min() >= 5
    assert pq.read_table(folder / "items.parquet").column("title").to_pylist()[7].endswith("series 7 part 1")
    again = generate_interactions(tmp_path, users=1500, items=800, interactions=16000, seed=3, users_per_file=400)
    assert again == info and pq.read_table(tmp_path / "interactions").equals(table)
    with pytest.raises(ValueError, match="interactions >= 5 x users"):
        generate_interactions(tmp_path / "x", users=100, items=10, interactions=100)


def test_streamed_prepare_holds_what_the_in_memory_prepare_holds(generated, tmp_path):
    folder, _ = generated
    pq.write_table(pq.read_table(folder / "interactions"), tmp_path / "all.parquet")
    streamed = prepare_streaming(folder / "interactions", folder / "items.parquet", tmp_path / "s",
                                 text_cols=["title"], user_hash_key="k", min_interactions=8, rows_per_bucket=3000)
    in_memory = prepare_dataset("generic", tmp_path / "m", user_hash_key="k", min_interactions=8,
                                generic={"interactions": str(tmp_path / "all.parquet"),
                                         "items": str(folder / "items.parquet"), "text_cols": ["title"]})
    assert streamed["counts"] == in_memory["counts"]
    assert streamed["counts"]["users"] < 1500  # the filter dropped some users, and items with them
    assert len(streamed["shards"]["train"]) == 6  # 16k rows / 3000 per bucket
    assert rows_by_user(tmp_path / "s") == rows_by_user(tmp_path / "m")
    assert items_by_id(tmp_path / "s") == items_by_id(tmp_path / "m")
    dataset_format.verify_dataset(tmp_path / "s")
    for split in dataset_format.SPLITS:  # part k of every split holds the same users
        parts = [pq.read_table(tmp_path / "s" / f).column("user_idx").to_pylist() for f in streamed["shards"][split]]
        assert parts[0][0] == 1 and all(p == sorted(p) for p in parts)
        if split != "train":
            assert [len(p) for p in parts] == [len(p) for p in
                                               [pq.read_table(tmp_path / "s" / f) for f in streamed["shards"]["valid"]]]


def test_csv_with_string_ids_streams_like_parquet(tmp_path):
    rng = np.random.default_rng(0)
    users = np.repeat([f"user-{i}" for i in range(60)], 7)
    items = np.array([f"sku-{i}" for i in rng.integers(0, 40, size=len(users))])
    times = rng.integers(0, 10_000, size=len(users))
    (tmp_path / "events.csv").write_text("customer,sku,ts\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in zip(users, items, times)))
    (tmp_path / "items.csv").write_text("sku,title\n" + "".join(f"sku-{i},thing {i}\n" for i in range(40)))
    options = {"user_col": "customer", "item_col": "sku", "time_col": "ts", "item_id_col": "sku",
               "text_cols": ["title"]}
    prepare_streaming(tmp_path / "events.csv", tmp_path / "items.csv", tmp_path / "s", user_hash_key="k",
                      rows_per_bucket=1000, **options)
    prepare_dataset("generic", tmp_path / "m", user_hash_key="k",
                    generic={"interactions": str(tmp_path / "events.csv"), "items": str(tmp_path / "items.csv"),
                             **options})
    assert rows_by_user(tmp_path / "s") == rows_by_user(tmp_path / "m")


def test_streamed_input_problems_are_named(generated, tmp_path):
    folder, _ = generated
    items = pq.read_table(folder / "items.parquet")
    pq.write_table(items.slice(1), tmp_path / "fewer.parquet")
    with pytest.raises(PrepareError, match="item 0 has interactions but no text"):
        prepare_streaming(folder / "interactions", tmp_path / "fewer.parquet", tmp_path / "a", text_cols=["title"])
    with pytest.raises(PrepareError, match="no column 'who'"):
        prepare_streaming(folder / "interactions", folder / "items.parquet", tmp_path / "b", user_col="who",
                          text_cols=["title"])
    pq.write_table(pa.table({"user_id": [1.5] * 6, "item_id": [0] * 6, "timestamp": list(range(6))}),
                   tmp_path / "floats.parquet")
    with pytest.raises(PrepareError, match="streamed input needs integer or string ids"):
        prepare_streaming(tmp_path / "floats.parquet", folder / "items.parquet", tmp_path / "c", text_cols=["title"])
    with pytest.raises(PrepareError, match="no users left"):
        prepare_streaming(folder / "interactions", folder / "items.parquet", tmp_path / "d", text_cols=["title"],
                          min_interactions=10_000)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing half-written


def test_prepare_stream_on_the_command_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmrec_dist.cli", "prepare", *args], capture_output=True,
                              text=True, timeout=300)

    done = cli("--source", "synthetic", "--stream", "--synthetic-users", "300", "--synthetic-items", "100",
               "--synthetic-interactions", "3000", "--output", str(tmp_path / "syn"))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text())
    assert manifest["source"]["variant"] == "synthetic-stream-v1" and manifest["counts"]["users"] == 300
    for flags, message in ((["--cold-items", "0.1"], "--cold-items is not available with --stream"),
                           (["--source", "movielens", "--input", "x"], "--stream is for --source generic or synthetic"),
                           (["--rows-per-bucket", "5000"], None)):
        args = ["--source", "synthetic", "--output", str(tmp_path / "no"), *flags]
        if message is None:
            done = cli(*args)  # without --stream
            assert done.returncode == 2 and "--rows-per-bucket needs --stream" in done.stderr
            continue
        done = cli(*args, "--stream")
        assert done.returncode == 2 and message in done.stderr, done.stderr


def _peak_mb(code: str) -> float:
    done = subprocess.run([sys.executable, "-c", code + "\nimport resource; "
                                                        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True, timeout=600, check=True)
    return int(done.stdout.split()[-1]) / 1024


def test_the_streaming_writer_and_prepare_keep_their_memory_as_the_input_grows(tmp_path):
    """4x the interactions (and users), the same catalogue: peak RSS of the generator and of prepare
    grows by less than a fifth (a non-streaming path would grow with the rows)."""
    peaks = {}
    for size in (400_000, 1_600_000):
        folder, out = tmp_path / f"raw{size}", tmp_path / f"ds{size}"
        peaks[("generate", size)] = _peak_mb(
            "from llmrec_dist.data.streaming import generate_interactions\n"
            f"generate_interactions({str(folder)!r}, users={size // 10}, items=20000, interactions={size}, "
            "users_per_file=20000)")
        peaks[("prepare", size)] = _peak_mb(
            "from llmrec_dist.data.streaming import prepare_streaming\n"
            f"prepare_streaming({str(folder / 'interactions')!r}, {str(folder / 'items.parquet')!r}, {str(out)!r}, "
            "text_cols=['title'], rows_per_bucket=200000, batch_rows=100000)")
    for step in ("generate", "prepare"):
        assert peaks[(step, 1_600_000)] <= 1.2 * peaks[(step, 400_000)], peaks


# ------------------------------------------------------------------------------------------ content hash
def test_the_hash_read_part_by_part_is_the_hash_of_the_whole_tables(tmp_path):
    rated = tmp_path / "rated.csv"
    rng = np.random.default_rng(1)
    rows = [(u, int(rng.integers(0, 30)), t, int(rng.integers(1, 6))) for u in range(40) for t in range(8)]
    rated.write_text("user_id,item_id,timestamp,stars\n" + "".join(f"{u},{i},{t},{s}\n" for u, i, t, s in rows))
    (tmp_path / "items.csv").write_text("item_id,text\n" + "".join(f"{i},item {i}\n" for i in range(30)))
    prepare_dataset("generic", tmp_path / "ds", num_shards=3, cold_items=0.2, seed=1,
                    generic={"interactions": str(rated), "items": str(tmp_path / "items.csv"), "rating_col": "stars"})
    path = tmp_path / "ds"
    whole = dataset_format.compute_content_hash(
        dataset_format.read_items(path), {s: dataset_format.read_split(path, s, feedback=True)
                                          for s in dataset_format.SPLITS})
    manifest = dataset_format.read_manifest(path)
    assert dataset_format.content_hash_of_files(path) == whole == manifest["content_hash"]
    assert manifest["cold_items"]["items"] > 0 and manifest["feedback"] is not None  # both sections hashed


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluation_batches_shrink_with_the_catalogue():
    assert eval_batch_rows(256, 10_000) == 256
    assert eval_batch_rows(256, 1_000_000) == SCORE_BUDGET // 1_000_001 == 33
    assert eval_batch_rows(256, 10**9) == 1


def test_eval_rows_are_this_ranks_share_of_a_fixed_subset(generated, tmp_path):
    folder, _ = generated
    prepare_streaming(folder / "interactions", folder / "items.parquet", tmp_path / "s", text_cols=["title"],
                      rows_per_bucket=3000)
    every = load_eval_rows(str(tmp_path / "s"), "valid")
    assert len(every) == 1500
    subset = load_eval_rows(str(tmp_path / "s"), "valid", max_users=100)
    stride = -(-1500 // 100)
    assert np.array_equal(subset.targets, every.targets[::stride])
    shares = [load_eval_rows(str(tmp_path / "s"), "valid", rank, 2, max_users=100) for rank in (0, 1)]
    assert sorted(np.concatenate([s.targets for s in shares]).tolist()) == sorted(subset.targets.tolist())
    assert np.array_equal(shares[0].targets, subset.targets[0::2])
