"""The ``generic`` source: an interactions table and an items table, CSV or Parquet.

Also home of the table helpers the MovieLens reader shares: reading delimited text with exact
line numbers, id and timestamp validation with row-numbered ``PrepareError``s.

Row numbers in errors: for files with a header (CSV) and Parquet, the 1-based *data* row
(the header is not counted); for header-less text files, the 1-based line number.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.dataset_format import arrow_error_reason, sha256_file

CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Column added to raw tables with the row number used in messages (named to avoid clashes with data).
ROW = "__row__"


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by movielens.py)
# ---------------------------------------------------------------------------------------------


def read_delimited(
    data: bytes,
    display: str,
    *,
    sep: str,
    names: Sequence[str] | None = None,
    encoding: str = "utf-8",
    quoted: bool = True,
    encoding_hint: str = "",
) -> pd.DataFrame:
    """Parse delimited text into string columns, keeping a ``ROW`` column for error messages.

    With ``names`` the text has no header and ``ROW`` is the line number; without, the first
    line is the header and ``ROW`` is the 1-based data row. Blank lines are skipped (but still
    counted). A line with too many fields raises ``PrepareError`` at that line; missing fields
    come back as empty strings, for the caller's column checks to report. Bytes that are not
    valid ``encoding`` raise ``PrepareError`` at their row with their byte offset in the file,
    followed by ``encoding_hint`` (what the user can do about it).
    """
    parser_sep = sep
    if len(sep) > 1:  # the C parser takes one-character separators only ('::' in .dat files)
        if b"\t" in data:
            raise PrepareError(display, None, f"tab characters found in a {sep!r}-separated file")
        data = data.replace(sep.encode(encoding), b"\t")
        parser_sep = "\t"
    try:
        frame = pd.read_csv(
            io.BytesIO(data),
            sep=parser_sep,
            header=None if names is not None else 0,
            names=list(names) if names is not None else None,
            dtype=str,
            na_filter=False,
            quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
            encoding=encoding,
            index_col=False,
            skip_blank_lines=False,
            engine="c",
        )
    except UnicodeDecodeError:
        raise _encoding_error(data, display, encoding, header=names is None, hint=encoding_hint) from None
    except pd.errors.ParserError as err:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
        if match:
            expected, line, seen = (int(g) for g in match.groups())
            row = line if names is not None else line - 1
            raise PrepareError(
                display, row, f"expected {expected} fields separated by {sep!r}, found {seen}"
            ) from err
        raise PrepareError(display, None, f"cannot parse: {err}") from err
    except pd.errors.EmptyDataError as err:
        raise PrepareError(display, None, "file is empty") from err
    frame[ROW] = np.arange(1, len(frame) + 1, dtype=np.int64)
    if len(frame.columns) > 1:
        blank = (frame.drop(columns=ROW) == "").all(axis=1)
        if blank.any():
            frame = frame[~blank.to_numpy()].reset_index(drop=True)
    return frame


def _encoding_error(data: bytes, display: str, encoding: str, *, header: bool, hint: str) -> PrepareError:
    """The error for the first byte of ``data`` that is not valid ``encoding``.

    pandas decodes in chunks, so the offset in its exception is relative to a chunk; the bytes are
    decoded again here to find the offset in the file and the row it falls in.
    """
    try:
        data.decode(encoding)
    except UnicodeDecodeError as err:
        offset, reason = err.start, err.reason
    else:  # pandas failed where Python does not (e.g. a BOM in the middle); report the file as a whole
        return PrepareError(display, None, f"cannot decode the file as {encoding} text{hint}")
    line = data[:offset].count(b"\n") + 1
    row = (line - 1 or None) if header else line  # header files count data rows; the header is row None
    where = " (in the header)" if header and row is None else ""
    return PrepareError(display, row, f"not valid {encoding} text at byte offset {offset}{where}: "
                                      f"{data[offset:offset + 1]!r} ({reason}){hint}")


def require_columns(frame: pd.DataFrame, display: str, columns: Sequence[str]) -> None:
    """``PrepareError`` naming the file, every missing column and the columns that exist."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = [c for c in frame.columns if c != ROW]
        raise PrepareError(
            display,
            None,
            f"missing column(s) {', '.join(map(repr, missing))}; columns found: "
            f"{', '.join(map(repr, found)) or '(none)'}",
        )


def _first_bad(mask: np.ndarray, rows: pd.Series) -> int:
    return int(rows.iloc[int(np.flatnonzero(mask)[0])])


def normalise_ids(frame: pd.DataFrame, column: str, display: str, what: str) -> pd.Series:
    """Ids as stripped strings; integral floats lose their ``.0``; null/empty ids are errors."""
    values = frame[column]
    if pd.api.types.is_bool_dtype(values.dtype):
        raise PrepareError(display, None, f"column {column!r} holds booleans, not {what} ids")
    null = values.isna().to_numpy()
    if null.any():
        raise PrepareError(display, _first_bad(null, frame[ROW]), f"empty {what} id in column {column!r}")
    if pd.api.types.is_float_dtype(values.dtype):
        as_int = values.astype(np.int64)
        integral = (as_int == values).to_numpy()
        text = values.astype(str)
        text[integral] = as_int[integral].astype(str)
        values = text
    elif pd.api.types.is_integer_dtype(values.dtype):
        values = values.astype(str)
    else:
        values = values.astype(str).str.strip()
    empty = (values == "").to_numpy()
    if empty.any():
        raise PrepareError(display, _first_bad(empty, frame[ROW]), f"empty {what} id in column {column!r}")
    return values.astype(object)


def parse_order_key(frame: pd.DataFrame, column: str, display: str) -> np.ndarray:
    """Timestamps as a sortable float64/int64 array.

    Accepts numbers (epoch, any unit, as long as one file uses one unit), ISO-8601 strings
    (``2021-03-04``, ``2021-03-04T05:06:07+02:00``; naive times are taken as UTC, converted to
    epoch seconds) and Parquet timestamp columns. Anything else is a ``PrepareError`` naming
    the row, the column and the value.
    """
    values = frame[column]
    rows = frame[ROW]
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        bad = values.isna().to_numpy()
        if bad.any():
            raise PrepareError(display, _first_bad(bad, rows), f"missing timestamp in column {column!r}")
        if values.dt.tz is None:
            values = values.dt.tz_localize("UTC")
        return ((values - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(np.float64)
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        numeric = values.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(numeric)
        if bad.any():
            raise PrepareError(display, _first_bad(bad, rows), f"missing timestamp in column {column!r}")
        if pd.api.types.is_integer_dtype(values.dtype):
            return values.to_numpy(dtype=np.int64)
        return numeric
    text = values.astype(str).str.strip()
    numeric = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan).copy()
    need_date = ~np.isfinite(numeric)
    if need_date.any():
        dates = pd.to_datetime(text[need_date], format="ISO8601", utc=True, errors="coerce")
        seconds = ((dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        numeric[need_date] = seconds
    bad = ~np.isfinite(numeric)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise PrepareError(
            display,
            int(rows.iloc[index]),
            f"cannot parse timestamp {values.iloc[index]!r} in column {column!r} "
            "(expected a number such as epoch seconds, or an ISO-8601 date/time)",
        )
    if np.all(numeric == np.round(numeric)) and np.all(np.abs(numeric) < 2**53):
        return numeric.astype(np.int64)
    return numeric


def parse_range(value) -> tuple[float, float] | None:
    """``"LOW,HIGH"`` (or a pair) as two finite floats with LOW <= HIGH; None stays None."""
    if value is None or value == "":
        return None
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"rating_range must be two numbers LOW,HIGH (e.g. 1,5), got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise ValueError(f"rating_range must be finite numbers with LOW <= HIGH, got {value!r}")
    return low, high


def parse_feedback(frame: pd.DataFrame, column: str, display: str, kind: str,
                   value_range: tuple[float, float] | None = None) -> np.ndarray:
    """The explicit feedback of every row as float32: a ``rating`` (any finite number, inside
    ``value_range`` when one is declared) or a click ``label`` (0 or 1).

    A value that is missing, NaN, not a number, out of the range or (labels) neither 0 nor 1 is a
    ``PrepareError`` naming the row, the column and the value.
    """
    values = frame[column]
    rows = frame[ROW]
    if pd.api.types.is_bool_dtype(values.dtype):
        numeric = values.to_numpy(dtype=np.float64)
    elif pd.api.types.is_numeric_dtype(values.dtype):
        numeric = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        text = values.astype(str).str.strip()
        numeric = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan).copy()
        numeric[values.isna().to_numpy()] = np.nan
    bad = ~np.isfinite(numeric)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raw = values.iloc[index]
        shown = "an empty value" if raw is None or (isinstance(raw, float) and np.isnan(raw)) or str(raw).strip() == "" \
            else f"{raw!r}"
        raise PrepareError(display, int(rows.iloc[index]),
                           f"column {column!r}: {shown} is not a {kind} (expected a finite number)")
    if kind == "label":
        bad = (numeric != 0) & (numeric != 1)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise PrepareError(display, int(rows.iloc[index]),
                               f"column {column!r}: label {values.iloc[index]!r} is not 0 or 1")
    elif value_range is not None:
        low, high = value_range
        bad = (numeric < low) | (numeric > high)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise PrepareError(display, int(rows.iloc[index]),
                               f"column {column!r}: rating {values.iloc[index]!r} is outside the declared "
                               f"range [{low:g}, {high:g}]")
    return numeric.astype(np.float32)


def feedback_record(kind: str, column: str, values: np.ndarray,
                    value_range: tuple[float, float] | None = None) -> dict:
    """The manifest's ``feedback`` section: what the numbers are and their range (declared, else seen)."""
    low, high = value_range if value_range is not None else (float(values.min()), float(values.max()))
    if kind == "label":
        low, high = 0.0, 1.0
    return {"kind": kind, "column": column, "min": float(low), "max": float(high),
            "range": "declared" if value_range is not None or kind == "label" else "observed"}


def check_unique_items(items: pd.DataFrame, display: str, column: str) -> None:
    """``PrepareError`` naming both rows of the first duplicated item id."""
    duplicated = items["item_id"].duplicated().to_numpy()
    if duplicated.any():
        index = int(np.flatnonzero(duplicated)[0])
        item_id = items["item_id"].iloc[index]
        first = int(items.loc[(items["item_id"] == item_id).to_numpy(), "row"].iloc[0])
        raise PrepareError(
            display,
            int(items["row"].iloc[index]),
            f"duplicate item id {item_id!r} in column {column!r} (first seen at row {first})",
        )


def check_items_known(interactions: pd.DataFrame, items: pd.DataFrame, display: str, items_display: str) -> None:
    """``PrepareError`` for the first interaction whose item is not in the items table."""
    unknown = ~interactions["item_id"].isin(items["item_id"]).to_numpy()
    if unknown.any():
        index = int(np.flatnonzero(unknown)[0])
        raise PrepareError(
            display,
            int(interactions["row"].iloc[index]),
            f"item id {interactions['item_id'].iloc[index]!r} is not in the items table "
            f"{items_display} ({int(unknown.sum())} interaction(s) with unknown items)",
        )


def build_text(frame: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """Join the non-empty values of ``columns`` with ``". "``."""
    parts = []
    for column in columns:
        values = frame[column]
        parts.append(values.where(values.notna(), "").astype(str).str.strip())
    joined = [". ".join(p for p in row if p) for row in zip(*parts)] if parts else []
    return pd.Series(joined, index=frame.index, dtype=object)


# ---------------------------------------------------------------------------------------------
# The generic reader
# ---------------------------------------------------------------------------------------------


def _is_scalar_text_or_number(tp: pa.DataType) -> bool:
    if pa.types.is_dictionary(tp):
        tp = tp.value_type
    return pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_integer(tp) \
        or pa.types.is_floating(tp)


def _check_parquet_types(schema: pa.Schema, display: str, id_columns: Sequence[str], columns: Sequence[str]) -> None:
    """``PrepareError`` for a requested column of a type the reader cannot turn into ids / text / times.

    Ids must be strings or numbers; no column may be nested (list, struct, map): a list is never an
    id, and its string form would silently become one.
    """
    for column in dict.fromkeys(columns):
        tp = schema.field(column).type
        if pa.types.is_nested(tp) or pa.types.is_binary(tp) or pa.types.is_large_binary(tp):
            raise PrepareError(display, None, f"column {column!r} has Parquet type {tp}; expected strings, "
                                              "numbers (or, for the time column, timestamps)")
        if column in id_columns and not _is_scalar_text_or_number(tp):
            raise PrepareError(display, None, f"column {column!r} has Parquet type {tp}; ids must be "
                                              "strings or integers")


def _read_parquet(path: Path, columns: Sequence[str], id_columns: Sequence[str]) -> pd.DataFrame:
    display = str(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise PrepareError(display, None, f"cannot read Parquet file: {arrow_error_reason(err)}") from None
    require_columns(pd.DataFrame(columns=schema.names), display, columns)
    _check_parquet_types(schema, display, id_columns, columns)
    try:
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    except (pa.ArrowException, OSError) as err:  # a readable footer over damaged data pages
        raise PrepareError(display, None, f"cannot read Parquet file: {arrow_error_reason(err)}") from None
    frame = table.to_pandas(types_mapper=None)
    frame[ROW] = np.arange(1, len(frame) + 1, dtype=np.int64)
    return frame


def _read_table_file(path: Path, columns: Sequence[str], id_columns: Sequence[str], encoding: str) -> pd.DataFrame:
    """A CSV/TSV (decoded with ``encoding``) or Parquet file's ``columns`` with a ``ROW`` column."""
    display = str(path)
    if not path.is_file():
        raise PrepareError(display, None, "file not found" if not path.exists() else "not a file")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, columns, id_columns)
    if suffix in CSV_SUFFIXES:
        hint = (f"; if the file is not {encoding}, name its encoding with --encoding (e.g. --encoding latin-1 "
                "or cp1252), or re-save it as UTF-8")
        frame = read_delimited(path.read_bytes(), display, sep="\t" if suffix == ".tsv" else ",",
                               encoding=encoding, encoding_hint=hint)
        require_columns(frame, display, columns)
        return frame
    raise PrepareError(
        display,
        None,
        f"unsupported file type {suffix!r}; expected one of {', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}",
    )


def check_encoding(encoding: str) -> str:
    """The canonical name of a Python text encoding, or ``ValueError`` naming it."""
    try:
        return codecs.lookup(encoding).name
    except (LookupError, TypeError):
        raise ValueError(f"unknown text encoding {encoding!r} (examples: utf-8, latin-1, cp1252)") from None


def read_generic(
    interactions: str | os.PathLike,
    items: str | os.PathLike,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    item_id_col: str = "item_id",
    text_cols: Sequence[str] = ("text",),
    encoding: str = "utf-8",
    rating_col: str | None = None,
    label_col: str | None = None,
    rating_range=None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Read an interactions table and an items table (CSV or Parquet, chosen by extension).

    Args:
        interactions: File with one interaction per row.
        items: File with one item per row and its text.
        user_col: Column of ``interactions`` holding user ids.
        item_col: Column of ``interactions`` holding item ids.
        time_col: Column of ``interactions`` with the time (epoch numbers or ISO-8601). ``None``
            or ``""``: no time column, the file order is the chronological order.
        item_id_col: Column of ``items`` holding item ids.
        text_cols: Columns of ``items`` joined with ``". "`` into the item text.
        encoding: Text encoding of CSV/TSV files (Parquet strings are always UTF-8). Bytes that
            are not valid in it are a ``PrepareError`` naming the file, the row and the byte
            offset; nothing is replaced or guessed.
        rating_col: Column of ``interactions`` with explicit ratings, kept per event as the
            dataset's feedback (``parse_feedback``); ``rating_range`` (``"LOW,HIGH"``) declares the
            valid range.
        label_col: Column of ``interactions`` with 0/1 click labels, kept per event as the
            dataset's feedback. At most one of ``rating_col`` and ``label_col``.

    Ids are read as strings: integer ids (``42``, ``42.0`` in a float column) become ``"42"``.
    Parquet id columns must hold strings or numbers; nested columns (lists, structs) are refused.
    """
    encoding = check_encoding(encoding)
    if isinstance(text_cols, str):
        text_cols = [c.strip() for c in text_cols.split(",") if c.strip()]
    if not text_cols:
        raise ValueError("text_cols must name at least one column of the items file")
    time_col = time_col or None
    rating_col, label_col = rating_col or None, label_col or None
    if rating_col and label_col:
        raise ValueError("give one feedback column: rating_col (explicit ratings) or label_col (0/1 labels), not both")
    value_range = parse_range(rating_range)
    if value_range is not None and not rating_col:
        raise ValueError("rating_range needs rating_col (the column whose values it bounds)")
    feedback_col = rating_col or label_col
    kind = "rating" if rating_col else "label"
    interactions_path, items_path = Path(interactions), Path(items)

    columns = [user_col, item_col] + ([time_col] if time_col else []) + ([feedback_col] if feedback_col else [])
    raw = _read_table_file(interactions_path, columns, [user_col, item_col], encoding)
    display = str(interactions_path)
    frame = pd.DataFrame(
        {
            "user_id": normalise_ids(raw, user_col, display, "user"),
            "item_id": normalise_ids(raw, item_col, display, "item"),
            "order_key": (
                parse_order_key(raw, time_col, display)
                if time_col
                else np.arange(len(raw), dtype=np.int64)
            ),
            "row": raw[ROW].to_numpy(),
        }
    )
    if feedback_col:
        frame["feedback"] = parse_feedback(raw, feedback_col, display, kind, value_range)

    raw_items = _read_table_file(items_path, [item_id_col, *text_cols], [item_id_col], encoding)
    items_display = str(items_path)
    items_frame = pd.DataFrame(
        {
            "item_id": normalise_ids(raw_items, item_id_col, items_display, "item"),
            "text": build_text(raw_items, text_cols),
            "row": raw_items[ROW].to_numpy(),
        }
    )
    check_unique_items(items_frame, items_display, item_id_col)
    check_items_known(frame, items_frame, display, items_display)

    info = {
        "type": "generic",
        "variant": "generic",
        "files": [
            {"role": "interactions", "name": interactions_path.name, "sha256": sha256_file(interactions_path)},
            {"role": "items", "name": items_path.name, "sha256": sha256_file(items_path)},
        ],
        "parameters": {
            "user_col": user_col,
            "item_col": item_col,
            "time_col": time_col,
            "item_id_col": item_id_col,
            "text_cols": list(text_cols),
            "encoding": encoding,
            "rating_col": rating_col,
            "label_col": label_col,
            "rating_range": list(value_range) if value_range else None,
        },
        "time_order": "timestamp" if time_col else "file_order",
    }
    if feedback_col:
        info["feedback"] = feedback_record(kind, feedback_col, frame["feedback"].to_numpy(), value_range)
    return frame, items_frame.drop(columns="row"), info
