"""The ``movielens`` source: ml-100k, ml-1m, the SASRec ml-1m sequences, ml-latest(-small).

``input`` is a folder or an original ``.zip``; the files may sit at its top level or in one
subfolder (``ml-1m.zip`` holds ``ml-1m/ratings.dat``). Zips are read in memory, never
extracted. The variant is recognised by its files, tried in this order:

============  ==================================  ==========================================
variant       files                               notes
============  ==================================  ==========================================
ml-1m         ratings.dat + movies.dat            ``::``-separated, latin-1
ml-1m-sasrec  ml-1m-sequences.txt + movies.dat    "UserID MovieID" lines, file order = time
ml-100k       u.data + u.item (+ u.genre)         tab / ``|``-separated, latin-1
ml-latest     ratings.csv + movies.csv (+ tags)   UTF-8 CSV (CRLF fine), ``-small`` by name
============  ==================================  ==========================================

Every rating counts as an interaction (implicit feedback, as in SASRec), and the rating itself is kept
as the dataset's explicit feedback (1-5 stars in ml-100k and ml-1m, 0.5-5 in half stars in ml-latest;
the SASRec ml-1m sequences have none). Item text is
``"Toy Story (1995). Genres: Animation, Children's, Comedy."``, plus ``" Tags: a, b."`` with
up to five of the most frequent tags when ``tags.csv`` exists.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.dataset_format import sha256_file
from llmrec_dist.data.generic import (
    ROW,
    check_items_known,
    check_unique_items,
    feedback_record,
    normalise_ids,
    parse_feedback,
    parse_order_key,
    read_delimited,
    require_columns,
)

VARIANTS = (
    ("ml-1m", ("ratings.dat", "movies.dat")),
    ("ml-1m-sasrec", ("ml-1m-sequences.txt", "movies.dat")),
    ("ml-100k", ("u.data", "u.item")),
    ("ml-latest", ("ratings.csv", "movies.csv")),
)
ITEM_FILES = {variant: required[1] for variant, required in VARIANTS}
# The genre flags of ml-100k's u.item, in column order, used when u.genre is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)
MAX_TAGS = 5
# The rating column and its documented range, per variant that has ratings.
RATINGS = {
    "ml-1m": ("Rating", (1.0, 5.0)),
    "ml-100k": ("rating", (1.0, 5.0)),
    "ml-latest": ("rating", (0.5, 5.0)),
}
STAR_RATINGS = RATINGS["ml-1m"][1]
HALF_STAR_RATINGS = RATINGS["ml-latest"][1]


class _Container:
    """A folder or a zip archive, seen as directories (top level and depth one) of files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.archive: zipfile.ZipFile | None = None
        self.dirs: dict[str, dict[str, str]] = {}
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file():
                    self.dirs.setdefault("", {})[child.name] = str(child)
                elif child.is_dir():
                    for grandchild in sorted(child.iterdir()):
                        if grandchild.is_file():
                            self.dirs.setdefault(child.name, {})[grandchild.name] = str(grandchild)
        elif path.is_file() and zipfile.is_zipfile(path):
            self.archive = zipfile.ZipFile(path)
            for name in self.archive.namelist():
                parts = name.split("/")
                if name.endswith("/") or len(parts) > 2 or parts[0] == "__MACOSX":
                    continue
                folder = parts[0] if len(parts) == 2 else ""
                self.dirs.setdefault(folder, {})[parts[-1]] = name
        elif path.exists():
            raise PrepareError(str(path), None, "not a folder or a .zip archive of MovieLens data")
        else:
            raise PrepareError(str(path), None, "input not found")

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def display(self, folder: str, name: str) -> str:
        return str(self.path / self.dirs[folder][name]) if self.archive else self.dirs[folder][name]

    def read(self, folder: str, name: str) -> bytes:
        location = self.dirs[folder][name]
        if self.archive is not None:
            return self.archive.read(location)
        return Path(location).read_bytes()

    def detect(self) -> tuple[str, str]:
        """``(folder, variant)`` of the first variant whose files are all present."""
        matches = [
            (folder, variant)
            for folder in sorted(self.dirs, key=lambda f: (f != "", f))
            for variant, required in VARIANTS
            if all(name in self.dirs[folder] for name in required)
        ]
        top = [m for m in matches if m[0] == ""]
        if top:
            return top[0]
        folders = sorted({folder for folder, _ in matches})
        if len(folders) > 1:
            raise PrepareError(
                str(self.path), None,
                f"several MovieLens folders found ({', '.join(folders)}); point --input at one of them",
            )
        if matches:
            return matches[0]
        looked_for = "; ".join(f"{' + '.join(req)} ({variant})" for variant, req in VARIANTS)
        present = sorted({name for files in self.dirs.values() for name in files})
        raise PrepareError(
            str(self.path), None,
            f"no MovieLens variant recognised; looked for {looked_for}, at the top level and "
            f"in immediate subfolders; found: {', '.join(present[:20]) or 'no files'}",
        )


class _Reader:
    """Reads the files of one detected variant and records their sha256."""

    def __init__(self, container: _Container, folder: str) -> None:
        self.container = container
        self.folder = folder
        self.files: list[dict] = []

    def has(self, name: str) -> bool:
        return name in self.container.dirs[self.folder]

    def display(self, name: str) -> str:
        return self.container.display(self.folder, name)

    def read(self, name: str) -> bytes:
        data = self.container.read(self.folder, name)
        self.files.append({"name": name, "sha256": hashlib.sha256(data).hexdigest()})
        return data


def _interactions(raw: pd.DataFrame, display: str, user: str, item: str, time: str | None,
                  rating: str | None = None, rating_range: tuple[float, float] | None = None) -> pd.DataFrame:
    require_columns(raw, display, [c for c in (user, item, time, rating) if c])
    frame = pd.DataFrame(
        {
            "user_id": normalise_ids(raw, user, display, "user"),
            "item_id": normalise_ids(raw, item, display, "item"),
            "order_key": parse_order_key(raw, time, display) if time else np.arange(len(raw), dtype=np.int64),
            "row": raw[ROW].to_numpy(),
        }
    )
    if rating:
        frame["feedback"] = parse_feedback(raw, rating, display, "rating", rating_range)
    return frame


def movie_text(title: str, genres: list[str], tags: list[str] | None = None) -> str:
    """``"Toy Story (1995). Genres: Animation, Comedy."`` (+ ``" Tags: pixar, fun."``)."""
    title = title.strip()
    text = title if title.endswith((".", "!", "?")) else f"{title}."
    if genres:
        text += f" Genres: {', '.join(genres)}."
    if tags:
        text += f" Tags: {', '.join(tags)}."
    return text


def _items(ids: pd.Series, texts: list[str], rows: np.ndarray, display: str, id_col: str) -> pd.DataFrame:
    items = pd.DataFrame({"item_id": ids, "text": pd.Series(texts, dtype=object), "row": rows})
    check_unique_items(items, display, id_col)
    return items


def _split_genres(values: pd.Series) -> list[list[str]]:
    return [
        [g.strip() for g in value.split("|") if g.strip() and g.strip() != "(no genres listed)"]
        for value in values
    ]


def _movies_dat(reader: _Reader) -> pd.DataFrame:
    display = reader.display("movies.dat")
    raw = read_delimited(
        reader.read("movies.dat"), display, sep="::", names=["MovieID", "Title", "Genres"],
        encoding="latin-1", quoted=False,
    )
    ids = normalise_ids(raw, "MovieID", display, "movie")
    texts = [movie_text(t, g) for t, g in zip(raw["Title"], _split_genres(raw["Genres"]))]
    return _items(ids, texts, raw[ROW].to_numpy(), display, "MovieID")


def _read_ml1m(reader: _Reader) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    display = reader.display("ratings.dat")
    raw = read_delimited(
        reader.read("ratings.dat"), display, sep="::",
        names=["UserID", "MovieID", "Rating", "Timestamp"], encoding="latin-1", quoted=False,
    )
    interactions = _interactions(raw, display, "UserID", "MovieID", "Timestamp", "Rating", STAR_RATINGS)
    return interactions, _movies_dat(reader), display


def _read_ml1m_sasrec(reader: _Reader) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    display = reader.display("ml-1m-sequences.txt")
    raw = read_delimited(
        reader.read("ml-1m-sequences.txt"), display, sep=" ", names=["UserID", "MovieID"],
        encoding="latin-1", quoted=False,
    )
    interactions = _interactions(raw, display, "UserID", "MovieID", None)
    return interactions, _movies_dat(reader), display


def _read_ml100k(reader: _Reader) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    display = reader.display("u.data")
    raw = read_delimited(
        reader.read("u.data"), display, sep="\t", names=["user id", "item id", "rating", "timestamp"],
        encoding="latin-1", quoted=False,
    )
    interactions = _interactions(raw, display, "user id", "item id", "timestamp", "rating", STAR_RATINGS)

    genres = list(ML100K_GENRES)
    if reader.has("u.genre"):
        genre_display = reader.display("u.genre")
        table = read_delimited(
            reader.read("u.genre"), genre_display, sep="|", names=["genre", "index"],
            encoding="latin-1", quoted=False,
        )
        genres = table["genre"].tolist()
    item_display = reader.display("u.item")
    columns = ["movie id", "movie title", "release date", "video release date", "IMDb URL", *genres]
    raw_items = read_delimited(
        reader.read("u.item"), item_display, sep="|", names=columns, encoding="latin-1", quoted=False,
    )
    flags = raw_items[genres].to_numpy() == "1"
    texts = [
        movie_text(title, [g for g, on in zip(genres, row) if on and g != "unknown"])
        for title, row in zip(raw_items["movie title"], flags)
    ]
    ids = normalise_ids(raw_items, "movie id", item_display, "movie")
    return interactions, _items(ids, texts, raw_items[ROW].to_numpy(), item_display, "movie id"), display


def _top_tags(reader: _Reader) -> dict[str, list[str]]:
    """Per movieId, up to ``MAX_TAGS`` distinct tags (case-insensitive), most frequent first."""
    display = reader.display("tags.csv")
    raw = read_delimited(reader.read("tags.csv"), display, sep=",")
    require_columns(raw, display, ["movieId", "tag"])
    tags = pd.DataFrame(
        {"movie": normalise_ids(raw, "movieId", display, "movie"), "tag": raw["tag"].str.strip()}
    )
    tags = tags[(tags["tag"] != "").to_numpy()]
    tags["key"] = tags["tag"].str.lower()
    # Display form of a tag: its most frequent spelling (ties: alphabetical).
    forms = tags.groupby(["movie", "key", "tag"], sort=False).size().reset_index(name="n")
    forms = forms.sort_values(["movie", "key", "n", "tag"], ascending=[True, True, False, True])
    forms = forms.drop_duplicates(["movie", "key"])
    counts = tags.groupby(["movie", "key"], sort=False).size().reset_index(name="count")
    ranked = counts.merge(forms[["movie", "key", "tag"]], on=["movie", "key"])
    ranked = ranked.sort_values(["movie", "count", "key"], ascending=[True, False, True])
    ranked = ranked.groupby("movie", sort=False).head(MAX_TAGS)
    top: dict[str, list[str]] = {}
    for movie, tag in zip(ranked["movie"], ranked["tag"]):
        top.setdefault(movie, []).append(tag)
    return top


def _read_ml_latest(reader: _Reader) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    display = reader.display("ratings.csv")
    raw = read_delimited(reader.read("ratings.csv"), display, sep=",")
    interactions = _interactions(raw, display, "userId", "movieId", "timestamp", "rating", HALF_STAR_RATINGS)

    movie_display = reader.display("movies.csv")
    movies = read_delimited(reader.read("movies.csv"), movie_display, sep=",")
    require_columns(movies, movie_display, ["movieId", "title", "genres"])
    ids = normalise_ids(movies, "movieId", movie_display, "movie")
    tags = _top_tags(reader) if reader.has("tags.csv") else {}
    texts = [
        movie_text(title, genres, tags.get(movie))
        for movie, title, genres in zip(ids, movies["title"], _split_genres(movies["genres"]))
    ]
    return interactions, _items(ids, texts, movies[ROW].to_numpy(), movie_display, "movieId"), display


_READERS = {
    "ml-1m": _read_ml1m,
    "ml-1m-sasrec": _read_ml1m_sasrec,
    "ml-100k": _read_ml100k,
    "ml-latest": _read_ml_latest,
}


def read_movielens(input: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Read a MovieLens folder or ``.zip``; returns ``(interactions, items, info)``.

    Raises ``PrepareError`` naming the file and line for malformed data, and listing the
    files looked for when no variant is recognised.
    """
    path = Path(input)
    container = _Container(path)
    try:
        folder, variant = container.detect()
        reader = _Reader(container, folder)
        interactions, items, display = _READERS[variant](reader)
        check_items_known(interactions, items, display, reader.display(ITEM_FILES[variant]))
    finally:
        container.close()
    name = folder or (path.stem if container.archive is not None else path.name)
    if variant == "ml-latest" and "small" in name.lower():
        variant = "ml-latest-small"
    info = {
        "type": "movielens",
        "variant": variant,
        "input": path.name,
        "folder": folder,
        "files": reader.files,
        "parameters": {},
        "time_order": "file_order" if variant == "ml-1m-sasrec" else "timestamp",
    }
    if container.archive is not None:
        info["archive_sha256"] = sha256_file(path)
    if "feedback" in interactions:
        column, value_range = RATINGS[variant.removesuffix("-small")]
        info["feedback"] = feedback_record("rating", column, interactions["feedback"].to_numpy(), value_range)
    return interactions, items.drop(columns="row"), info

