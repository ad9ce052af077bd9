"""Data far larger than memory: a synthetic generator and a ``prepare`` that both stream.

:func:`generate_interactions` writes a catalogue (``items.parquet``: ``item_id``, ``title``) and
interactions (``interactions/part-*.parquet``: ``user_id``, ``item_id``, ``timestamp``) one block of
users at a time: 10^8 interactions of 10^7 users over 10^6 items never sit in memory together.

:func:`prepare_streaming` turns generic input of any size (a Parquet file, a folder of Parquet files or a
CSV file, read in record batches) into the dataset layout of :mod:`llmrec_dist.data.dataset_format`, in
three passes over bounded pieces:

1. **scatter**: each batch's rows go to one of ``B`` bucket files by a hash of the user id (so all of
   a user's interactions share a bucket), item ids already replaced by their position in the sorted
   catalogue; ``B`` grows with the input (``rows_per_bucket`` rows each), so a bucket's size does not;
2. **sequences**: per bucket, the rows sorted by (user, time, input order), users with fewer than
   ``min_interactions`` dropped, each user's sequence kept; the catalogue positions in use counted;
3. **splits**: per bucket, positions renumbered to ``item_idx`` 1..N (items with no kept interaction
   leave the catalogue, as in the in-memory prepare), leave-one-out, and part ``b`` of train, valid
   and test written for the bucket's users.

Memory is that of one input batch, one bucket and the catalogue (a few arrays of N), whatever the number
of interactions. The result is the layout every reader expects; per user it holds exactly what the
in-memory ``prepare`` gives (tested), with users numbered by bucket, then by id, instead of by id alone.
Not streamed (refused with a message): the item k-core, cold items, explicit feedback and user
attributes, which need the whole table or a second kind of input.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

import llmrec_dist
from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import _lists, resolve_user_hash_key, user_keys

log = logging.getLogger(__name__)

ROWS_PER_BUCKET = 1_000_000     # input rows per bucket (and so per part file): bounds pass 2's memory
BATCH_ROWS = 1 << 20            # input rows per record batch
GENERATOR_VERSION = "stream-v1"


# ============================================================================================ generator
_ADJECTIVES = np.array(["quiet", "bright", "bold", "gentle", "rapid", "silver", "hidden", "golden", "wild",
                        "ancient", "modern", "tiny", "grand", "lucky", "stormy", "sunny"])
_NOUNS = np.array(["river", "engine", "garden", "signal", "harbor", "lantern", "canvas", "orbit", "meadow",
                   "circuit", "compass", "atlas", "voyage", "echo", "summit", "prism"])
_GENRES = np.array(["mystery", "comedy", "drama", "documentary", "thriller", "romance", "fantasy", "science",
                    "history", "music", "travel", "cooking", "sports", "poetry", "gaming", "design"])


def _item_texts(ids: np.ndarray, topics: int) -> pa.Array:
    """Titles whose words follow the item's topic and its place in the topic's series, so text carries
    the structure the sequences have (``"bold harbor 4711 — a travel piece, series 12 part 3"``)."""
    topic, position = ids % topics, ids // topics
    words = [_ADJECTIVES[(topic * 7 + position // 4) % len(_ADJECTIVES)],
             _NOUNS[(topic * 3 + position // 2) % len(_NOUNS)], ids.astype(str),
             np.full(len(ids), " — a "), _GENRES[topic % len(_GENRES)], np.full(len(ids), " piece, series "),
             topic.astype(str), np.full(len(ids), " part "), (position + 1).astype(str)]
    text = np.char.add(np.char.add(words[0], " "), np.char.add(words[1], " "))
    for word in words[2:]:
        text = np.char.add(text, word)
    return pa.array(text.astype(object), pa.string())


def generate_interactions(folder: str | os.PathLike, *, users: int, items: int, interactions: int,
                          seed: int = 0, users_per_file: int = 100_000) -> dict:
    """Write a synthetic catalogue and its users' interactions to ``folder``, one block of users at a time.

    Items belong to ``max(10, items // 1000)`` topics, each an ordered series. A user favours one topic,
    starts somewhere in its series (early parts
    favoured) and mostly walks forward (the next item, sometimes one or two further),
    with one step in six to a popular item of any topic; sequence lengths are 5 plus a geometric number,
    averaging ``interactions / users``. Returns what was written (counts, files, seconds)."""
    if min(users, items, interactions) < 1 or interactions < 5 * users:
        raise ValueError(f"need users, items >= 1 and interactions >= 5 x users (every user has at least 5); "
                         f"got users={users}, items={items}, interactions={interactions}")
    folder = Path(folder)
    (folder / "interactions").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    topics = max(10, items // 1000)
    per_topic = -(-items // topics)
    ids = np.arange(items, dtype=np.int64)
    item_table = pa.table({"item_id": pa.array(ids), "title": _item_texts(ids, topics)})
    pq.write_table(item_table, folder / "items.parquet", compression="zstd")
    del item_table
    popular = np.minimum((rng.pareto(1.2, size=1 << 16) * items / 200).astype(np.int64), items - 1)
    extra_mean = interactions / users - 5
    written, files = 0, []
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
    for start in range(0, users, users_per_file):
        n = min(users_per_file, users - start)
        lengths = 5 + (rng.geometric(1 / (extra_mean + 1), size=n) - 1 if extra_mean > 0 else np.zeros(n, np.int64))
        total = int(lengths.sum())
        user = np.repeat(np.arange(start, start + n, dtype=np.int64), lengths)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        step = rng.choice(np.array([1, 1, 1, 1, 2, 3]), size=total)
        step[first == np.arange(total)] = 0
        offset = np.repeat((per_topic * rng.random(n) ** 2).astype(np.int64), lengths)  # early parts favoured
        walk = np.cumsum(step) - np.repeat(np.cumsum(step)[np.cumsum(lengths) - lengths], lengths)
        topic = np.repeat(rng.integers(0, topics, size=n), lengths)
        item = topic + topics * ((offset + walk) % per_topic)
        item = np.where(item < items, item, item % items)
        jump = rng.random(total) < 1 / 6
        item[jump] = popular[rng.integers(0, len(popular), size=int(jump.sum()))]
        time = np.repeat(rng.integers(1_500_000_000, 1_600_000_000, size=n), lengths) + walk * 3600
        name = f"interactions/part-{start // users_per_file:05d}.parquet"
        pq.write_table(pa.table({"user_id": user, "item_id": item, "timestamp": time}, schema=schema),
                       folder / name, compression="zstd", row_group_size=1 << 20)
        files.append(name)
        written += total
    return {"generator": GENERATOR_VERSION, "seed": seed, "users": users, "items": items,
            "interactions": written, "files": len(files)}


# ============================================================================================ input
def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".parquet", ".pq") and p.is_file())
        if not files:
            raise PrepareError(str(path), None, "a folder of interactions must hold .parquet files; it has none")
        return files
    if not path.is_file():
        raise PrepareError(str(path), None, "file not found" if not path.exists() else "not a file")
    return [path]


def _is_csv(files: list[Path]) -> bool:
    return len(files) == 1 and files[0].suffix.lower() in (".csv", ".tsv")


def _batches(files: list[Path], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The input's ``columns`` in record batches, in file order."""
    display = str(files[0] if len(files) == 1 else files[0].parent)
    try:
        if _is_csv(files):
            options = pacsv.ReadOptions(block_size=64 << 20)
            parse = pacsv.ParseOptions(delimiter="\t" if files[0].suffix.lower() == ".tsv" else ",")
            convert = pacsv.ConvertOptions(include_columns=columns)
            with pacsv.open_csv(files[0], read_options=options, parse_options=parse, convert_options=convert) as rd:
                for batch in rd:
                    yield batch
            return
        # File by file, batch by batch, nothing read ahead (Arrow's dataset scanner reads ahead of a slow
        # consumer without bound: ~100 MB a batch here): memory is one batch's, whatever the input's size.
        for file in files:
            reader = pq.ParquetFile(file)
            missing = [c for c in columns if c not in reader.schema_arrow.names]
            if missing:
                raise PrepareError(str(file), None, f"no column {missing[0]!r} (columns: "
                                                    f"{', '.join(reader.schema_arrow.names)})")
            yield from reader.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as err:
        raise PrepareError(display, None, f"cannot read: {str(err).splitlines()[0]}") from None


def _row_count(files: list[Path]) -> int:
    """Input rows (exact for Parquet; for CSV, from the file size at ~24 bytes a row)."""
    if _is_csv(files):
        return max(1, files[0].stat().st_size // 24)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _ids(column: pa.Array, display: str, what: str) -> pa.Array:
    """Ids as int64 (integer columns) or strings; anything else is refused."""
    if pa.types.is_integer(column.type):
        return column.cast(pa.int64())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        if column.null_count:
            raise PrepareError(display, None, f"missing {what} id")
        return column.cast(pa.string())
    raise PrepareError(display, None, f"{what} ids of type {column.type}: streamed input needs integer or "
                                      "string ids")


def _order_key(column: pa.Array, display: str, name: str) -> np.ndarray:
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    elif pa.types.is_string(column.type):
        try:
            column = pc.cast(pc.strptime(column, format="%Y-%m-%dT%H:%M:%S", unit="s"), pa.int64())
        except pa.ArrowInvalid:
            raise PrepareError(display, None, f"column {name!r}: streamed input needs numeric or timestamp "
                                              "times, or ISO-8601 'YYYY-MM-DDTHH:MM:SS' strings") from None
    if column.null_count:
        raise PrepareError(display, None, f"missing timestamp in column {name!r}")
    return column.to_numpy(zero_copy_only=False)


def _bucket_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """A hash of each id modulo ``buckets`` (the same id always lands in the same bucket)."""
    if pa.types.is_integer(ids.type):
        h = ids.to_numpy(zero_copy_only=False).astype(np.uint64)
    else:  # a polynomial hash of the UTF-8 bytes, computed on Arrow's buffers
        offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset:ids.offset + len(ids) + 1]
        data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].astype(np.uint64)
        starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
        position = np.arange(len(data)) - np.repeat(starts, lengths)
        with np.errstate(over="ignore"):
            weights = np.uint64(1099511628211) ** (position.astype(np.uint64) + np.uint64(1))
            h = np.zeros(len(ids), dtype=np.uint64)
            nonempty = lengths > 0
            if len(data):
                h[nonempty] = np.add.reduceat(data * weights, starts[nonempty])
            h = h + lengths.astype(np.uint64)
    with np.errstate(over="ignore"):  # splitmix64's finaliser: nearby ids spread over the buckets
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return (h % np.uint64(buckets)).astype(np.int64)


def _sorted_catalogue(items_path: Path, item_id_col: str, text_cols: Sequence[str]) -> tuple[pa.Array, pa.Array]:
    """(ids sorted, their texts): integer ids numerically, string ids as strings."""
    display = str(items_path)
    files = _input_files(items_path)
    table = pa.Table.from_batches(list(_batches(files, [item_id_col, *text_cols], BATCH_ROWS)))
    ids = _ids(table.column(item_id_col).combine_chunks(), display, "item")
    parts = [pc.fill_null(table.column(c).cast(pa.string()), "") for c in text_cols]
    text = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, ". ")
    order = pc.sort_indices(ids)
    text = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    ids, text = ids.take(order), text.take(order)
    repeated = np.flatnonzero(pc.equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)) if len(ids) > 1 else []
    if len(repeated):
        duplicate = ids[int(repeated[0])]
        raise PrepareError(display, None, f"item id {duplicate.as_py()!r} appears more than once in column "
                                          f"{item_id_col!r}")
    return ids, text


# ============================================================================================ prepare
def prepare_streaming(interactions: str | os.PathLike, items: str | os.PathLike, output: str | os.PathLike, *,
                      user_col: str = "user_id", item_col: str = "item_id", time_col: str | None = "timestamp",
                      item_id_col: str = "item_id", text_cols: Sequence[str] = ("text",),
                      min_interactions: int = 5, user_hash_key: str | None = None, overwrite: bool = False,
                      rows_per_bucket: int = ROWS_PER_BUCKET, batch_rows: int = BATCH_ROWS,
                      source_info: dict | None = None, work_dir: str | os.PathLike | None = None) -> dict:
    """Prepare generic input of any size (see the module doc); returns the manifest. ``output`` is a
    folder or a URI, written atomically as by ``prepare``. ``work_dir``: where the bucket files go
    (default: the system's temporary folder); they take about the input's size, uncompressed."""
    if min_interactions < 3:
        raise ValueError(f"min_interactions must be >= 3 (leave-one-out needs train >= 1, valid and test), "
                         f"got {min_interactions}")
    if isinstance(text_cols, str):
        text_cols = [c.strip() for c in text_cols.split(",") if c.strip()]
    dataset_format.check_output_free(output, overwrite)
    hash_key, user_ids_info = resolve_user_hash_key(user_hash_key)
    inputs, items_path = _input_files(Path(interactions)), Path(items)
    display = str(interactions)
    catalogue, texts = _sorted_catalogue(items_path, item_id_col, text_cols)
    total_rows = _row_count(inputs)
    buckets = max(2, math.ceil(total_rows / rows_per_bucket))  # two parts at least: one per worker
    columns = [user_col, item_col] + ([time_col] if time_col else [])
    with tempfile.TemporaryDirectory(prefix="llmrec-stream-", dir=work_dir) as work:
        work = Path(work)
        counts = _scatter(inputs, display, columns, catalogue, buckets, work, batch_rows, time_col)
        used = np.zeros(len(catalogue), dtype=np.int64)
        users_per_bucket, kept_interactions = [], 0
        for b in range(buckets):
            n_read, n_users, n_kept = _sequences(work, b, min_interactions, hash_key, used)
            counts["users"] += n_read
            users_per_bucket.append(n_users)
            kept_interactions += n_kept
        if kept_interactions == 0:
            raise PrepareError(display, None, f"no users left after filtering: min_interactions={min_interactions} "
                                              f"({counts['rows']} interactions of {counts['users']} users read)")
        item_idx = np.cumsum(used > 0).astype(np.int32)  # catalogue position -> item_idx (1..N for used ones)
        item_idx[used == 0] = 0
        num_items = int(item_idx.max())
        popularity = np.zeros(num_items + 1, dtype=np.int64)
        with dataset_format.atomic_output_dir(output, overwrite) as folder:
            shards, train_interactions, first_user = {s: [] for s in dataset_format.SPLITS}, 0, 0
            for b in range(buckets):
                if users_per_bucket[b] == 0:
                    continue
                part = len(shards["train"])
                train_interactions += _write_splits(work, b, folder, part, first_user, item_idx, popularity)
                first_user += users_per_bucket[b]
                for split in dataset_format.SPLITS:
                    shards[split].append(dataset_format.shard_relpath(split, part))
            kept = used > 0
            items_table = pa.table({
                "item_idx": pa.array(np.arange(1, num_items + 1, dtype=np.int32)),
                "item_id": catalogue.filter(pa.array(kept)).cast(pa.string()),
                "text": texts.filter(pa.array(kept)),
                "popularity": pa.array(popularity[1:]),
                "cold": pa.array(np.zeros(num_items, dtype=bool)),
            }, schema=dataset_format.ITEMS_FILE_SCHEMA)
            dataset_format.write_parquet(items_table, folder / dataset_format.ITEMS_FILE)
            manifest = {
                "format_version": dataset_format.FORMAT_VERSION,
                "source": source_info or _generic_info(inputs, items_path, user_col, item_col, time_col,
                                                       item_id_col, text_cols),
                "counts": {"users": first_user, "items": num_items, "interactions": kept_interactions,
                           "train_interactions": train_interactions, "raw_interactions": counts["rows"],
                           "raw_users": counts["users"], "raw_items": counts["items"]},
                "split": {"protocol": "leave-one-out", "min_interactions": min_interactions,
                          "item_min_interactions": 0, "time_order": "timestamp" if time_col else "file_order"},
                "cold_items": {"fraction": 0.0, "seed": None, "chosen_from": "all items", "items": 0,
                               "valid_targets": 0, "test_targets": 0, "train_interactions_removed": 0,
                               "train_rows_dropped": 0},
                "feedback": None,
                "user_ids": user_ids_info,
                "user_attributes": None,
                "shards": shards,
                "streamed": {"buckets": buckets, "rows_per_bucket": rows_per_bucket},
            }
            manifest["content_hash"] = dataset_format.content_hash_of_files(folder, manifest)
            manifest["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            manifest["llmrec_dist_version"] = llmrec_dist.__version__
            dataset_format.write_manifest(folder, manifest)
    log.info("prepared %s (streamed, %d buckets): %s", output, buckets, manifest["counts"])
    return manifest


def _generic_info(inputs, items_path, user_col, item_col, time_col, item_id_col, text_cols) -> dict:
    return {"type": "generic", "variant": "generic-streamed",
            "files": [{"role": "interactions", "name": f.name, "sha256": dataset_format.sha256_file(f)}
                      for f in inputs]
            + [{"role": "items", "name": f.name, "sha256": dataset_format.sha256_file(f)}
               for f in _input_files(items_path)],
            "parameters": {"user_col": user_col, "item_col": item_col, "time_col": time_col,
                           "item_id_col": item_id_col, "text_cols": list(text_cols)}}


_BUCKET_SCHEMA_FIELDS = ("user", "item", "time", "row")


def _scatter(inputs, display, columns, catalogue, buckets, work: Path, batch_rows, time_col) -> dict:
    """Pass 1: every input row to its user's bucket file, its item as a catalogue position."""
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    sinks = []
    rows = 0
    seen_items = np.zeros(len(catalogue), dtype=bool)
    user_type = None
    try:
        for batch in _batches(inputs, columns, batch_rows):
            if batch.num_rows == 0:
                continue
            users = _ids(batch.column(0), display, "user")
            if user_type is None:
                user_type = users.type
            elif users.type != user_type:
                raise PrepareError(display, None, "user ids change type between files (integers, then strings)")
            given = _ids(batch.column(1), display, "item")
            if given.type != catalogue.type:
                given = given.cast(pa.string()) if catalogue.type == pa.string() else given
                if given.type != catalogue.type:
                    raise PrepareError(display, None, "item ids are strings here but integers in the items file")
            position = pc.index_in(given, value_set=catalogue)
            if position.null_count:
                missing = given.filter(pc.is_null(position))[0].as_py()
                raise PrepareError(display, None, f"item {missing!r} has interactions but no text (not in the "
                                                  "items file)")
            position = position.to_numpy(zero_copy_only=False).astype(np.int32)
            seen_items[position] = True
            time = (_order_key(batch.column(2), display, time_col) if time_col
                    else np.arange(rows, rows + batch.num_rows, dtype=np.int64))
            order_in_input = np.arange(rows, rows + batch.num_rows, dtype=np.int64)
            bucket = _bucket_of(users, buckets)
            by_bucket = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[by_bucket], np.arange(buckets + 1))
            table = pa.table({"user": users, "item": position, "time": time, "row": order_in_input})
            table = table.take(pa.array(by_bucket))
            for b in np.flatnonzero(np.diff(bounds)):
                if b not in writers:
                    sink = pa.OSFile(str(work / f"bucket-{b:05d}.arrow"), "wb")
                    sinks.append(sink)
                    writers[b] = pa.ipc.new_stream(sink, table.schema)
                writers[b].write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))
            rows += batch.num_rows
    finally:
        for writer in writers.values():
            writer.close()
        for sink in sinks:
            sink.close()
    if rows == 0:
        raise PrepareError(display, None, "no interactions")
    return {"rows": rows, "items": int(seen_items.sum()), "users": 0}


def _read_bucket(path: Path) -> pa.Table | None:
    if not path.exists():
        return None
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_stream(source).read_all()


def _sequences(work: Path, b: int, min_interactions: int, hash_key: bytes,
               used: np.ndarray) -> tuple[int, int, int]:
    """Pass 2 for bucket ``b``: its users' time-ordered sequences (catalogue positions), short users
    dropped, written as ``seq-<b>.parquet`` (user_key, seq); counts the positions in use into ``used``.
    Returns (users read, users kept, interactions kept)."""
    table = _read_bucket(work / f"bucket-{b:05d}.arrow")
    if table is None:
        return 0, 0, 0
    order = pc.sort_indices(table, sort_keys=[("user", "ascending"), ("time", "ascending"), ("row", "ascending")])
    table = table.take(order)
    users = table.column("user").combine_chunks()
    change = pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False) if len(users) > 1 else np.zeros(0, bool)
    starts = np.concatenate([[0], np.flatnonzero(change) + 1])
    lengths = np.diff(np.concatenate([starts, [len(users)]]))
    keep = lengths >= min_interactions
    items = table.column("item").to_numpy()
    mask = np.repeat(keep, lengths)
    kept_items, kept_lengths = items[mask], lengths[keep]
    used += np.bincount(kept_items, minlength=len(used))
    keys = user_keys(users.take(pa.array(starts[keep])).to_pylist(), hash_key)
    offsets = np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64)
    seq = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(kept_items, pa.int32()))
    pq.write_table(pa.table({"user_key": pa.array(keys, pa.string()), "seq": seq}),
                   work / f"seq-{b:05d}.parquet", compression="none")
    (work / f"bucket-{b:05d}.arrow").unlink()
    return len(starts), int(keep.sum()), int(kept_lengths.sum())


def _write_splits(work: Path, b: int, folder: Path, part: int, first_user: int, item_idx: np.ndarray,
                  popularity: np.ndarray) -> int:
    """Pass 3 for bucket ``b``: leave-one-out over its sequences (item_idx numbering), part ``part`` of
    each split written; train popularity counted. Returns the train interactions written."""
    table = pq.read_table(work / f"seq-{b:05d}.parquet")
    seq = table.column("seq").combine_chunks()
    lengths = pc.list_value_length(seq).to_numpy().astype(np.int64)
    values = item_idx[seq.flatten().to_numpy()]
    ends = np.cumsum(lengths)
    position = np.arange(len(values)) - np.repeat(ends - lengths, lengths)
    train_keep = position < np.repeat(lengths - 2, lengths)
    test_keep = position < np.repeat(lengths - 1, lengths)
    user_idx = pa.array(np.arange(first_user + 1, first_user + len(lengths) + 1, dtype=np.int32))
    keys = table.column("user_key")
    train_items = _lists(values[train_keep], lengths - 2)
    no_cold = pa.array(np.zeros(len(lengths), dtype=bool))
    tables = {
        "train": pa.table({"user_idx": user_idx, "user_key": keys, "items": train_items}),
        "valid": pa.table({"user_idx": user_idx, "user_key": keys, "items": train_items,
                           "target": pa.array(values[ends - 2]), "cold": no_cold}),
        "test": pa.table({"user_idx": user_idx, "user_key": keys, "items": _lists(values[test_keep], lengths - 1),
                          "target": pa.array(values[ends - 1]), "cold": no_cold}),
    }
    for split, t in tables.items():
        schema = dataset_format.SPLIT_SCHEMAS[split]
        dataset_format.write_parquet(t.select(schema.names).cast(schema),
                                     folder / dataset_format.shard_relpath(split, part))
    popularity += np.bincount(values[train_keep], minlength=len(popularity))
    (work / f"seq-{b:05d}.parquet").unlink()
    return int(train_keep.sum())
