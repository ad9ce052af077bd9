"""User attributes for the fairness report: read at ``prepare`` time, written as ``users.parquet``.

Sources of attributes (all optional; no attributes → no ``users.parquet``):

- MovieLens ml-1m (``ratings.dat`` or the SASRec sequences): ``users.dat`` in the same folder,
  ``UserID::Gender::Age::Occupation::Zip-code``; the age code becomes its band (``1`` → ``"<18"``,
  ``18`` → ``"18-24"``, …, ``56`` → ``"56+"``) and the occupation code its name (``12`` → ``"programmer"``).
- MovieLens ml-100k: ``u.user``, ``user id | age | gender | occupation | zip code``; the age in years
  is put in the ml-1m bands so that both variants report the same groups.
- ``generic`` / ``sequences`` sources: ``--user-attrs FILE`` (CSV, TSV or Parquet with a header) with the
  user id in ``--user-col`` and the attributes in ``--user-attr-cols a,b``; values are kept as text
  (bin numeric attributes such as an age before, or every distinct value becomes a group).

Zip codes are never kept. Every reader returns a frame with ``user_id`` (raw id, as the interaction
readers normalise it, so it matches their ``user_id``) and one string column per attribute; a missing
value is null. The raw ids are replaced by the dataset's keyed ``user_key`` before anything is written
(:func:`users_table`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.generic import ROW, _read_table_file, check_encoding, normalise_ids, read_delimited

# ml-1m's age codes (README: "Age is chosen from the following ranges") and their labels.
AGE_BANDS = {1: "<18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
# ml-1m's occupation codes (README: "Occupation is chosen from the following choices").
OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)
MOVIELENS_ATTRIBUTES = ("gender", "age", "occupation")
USER_KEY = "user_key"


def age_band(years: int) -> str:
    """The ml-1m age band of an age in years: ``17`` → ``"<18"``, ``24`` → ``"18-24"``, ``60`` → ``"56+"``."""
    lower = max((code for code in AGE_BANDS if code <= years), default=1)
    return AGE_BANDS[lower]


def _bad_row(frame: pd.DataFrame, mask: np.ndarray) -> int:
    return int(frame[ROW].iloc[int(np.flatnonzero(mask)[0])])


def _check_unique_users(users: pd.Series, frame: pd.DataFrame, display: str) -> None:
    again = users.duplicated().to_numpy()
    if again.any():
        raise PrepareError(display, _bad_row(frame, again), f"user {users[again].iloc[0]!r} appears twice")


def _codes(frame: pd.DataFrame, column: str, display: str, allowed) -> pd.Series:
    """A column of integer codes, each one of ``allowed``; a ``PrepareError`` at the first bad row."""
    numbers = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = ~numbers.isin(list(allowed)).to_numpy()
    if bad.any():
        value = frame[column].iloc[int(np.flatnonzero(bad)[0])]
        raise PrepareError(display, _bad_row(frame, bad),
                           f"{column} {value!r} is not one of the documented codes {sorted(allowed)}")
    return numbers.astype(np.int64)


def _gender(frame: pd.DataFrame, column: str, display: str) -> pd.Series:
    values = frame[column].str.strip().str.upper()
    bad = ~values.isin(["M", "F"]).to_numpy()
    if bad.any():
        raise PrepareError(display, _bad_row(frame, bad),
                           f"gender {frame[column].iloc[int(np.flatnonzero(bad)[0])]!r} is not M or F")
    return values


def parse_users_dat(data: bytes, display: str) -> pd.DataFrame:
    """ml-1m ``users.dat`` → ``user_id``, ``gender`` (M/F), ``age`` (band), ``occupation`` (name)."""
    raw = read_delimited(data, display, sep="::", names=["UserID", "Gender", "Age", "Occupation", "Zip"],
                         encoding="latin-1", quoted=False)
    users = normalise_ids(raw, "UserID", display, "user")
    _check_unique_users(users, raw, display)
    ages = _codes(raw, "Age", display, AGE_BANDS)
    occupations = _codes(raw, "Occupation", display, range(len(OCCUPATIONS)))
    return pd.DataFrame({
        "user_id": users.to_numpy(),
        "gender": _gender(raw, "Gender", display).to_numpy(),
        "age": [AGE_BANDS[a] for a in ages],
        "occupation": [OCCUPATIONS[o] for o in occupations],
    })


def parse_u_user(data: bytes, display: str) -> pd.DataFrame:
    """ml-100k ``u.user`` → ``user_id``, ``gender`` (M/F), ``age`` (ml-1m band), ``occupation`` (as written)."""
    raw = read_delimited(data, display, sep="|", names=["user id", "age", "gender", "occupation", "zip code"],
                         encoding="latin-1", quoted=False)
    users = normalise_ids(raw, "user id", display, "user")
    _check_unique_users(users, raw, display)
    years = pd.to_numeric(raw["age"].str.strip(), errors="coerce")
    bad = (years.isna() | (years < 0) | (years % 1 != 0)).to_numpy()
    if bad.any():
        raise PrepareError(display, _bad_row(raw, bad), f"age {raw['age'].iloc[int(np.flatnonzero(bad)[0])]!r} "
                                                        "is not a whole number of years")
    occupation = raw["occupation"].str.strip()
    empty = (occupation == "").to_numpy()
    if empty.any():
        raise PrepareError(display, _bad_row(raw, empty), "empty occupation")
    return pd.DataFrame({
        "user_id": users.to_numpy(),
        "gender": _gender(raw, "gender", display).to_numpy(),
        "age": [age_band(int(y)) for y in years],
        "occupation": occupation.to_numpy(),
    })


# The users file of each MovieLens variant that has one (ml-latest has none).
MOVIELENS_USER_FILES = {"ml-1m": ("users.dat", parse_users_dat), "ml-1m-sasrec": ("users.dat", parse_users_dat),
                        "ml-100k": ("u.user", parse_u_user)}


def read_movielens_users(input: str | os.PathLike) -> tuple[pd.DataFrame | None, dict | None]:
    """``(attributes, info)`` of a MovieLens folder or ``.zip`` (its variant detected as the interaction
    reader does), or ``(None, None)`` when the variant has no users file or it is absent."""
    from llmrec_dist.data.movielens import _Container

    container = _Container(Path(input))
    try:
        folder, variant = container.detect()
        if variant not in MOVIELENS_USER_FILES:
            return None, None
        name, parse = MOVIELENS_USER_FILES[variant]
        if name not in container.dirs[folder]:
            return None, None
        display = container.display(folder, name)
        frame = parse(container.read(folder, name), display)
    finally:
        container.close()
    return frame, {"file": name, "columns": list(MOVIELENS_ATTRIBUTES)}


def parse_attr_cols(value: str | Sequence[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` → ``["a", "b"]``; a ``ValueError`` when empty or repeated."""
    cols = [c.strip() for c in (value.split(",") if isinstance(value, str) else value) if c.strip()]
    if not cols:
        raise ValueError("user_attr_cols must name at least one column of the user attributes file")
    if len(set(cols)) != len(cols):
        raise ValueError(f"user_attr_cols names a column twice: {', '.join(cols)}")
    return cols


def read_generic_users(path: str | os.PathLike, columns: str | Sequence[str], *, user_col: str = "user_id",
                       encoding: str = "utf-8") -> tuple[pd.DataFrame, dict]:
    """``(attributes, info)`` of a user attributes table (CSV, TSV or Parquet, by extension).

    One row per user (a repeated user id is a ``PrepareError`` naming the row); empty cells are null.
    """
    columns = parse_attr_cols(columns)
    if user_col in columns:
        raise ValueError(f"user_attr_cols must not include the user id column {user_col!r}")
    path = Path(path)
    display = str(path)
    raw = _read_table_file(path, [user_col, *columns], [user_col], check_encoding(encoding))
    users = normalise_ids(raw, user_col, display, "user")
    _check_unique_users(users, raw, display)
    frame = pd.DataFrame({"user_id": users.to_numpy()})
    for column in columns:
        frame[column] = pd.Series([None if v is None or v != v else _as_text(v) for v in raw[column].tolist()],
                                  dtype=object)
    return frame, {"file": path.name, "columns": columns}


def _as_text(value) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def users_table(attributes: pd.DataFrame, raw_users: np.ndarray, keys: list[str]) -> tuple[pa.Table, int]:
    """``(users.parquet table, users without attributes)``: one row per dataset user that has attributes,
    in the dataset's user order, ``user_key`` (``keys[i]`` of ``raw_users[i]``) then the attribute
    columns as strings. Raw ids are dropped here."""
    by_id = attributes.drop_duplicates("user_id").set_index("user_id")
    position = by_id.index.get_indexer(pd.Index(np.asarray(raw_users, dtype=object)))
    found = position >= 0
    columns = {USER_KEY: pa.array([k for k, f in zip(keys, found) if f], pa.string())}
    for column in by_id.columns:
        values = by_id[column].to_numpy(dtype=object)[position[found]]
        columns[column] = pa.array([None if v is None or v != v else str(v) for v in values], pa.string())
    return pa.table(columns), int((~found).sum())
