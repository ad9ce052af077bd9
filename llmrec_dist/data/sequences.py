"""The ``sequences`` source: one line per user with that user's items in time order, plus an items table.

Many public datasets ship interactions this way, without timestamps (e.g. the Amazon Beauty 5-core
of SASRec/S3-Rec: ``user_idx<TAB>reviewerID<TAB>item_seq``). The sequences file is a table with a
header, chosen by extension like the ``generic`` source's files: ``.csv`` (comma), ``.tsv`` (tab)
or Parquet. Its user column holds one user id per row; its items column holds that user's item
ids separated by whitespace, oldest first (in Parquet: a string column of the same form; list
columns are refused). The items file is read exactly as the ``generic`` source reads its own.

Ids are strings (``"0012"`` stays ``"0012"``). The order of the ids on a line is the time order
(``time_order`` ``"file_order"``); repeated items on a line are kept. A user on two rows, a row
without items and an item id missing from the items table are ``PrepareError``s naming the file
and the row (1-based data rows, the header not counted).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.generic import (
    PARQUET_SUFFIXES,
    ROW,
    _read_table_file,
    build_text,
    check_encoding,
    check_items_known,
    check_unique_items,
    normalise_ids,
)
from llmrec_dist.data.dataset_format import sha256_file


def _check_parquet_sequence_column(path: Path, column: str) -> None:
    """``PrepareError`` if a Parquet file's ``column`` exists but does not hold strings.

    Unreadable files and missing columns are left to ``_read_table_file``, which reports them.
    """
    if path.suffix.lower() not in PARQUET_SUFFIXES or not path.is_file():
        return
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError):
        return
    if column not in schema.names:
        return
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PrepareError(
            str(path), None,
            f"column {column!r} has Parquet type {kind}; expected strings of whitespace-separated item ids "
            "(oldest first), e.g. '12 7 31'",
        )


def _check_one_row_per_user(users: pd.Series, rows: np.ndarray, display: str, column: str) -> None:
    """``PrepareError`` at the second row of the first user id that appears twice."""
    again = users.duplicated().to_numpy()
    if again.any():
        index = int(np.flatnonzero(again)[0])
        user = users.iloc[index]
        first = int(rows[int(np.flatnonzero((users == user).to_numpy())[0])])
        raise PrepareError(
            display,
            int(rows[index]),
            f"user id {user!r} in column {column!r} is also on row {first}; "
            "a sequences file has one row per user",
        )


def _split_sequences(values: pd.Series, rows: np.ndarray, display: str, column: str) -> tuple[list, np.ndarray]:
    """``(item ids of all rows in order, number of ids per row)``; a row without ids is an error."""
    text = values.where(values.notna(), "").astype(str)
    per_row = [line.split() for line in text]
    lengths = np.fromiter(map(len, per_row), dtype=np.int64, count=len(per_row))
    empty = lengths == 0
    if empty.any():
        raise PrepareError(
            display,
            int(rows[int(np.flatnonzero(empty)[0])]),
            f"no item ids in column {column!r} (expected whitespace-separated item ids, oldest first)",
        )
    return list(chain.from_iterable(per_row)), lengths


def read_sequences(
    sequences: str | os.PathLike,
    items: str | os.PathLike,
    *,
    user_col: str = "user_id",
    items_col: str = "items",
    item_id_col: str = "item_id",
    text_cols: Sequence[str] = ("text",),
    encoding: str = "utf-8",
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Read a sequences file and an items table (CSV, TSV or Parquet, chosen by extension).

    Args:
        sequences: File with one row per user.
        items: File with one item per row and its text (as for the ``generic`` source).
        user_col: Column of ``sequences`` holding user ids.
        items_col: Column of ``sequences`` holding the user's item ids, whitespace-separated,
            oldest first.
        item_id_col: Column of ``items`` holding item ids.
        text_cols: Columns of ``items`` joined with ``". "`` into the item text.
        encoding: Text encoding of CSV/TSV files (Parquet strings are always UTF-8).

    Returns ``(interactions, items, info)`` like ``read_generic``: one interaction per item id
    on a line, with an ``order_key`` that increases along the file, so each line's order is the
    time order.
    """
    encoding = check_encoding(encoding)
    if isinstance(text_cols, str):  # "title, description" as on the command line
        text_cols = text_cols.split(",")
    text_cols = [c.strip() for c in text_cols if c.strip()]
    if not text_cols:
        raise ValueError("text_cols must name at least one column of the items file")
    parameters = dict(user_col=user_col, items_col=items_col, item_id_col=item_id_col, text_cols=text_cols,
                      encoding=encoding)
    sequences_path, items_path = Path(sequences), Path(items)
    display, items_display = str(sequences_path), str(items_path)

    _check_parquet_sequence_column(sequences_path, items_col)
    raw = _read_table_file(sequences_path, [user_col, items_col], [user_col], encoding)
    rows = raw[ROW].to_numpy()
    users = normalise_ids(raw, user_col, display, "user")
    _check_one_row_per_user(users, rows, display, user_col)
    item_ids, lengths = _split_sequences(raw[items_col], rows, display, items_col)
    interactions = pd.DataFrame(
        {
            "user_id": np.repeat(users.to_numpy(dtype=object), lengths),
            "item_id": pd.Series(item_ids, dtype=object),
            "order_key": np.arange(len(item_ids), dtype=np.int64),
            "row": np.repeat(rows, lengths),
        }
    )

    catalogue = _read_table_file(items_path, [item_id_col, *text_cols], [item_id_col], encoding)
    items_frame = pd.DataFrame(
        {
            "item_id": normalise_ids(catalogue, item_id_col, items_display, "item"),
            "text": build_text(catalogue, text_cols),
            "row": catalogue[ROW].to_numpy(),
        }
    )
    check_unique_items(items_frame, items_display, item_id_col)
    check_items_known(interactions, items_frame, display, items_display)

    info = {
        "type": "sequences",
        "variant": "sequences",
        "files": [
            {"role": "sequences", "name": sequences_path.name, "sha256": sha256_file(sequences_path)},
            {"role": "items", "name": items_path.name, "sha256": sha256_file(items_path)},
        ],
        "parameters": parameters,
        "time_order": "file_order",
    }
    return interactions, items_frame.drop(columns="row"), info
