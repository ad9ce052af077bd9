"""The on-disk contract of a prepared dataset: written by ``prepare``, read by everything else.

::

    <dataset>/
      manifest.json         format_version, source, counts, split protocol, shards, content_hash, ...
      items.parquet         item_idx int32 (1..N; 0 is padding), item_id string, text string, popularity int64,
                            cold bool
      train/part-*.parquet  user_idx int32, user_key string, items list<int32>
      valid/part-*.parquet  user_idx int32, user_key string, items list<int32> (history), target int32, cold bool
      test/part-*.parquet   user_idx int32, user_key string, items list<int32> (history), target int32, cold bool
      users.parquet         optional: user_key string, one string column per user attribute (gender, age, ...)

Explicit feedback (format_version 2, only when the manifest's ``feedback`` is not null): every split
also has ``feedback list<float32>``, the rating (or 0/1 label) of each event of ``items``, in the same
order, and valid/test have ``target_feedback float32``, that of the target event. The manifest's
``feedback`` says what the numbers are: ``{"kind": "rating" | "label", "column": ..., "min": ...,
"max": ...}``. Datasets of format_version 1 (before feedback existed) read as without feedback.

``users.parquet`` (user attributes for the fairness report, ``llmrec_dist.data.user_attributes``) is
written only when the source has user attributes; it is not part of the content hash, so a dataset with
it keeps the hash (and the models) of the same dataset without it. The manifest's ``user_attributes``
describes it (null when there is none).

Rows of every split are sorted by ``user_idx`` and the users are cut into the same contiguous
ranges for all three splits, so part ``k`` of train, valid and test holds the same users.

Cold items (``prepare --cold-items``): items with ``cold`` true appear in no ``items`` list of
any split, only as valid/test ``target`` (whose row then has ``cold`` true), and have popularity
0. A user whose train sequence held only cold items has no train row (valid and test keep one
row per user). Datasets prepared before the ``cold`` columns existed read as all-false.

A dataset location is a local folder or a URI that ``pyarrow.fs`` understands (``s3://bucket/ds``,
``gs://...``). ``prepare`` writes a URI by staging the dataset locally, uploading it under a hidden
sibling prefix (``s3://bucket/.ds.tmp-<random>/``), then copying it into place server-side with
``manifest.json`` last: a prefix without a manifest is not a dataset (readers refuse it), and a
failure removes whatever was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmrec_dist import storage

FORMAT_VERSION = 2
# Versions this code reads: 1 is 2 without the feedback columns (manifest feedback null).
READABLE_FORMAT_VERSIONS = (1, 2)
FEEDBACK_KINDS = ("rating", "label")
SPLITS = ("train", "valid", "test")
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
PADDING_IDX = 0

# Parquet settings: small row groups so Ray Data can stream a shard without reading it whole.
ROW_GROUP_SIZE = 4096
COMPRESSION = "zstd"

# The columns every items table has (also tables built by hand, e.g. in registry packages).
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("popularity", pa.int64(), nullable=False),
    ]
)
# ``cold``: the item is held out of every input sequence (see ``prepare --cold-items``).
COLD_FIELD = pa.field("cold", pa.bool_(), nullable=False)
# What ``prepare`` writes to items.parquet; ``read_items`` adds an all-false ``cold`` to older files.
ITEMS_FILE_SCHEMA = ITEMS_SCHEMA.append(COLD_FIELD)
TRAIN_SCHEMA = pa.schema(
    [
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("user_key", pa.string(), nullable=False),
        pa.field("items", pa.list_(pa.int32()), nullable=False),
    ]
)
# ``cold`` on valid/test rows: the target is a cold item.
EVAL_SCHEMA = TRAIN_SCHEMA.append(pa.field("target", pa.int32(), nullable=False)).append(COLD_FIELD)
SPLIT_SCHEMAS = {"train": TRAIN_SCHEMA, "valid": EVAL_SCHEMA, "test": EVAL_SCHEMA}
# Explicit feedback (manifest ``feedback`` not null): per history event, and of the target event.
FEEDBACK_FIELD = pa.field("feedback", pa.list_(pa.float32()), nullable=False)
TARGET_FEEDBACK_FIELD = pa.field("target_feedback", pa.float32(), nullable=False)
FEEDBACK_SPLIT_SCHEMAS = {
    "train": TRAIN_SCHEMA.append(FEEDBACK_FIELD),
    "valid": EVAL_SCHEMA.append(FEEDBACK_FIELD).append(TARGET_FEEDBACK_FIELD),
    "test": EVAL_SCHEMA.append(FEEDBACK_FIELD).append(TARGET_FEEDBACK_FIELD),
}

_CONTENT_HASH_TAG = b"llmrec_dist dataset content v1\n"


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def _join(root: str | os.PathLike, relative: str) -> str:
    """``root/relative`` as an absolute local path, or a URI when ``root`` is a URI."""
    if storage.is_uri(root):
        return str(root).rstrip("/") + "/" + relative
    return str(Path(root).absolute() / relative)


def shard_relpath(split: str, index: int) -> str:
    """Relative path of part file ``index`` of ``split``, e.g. ``train/part-00000.parquet``."""
    return f"{split}/part-{index:05d}.parquet"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


class DatasetError(ValueError):
    """A prepared dataset that cannot be used as it is: a manifest that is not what ``prepare`` writes, a
    file that is not readable Parquet or lacks the layout's columns, or content that does not match the
    manifest's hash. The message names the file and says what to do. (A missing folder, manifest or
    listed file is a ``FileNotFoundError`` instead.)"""


_REPREPARE = "the dataset is damaged or incomplete: re-run `llmrec-dist prepare --overwrite`"


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def _read_text(location: str) -> str:
    data = storage.read_bytes(location)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{location}: not UTF-8 text (byte offset {err.start}: {err.reason}); "
                           f"{_REPREPARE}") from None


def _shard_problem(split: str, relative) -> str | None:
    """Why ``relative`` is not a part file inside ``<split>/`` of the dataset folder, or None.

    A manifest is data: a listed path must not reach outside the folder (``../../etc/passwd``,
    ``/abs/path``), switch filesystems (``s3://...``, ``C:...``) or point at a non-Parquet file.
    """
    if not isinstance(relative, str):
        return f"expected a relative path string, got {type(relative).__name__}"
    parts = relative.split("/")
    unsafe = (
        relative.startswith("/") or "\\" in relative or ":" in relative
        or any(ord(c) < 32 for c in relative) or any(p in ("", ".", "..") for p in parts)
    )
    if unsafe or len(parts) < 2 or parts[0] != split or not relative.endswith(".parquet"):
        return (f"{relative!r} is not a Parquet file inside the {split}/ folder of the dataset "
                f"(expected e.g. {shard_relpath(split, 0)!r})")
    return None


def _manifest_problems(manifest: dict) -> list[str]:
    """Everything in a manifest that is not shaped as ``prepare`` writes it, by dotted key."""
    missing = [key for key in ("counts", "shards", "content_hash") if key not in manifest]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    problems = []
    counts, shards = manifest["counts"], manifest["shards"]
    if not isinstance(counts, dict):
        problems.append(f"counts: expected an object, got {type(counts).__name__}")
    else:
        for key in ("items", "users"):
            value = counts.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"counts.{key}: expected a non-negative integer, got {value!r}")
    if not isinstance(manifest["content_hash"], str):
        problems.append(f"content_hash: expected a string, got {manifest['content_hash']!r}")
    feedback = manifest.get("feedback")
    if feedback is not None and (not isinstance(feedback, dict) or feedback.get("kind") not in FEEDBACK_KINDS):
        problems.append(f"feedback: expected null or an object with kind {' or '.join(FEEDBACK_KINDS)}, "
                        f"got {feedback!r}")
    if not isinstance(shards, dict):
        return problems + [f"shards: expected an object with {', '.join(SPLITS)}, got {type(shards).__name__}"]
    for split in SPLITS:
        listed = shards.get(split)
        if not isinstance(listed, list):
            problems.append(f"shards.{split}: expected a list of part files, got "
                            f"{'nothing' if listed is None else type(listed).__name__}")
            continue
        problems += [f"shards.{split}[{i}]: {problem}" for i, relative in enumerate(listed)
                     if (problem := _shard_problem(split, relative))]
    return problems


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and check ``<path>/manifest.json`` of a prepared dataset.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no ``manifest.json``.
        DatasetError: the manifest is not UTF-8 JSON, lacks required keys, has keys of the wrong
            type, a ``format_version`` this code does not read, or lists a shard that is not a
            Parquet file inside its split's folder (``../../etc/passwd`` is refused here, before
            anything reads it).
    """
    location = _join(path, MANIFEST_FILE)
    if not storage.is_uri(path):
        if not Path(path).exists():
            raise FileNotFoundError(f"dataset folder {str(path)!r} does not exist (write one with "
                                "`llmrec-dist prepare --source ... --output DIR`)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{str(path)!r} is not a dataset folder (it is a file)")
        if not Path(location).is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is not a prepared dataset folder: it has no {MANIFEST_FILE} "
                "(create one with `llmrec-dist prepare`)"
            )
    elif not storage.exists(location):
        raise FileNotFoundError(f"{str(path)!r} is not a prepared dataset: it has no {MANIFEST_FILE} "
                                "(create one with `llmrec-dist prepare --output URI`)")
    try:
        manifest = json.loads(_read_text(location))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{location}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{location}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise DatasetError(
            f"{location}: unsupported format_version {version!r}; this llmrec_dist reads "
            f"format_version {readable} (re-run `llmrec-dist prepare`)"
        )
    problems = _manifest_problems(manifest)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(f"{location}: not a manifest written by `llmrec-dist prepare`: {shown}")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Mapping) -> Path:
    """Write ``manifest.json`` (pretty, key order kept) into ``folder``; returns its path."""
    target = Path(folder) / MANIFEST_FILE
    target.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def split_files(path: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths (or URIs) of the part files of ``split``, in user order, from the manifest."""
    _check_split(split)
    manifest = read_manifest(path)
    return [_join(path, relative) for relative in manifest["shards"][split]]


def num_items(manifest: Mapping) -> int:
    """Number of real items N; item indices run 1..N and 0 is padding (embedding size N + 1)."""
    return int(manifest["counts"]["items"])


def num_train_rows(manifest: Mapping, split: str = "train") -> int:
    """Rows of the split trained on (``test`` for a refit): one per user, less, for ``train``, the users
    whose train sequence held only cold items (valid and test keep every user)."""
    _check_split(split)
    dropped = (manifest.get("cold_items") or {}).get("train_rows_dropped", 0) if split == "train" else 0
    return int(manifest["counts"]["users"]) - int(dropped)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write one Parquet file with the layout's compression and row-group size."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path), row_group_size=ROW_GROUP_SIZE, compression=COMPRESSION)


def with_cold_column(table: pa.Table) -> pa.Table:
    """``table`` with an all-false ``cold`` column appended if it has none (files from before it existed)."""
    if COLD_FIELD.name in table.column_names:
        return table
    return table.append_column(COLD_FIELD, pa.array(np.zeros(table.num_rows, dtype=bool)))


def arrow_error_reason(err: Exception) -> str:
    """pyarrow's message without the path it repeats (the caller names the file)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^Could not open Parquet input source '[^']*': ", "", text).rstrip(".")


def read_parquet_file(location: str | os.PathLike, columns: list[str] | None = None, *,
                      remedy: str = _REPREPARE) -> pa.Table:
    """One Parquet file of a dataset (or package), or an error naming it and ending with ``remedy``:
    ``FileNotFoundError`` when it is missing, :class:`DatasetError` when it is not readable Parquet
    (truncated, overwritten, not Parquet at all)."""
    location = str(location)
    if not storage.is_uri(location) and not Path(location).is_file():
        raise FileNotFoundError(f"{location}: missing; {remedy}")
    try:
        return pq.read_table(location, columns=columns)
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: missing; {remedy}") from None
    except (pa.ArrowException, OSError) as err:
        if (named := storage.storage_error(location, err)) is not None:
            raise named from None
        raise DatasetError(f"{location}: not a readable Parquet file ({arrow_error_reason(err)}); {remedy}") from None


def conform_table(table: pa.Table, schema: pa.Schema, location: str | os.PathLike, what: str, *,
                  remedy: str = _REPREPARE) -> pa.Table:
    """``table`` reduced and cast to ``schema``, or a :class:`DatasetError` naming the file."""
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowException, ValueError) as err:
        raise DatasetError(f"{location}: does not have the {what} schema of the layout "
                           f"({arrow_error_reason(err)}); {remedy}") from None


def read_items(path: str | os.PathLike) -> pa.Table:
    """The items table (``item_idx``, ``item_id``, ``text``, ``popularity``, ``cold``), sorted by item_idx."""
    location = _join(path, ITEMS_FILE)
    table = with_cold_column(read_parquet_file(location))
    return conform_table(table, ITEMS_FILE_SCHEMA, location, "items").sort_by("item_idx")


def read_users(path: str | os.PathLike) -> pa.Table | None:
    """``users.parquet`` (``user_key`` + attribute columns as strings), or None when the dataset has none."""
    location = _join(path, USERS_FILE)
    if not storage.exists(location):
        return None
    table = read_parquet_file(location)
    if "user_key" not in table.column_names:
        raise DatasetError(f"{location}: has no user_key column; {_REPREPARE}")
    return table


def read_item_texts(path: str | os.PathLike) -> list[str]:
    """Every item's text, in item_idx order (index 0 is item 1)."""
    return [str(t) for t in read_items(path).column("text").to_pylist()]


def history_lengths(path: str | os.PathLike, split: str = "train") -> np.ndarray:
    """The length of every history of ``split`` (only the ``items`` column is read)."""
    lengths = [pc.list_value_length(read_parquet_file(f, columns=["items"]).column("items")).to_numpy()
               for f in split_files(path, split)]
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


def item_popularity(path: str | os.PathLike) -> np.ndarray:
    """``popularity`` over item_idx ``0..N`` (int64): each item's occurrences in the train split's
    histories; index 0 (padding) is 0. Only two columns of items.parquet are read."""
    table = read_parquet_file(_join(path, ITEMS_FILE), columns=["item_idx", "popularity"]).sort_by("item_idx")
    return np.concatenate([[0], table.column("popularity").to_numpy()]).astype(np.int64)


def item_counts(path: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Occurrences of every item (index = item_idx ``0..N``; 0 for padding) in the histories of ``split``,
    the one trained on (for ``train``: items.parquet's ``popularity``)."""
    popularity = item_popularity(path)
    if split == "train":
        return popularity
    counts = np.zeros(len(popularity), dtype=np.int64)
    for f in split_files(path, split):
        values = pc.list_flatten(read_parquet_file(f, columns=["items"]).column("items")).to_numpy()
        counts += np.bincount(values, minlength=len(counts))[:len(counts)]
    counts[0] = 0
    return counts


def items_seen_in_training(path: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Bool flags over item_idx ``0..N``: the item occurs in some history of ``split``, the one trained
    on (for ``train``: popularity > 0). Index 0 (padding) is false."""
    return item_counts(path, split) > 0


def feedback_of(manifest: Mapping) -> dict | None:
    """The manifest's explicit-feedback record (``kind``, ``column``, ``min``, ``max``), or None when
    the dataset has none (also every dataset of format_version 1)."""
    return manifest.get("feedback")


def read_split(path: str | os.PathLike, split: str, *, feedback: bool = False) -> pa.Table:
    """All part files of ``split`` concatenated in one table (small data, tests, evaluation).

    With ``feedback`` the table also has the explicit-feedback columns (``feedback``, and
    ``target_feedback`` for valid/test); the dataset must have them (manifest ``feedback`` not null).

    Raises ``FileNotFoundError`` for a missing part file and :class:`DatasetError` for one that is not
    readable Parquet or lacks the split's columns, each naming the file.
    """
    schema = (FEEDBACK_SPLIT_SCHEMAS if feedback else SPLIT_SCHEMAS)[split]
    tables = []
    for file in split_files(path, split):
        table = read_parquet_file(file)
        if feedback and FEEDBACK_FIELD.name not in table.column_names:
            raise DatasetError(f"{file}: the dataset has no explicit feedback (no ratings or labels); prepare "
                               "it from data with ratings (MovieLens ratings files, or --rating-col / "
                               "--label-col of the generic source)")
        if COLD_FIELD.name in schema.names:
            table = with_cold_column(table)
        tables.append(conform_table(table, schema, file, split))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def check_files(path: str | os.PathLike) -> dict:
    """The manifest, after checking that every file it lists exists and is Parquet with the layout's
    columns. Reads only the Parquet footers: a cheap check for when the content hash is not verified
    (``data.verify_hash=false``), so that a damaged shard is named here rather than failing inside a
    Ray Data read or a worker. Raises like :func:`read_split`."""
    manifest = read_manifest(path)
    schemas = FEEDBACK_SPLIT_SCHEMAS if feedback_of(manifest) is not None else SPLIT_SCHEMAS
    listed = [(_join(path, ITEMS_FILE), ITEMS_SCHEMA, "items")]
    listed += [(_join(path, relative), schemas[split], split)
               for split in SPLITS for relative in manifest["shards"][split]]
    for location, schema, what in listed:
        if not storage.is_uri(location) and not Path(location).is_file():
            raise FileNotFoundError(f"{location}: missing; {_REPREPARE}")
        try:
            names = pq.read_schema(location).names
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"{location}: not a readable Parquet file ({arrow_error_reason(err)}); "
                               f"{_REPREPARE}") from None
        lacking = [name for name in schema.names if name not in names and name != COLD_FIELD.name]
        if lacking:
            raise DatasetError(f"{location}: does not have the {what} schema of the layout (lacks "
                               f"{', '.join(lacking)}); {_REPREPARE}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Content hash
# ---------------------------------------------------------------------------------------------


def _hash_ints(digest, values) -> None:
    digest.update(np.asarray(values, dtype="<i8").tobytes())


def _hash_strings(digest, column) -> None:
    """The UTF-8 byte lengths (-1 for null) as int64, then the bytes, concatenated. Read straight from
    Arrow's buffers when there is no null (no Python string per value: a 10^6-item catalogue's texts)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count == 0 and pa.types.is_string(array.type):
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset:array.offset + len(array) + 1]
        _hash_ints(digest, np.diff(offsets))
        if len(array):
            digest.update(memoryview(array.buffers()[2])[offsets[0]:offsets[-1]])
        return
    values = array.to_pylist()
    encoded = [b"" if s is None else s.encode("utf-8") for s in values]
    _hash_ints(digest, [-1 if s is None else len(e) for s, e in zip(values, encoded)])
    digest.update(b"".join(encoded))


def compute_content_hash(items_table: pa.Table, split_tables: Mapping[str, pa.Table]) -> str:
    """``"sha256:<hex>"`` over the dataset's content, independent of how it is stored.

    Canonical serialisation, fed to SHA-256 in this order:

    1. the tag ``b"llmrec_dist dataset content v1\\n"``;
    2. ``b"items\\n"``, then, with items sorted by ``item_idx``: ``item_idx`` as little-endian
       int64, then for ``item_id`` and for ``text`` the UTF-8 byte lengths (int64) followed by
       the concatenated UTF-8 bytes;
    3. for each split in ``SPLITS`` order: ``b"<split>\\n"``, then, with rows sorted by
       ``user_idx``: ``user_idx`` (int64), the list lengths of ``items`` (int64), all
       ``items`` values flattened (int64), and ``target`` (int64) for valid and test;
    4. only if some ``cold`` flag is true: ``b"cold\\n"``, then the ``cold`` flags (int64 0/1) of
       the items (sorted by ``item_idx``), of valid and of test (rows sorted by ``user_idx``);
    5. only if the split tables have a ``feedback`` column: ``b"feedback\\n"``, then for each split
       (rows sorted by ``user_idx``) the ``feedback`` values flattened as little-endian float32, and
       ``target_feedback`` (float32) for valid and test.

    ``user_key``, ``popularity`` (derived from train), shard boundaries, Parquet encoding and
    the manifest's ``created_at`` are deliberately left out, so the same input and filters give
    the same hash whatever the user-hash key or shard count. A missing ``cold`` column counts as
    all-false, and all-false flags add nothing, so datasets without cold items keep the hash
    they had before the ``cold`` columns existed; any true flag changes the hash. Likewise a
    dataset without feedback hashes as it did in format_version 1.
    """
    digest = hashlib.sha256(_CONTENT_HASH_TAG)
    items = items_table.sort_by("item_idx")
    digest.update(b"items\n")
    _hash_ints(digest, items.column("item_idx").to_numpy())
    _hash_strings(digest, items.column("item_id"))
    _hash_strings(digest, items.column("text"))
    for split in SPLITS:
        table = split_tables[split].sort_by("user_idx")
        digest.update(split.encode() + b"\n")
        _hash_ints(digest, table.column("user_idx").to_numpy())
        lists = table.column("items").combine_chunks()
        _hash_ints(digest, pc.list_value_length(lists).fill_null(-1).to_numpy())
        _hash_ints(digest, lists.flatten().to_numpy(zero_copy_only=False))
        if split != "train":
            _hash_ints(digest, table.column("target").to_numpy())
    cold = [_cold_flags(items)] + [_cold_flags(split_tables[s].sort_by("user_idx")) for s in ("valid", "test")]
    if any(flags.any() for flags in cold):
        digest.update(b"cold\n")
        for flags in cold:
            _hash_ints(digest, flags)
    if FEEDBACK_FIELD.name in split_tables["train"].column_names:
        digest.update(b"feedback\n")
        for split in SPLITS:
            table = split_tables[split].sort_by("user_idx")
            _hash_floats(digest, table.column(FEEDBACK_FIELD.name).combine_chunks().flatten())
            if split != "train":
                _hash_floats(digest, table.column(TARGET_FEEDBACK_FIELD.name))
    return "sha256:" + digest.hexdigest()


def _hash_floats(digest, values) -> None:
    digest.update(np.asarray(values, dtype="<f4").tobytes())


def _cold_flags(table: pa.Table) -> np.ndarray:
    """The ``cold`` column as a bool array; all false when the table has none."""
    if COLD_FIELD.name not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    return table.column(COLD_FIELD.name).to_numpy().astype(bool)


def _part_column(location: str, name: str, rows: int | None = None) -> pa.ChunkedArray:
    """One column of one part file (an all-false ``cold`` for files from before it existed)."""
    if name == COLD_FIELD.name and name not in pq.read_schema(location).names:
        return pa.chunked_array([pa.array(np.zeros(rows or 0, dtype=bool))])
    table = read_parquet_file(location, columns=[name])
    if name not in table.column_names:
        raise DatasetError(f"{location}: does not have the layout's column {name!r}; {_REPREPARE}")
    return table.column(name)


class _NotInUserOrder(Exception):
    """A split's rows are not in strictly increasing ``user_idx`` across its parts."""


def content_hash_of_files(path: str | os.PathLike, manifest: dict | None = None) -> str:
    """:func:`compute_content_hash` of a prepared dataset, read one column of one part file at a time (a
    column read once per thing hashed, e.g. the list lengths, then the values), so that memory stays that
    of one part whatever the dataset's size. The parts are in user order, as ``prepare`` writes them; a
    dataset whose rows are not (rewritten by hand) is hashed whole instead."""
    manifest = manifest or read_manifest(path)
    try:
        return _content_hash_by_part(path, manifest)
    except _NotInUserOrder:
        feedback = feedback_of(manifest) is not None
        return compute_content_hash(read_items(path), {s: read_split(path, s, feedback=feedback) for s in SPLITS})


def _content_hash_by_part(path, manifest: dict) -> str:
    files = {split: [_join(path, relative) for relative in manifest["shards"][split]] for split in SPLITS}
    items = read_items(path)
    digest = hashlib.sha256(_CONTENT_HASH_TAG)
    digest.update(b"items\n")
    _hash_ints(digest, items.column("item_idx").to_numpy())
    _hash_strings(digest, items.column("item_id"))
    _hash_strings(digest, items.column("text"))
    rows = {}
    for split in SPLITS:
        digest.update(split.encode() + b"\n")
        last, rows[split] = 0, []
        for location in files[split]:
            users = _part_column(location, "user_idx").to_numpy().astype(np.int64)
            if users.size and (users[0] <= last or np.any(np.diff(users) <= 0)):
                raise _NotInUserOrder(location)
            last = int(users[-1]) if users.size else last
            rows[split].append(len(users))
            _hash_ints(digest, users)
        for location in files[split]:
            _hash_ints(digest, pc.list_value_length(_part_column(location, "items").combine_chunks())
                       .fill_null(-1).to_numpy())
        for location in files[split]:
            _hash_ints(digest, _part_column(location, "items").combine_chunks().flatten()
                       .to_numpy(zero_copy_only=False))
        if split != "train":
            for location in files[split]:
                _hash_ints(digest, _part_column(location, "target").to_numpy())

    def cold_parts(split):
        for location, n in zip(files[split], rows[split]):
            yield _part_column(location, COLD_FIELD.name, n).to_numpy(zero_copy_only=False).astype(bool)

    item_cold = _cold_flags(items)
    if item_cold.any() or any(flags.any() for s in ("valid", "test") for flags in cold_parts(s)):
        digest.update(b"cold\n")
        _hash_ints(digest, item_cold)
        for split in ("valid", "test"):
            for flags in cold_parts(split):
                _hash_ints(digest, flags)
    if feedback_of(manifest) is not None:
        digest.update(b"feedback\n")
        for split in SPLITS:
            for location in files[split]:
                _hash_floats(digest, _part_column(location, FEEDBACK_FIELD.name).combine_chunks().flatten())
            if split != "train":
                for location in files[split]:
                    _hash_floats(digest, _part_column(location, TARGET_FEEDBACK_FIELD.name))
    return "sha256:" + digest.hexdigest()


def verify_dataset(path: str | os.PathLike) -> dict:
    """Recompute the content hash from the files (:func:`content_hash_of_files`, one part at a time) and
    compare it with the manifest's.

    Returns the manifest. Raises :class:`DatasetError` naming both hashes when they differ (a shard
    was changed, replaced or lost after ``prepare``), and the errors of ``read_manifest`` and
    ``read_split`` (missing or unreadable files, named).
    """
    manifest = read_manifest(path)
    check_files(path)
    actual = content_hash_of_files(path, manifest)
    if actual != manifest["content_hash"]:
        raise DatasetError(
            f"dataset {str(path)!r} does not match its manifest: manifest content_hash "
            f"{manifest['content_hash']}, files hash to {actual} (files were modified after "
            "prepare; re-run `llmrec-dist prepare --overwrite`)"
        )
    return manifest


# ---------------------------------------------------------------------------------------------
# Atomic output folder
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_free(output: str | os.PathLike, overwrite: bool) -> None:
    """Fail early, before any work, when ``output`` may not be (re)written.

    Without ``overwrite`` any existing path is refused. With it, only a prepared dataset (a
    folder holding ``manifest.json``) or an empty folder is replaced, so a mistyped path can
    never delete unrelated files. A URI's bucket must exist and be reachable
    (:class:`llmrec_dist.storage.StorageError` otherwise).
    """
    if storage.is_uri(output):
        storage.require_bucket(output)
        present = storage.list_files(output)
        if present and not overwrite:
            raise FileExistsError(f"output {str(output)!r} already exists; pass --overwrite (overwrite=True) "
                                  "to replace it")
        if present and MANIFEST_FILE not in present:
            raise FileExistsError(f"output {str(output)!r} holds {len(present)} objects and is not a prepared "
                                  f"dataset (no {MANIFEST_FILE}); refusing to replace it even with --overwrite; "
                                  "choose another prefix or remove them")
        return
    output = Path(output)
    blocked = next((parent for parent in output.absolute().parents if parent.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise FileExistsError(f"output {str(output)!r} cannot be created: {str(blocked)!r} is a file, not a folder")
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"output {str(output)!r} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    is_dataset = output.is_dir() and (output / MANIFEST_FILE).is_file()
    is_empty_dir = output.is_dir() and not output.is_symlink() and not any(output.iterdir())
    if not (is_dataset or is_empty_dir):
        raise FileExistsError(
            f"output {str(output)!r} exists and is not a prepared dataset (no {MANIFEST_FILE}); "
            "refusing to replace it even with --overwrite; choose another path or remove it"
        )


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``output`` only if the ``with`` body succeeds.

    The temporary folder ``.<name>.tmp-<random>`` sits next to ``output`` (same filesystem,
    so the final ``os.rename`` is atomic). On any exception it is removed and ``output`` is
    left as it was. With ``overwrite`` an existing dataset is renamed aside, the new one is
    renamed into place, and only then is the old one deleted. For a URI see :func:`_atomic_output_uri`.
    """
    if storage.is_uri(output):
        with _atomic_output_uri(str(output).rstrip("/"), overwrite) as folder:
            yield folder
        return
    output = Path(output).absolute()
    check_output_free(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.parent / f".{output.name}.tmp-{secrets.token_hex(6)}"
    temp.mkdir()
    try:
        yield temp
        # The output may have appeared while we worked; check again just before the swap.
        check_output_free(output, overwrite)
        if output.exists():
            old = output.parent / f".{output.name}.old-{secrets.token_hex(6)}"
            os.rename(output, old)
            try:
                os.rename(temp, output)
            except BaseException:
                os.rename(old, output)
                raise
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _atomic_output_uri(output: str, overwrite: bool) -> Iterator[Path]:
    """The dataset is built in a local temporary folder (``$TMPDIR``), uploaded under the hidden
    sibling prefix ``.<name>.tmp-<random>`` (an old dataset at ``output`` stays whole meanwhile), then
    copied into ``output`` on the store with ``manifest.json`` last. Any failure removes what was
    written under ``output`` and the staging prefix."""
    check_output_free(output, overwrite)
    parent, name = output.rsplit("/", 1)
    staging = f"{parent}/.{name}.tmp-{secrets.token_hex(6)}"
    with tempfile.TemporaryDirectory(prefix="llmrec-prepare-") as temp:
        yield Path(temp)
        files = storage.list_files(temp)
        ordered = [f for f in files if f != MANIFEST_FILE] + [MANIFEST_FILE]
        copied = False
        try:
            storage.upload(temp, staging, ordered)
            check_output_free(output, overwrite)  # it may have appeared while we worked
            old = storage.list_files(output)
            if old:  # the manifest first: from here on readers see no dataset
                storage.delete(output, [MANIFEST_FILE])
                storage.delete(output, [f for f in old if f != MANIFEST_FILE])
            copied = True
            storage.copy(staging, output, ordered)
        except BaseException:
            if copied:
                with contextlib.suppress(OSError):
                    storage.delete(output, ordered)
            raise
        finally:
            with contextlib.suppress(OSError):
                storage.delete(staging)


def checked_manifest(path: str | os.PathLike, verify_hash: bool = True) -> dict:
    """The manifest of a dataset about to be used, on the driver before anything starts: the content
    hash recomputed (:func:`verify_dataset`) or, without ``verify_hash``, the Parquet footers read
    (:func:`check_files`). Either way a damaged dataset is refused here, naming the file."""
    return verify_dataset(path) if verify_hash else check_files(path)
