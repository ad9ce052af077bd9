"""``prepare``: raw interactions → filtered, indexed, leave-one-out split, sharded Parquet dataset.

Steps (see ``prepare_dataset``): read a source → k-core / minimum-interaction filters → map
ids to dense indices → leave-one-out split by time → keyed user hashing → optional cold items
(``llmrec_dist.data.cold``) → write Parquet shards and a manifest into a temporary folder that is
renamed into place only when complete.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

import llmrec_dist
from llmrec_dist.data import dataset_format
from llmrec_dist.data.cold import apply_cold_items, check_fraction
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.generic import read_generic
from llmrec_dist.data.movielens import read_movielens
from llmrec_dist.data.sequences import read_sequences
from llmrec_dist.data.synthetic import generate_synthetic
from llmrec_dist.data.user_attributes import read_generic_users, read_movielens_users, users_table

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "movielens", "generic", "sequences")
USER_HASH_ENV = "LLMREC_USER_HASH_KEY"
USER_HASH_SCHEME = "hmac-sha256-128"  # first 32 hex chars of HMAC-SHA256(key, raw user id)
USERS_PER_SHARD = 20_000
GENERIC_KEYS = ("interactions", "items", "user_col", "item_col", "time_col", "item_id_col", "text_cols", "encoding",
                "rating_col", "label_col", "rating_range")
SEQUENCES_KEYS = ("sequences", "items", "user_col", "items_col", "item_id_col", "text_cols", "encoding")
# File sources: reader, valid option keys, the required file keys (the first one names the input).
_FILE_SOURCES = {
    "generic": (read_generic, GENERIC_KEYS, ("interactions", "items")),
    "sequences": (read_sequences, SEQUENCES_KEYS, ("sequences", "items")),
}
SYNTHETIC_KEYS = (
    "n_users", "n_items", "seed", "n_topics", "min_length", "max_length", "continue_prob", "noise_prob",
)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _check_keys(name: str, given: Mapping, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} option(s) {', '.join(unknown)}; valid: {', '.join(allowed)}")


def read_source(
    source: str,
    *,
    input: str | os.PathLike | None = None,
    seed: int = 0,
    synthetic: Mapping | None = None,
    generic: Mapping | None = None,
    sequences: Mapping | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict, str]:
    """Dispatch to a reader; returns ``(interactions, items, info, input_display)``.

    ``input_display`` names the input in messages about the data as a whole.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if input is not None and source != "movielens":
        raise ValueError(f"input is only used by source 'movielens' (got source {source!r})")
    for name, given in (("synthetic", synthetic), ("generic", generic), ("sequences", sequences)):
        if given and source != name:
            raise ValueError(f"{name} options are only used by source {name!r} (got {source!r})")

    if source == "synthetic":
        options = dict(synthetic or {})
        _check_keys("synthetic", options, SYNTHETIC_KEYS)
        options.setdefault("seed", seed)
        interactions, items, info = generate_synthetic(**options)
        return interactions, items, info, "synthetic"
    if source == "movielens":
        if input is None:
            raise ValueError("source 'movielens' needs input= (a MovieLens folder or .zip)")
        interactions, items, info = read_movielens(input)
        return interactions, items, info, str(input)
    reader, keys, required = _FILE_SOURCES[source]
    options = dict((generic if source == "generic" else sequences) or {})
    _check_keys(source, options, keys)
    missing = [key for key in required if not options.get(key)]
    if missing:
        raise ValueError(f"source {source!r} needs {source}={{...}} with {' and '.join(missing)} (file paths)")
    interactions, items, info = reader(**options)
    return interactions, items, info, str(options[required[0]])


# ---------------------------------------------------------------------------------------------
# Filtering and indexing
# ---------------------------------------------------------------------------------------------


def _read_user_attributes(source: str, input, options: Mapping | None,
                          file_options: Mapping | None) -> tuple[pd.DataFrame | None, dict | None]:
    """The source's user attributes (raw ``user_id`` + attribute columns) and their description, or
    ``(None, None)``; ``options`` (``file``, ``columns``) for the generic and sequences sources."""
    if options and source not in _FILE_SOURCES:
        raise ValueError(f"user_attributes are only given for the generic and sequences sources (got {source!r}); "
                         "MovieLens brings its own users file")
    if source == "movielens":
        return read_movielens_users(input)
    if not options:
        return None, None
    unknown = sorted(set(options) - {"file", "columns"})
    if unknown or not options.get("file") or not options.get("columns"):
        raise ValueError("user_attributes needs exactly file= (a CSV/TSV/Parquet table) and columns= (attribute "
                         f"columns); got {sorted(options)}")
    file_options = file_options or {}
    return read_generic_users(options["file"], options["columns"], user_col=file_options.get("user_col", "user_id"),
                              encoding=file_options.get("encoding", "utf-8"))


def filter_interactions(
    interactions: pd.DataFrame, min_interactions: int, item_min_interactions: int = 0
) -> pd.DataFrame:
    """Drop rare items and short users.

    With ``item_min_interactions > 0`` this is an iterative k-core: items with fewer
    interactions and users with fewer than ``min_interactions`` are dropped alternately until
    neither filter removes anything. Otherwise only the user filter runs (once).
    """
    frame = interactions
    while True:
        before = len(frame)
        if item_min_interactions > 0:
            item_counts = frame.groupby("item_id", sort=False)["item_id"].transform("size")
            frame = frame[(item_counts >= item_min_interactions).to_numpy()]
        user_counts = frame.groupby("user_id", sort=False)["user_id"].transform("size")
        frame = frame[(user_counts >= min_interactions).to_numpy()]
        if item_min_interactions <= 0 or len(frame) == before:
            return frame


def sorted_unique_ids(ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, order)``: ``codes`` index the unique ids in sorted order (0-based).

    Ids sort numerically when all of them are integers (``"2" < "10"``), as strings otherwise.
    """
    codes, uniques = pd.factorize(ids, sort=False)
    uniques = np.asarray(uniques, dtype=object)
    if pd.Series(uniques, dtype=object).str.fullmatch(r"[+-]?\d+").all():
        keys = sorted(range(len(uniques)), key=lambda i: (int(uniques[i]), uniques[i]))
    else:
        keys = sorted(range(len(uniques)), key=lambda i: uniques[i])
    order = np.asarray(keys, dtype=np.int64)
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[order] = np.arange(len(uniques))
    return rank[codes], uniques[order]


# ---------------------------------------------------------------------------------------------
# Leave-one-out split
# ---------------------------------------------------------------------------------------------


def _lists(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType = pa.int32()) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def leave_one_out(user_idx: np.ndarray, item_idx: np.ndarray, order_key: np.ndarray,
                  feedback: np.ndarray | None = None) -> dict[str, pa.Table]:
    """Split interactions per user by time: last → test target, second-last → valid target.

    ``user_idx`` must be 1..U with every user having at least 3 interactions. Ties in
    ``order_key`` keep the input order. Returns tables (``user_idx``, ``items``, ``target``
    for valid/test), rows sorted by ``user_idx``; ``user_key`` is added by the caller. With
    ``feedback`` (one float per interaction: its rating or label) the tables also have
    ``feedback`` (per event of ``items``) and, for valid/test, ``target_feedback``.
    """
    order = np.lexsort((np.arange(len(user_idx)), order_key, user_idx))
    users = user_idx[order]
    items = item_idx[order].astype(np.int32)
    counts = np.bincount(users)[1:]
    if counts.size == 0 or counts.min() < 3:
        raise ValueError("leave-one-out needs user_idx 1..U and >= 3 interactions per user")
    ends = np.cumsum(counts)
    position = np.arange(len(items)) - np.repeat(ends - counts, counts)
    train_keep = position < np.repeat(counts - 2, counts)
    test_keep = position < np.repeat(counts - 1, counts)
    user_column = pa.array(np.arange(1, len(counts) + 1, dtype=np.int32))
    train_items = _lists(items[train_keep], counts - 2)
    splits = {
        "train": pa.table({"user_idx": user_column, "items": train_items}),
        "valid": pa.table(
            {"user_idx": user_column, "items": train_items, "target": pa.array(items[ends - 2])}
        ),
        "test": pa.table(
            {
                "user_idx": user_column,
                "items": _lists(items[test_keep], counts - 1),
                "target": pa.array(items[ends - 1]),
            }
        ),
    }
    if feedback is None:
        return splits
    values = np.asarray(feedback, dtype=np.float32)[order]
    train_feedback = _lists(values[train_keep], counts - 2, pa.float32())
    histories = {"train": train_feedback, "valid": train_feedback,
                 "test": _lists(values[test_keep], counts - 1, pa.float32())}
    targets = {"valid": values[ends - 2], "test": values[ends - 1]}
    for name, table in splits.items():
        table = table.append_column(dataset_format.FEEDBACK_FIELD, histories[name])
        if name in targets:
            table = table.append_column(dataset_format.TARGET_FEEDBACK_FIELD, pa.array(targets[name], pa.float32()))
        splits[name] = table
    return splits


# ---------------------------------------------------------------------------------------------
# User hashing
# ---------------------------------------------------------------------------------------------


def resolve_user_hash_key(user_hash_key: str | None) -> tuple[bytes, dict]:
    """The HMAC key and its manifest description (never the key itself).

    Order: the argument, then ``$LLMREC_USER_HASH_KEY``, else a random key that is not
    stored anywhere (user keys then cannot be linked to other datasets or re-derived).
    """
    if user_hash_key is not None and user_hash_key == "":
        raise ValueError("user_hash_key must not be empty (omit it to use a random key)")
    source = "argument"
    if user_hash_key is None and os.environ.get(USER_HASH_ENV):
        user_hash_key, source = os.environ[USER_HASH_ENV], "environment"
    description: dict = {"scheme": USER_HASH_SCHEME, "raw_ids_stored": False}
    if user_hash_key is None:
        description.update(key_provided=False, key_source="random (not stored)", key_fingerprint=None)
        return secrets.token_bytes(32), description
    key = user_hash_key.encode("utf-8")
    description.update(
        key_provided=True, key_source=source, key_fingerprint=hashlib.sha256(key).hexdigest()[:8]
    )
    return key, description


def user_keys(raw_user_ids, key: bytes) -> list[str]:
    """First 32 hex chars of HMAC-SHA256(key, raw user id) for each id."""
    return [hmac.new(key, str(u).encode("utf-8"), hashlib.sha256).hexdigest()[:32] for u in raw_user_ids]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def default_num_shards(num_users: int) -> int:
    """``max(2, ceil(users / 20000))``, capped at the number of users."""
    return max(1, min(num_users, max(2, math.ceil(num_users / USERS_PER_SHARD))))


def write_dataset(
    folder: Path, items: pa.Table, splits: Mapping[str, pa.Table], num_shards: int
) -> dict[str, list[str]]:
    """Write ``items.parquet`` and each split as ``num_shards`` part files of contiguous user ranges.

    The users 1..U (one valid row each) are cut into ``num_shards`` equal ranges, the same for
    every split; a train split that lacks some users (cold items) gets fewer rows in a part.
    """
    dataset_format.write_parquet(items, folder / dataset_format.ITEMS_FILE)
    num_users = splits["valid"].num_rows
    bounds = np.linspace(0, num_users, num_shards + 1).round().astype(int)
    shards: dict[str, list[str]] = {}
    has_feedback = dataset_format.FEEDBACK_FIELD.name in splits["train"].column_names
    schemas = dataset_format.FEEDBACK_SPLIT_SCHEMAS if has_feedback else dataset_format.SPLIT_SCHEMAS
    for split in dataset_format.SPLITS:
        schema = schemas[split]
        table = splits[split].select(schema.names).cast(schema)
        # Row positions of the user range starts (user_idx = bound + 1); rows are sorted by user_idx.
        rows = np.searchsorted(table.column("user_idx").to_numpy(), bounds + 1, side="left")
        shards[split] = []
        for index in range(num_shards):
            relative = dataset_format.shard_relpath(split, index)
            part = table.slice(rows[index], rows[index + 1] - rows[index])
            dataset_format.write_parquet(part, folder / relative)
            shards[split].append(relative)
    return shards


def prepare_dataset(
    source: str,
    output: str | os.PathLike,
    *,
    input: str | None = None,
    overwrite: bool = False,
    min_interactions: int = 5,
    item_min_interactions: int = 0,
    user_hash_key: str | None = None,
    num_shards: int | None = None,
    seed: int = 0,
    synthetic: dict | None = None,
    generic: dict | None = None,
    cold_items: float = 0.0,
    sequences: dict | None = None,
    user_attributes: dict | None = None,
) -> dict:
    """Prepare a dataset folder (see ``llmrec_dist.data.dataset_format``); returns its manifest.

    Args:
        source: ``"synthetic"``, ``"movielens"``, ``"generic"`` or ``"sequences"``.
        output: Dataset folder to create. Written atomically (temporary folder + rename).
        input: MovieLens folder or ``.zip`` (source ``movielens`` only).
        overwrite: Replace an existing dataset at ``output`` (refused otherwise).
        min_interactions: Users with fewer interactions are dropped; at least 3, because
            leave-one-out needs one train, one valid and one test item.
        item_min_interactions: If > 0, iterative k-core: items with fewer interactions are
            dropped, alternating with the user filter until stable.
        user_hash_key: HMAC key for ``user_key``; default ``$LLMREC_USER_HASH_KEY``, else a
            random key that is not stored.
        num_shards: Part files per split; default ``max(2, ceil(users / 20000))``, capped at
            the number of users.
        seed: Seed of the synthetic generator and of the cold-item choice (other sources
            are deterministic anyway); >= 0.
        synthetic: Options of ``generate_synthetic`` (``n_users``, ``n_items``, ...).
        generic: Options of ``read_generic`` (``interactions``, ``items``, ``user_col``, ...).
        sequences: Options of ``read_sequences`` (``sequences``, ``items``, ``user_col``,
            ``items_col``, ...): one row per user with its item ids in time order.
        cold_items: Fraction in [0, 1) of the items to make cold (``llmrec_dist.data.cold``):
            ``round(cold_items · N)`` items, chosen with ``seed`` among all N items, are
            removed from every train sequence and valid/test history and stay only as
            valid/test targets (the cold-start subset), flagged by the ``cold`` column of
            items, valid and test. 0 = none.
        user_attributes: For the ``generic`` and ``sequences`` sources, ``{"file": ..., "columns": [...]}``:
            a table of user attributes keyed by the interactions' user column (``user_col``), read by
            :func:`llmrec_dist.data.user_attributes.read_generic_users`. MovieLens ml-1m and ml-100k
            bring theirs (``users.dat``, ``u.user``). Written as ``users.parquet`` with ``user_key``
            instead of raw ids; not part of the content hash. None and no users file: no ``users.parquet``.

    Raises:
        ValueError: bad arguments (unknown source, ``min_interactions < 3``, ...).
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        PrepareError: malformed input, nothing left after filtering, or a ``cold_items``
            fraction that gives no cold item, no cold valid/test target, or no train data.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
    if min_interactions < 3:
        raise ValueError(
            f"min_interactions must be >= 3 (leave-one-out needs train >= 1, valid and test), "
            f"got {min_interactions}"
        )
    if item_min_interactions < 0:
        raise ValueError(f"item_min_interactions must be >= 0, got {item_min_interactions}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    cold_items = check_fraction(cold_items)
    if cold_items > 0 and seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds the cold-item choice), got {seed}")
    dataset_format.check_output_free(output, overwrite)  # fail before the (possibly long) read
    hash_key, user_ids_info = resolve_user_hash_key(user_hash_key)

    interactions, items, info, input_display = read_source(
        source, input=input, seed=seed, synthetic=synthetic, generic=generic, sequences=sequences
    )
    attributes, attributes_info = _read_user_attributes(source, input, user_attributes, generic or sequences)
    raw_counts = {
        "raw_interactions": len(interactions),
        "raw_users": int(interactions["user_id"].nunique()),
        "raw_items": int(interactions["item_id"].nunique()),
    }
    log.info("read %d interactions from %s", len(interactions), input_display)

    kept = filter_interactions(interactions, min_interactions, item_min_interactions)
    if kept.empty:
        raise PrepareError(
            input_display,
            None,
            f"no users left after filtering: min_interactions={min_interactions}, "
            f"item_min_interactions={item_min_interactions} "
            f"({raw_counts['raw_interactions']} interactions of {raw_counts['raw_users']} users read)",
        )

    user_codes, raw_users = sorted_unique_ids(kept["user_id"])
    item_codes, item_ids = sorted_unique_ids(kept["item_id"])
    feedback = kept["feedback"].to_numpy() if "feedback" in kept else None
    splits = leave_one_out(user_codes + 1, item_codes + 1, kept["order_key"].to_numpy(), feedback)
    key_list = user_keys(raw_users, hash_key)
    keys = pa.array(key_list, pa.string())
    splits = {name: table.add_column(1, "user_key", keys) for name, table in splits.items()}
    users = None
    if attributes is not None:
        users, without = users_table(attributes, raw_users, key_list)
        attributes_info = {"file": dataset_format.USERS_FILE, "source_file": attributes_info["file"],
                           "columns": attributes_info["columns"], "users": users.num_rows, "users_without": without}
        if users.num_rows == 0:  # no user of the dataset has attributes: nothing to write
            users, attributes_info = None, None
    splits, cold, cold_info = apply_cold_items(splits, len(item_ids), cold_items, seed, input_display)
    del raw_users  # raw user ids go no further

    text_of = items.drop_duplicates("item_id").set_index("item_id")["text"]
    position = text_of.index.get_indexer(item_ids)
    if (position < 0).any():
        missing = item_ids[int(np.flatnonzero(position < 0)[0])]
        raise PrepareError(input_display, None, f"item {missing!r} has interactions but no text")
    train_values = splits["train"].column("items").combine_chunks().flatten().to_numpy()
    items_table = pa.table(
        {
            "item_idx": pa.array(np.arange(1, len(item_ids) + 1, dtype=np.int32)),
            "item_id": pa.array(item_ids.tolist(), pa.string()),
            "text": pa.array(text_of.to_numpy()[position].tolist(), pa.string()),
            "popularity": pa.array(np.bincount(train_values, minlength=len(item_ids) + 1)[1:].astype(np.int64)),
            "cold": pa.array(cold[1:]),
        },
        schema=dataset_format.ITEMS_FILE_SCHEMA,
    )

    num_users = len(keys)
    shards_count = min(num_shards, num_users) if num_shards else default_num_shards(num_users)
    time_order = info.pop("time_order", "timestamp")
    feedback_info = info.pop("feedback", None)
    manifest = {
        "format_version": dataset_format.FORMAT_VERSION,
        "source": info,
        "counts": {
            "users": num_users,
            "items": len(item_ids),
            "interactions": len(kept),
            "train_interactions": int(len(train_values)),
            **raw_counts,
        },
        "split": {
            "protocol": "leave-one-out",
            "min_interactions": min_interactions,
            "item_min_interactions": item_min_interactions,
            "time_order": time_order,
        },
        "cold_items": cold_info,
        "feedback": feedback_info,
        "user_ids": user_ids_info,
        "user_attributes": attributes_info,
        "shards": {},
        "content_hash": dataset_format.compute_content_hash(items_table, splits),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "llmrec_dist_version": llmrec_dist.__version__,
    }
    with dataset_format.atomic_output_dir(output, overwrite) as folder:
        manifest["shards"] = write_dataset(folder, items_table, splits, shards_count)
        if users is not None:
            dataset_format.write_parquet(users, folder / dataset_format.USERS_FILE)
        dataset_format.write_manifest(folder, manifest)
    log.info("prepared %s: %s", output, manifest["counts"])
    return manifest
