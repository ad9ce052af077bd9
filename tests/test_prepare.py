"""prepare: split protocol, filters, user hashing, generic source, errors, atomic output, verify."""

from __future__ import annotations

import hashlib
import hmac
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import prepare_dataset


def write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def rows(dataset, split: str) -> list[dict]:
    return dataset_format.read_split(dataset, split).to_pylist()


def generic_files(tmp_path, interactions: str, items: str | None = None):
    """Write interactions.csv / items.csv; items default to every item id seen with text 'T<id>'."""
    inter = write(tmp_path / "interactions.csv", interactions)
    if items is None:
        ids = sorted(set(pd.read_csv(inter, dtype=str)["item_id"]))
        items = "item_id,text\n" + "".join(f"{i},T{i}\n" for i in ids)
    return {"interactions": str(inter), "items": str(write(tmp_path / "items.csv", items))}


def prepare_generic(tmp_path, interactions: str, items: str | None = None, name="ds", **kwargs):
    files = generic_files(tmp_path, interactions, items)
    return prepare_dataset("generic", tmp_path / name, generic=files, **kwargs), tmp_path / name


# ---------------------------------------------------------------------------------------------
# Leave-one-out, indexing, filters
# ---------------------------------------------------------------------------------------------

HAND_BUILT = """\
user_id,item_id,timestamp
7,30,300
7,10,100
7,20,200
7,40,400
7,50,500
2,20,10
2,10,10
2,40,30
2,30,20
2,50,40
9,10,5
9,20,6
"""


def test_leave_one_out_exact_rows(tmp_path):
    # user 9 has 2 interactions and is dropped; user 2's tie at t=10 keeps file order (20, 10).
    manifest, ds = prepare_generic(tmp_path, HAND_BUILT, min_interactions=3, num_shards=1)

    items = dataset_format.read_items(ds).to_pylist()
    assert [(r["item_idx"], r["item_id"]) for r in items] == [(1, "10"), (2, "20"), (3, "30"), (4, "40"), (5, "50")]
    # user_idx in numeric order of original ids: "2" -> 1, "7" -> 2 (string order would swap them)
    train = [(r["user_idx"], r["items"]) for r in rows(ds, "train")]
    valid = [(r["user_idx"], r["items"], r["target"]) for r in rows(ds, "valid")]
    test = [(r["user_idx"], r["items"], r["target"]) for r in rows(ds, "test")]
    assert train == [(1, [2, 1, 3]), (2, [1, 2, 3])]
    assert valid == [(1, [2, 1, 3], 4), (2, [1, 2, 3], 4)]
    assert test == [(1, [2, 1, 3, 4], 5), (2, [1, 2, 3, 4], 5)]
    # popularity counts train occurrences only
    assert [r["popularity"] for r in items] == [2, 2, 2, 0, 0]
    assert manifest["counts"] == {
        "users": 2, "items": 5, "interactions": 10, "train_interactions": 6,
        "raw_interactions": 12, "raw_users": 3, "raw_items": 5,
    }
    assert manifest["split"] == {
        "protocol": "leave-one-out", "min_interactions": 3, "item_min_interactions": 0, "time_order": "timestamp",
    }


def test_written_schema_and_layout(tmp_path):
    manifest, ds = prepare_generic(tmp_path, HAND_BUILT, min_interactions=3)
    assert dataset_format.read_manifest(ds)["content_hash"] == manifest["content_hash"]
    assert pq.read_schema(ds / "items.parquet").remove_metadata() == dataset_format.ITEMS_FILE_SCHEMA
    for split in dataset_format.SPLITS:
        files = dataset_format.split_files(ds, split)
        assert len(files) == 2 and all(f.startswith(str(ds.absolute())) for f in files)
        assert pq.read_schema(files[0]).remove_metadata() == dataset_format.SPLIT_SCHEMAS[split]
    assert dataset_format.num_items(manifest) == 5
    assert manifest["format_version"] == dataset_format.FORMAT_VERSION == 2
    assert manifest["feedback"] is None  # no rating or label column given


def test_min_interactions_filter(tmp_path):
    lines = ["user_id,item_id,timestamp"]
    for user, n in {"a": 2, "b": 3, "c": 4, "d": 5}.items():
        lines += [f"{user},{i},{i}" for i in range(n)]
    manifest, ds = prepare_generic(tmp_path, "\n".join(lines) + "\n", min_interactions=4)
    assert manifest["counts"]["users"] == 2  # c and d
    assert [len(r["items"]) for r in rows(ds, "test")] == [3, 4]
    with pytest.raises(ValueError, match="min_interactions must be >= 3"):
        prepare_dataset("generic", tmp_path / "x", min_interactions=2, generic={})


def test_item_k_core_is_iterative(tmp_path):
    # Dropping item 4 removes user C, which leaves item 8 with one interaction, which removes D.
    data = "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n"
        for u, seq in {"A": [1, 2, 3], "B": [1, 2, 3], "C": [1, 4, 8], "D": [8, 1, 2]}.items()
        for t, i in enumerate(seq)
    )
    manifest, ds = prepare_generic(tmp_path, data, min_interactions=3, item_min_interactions=2)
    assert manifest["counts"]["users"] == 2
    assert [r["item_id"] for r in dataset_format.read_items(ds).to_pylist()] == ["1", "2", "3"]
    assert manifest["split"]["item_min_interactions"] == 2
    # without the k-core, C and D stay (and items 4 and 8 with them)
    manifest, _ = prepare_generic(tmp_path, data, name="plain", min_interactions=3)
    assert manifest["counts"]["users"] == 4 and manifest["counts"]["items"] == 5


def test_nothing_left_after_filtering(tmp_path):
    with pytest.raises(PrepareError, match="no users left after filtering: min_interactions=10") as err:
        prepare_generic(tmp_path, HAND_BUILT, min_interactions=10)
    assert err.value.file.endswith("interactions.csv")
    assert not (tmp_path / "ds").exists()


def test_content_hash_ignores_shards_and_hash_key(tmp_path):
    one, ds1 = prepare_generic(tmp_path, HAND_BUILT, name="one", min_interactions=3, num_shards=1, user_hash_key="a")
    two, ds2 = prepare_generic(tmp_path, HAND_BUILT, name="two", min_interactions=3, num_shards=2, user_hash_key="b")
    assert one["content_hash"] == two["content_hash"]
    assert len(two["shards"]["train"]) == 2
    assert [r["user_key"] for r in rows(ds1, "train")] != [r["user_key"] for r in rows(ds2, "train")]
    # shard count is capped at the number of users
    capped, _ = prepare_generic(tmp_path, HAND_BUILT, name="capped", min_interactions=3, num_shards=50)
    assert len(capped["shards"]["test"]) == 2


def test_unknown_source_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="synthetic, movielens, generic"):
        prepare_dataset("netflix", tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# User hashing
# ---------------------------------------------------------------------------------------------

SECRET_USERS = ["alice@example.com", "bob-7781-secret", "carol.zz9"]


def _secret_interactions() -> str:
    return "user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u in SECRET_USERS for t, i in enumerate([3, 1, 2, 4, 5])
    )


def test_raw_user_ids_never_written(tmp_path):
    manifest, ds = prepare_generic(tmp_path, _secret_interactions(), user_hash_key="k1")
    files = [p for p in ds.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", "items.parquet", "part-00000.parquet"}
    for path in files:
        blob = path.read_bytes()
        for user in SECRET_USERS:
            assert user.encode() not in blob, f"{user} leaked into {path}"
    decoded = json.dumps(manifest) + "".join(
        str(pq.read_table(p).to_pylist()) for p in files if p.suffix == ".parquet"
    )
    assert not any(user in decoded for user in SECRET_USERS)
    assert "k1" not in json.dumps(manifest["user_ids"]).replace(manifest["user_ids"]["key_fingerprint"], "")


def test_user_keys_are_keyed_hmac(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMREC_USER_HASH_KEY", raising=False)
    manifest, ds = prepare_generic(tmp_path, _secret_interactions(), name="a", user_hash_key="k1")
    keys = [r["user_key"] for r in rows(ds, "train")]
    expected = [hmac.new(b"k1", u.encode(), hashlib.sha256).hexdigest()[:32] for u in sorted(SECRET_USERS)]
    assert keys == expected
    assert manifest["user_ids"]["key_provided"] is True
    assert manifest["user_ids"]["key_fingerprint"] == hashlib.sha256(b"k1").hexdigest()[:8]

    monkeypatch.setenv("LLMREC_USER_HASH_KEY", "k1")  # same key from the environment
    env_manifest, env_ds = prepare_generic(tmp_path, _secret_interactions(), name="b")
    assert [r["user_key"] for r in rows(env_ds, "test")] == keys
    assert env_manifest["user_ids"]["key_source"] == "environment"

    monkeypatch.delenv("LLMREC_USER_HASH_KEY")  # random key: different keys, same content
    random1, ds1 = prepare_generic(tmp_path, _secret_interactions(), name="c")
    random2, ds2 = prepare_generic(tmp_path, _secret_interactions(), name="d")
    assert random1["user_ids"]["key_provided"] is False and random1["user_ids"]["key_fingerprint"] is None
    assert [r["user_key"] for r in rows(ds1, "train")] != [r["user_key"] for r in rows(ds2, "train")]
    assert random1["content_hash"] == random2["content_hash"] == manifest["content_hash"]


# ---------------------------------------------------------------------------------------------
# Generic source: formats and bad input
# ---------------------------------------------------------------------------------------------


def test_generic_parquet_custom_columns_and_iso_times(tmp_path):
    events = pa.table(
        {
            "customer": pa.array([11, 11, 11, 12, 12, 12, 12], pa.int64()),
            "sku": ["x", "y", "z", "z", "y", "x", "w"],
            "when": [
                "2021-03-04T10:00:00Z", "2021-03-04", "2021-03-05T00:00:00+02:00",
                "1614800000", "2021-01-01", "2021-02-01", "2021-03-01",
            ],
        }
    )
    catalogue = pa.table(
        {"sku": ["w", "x", "y", "z"], "title": ["Wok", "Xylo", "Yarn", "Zip"], "blurb": ["hot", None, "soft", ""]}
    )
    pq.write_table(events, tmp_path / "events.parquet")
    pq.write_table(catalogue, tmp_path / "catalogue.parquet")
    options = dict(
        interactions=str(tmp_path / "events.parquet"), items=str(tmp_path / "catalogue.parquet"),
        user_col="customer", item_col="sku", time_col="when", item_id_col="sku", text_cols=["title", "blurb"],
    )
    manifest, ds = prepare_dataset("generic", tmp_path / "ds", generic=options, min_interactions=3), tmp_path / "ds"
    id_of = {r["item_idx"]: r["item_id"] for r in dataset_format.read_items(ds).to_pylist()}
    text_of = {r["item_id"]: r["text"] for r in dataset_format.read_items(ds).to_pylist()}
    assert text_of == {"w": "Wok. hot", "x": "Xylo", "y": "Yarn. soft", "z": "Zip"}
    # user 11: 2021-03-04 00:00 (y) < 2021-03-04 10:00 (x) < 2021-03-04 22:00 UTC (z)
    # user 12: 1614800000 = 2021-03-03T19:33Z, so order y, x, w, z
    sequences = [[id_of[i] for i in r["items"]] + [id_of[r["target"]]] for r in rows(ds, "test")]
    assert sequences == [["y", "x", "z"], ["y", "x", "w", "z"]]
    assert [f["role"] for f in manifest["source"]["files"]] == ["interactions", "items"]
    assert manifest["source"]["parameters"]["text_cols"] == ["title", "blurb"]


def test_generic_without_time_column_uses_file_order(tmp_path):
    data = "user_id,item_id\n1,c\n1,a\n1,b\n"
    files = generic_files(tmp_path, data)
    manifest = prepare_dataset("generic", tmp_path / "ds", min_interactions=3, generic={**files, "time_col": None})
    assert manifest["split"]["time_order"] == "file_order"
    row = rows(tmp_path / "ds", "test")[0]
    assert (row["items"], row["target"]) == ([3, 1], 2)  # c a | b with a=1, b=2, c=3


@pytest.mark.parametrize(
    ("interactions", "items", "expected"),
    [
        pytest.param(
            "user_id,item_id,timestamp\n1,a,5\n1,b,6\n1,c,yesterday\n", None,
            r"interactions\.csv:3: cannot parse timestamp 'yesterday' in column 'timestamp'", id="bad-timestamp",
        ),
        pytest.param(
            "user_id,item_id,timestamp\n1,a,5\n1,b,2021-13-45\n", None,
            r"interactions\.csv:2: cannot parse timestamp '2021-13-45'", id="bad-date",
        ),
        pytest.param(
            "user,item_id,timestamp\n1,a,5\n", None,
            r"interactions\.csv: missing column\(s\) 'user_id'; columns found: 'user', 'item_id', 'timestamp'",
            id="missing-column",
        ),
        pytest.param(
            "user_id,item_id,timestamp\n1,a,5\n1,q,6\n", "item_id,text\na,A\n",
            r"interactions\.csv:2: item id 'q' is not in the items table", id="unknown-item",
        ),
        pytest.param(
            "user_id,item_id,timestamp\n1,a,5\n", "item_id,text\na,A\nb,B\na,C\n",
            r"items\.csv:3: duplicate item id 'a' in column 'item_id' \(first seen at row 1\)", id="duplicate-item",
        ),
        pytest.param(
            "user_id,item_id,timestamp\n1,a,5\n,a,6\n", "item_id,text\na,A\n",
            r"interactions\.csv:2: empty user id in column 'user_id'", id="empty-user",
        ),
        pytest.param(
            "user_id,item_id,timestamp\n1,a,5\n1,a,6,extra\n", "item_id,text\na,A\n",
            r"interactions\.csv:2: expected 3 fields", id="extra-field",
        ),
        pytest.param(
            "user_id,item_id,timestamp\n1,a,5\n", "item_id,title\na,A\n",
            r"items\.csv: missing column\(s\) 'text'; columns found: 'item_id', 'title'", id="missing-text-column",
        ),
    ],
)
def test_generic_bad_input(tmp_path, interactions, items, expected):
    with pytest.raises(PrepareError, match=expected):
        prepare_generic(tmp_path, interactions, items)
    assert not (tmp_path / "ds").exists()


def test_generic_missing_file(tmp_path):
    files = {"interactions": str(tmp_path / "nope.csv"), "items": str(tmp_path / "items.csv")}
    with pytest.raises(PrepareError, match=r"nope\.csv: file not found") as err:
        prepare_dataset("generic", tmp_path / "ds", generic=files)
    assert err.value.row is None and str(err.value) == f"{tmp_path / 'nope.csv'}: file not found"
    with pytest.raises(ValueError, match="unknown generic option"):
        prepare_dataset("generic", tmp_path / "ds", generic={**files, "user_column": "u"})


def test_prepare_error_format():
    assert str(PrepareError("a.csv", 4, "bad")) == "a.csv:4: bad"
    assert str(PrepareError("a.csv", None, "bad")) == "a.csv: bad"


# ---------------------------------------------------------------------------------------------
# Synthetic source
# ---------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic(tmp_path):
    small = {"n_users": 150, "n_items": 60}
    a = prepare_dataset("synthetic", tmp_path / "a", synthetic=small, seed=3)
    b = prepare_dataset("synthetic", tmp_path / "b", synthetic=small, seed=3)
    c = prepare_dataset("synthetic", tmp_path / "c", synthetic=small, seed=4)
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]
    assert a["counts"]["users"] == 150 and a["counts"]["items"] <= 60
    assert a["source"]["parameters"]["seed"] == 3 and a["source"]["type"] == "synthetic"
    lengths = [len(r["items"]) + 1 for r in rows(tmp_path / "a", "test")]  # history + target
    assert min(lengths) >= 8 and max(lengths) <= 50


def test_synthetic_has_sequential_and_text_signal(tmp_path):
    """A first-order transition model must beat popularity by far on the default dataset."""
    manifest = prepare_dataset("synthetic", tmp_path / "syn")
    assert manifest["counts"]["users"] == 1000 and manifest["counts"]["items"] == 400
    train = rows(tmp_path / "syn", "train")
    valid = rows(tmp_path / "syn", "valid")
    n = manifest["counts"]["items"] + 1
    transitions = np.zeros((n, n))
    for row in train:
        np.add.at(transitions, (row["items"][:-1], row["items"][1:]), 1)
    popularity = np.asarray(dataset_format.read_items(tmp_path / "syn").column("popularity").to_pylist(), float)
    hits_markov = hits_pop = 0
    for row in valid:
        seen = set(row["items"])
        scores = transitions[row["items"][-1], 1:] + 1e-6 * popularity
        for scoring, counter in ((scores, "markov"), (popularity, "pop")):
            ranked = [i + 1 for i in np.argsort(-scoring, kind="stable") if i + 1 not in seen][:10]
            if row["target"] in ranked:
                if counter == "markov":
                    hits_markov += 1
                else:
                    hits_pop += 1
    assert hits_markov > 3 * hits_pop and hits_markov / len(valid) > 0.4
    # text reflects the latent attributes: consecutive items mostly share their "about ..." theme
    texts = dataset_format.read_items(tmp_path / "syn").column("text").to_pylist()
    theme = {idx: t.split(" about ", 1)[1].split(";")[0] for idx, t in enumerate(texts, start=1)}
    pairs = [(a, b) for row in train for a, b in zip(row["items"], row["items"][1:])]
    same = sum(theme[a] == theme[b] for a, b in pairs) / len(pairs)
    assert same > 0.5


# ---------------------------------------------------------------------------------------------
# Output safety: overwrite, atomicity, verification
# ---------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_then_overwrites(tmp_path):
    data = HAND_BUILT + "9,30,7\n"  # user 9 now has 3 interactions
    _, ds = prepare_generic(tmp_path, data, min_interactions=3)
    first = dataset_format.read_manifest(ds)
    assert first["counts"]["users"] == 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_generic(tmp_path, data, min_interactions=4)
    assert dataset_format.read_manifest(ds) == first
    second, _ = prepare_generic(tmp_path, data, min_interactions=4, overwrite=True)
    assert dataset_format.read_manifest(ds) == second and second["counts"]["users"] == 2
    assert second["content_hash"] != first["content_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "interactions.csv", "items.csv"]


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare_generic(tmp_path, HAND_BUILT, min_interactions=3, overwrite=True)
    assert (tmp_path / "ds" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("existing", [False, True])
def test_no_partial_output_on_failure(tmp_path, monkeypatch, existing):
    if existing:
        prepare_generic(tmp_path, HAND_BUILT, min_interactions=3)
        before = dataset_format.verify_dataset(tmp_path / "ds")

    def fail(folder, manifest):
        assert any((folder / "train").iterdir())  # shards were already written
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(dataset_format, "write_manifest", fail)
    with pytest.raises(RuntimeError, match="injected"):
        prepare_generic(tmp_path, HAND_BUILT, min_interactions=4, overwrite=True)
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    if existing:
        assert dataset_format.verify_dataset(tmp_path / "ds") == before
    else:
        assert not (tmp_path / "ds").exists()


def test_verify_dataset_detects_tampering(tmp_path):
    manifest, ds = prepare_generic(tmp_path, HAND_BUILT, min_interactions=3)
    assert dataset_format.verify_dataset(ds)["content_hash"] == manifest["content_hash"]
    shard = dataset_format.split_files(ds, "valid")[0]
    table = pq.read_table(shard)
    tampered = table.set_column(3, "target", pa.array([1] * table.num_rows, pa.int32()))
    pq.write_table(tampered, shard)
    with pytest.raises(ValueError) as err:
        dataset_format.verify_dataset(ds)
    assert manifest["content_hash"] in str(err.value) and "sha256:" in str(err.value).split("files hash to")[1]


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset_format.read_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset folder"):
        dataset_format.read_manifest(tmp_path / "empty")
    _, ds = prepare_generic(tmp_path, HAND_BUILT, min_interactions=3)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="unsupported format_version 99"):
        dataset_format.read_manifest(ds)
    with pytest.raises(ValueError, match="unknown split"):
        dataset_format.split_files(ds, "holdout")
