"""MovieLens source: every variant from tiny fake files in the real formats, plus the real data."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.movielens import read_movielens
from llmrec_dist.data.prepare import prepare_dataset

SHARED = Path("/work/shared/data/movielens")


def sequences(dataset) -> dict[str, list[str]]:
    """Full chronological sequence (original item ids) per user_idx, rebuilt from the test split."""
    id_of = {r["item_idx"]: r["item_id"] for r in dataset_format.read_items(dataset).to_pylist()}
    return {
        r["user_idx"]: [id_of[i] for i in r["items"]] + [id_of[r["target"]]]
        for r in dataset_format.read_split(dataset, "test").to_pylist()
    }


def ratings_of(dataset) -> dict[int, list[float]]:
    """Every user's ratings in time order (history, then the test target's), from the test split."""
    return {r["user_idx"]: r["feedback"] + [r["target_feedback"]]
            for r in dataset_format.read_split(dataset, "test", feedback=True).to_pylist()}


def texts(dataset) -> dict[str, str]:
    return {r["item_id"]: r["text"] for r in dataset_format.read_items(dataset).to_pylist()}


def test_ml100k_folder(tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    # user item rating timestamp, tab-separated, not in time order
    ratings = [(1, 1, 5, 30), (1, 2, 3, 10), (1, 3, 4, 20), (2, 3, 1, 5), (2, 1, 2, 7), (2, 2, 2, 6), (3, 1, 4, 1)]
    (folder / "u.data").write_bytes("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings).encode())
    flags = {1: [3, 4, 5], 2: [8], 3: []}  # Animation, Children's, Comedy / Drama / none
    titles = {1: "Toy Story (1995)", 2: "Misérables, Les (1995)", 3: "unknown"}
    lines = [
        f"{i}|{titles[i]}|01-Jan-1995||http://us.imdb.com/x|" + "|".join("1" if g in flags[i] else "0" for g in range(19))
        for i in (1, 2, 3)
    ]
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
              "War", "Western"]
    (folder / "u.genre").write_bytes(("".join(f"{g}|{n}\n" for n, g in enumerate(genres)) + "\n").encode())

    manifest = prepare_dataset("movielens", tmp_path / "ds", input=str(folder), min_interactions=3)
    assert manifest["source"]["variant"] == "ml-100k"
    assert manifest["counts"]["users"] == 2 and manifest["counts"]["raw_interactions"] == 7
    assert sequences(tmp_path / "ds") == {1: ["2", "3", "1"], 2: ["3", "2", "1"]}
    assert texts(tmp_path / "ds") == {
        "1": "Toy Story (1995). Genres: Animation, Children's, Comedy.",
        "2": "Misérables, Les (1995). Genres: Drama.",
        "3": "unknown.",
    }
    assert [f["name"] for f in manifest["source"]["files"]] == ["u.data", "u.genre", "u.item"]


ML1M_MOVIES = "1::Toy Story (1995)::Animation|Children's|Comedy\n73::Misérables, Les (1995)::Drama|Musical\n2::Jumanji (1995)::Adventure\n"


def test_ml1m_zip_with_top_level_folder(tmp_path):
    ratings = "1::73::5::978300760\n1::1::3::978300000\n1::2::4::978300500\n2::2::4::5\n2::1::4::5\n2::73::4::4\n"
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/", "")
        zf.writestr("ml-1m/ratings.dat", ratings.encode("latin-1"))
        zf.writestr("ml-1m/movies.dat", ML1M_MOVIES.encode("latin-1"))
        zf.writestr("ml-1m/README", "readme")
    manifest = prepare_dataset("movielens", tmp_path / "ds", input=str(archive), min_interactions=3)
    assert manifest["source"]["variant"] == "ml-1m" and manifest["source"]["folder"] == "ml-1m"
    assert manifest["split"]["time_order"] == "timestamp"
    assert len(manifest["source"]["archive_sha256"]) == 64
    # user 2: ties at t=5 keep file order (2 before 1)
    assert sequences(tmp_path / "ds") == {1: ["1", "2", "73"], 2: ["73", "2", "1"]}
    assert ratings_of(tmp_path / "ds") == {1: [3.0, 4.0, 5.0], 2: [4.0, 4.0, 4.0]}
    assert manifest["feedback"] == {"kind": "rating", "column": "Rating", "min": 1.0, "max": 5.0, "range": "declared"}
    assert texts(tmp_path / "ds")["73"] == "Misérables, Les (1995). Genres: Drama, Musical."
    assert list(tmp_path.iterdir()) != [] and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_ml1m_sasrec_sequences_use_file_order(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ml-1m-sequences.txt").write_text("1 73\n1 1\n1 2\n2 2\n2 73\n2 1\n")
    (folder / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    manifest = prepare_dataset("movielens", tmp_path / "ds", input=str(folder), min_interactions=3)
    assert manifest["source"]["variant"] == "ml-1m-sasrec"
    assert manifest["split"]["time_order"] == "file_order"
    assert sequences(tmp_path / "ds") == {1: ["73", "1", "2"], 2: ["2", "73", "1"]}
    assert manifest["feedback"] is None  # the SASRec sequences have no ratings
    with pytest.raises(dataset_format.DatasetError, match="feedback"):
        dataset_format.read_split(tmp_path / "ds", "test", feedback=True)


def test_ml_latest_crlf_quotes_tags(tmp_path):
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    ratings = "userId,movieId,rating,timestamp\r\n1,1,4.0,30\r\n1,2,3.5,10\r\n1,3,5.0,20\r\n"
    movies = (
        "movieId,title,genres\r\n1,Toy Story (1995),Adventure|Animation\r\n"
        '2,"American President, The (1995)",Comedy|Drama\r\n3,Crème brûlée (2001),(no genres listed)\r\n'
    )
    tag_rows = ["pixar", "pixar", "Pixar", "fun", "fun", "zany", "gamma", "beta", "alpha"]
    tags = "userId,movieId,tag,timestamp\r\n" + "".join(f"{n},1,{t},{n}\r\n" for n, t in enumerate(tag_rows))
    tags += '5,2,"politics, satire",9\r\n'
    for name, text in (("ratings.csv", ratings), ("movies.csv", movies), ("tags.csv", tags)):
        (folder / name).write_bytes(text.encode("utf-8"))
    manifest = prepare_dataset("movielens", tmp_path / "ds", input=str(folder), min_interactions=3)
    assert manifest["source"]["variant"] == "ml-latest-small"
    assert sequences(tmp_path / "ds") == {1: ["2", "3", "1"]}
    assert ratings_of(tmp_path / "ds") == {1: [3.5, 5.0, 4.0]}
    assert (manifest["feedback"]["min"], manifest["feedback"]["max"]) == (0.5, 5.0)  # half stars
    assert texts(tmp_path / "ds") == {
        "1": "Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, fun, alpha, beta, gamma.",
        "2": "American President, The (1995). Genres: Comedy, Drama. Tags: politics, satire.",
        "3": "Crème brûlée (2001).",
    }


def test_unrecognised_folder_lists_what_was_looked_for(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ratings.dat").write_text("1::1::1::1\n")
    with pytest.raises(PrepareError) as err:
        read_movielens(tmp_path / "data")
    message = str(err.value)
    for expected in ("ratings.dat + movies.dat (ml-1m)", "ml-1m-sequences.txt + movies.dat",
                     "u.data + u.item (ml-100k)", "ratings.csv + movies.csv (ml-latest)", "found: ratings.dat"):
        assert expected in message
    with pytest.raises(PrepareError, match="input not found"):
        read_movielens(tmp_path / "nowhere.zip")


@pytest.mark.parametrize(
    ("ratings", "expected"),
    [
        ("1::1::5::10\n1::2::5::11\n1::3::5::1O\n", r"ratings\.dat:3: cannot parse timestamp '1O'"),
        ("1::1::5::10\n1::2::5::11::7\n", r"ratings\.dat:2: expected 4 fields separated by '::', found 5"),
        ("1::1::5::10\n\n1::2::5\n", r"ratings\.dat:3: cannot parse timestamp ''"),
        ("1::1::5::10\n1::999::5::11\n", r"ratings\.dat:2: item id '999' is not in the items table"),
        ("1::1::5::10\n1::2::five::11\n", r"ratings\.dat:2: column 'Rating': 'five' is not a rating"),
        ("1::1::5::10\n1::2::6::11\n", r"ratings\.dat:2: column 'Rating': rating '6' is outside the declared range \[1, 5\]"),
        ("1::1::5::10\n1::2::nan::11\n", r"ratings\.dat:2: column 'Rating': 'nan' is not a rating"),
    ],
)
def test_malformed_ratings_dat(tmp_path, ratings, expected):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_bytes(ratings.encode("latin-1"))
    (folder / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    with pytest.raises(PrepareError, match=expected):
        prepare_dataset("movielens", tmp_path / "ds", input=str(folder))
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("name", "users", "items", "interactions"),
    [("ml-latest-small", 610, 9724, 100_836), ("ml-1m", 6040, 3416, 999_611)],
)
def test_real_movielens_published_counts(tmp_path, name, users, items, interactions):
    source = SHARED / name
    if not source.is_dir():
        pytest.skip(f"{source} not present")
    manifest = prepare_dataset("movielens", tmp_path / name, input=str(source))
    counts = manifest["counts"]
    assert (counts["users"], counts["items"], counts["interactions"]) == (users, items, interactions)
    assert counts["train_interactions"] == interactions - 2 * users
    if name == "ml-latest-small":
        assert manifest["feedback"] == {"kind": "rating", "column": "rating", "min": 0.5, "max": 5.0,
                                        "range": "declared"}
        values = dataset_format.read_split(tmp_path / name, "train", feedback=True).column("feedback")
        assert len(values.combine_chunks().flatten()) == counts["train_interactions"]
    if name == "ml-1m":
        assert manifest["source"]["variant"] == "ml-1m-sasrec"
        # user 1's last line in the sequences file is its test target
        last = [line.split()[1] for line in (source / "ml-1m-sequences.txt").read_text().splitlines()
                if line.split()[0] == "1"][-1]
        id_of = {r["item_idx"]: r["item_id"] for r in dataset_format.read_items(tmp_path / name).to_pylist()}
        assert id_of[dataset_format.read_split(tmp_path / name, "test").to_pylist()[0]["target"]] == last
