"""User attributes: users.dat, u.user and generic tables read by hand-written files; users.parquet written by
prepare (keyed by user_key, outside the content hash, absent without attributes)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from llmrec_dist.cli import main
from llmrec_dist.data import dataset_format
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import prepare_dataset
from llmrec_dist.data.user_attributes import (
    age_band,
    parse_u_user,
    parse_users_dat,
    read_generic_users,
    read_movielens_users,
)

USERS_DAT = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|writer|32067\n"


def test_users_dat_codes_become_labels():
    frame = parse_users_dat(USERS_DAT.encode("latin-1"), "users.dat")
    assert frame.to_dict("list") == {
        "user_id": ["1", "2", "3"], "gender": ["F", "M", "M"], "age": ["<18", "56+", "25-34"],
        "occupation": ["K-12 student", "self-employed", "scientist"],
    }


@pytest.mark.parametrize("line, problem", [
    ("4::M::30::1::x", "users.dat:4: Age '30' is not one of the documented codes"),
    ("4::M::25::21::x", "users.dat:4: Occupation '21' is not one of"),
    ("4::X::25::1::x", "users.dat:4: gender 'X' is not M or F"),
    ("1::M::25::1::x", "users.dat:4: user '1' appears twice"),
])
def test_users_dat_errors_name_the_line(line, problem):
    with pytest.raises(PrepareError) as err:
        parse_users_dat((USERS_DAT + line + "\n").encode(), "users.dat")
    assert str(err.value).startswith(problem)


def test_u_user_ages_fall_in_the_ml1m_bands():
    frame = parse_u_user(U_USER.encode(), "u.user")
    assert frame["age"].tolist() == ["18-24", "50-55", "<18"]
    assert frame["gender"].tolist() == ["M", "F", "M"] and frame["occupation"].tolist()[0] == "technician"
    assert [age_band(y) for y in (0, 17, 18, 44, 45, 49, 50, 56, 90)] == [
        "<18", "<18", "18-24", "35-44", "45-49", "45-49", "50-55", "56+", "56+"]
    with pytest.raises(PrepareError, match="u.user:2: age 'x'"):
        parse_u_user(b"1|24|M|technician|1\n2|x|F|other|2\n", "u.user")


def test_generic_table(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text("user_id,segment,region,score\nu1,gold,north,3\nu2,,south,4\nu3,silver,north,5\n")
    frame, info = read_generic_users(path, "segment, region", user_col="user_id")
    assert frame.to_dict("list") == {"user_id": ["u1", "u2", "u3"], "segment": ["gold", None, "silver"],
                                     "region": ["north", "south", "north"]}
    assert info == {"file": "users.csv", "columns": ["segment", "region"]}
    with pytest.raises(PrepareError, match="missing column"):
        read_generic_users(path, "tier")
    path.write_text("user_id,segment\nu1,a\nu1,b\n")
    with pytest.raises(PrepareError, match="users.csv:2: user 'u1' appears twice"):
        read_generic_users(path, ["segment"])
    with pytest.raises(ValueError, match="at least one"):
        read_generic_users(path, " , ")


INTERACTIONS = "user_id,item_id,timestamp\n" + "".join(
    f"{u},{i},{t}\n" for u in ("u1", "u2", "u3", "u4") for t, i in enumerate(("a", "b", "c", "d")))


def _generic(tmp_path):
    (tmp_path / "inter.csv").write_text(INTERACTIONS)
    (tmp_path / "items.csv").write_text("item_id,text\na,A\nb,B\nc,C\nd,D\n")
    (tmp_path / "users.csv").write_text("user_id,segment\nu1,gold\nu2,silver\nu3,gold\nu9,x\n")
    return {"interactions": str(tmp_path / "inter.csv"), "items": str(tmp_path / "items.csv")}


def test_prepare_writes_users_parquet_keyed_by_user_key(tmp_path):
    files = _generic(tmp_path)
    plain = prepare_dataset("generic", tmp_path / "plain", generic=files, min_interactions=3, user_hash_key="k")
    manifest = prepare_dataset("generic", tmp_path / "ds", generic=files, min_interactions=3, user_hash_key="k",
                               user_attributes={"file": str(tmp_path / "users.csv"), "columns": ["segment"]})
    assert manifest["content_hash"] == plain["content_hash"]  # attributes leave the hash (and models) alone
    assert plain["user_attributes"] is None and not (tmp_path / "plain" / "users.parquet").exists()
    assert manifest["user_attributes"] == {"file": "users.parquet", "source_file": "users.csv",
                                           "columns": ["segment"], "users": 3, "users_without": 1}
    users = pq.read_table(tmp_path / "ds" / "users.parquet")
    assert users.column_names == ["user_key", "segment"]
    keys = dataset_format.read_split(tmp_path / "ds", "train").column("user_key").to_pylist()  # u1..u4
    assert users.to_pylist() == [{"user_key": keys[0], "segment": "gold"}, {"user_key": keys[1], "segment": "silver"},
                                 {"user_key": keys[2], "segment": "gold"}]
    assert "u1" not in (tmp_path / "ds" / "users.parquet").read_bytes().decode("latin-1")  # raw ids not written
    assert dataset_format.read_users(tmp_path / "ds").num_rows == 3
    assert dataset_format.read_users(tmp_path / "plain") is None
    dataset_format.verify_dataset(tmp_path / "ds")


def test_movielens_users_file_is_optional(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    ratings = "".join(f"{u}::{m}::4::{u * 100 + t}\n" for u in (1, 2, 3) for t, m in enumerate((10, 20, 30, 40)))
    (folder / "ratings.dat").write_text(ratings)
    (folder / "movies.dat").write_text("10::A (1990)::Drama\n20::B (1991)::Comedy\n30::C::Drama\n40::D::Drama\n")
    assert read_movielens_users(folder) == (None, None)
    without = prepare_dataset("movielens", tmp_path / "without", input=str(folder), min_interactions=3)
    (folder / "users.dat").write_text(USERS_DAT)
    frame, info = read_movielens_users(folder)
    assert info == {"file": "users.dat", "columns": ["gender", "age", "occupation"]} and len(frame) == 3
    manifest = prepare_dataset("movielens", tmp_path / "with", input=str(folder), min_interactions=3)
    assert manifest["content_hash"] == without["content_hash"]
    assert not (tmp_path / "without" / "users.parquet").exists()
    assert dataset_format.read_users(tmp_path / "with").column("age").to_pylist() == ["<18", "56+", "25-34"]


def test_prepare_cli_user_attrs_flags(tmp_path, capsys):
    files = _generic(tmp_path)
    base = ["prepare", "--source", "generic", "--interactions", files["interactions"], "--items", files["items"],
            "--min-interactions", "3"]
    assert main(base + ["--output", str(tmp_path / "a"), "--user-attrs", str(tmp_path / "users.csv")]) == 2
    assert "--user-attrs and --user-attr-cols go together" in capsys.readouterr().err
    assert main(["prepare", "--source", "synthetic", "--output", str(tmp_path / "s"), "--user-attr-cols", "x"]) == 2
    assert "only used with --source generic or sequences" in capsys.readouterr().err
    assert main(base + ["--output", str(tmp_path / "b"), "--user-attrs", str(tmp_path / "users.csv"),
                        "--user-attr-cols", "segment"]) == 0
    assert "user attributes: segment for 3 users (1 without) in users.parquet" in capsys.readouterr().out
