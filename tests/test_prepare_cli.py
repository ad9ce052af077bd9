"""The ``prepare`` verb: argument parsing, summary line, exit codes without tracebacks."""

from __future__ import annotations

import argparse

import pytest

from llmrec_dist.cli import prepare as prepare_cli
from llmrec_dist.data import dataset_format


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llmrec-dist")
    prepare_cli.add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["prepare", *argv])
    return prepare_cli.run(args)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--source", "--output", "--input", "--overwrite", "--min-interactions", "--item-min-interactions",
                 "--user-hash-key", "--shards", "--seed", "--synthetic-users", "--synthetic-items",
                 "--interactions", "--items", "--user-col", "--item-col", "--time-col", "--item-id-col",
                 "--text-cols", "--encoding", "--sequences", "--items-col", "LLMREC_USER_HASH_KEY", "synthetic",
                 "movielens", "generic", "sequences"):
        assert flag in text


def test_synthetic_summary_and_refused_overwrite(tmp_path, capsys):
    out = tmp_path / "syn"
    assert run_cli("--source", "synthetic", "--output", str(out), "--synthetic-users", "120",
                   "--synthetic-items", "60", "--shards", "3", "--seed", "5") == 0
    summary = capsys.readouterr().out
    assert str(out) in summary and "120 users" in summary and " s:" in summary
    manifest = dataset_format.verify_dataset(out)
    assert len(manifest["shards"]["train"]) == 3 and manifest["source"]["parameters"]["seed"] == 5

    assert run_cli("--source", "synthetic", "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert run_cli("--source", "synthetic", "--output", str(out), "--overwrite") == 0


def test_generic_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "events.csv").write_text("u,i,t\n1,a,5\n1,b,noon\n")
    (tmp_path / "items.csv").write_text("sku,title,text\na,A,x\nb,B,y\n")
    code = run_cli("--source", "generic", "--output", str(tmp_path / "ds"), "--interactions",
                   str(tmp_path / "events.csv"), "--items", str(tmp_path / "items.csv"), "--user-col", "u",
                   "--item-col", "i", "--time-col", "t", "--item-id-col", "sku", "--text-cols", "title,text")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"llmrec-dist prepare: error: {tmp_path / 'events.csv'}:2: cannot parse timestamp "
                           "'noon' in column 't' (expected a number such as epoch seconds, or an ISO-8601 date/time)")
    assert not (tmp_path / "ds").exists()


def test_generic_success_with_text_cols(tmp_path, capsys):
    (tmp_path / "events.csv").write_text("u,i\n1,a\n1,b\n1,a\n")
    (tmp_path / "items.csv").write_text("sku,title,text\na,A,x\nb,B,y\n")
    code = run_cli("--source", "generic", "--output", str(tmp_path / "ds"), "--interactions",
                   str(tmp_path / "events.csv"), "--items", str(tmp_path / "items.csv"), "--user-col", "u",
                   "--item-col", "i", "--time-col", "", "--item-id-col", "sku", "--text-cols", "title, text",
                   "--min-interactions", "3", "--user-hash-key", "k")
    assert code == 0, capsys.readouterr().err
    assert dataset_format.read_items(tmp_path / "ds").column("text").to_pylist() == ["A. x", "B. y"]
    assert dataset_format.read_manifest(tmp_path / "ds")["split"]["time_order"] == "file_order"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "movielens"], "--input is required with --source movielens"),
        (["--source", "generic", "--items", "x.csv"], "--interactions is required with --source generic"),
        (["--source", "synthetic", "--input", "x"], "--input is only used with --source movielens"),
        (["--source", "movielens", "--input", "x", "--synthetic-users", "9"], "--synthetic-users is only used"),
    ],
)
def test_inconsistent_flags(tmp_path, capsys, argv, message):
    assert run_cli(*argv, "--output", str(tmp_path / "ds")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_bad_numbers_rejected_by_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--source", "synthetic", "--output", str(tmp_path / "ds"), "--min-interactions", "2")
    assert exit_info.value.code == 2
    assert "must be >= 3" in capsys.readouterr().err


def test_movielens_missing_input_exits_2(tmp_path, capsys):
    assert run_cli("--source", "movielens", "--input", str(tmp_path / "ml-1m.zip"), "--output", str(tmp_path / "ds")) == 2
    assert "input not found" in capsys.readouterr().err
