"""Bad input, nothing lost: every hostile input gets a clear error naming the file / dotted key / row,
no traceback, no partial output, no registry change, and the Ray cluster survives.

One test per area, parametrised over the hostile variants:

- prepared datasets: truncated / garbage / missing / wrong-schema shards, a manifest whose hash does not
  match, a manifest listing ``../../etc/passwd`` (or an absolute path, a URI), manifests of the wrong
  types, not JSON, not UTF-8;
- ``prepare`` input: non-UTF-8 CSV text (and ``--encoding``), damaged Parquet, nested-typed ids, an
  output below a file; the real ml-1m ``movies.dat`` (latin-1) reads right;
- configs: wrong types, unknown keys, Python-object YAML tags, names that would climb out of a folder
  or inject lines (``mlflow.registered_model``, ``mlflow.run_name``, ``mlflow.alias``, ``search.name``);
- the recommender / pyfunc / CLI: histories of ints, None, dicts, nested lists; k of -1, 0, 'ten',
  larger than the catalogue; a 10^6-item history; damaged packages and catalogues;
- training: a dataset failing its hash, and (Ray) a corrupt shard with ``data.verify_hash=false``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec_dist.cli import main as cli_main
from llmrec_dist.config import ConfigError, load_config
from llmrec_dist.data import dataset_format
from llmrec_dist.data.dataset_format import DatasetError
from llmrec_dist.data.errors import PrepareError
from llmrec_dist.registry.recommender import Recommender, UnknownItemWarning
from registry_fixtures import NUM_ITEMS, item_id, make_package, write_tiny_checkpoint
from mlflow_db import sqlite_uri

MODEL_NAME = "hostile-rec"
SHARED_ML1M = Path("/work/shared/data/movielens/ml-1m")
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
E_ACUTE = "\u00e9".encode("latin-1")  # b"\xe9": "é" in latin-1, never valid alone in UTF-8


# ---------------------------------------------------------------------------------------------- helpers
def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``llmrec-dist ARGV`` in this process (the console script's ``main``): (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = cli_main(list(argv))
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    return code, capsys.readouterr().err


def run_cli_process(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``llmrec-dist ARGV`` as a user runs it: a new process."""
    return subprocess.run([sys.executable, "-m", "llmrec_dist.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def error_line(stderr: str, verb: str) -> str:
    """The one error line of a failed command (log lines aside); no traceback allowed."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"llmrec-dist {verb}")]
    assert len(lines) == 1, stderr
    return lines[0]


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (hidden temporaries included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def registry_state(uri: str) -> dict:
    """Every registered model's versions (with tags) and aliases."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    state = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name='{model.name}'")
        state[model.name] = {"versions": sorted((v.version, v.run_id, tuple(sorted(v.tags.items())))
                                                for v in versions),
                             "aliases": dict(model.aliases)}
    return state


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow store (SQLite) with one registered version of a tiny package holding ``champion``."""
    from llmrec_dist.registry.promotion import register_and_promote
    from llmrec_dist.registry.pyfunc import log_model_package
    from llmrec_dist.tracking import end_run, start_run

    root = tmp_path_factory.mktemp("registry")
    package = make_package(root)
    uri = sqlite_uri(root / 'mlflow.db')
    run_id = start_run(uri, "hostile", run_name="seed")
    model_uri = log_model_package(package, uri, run_id)
    content_hash = json.loads((package / "manifest.json").read_text())["content_hash"]
    register_and_promote(uri, run_id, model_uri, MODEL_NAME, "champion", "valid_ndcg_at_10", 0.5, content_hash)
    end_run(uri, run_id)
    state = registry_state(uri)
    assert list(state[MODEL_NAME]["aliases"]) == ["champion"]
    return {"uri": uri, "root": root, "package": package, "state": state}


@pytest.fixture(scope="module")
def rec(registry):
    return Recommender.from_folder(registry["package"])


@pytest.fixture
def dataset(synthetic_dataset, tmp_path):
    """A private copy of the session's synthetic dataset, to damage."""
    return Path(shutil.copytree(synthetic_dataset, tmp_path / "dataset"))


# ============================================================================ prepared datasets
def _truncate(folder: Path) -> None:
    shard = folder / "train" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _garbage(folder: Path) -> None:
    (folder / "valid" / "part-00001.parquet").write_bytes(np.random.default_rng(0).bytes(4096))


def _missing(folder: Path) -> None:
    (folder / "test" / "part-00000.parquet").unlink()


def _garbage_items(folder: Path) -> None:
    (folder / "items.parquet").write_bytes(b"PAR1 not really parquet PAR1")


def _wrong_schema(folder: Path) -> None:
    pq.write_table(pa.table({"user": ["a"], "stuff": [1]}), folder / "train" / "part-00001.parquet")


def _hash_mismatch(folder: Path) -> None:
    shard = folder / "test" / "part-00000.parquet"
    table = pq.read_table(shard)
    targets = table.column("target").to_numpy().copy()
    targets[0] = targets[0] % 80 + 1 if targets[0] != targets[0] % 80 + 1 else targets[0] - 1
    pq.write_table(table.set_column(table.column_names.index("target"), "target", pa.array(targets)), shard)


def _edit_manifest(**changes):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        for key, value in changes.items():
            if key.startswith("shards_"):
                manifest["shards"][key[len("shards_"):]] = value
            else:
                manifest[key] = value
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _manifest_bytes(data: bytes):
    def edit(folder: Path) -> None:
        (folder / "manifest.json").write_bytes(data)
    return edit


def _manifest_latin1(folder: Path) -> None:
    text = (folder / "manifest.json").read_bytes()
    (folder / "manifest.json").write_bytes(text.replace(b'"synthetic"', b'"synth\xe9tic"', 1))


# name -> (damage, expected error type, message fragment (regex), detected by check_files too)
DATASET_CASES = {
    "truncated_shard": (_truncate, DatasetError,
                        r"train/part-00000\.parquet: not a readable Parquet file \(Parquet magic bytes", True),
    "garbage_shard": (_garbage, DatasetError, r"valid/part-00001\.parquet: not a readable Parquet file", True),
    "missing_shard": (_missing, FileNotFoundError, r"test/part-00000\.parquet: missing; the dataset is damaged", True),
    "garbage_items": (_garbage_items, DatasetError, r"items\.parquet: not a readable Parquet file", True),
    "wrong_schema_shard": (_wrong_schema, DatasetError,
                           r"train/part-00001\.parquet: does not have the train schema", True),
    "hash_mismatch": (_hash_mismatch, DatasetError,
                      r"does not match its manifest: manifest content_hash sha256:\w+, files hash to sha256:", False),
    "manifest_traversal": (_edit_manifest(shards_train=["../../../../etc/passwd"]), DatasetError,
                           r"shards\.train\[0\]: '\.\./\.\./\.\./\.\./etc/passwd' is not a Parquet file inside "
                           r"the train/ folder", True),
    "manifest_inner_traversal": (_edit_manifest(shards_valid=["valid/../../../x.parquet"]), DatasetError,
                                 r"shards\.valid\[0\]: 'valid/\.\./\.\./\.\./x\.parquet' is not a Parquet file", True),
    "manifest_absolute_path": (_edit_manifest(shards_test=["/etc/passwd"]), DatasetError,
                               r"shards\.test\[0\]: '/etc/passwd' is not a Parquet file inside the test/ folder", True),
    "manifest_uri": (_edit_manifest(shards_train=["s3://bucket/part.parquet"]), DatasetError,
                     r"shards\.train\[0\]: 's3://bucket/part\.parquet' is not a Parquet file", True),
    "manifest_wrong_types": (_edit_manifest(counts="many", shards_test="test/part-00000.parquet"),
                             DatasetError,
                             r"counts: expected an object, got str; shards\.test: expected a list of part files", True),
    "manifest_not_json": (_manifest_bytes(b"{not json"), DatasetError, r"manifest\.json: not valid JSON", True),
    "manifest_not_object": (_manifest_bytes(b"[1, 2]"), DatasetError,
                            r"manifest\.json: expected a JSON object, got list", True),
    "manifest_not_utf8": (_manifest_latin1, DatasetError, r"manifest\.json: not UTF-8 text \(byte offset \d+", True),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_damaged_dataset_is_named_and_left_alone(dataset, case):
    damage, error, message, cheap_check_sees_it = DATASET_CASES[case]
    damage(dataset)
    before = listing(dataset)
    with pytest.raises(error, match=message):
        dataset_format.verify_dataset(dataset)
    if cheap_check_sees_it:  # the footer-only check for data.verify_hash=false
        with pytest.raises(error, match=message):
            dataset_format.check_files(dataset)
    else:
        dataset_format.check_files(dataset)
    assert listing(dataset) == before  # reading never writes


@pytest.mark.parametrize("case, workers", [("truncated_shard", "1"), ("missing_shard", "1"), ("hash_mismatch", "1"),
                                           ("manifest_traversal", "1"), ("garbage_shard", "2")])
def test_evaluate_cli_refuses_a_damaged_dataset(dataset, tmp_path, capsys, case, workers):
    """Refused on the driver, before any Ray worker would start (``--workers 2``)."""
    damage, _, message, _ = DATASET_CASES[case]
    manifest = dataset_format.read_manifest(dataset)
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt", manifest["content_hash"],
                                       num_items=manifest["counts"]["items"])
    damage(dataset)
    before = listing(tmp_path)
    code, err = run_cli(capsys, "evaluate", "--model", str(checkpoint), "--data", str(dataset), "--workers", workers)
    assert code == 2
    line = error_line(err, "evaluate")
    assert re.search(message, line), line
    assert listing(tmp_path) == before


def test_manifest_traversal_never_reads_outside(dataset, tmp_path):
    """A listed ``../secret.parquet`` that exists and is valid Parquet is still refused, unread."""
    secret = dataset.parent / "secret.parquet"
    pq.write_table(dataset_format.TRAIN_SCHEMA.empty_table(), secret)
    _edit_manifest(shards_train=["train/../../secret.parquet"])(dataset)
    with pytest.raises(DatasetError, match=r"not a Parquet file inside the train/ folder"):
        dataset_format.split_files(dataset, "train")
    with pytest.raises(DatasetError, match=r"not a Parquet file inside the train/ folder"):
        dataset_format.read_split(dataset, "train")


# ============================================================================ prepare input
def _generic_files(folder: Path, item_text: bytes = b"Cafe") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    events = "user_id,item_id,timestamp\n" + "".join(f"u{u},i{i},{u * 100 + i}\n" for u in range(4) for i in range(5))
    (folder / "events.csv").write_text(events)
    items = b"item_id,text\n" + b"".join(f"i{i},Item {i}\n".encode() for i in range(5))
    (folder / "items.csv").write_bytes(items.replace(b"Item 3", item_text + b" 3"))
    return folder / "events.csv", folder / "items.csv"


def _generic_args(events: Path, items: Path, output: Path, *extra: str) -> list[str]:
    return ["prepare", "--source", "generic", "--interactions", str(events), "--items", str(items),
            "--min-interactions", "3", "--output", str(output), *extra]


def test_prepare_non_utf8_csv_names_file_row_and_offset(tmp_path, capsys):
    events, items = _generic_files(tmp_path / "in", item_text="Caf\u00e9".encode("latin-1"))
    offset = items.read_bytes().index(E_ACUTE)
    code, err = run_cli(capsys, *_generic_args(events, items, tmp_path / "out"))
    assert code == 2
    line = error_line(err, "prepare")
    assert f"{items}:4: not valid utf-8 text at byte offset {offset}: b'\\xe9'" in line
    assert "--encoding latin-1" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no .out.tmp-* left

    # The suggested fix works: the text arrives intact.
    code, _ = run_cli(capsys, *_generic_args(events, items, tmp_path / "out", "--encoding", "latin-1"))
    assert code == 0
    texts = dataset_format.read_items(tmp_path / "out").column("text").to_pylist()
    assert "Caf\u00e9 3" in texts
    assert dataset_format.read_manifest(tmp_path / "out")["source"]["parameters"]["encoding"] == "iso8859-1"


def test_prepare_non_utf8_far_into_a_big_file_is_located_exactly(tmp_path):
    """pandas decodes in chunks; the reported row and offset are those of the whole file."""
    from llmrec_dist.data.generic import read_generic

    events, _ = _generic_files(tmp_path)
    body = "".join(f"i{i},Item {i} {'x' * 200}\n" for i in range(20_000)).encode()
    data = b"item_id,text\n" + body.replace(b"Item 15000 ", "Caf\u00e9 ".encode("latin-1"))
    (tmp_path / "big.csv").write_bytes(data)
    with pytest.raises(PrepareError, match=rf"big\.csv:15001: not valid utf-8 text at byte offset "
                                           rf"{data.index(E_ACUTE)}:"):
        read_generic(events, tmp_path / "big.csv")


def _parquet_events(folder: Path, **columns) -> Path:
    base = {"user_id": [f"u{u}" for u in range(4) for _ in range(5)],
            "item_id": [f"i{i}" for _ in range(4) for i in range(5)],
            "timestamp": list(range(20))}
    path = folder / "events.parquet"
    pq.write_table(pa.table({**base, **columns}), path)
    return path


def _truncated_parquet(folder: Path) -> Path:
    path = _parquet_events(folder)
    path.write_bytes(path.read_bytes()[:40])
    return path


PREPARE_CASES = {
    "truncated_parquet_input": (_truncated_parquet, r"events\.parquet: cannot read Parquet file"),
    "list_typed_item_ids": (
        lambda d: _parquet_events(d, item_id=[[f"i{i}"] for _ in range(4) for i in range(5)]),
        r"events\.parquet: column 'item_id' has Parquet type list<.*>; expected strings"),
    "struct_typed_user_ids": (
        lambda d: _parquet_events(d, user_id=[{"id": u} for u in range(4) for _ in range(5)]),
        r"events\.parquet: column 'user_id' has Parquet type struct<.*>"),
    "null_user_id": (
        lambda d: _parquet_events(d, user_id=[None] + [f"u{u}" for u in range(4) for _ in range(5)][1:]),
        r"events\.parquet:1: empty user id in column 'user_id'"),
}


@pytest.mark.parametrize("case", list(PREPARE_CASES))
def test_prepare_bad_parquet_input(tmp_path, capsys, case):
    make, message = PREPARE_CASES[case]
    (tmp_path / "in").mkdir()
    events = make(tmp_path / "in")
    _, items = _generic_files(tmp_path / "in")
    code, err = run_cli(capsys, *_generic_args(events, items, tmp_path / "out"))
    assert code == 2
    assert re.search(message, error_line(err, "prepare"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no .out.tmp-* left


def test_prepare_bad_encoding_options(tmp_path, capsys):
    events, items = _generic_files(tmp_path / "in")
    code, err = run_cli(capsys, *_generic_args(events, items, tmp_path / "out", "--encoding", "klingon"))
    assert code == 2 and "unknown text encoding 'klingon'" in error_line(err, "prepare")
    code, err = run_cli(capsys, "prepare", "--source", "synthetic", "--output", str(tmp_path / "out"),
                        "--encoding", "latin-1")
    assert code == 2 and "--encoding is only used with --source generic" in error_line(err, "prepare")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_prepare_output_below_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    code, err = run_cli(capsys, "prepare", "--source", "synthetic", "--output", str(tmp_path / "afile" / "data"))
    assert code == 2
    assert "is a file, not a folder" in error_line(err, "prepare")
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_movielens_reads_the_real_latin1_movies_file(tmp_path):
    """ml-1m's movies.dat is latin-1: "Misérables" must not become mojibake or an error."""
    if not (SHARED_ML1M / "movies.dat").is_file():
        pytest.skip("the shared ml-1m files are not on this machine")
    from llmrec_dist.data.movielens import read_movielens

    folder = tmp_path / "ml-1m"
    folder.mkdir()
    shutil.copyfile(SHARED_ML1M / "movies.dat", folder / "movies.dat")
    ratings = [(u, m, 4, 100 * u + j) for u in (1, 2) for j, m in enumerate((73, 582, 1320, 3054))]
    (folder / "ratings.dat").write_text("".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in ratings))
    _, items, info = read_movielens(folder)
    text = dict(zip(items["item_id"], items["text"]))
    assert info["variant"] == "ml-1m"
    assert text["73"].startswith("Misérables, Les (1995).") and "Café au Lait" in text["582"]
    assert text["1320"].startswith("Alien³") and text["3054"].startswith("Pokémon")


def test_movielens_csv_with_a_bad_byte_is_located(tmp_path):
    from llmrec_dist.data.movielens import read_movielens

    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,10\n")
    movies = b"movieId,title,genres\n1,Toy Story (1995),Comedy\n2,Caf\xe9 (1993),Drama\n"
    (folder / "movies.csv").write_bytes(movies)
    with pytest.raises(PrepareError, match=rf"movies\.csv:2: not valid utf-8 text at byte offset {movies.index(E_ACUTE)}"):
        read_movielens(folder)


# ============================================================================ configs and names
BAD_CONFIGS = {
    "wrong_types": ({"train": {"lr": "fast", "epochs": 2.5}, "model": {"backbone": 7},
                     "scaling": {"num_workers": "two"}, "eval": {"ks": "10"}},
                    ["train.lr: expected a number; got 'fast'", "train.epochs: expected an integer; got 2.5",
                     "model.backbone: expected one of 'causal', 'bidirectional'; got 7",
                     "scaling.num_workers: expected an integer; got 'two'",
                     "eval.ks: expected a list of an integer; got '10'"]),
    "unknown_keys": ({"train": {"epochz": 3}, "trainer": {}, "model": {"hidden": 8}},
                     ["train.epochz: unknown key (did you mean train.epochs?)", "trainer: unknown key",
                      "model.hidden: unknown key"]),
    "section_not_mapping": ({"train": [1, 2]}, ["train: expected a mapping of keys; got [1, 2]"]),
    "registered_model_traversal": ({"mlflow": {"registered_model": "../../etc/evil"}},
                                   ["mlflow.registered_model: must be a plain name: no '/', '\\' or ':'"]),
    "registered_model_colon": ({"mlflow": {"registered_model": "C:evil"}}, ["mlflow.registered_model: must be a plain"]),
    "registered_model_dotdot": ({"mlflow": {"registered_model": ".."}}, ["mlflow.registered_model: must be a plain"]),
    "registered_model_newline": ({"mlflow": {"registered_model": "rec\nINFO fake log line"}},
                                 ["mlflow.registered_model: must not contain control characters"]),
    "run_name_control": ({"mlflow": {"run_name": "run\x1b[31m"}}, ["mlflow.run_name: must not contain control"]),
    "alias_path": ({"mlflow": {"alias": "../champion"}}, ["mlflow.alias: must be 1-255 letters, digits"]),
    "alias_reserved": ({"mlflow": {"alias": "latest"}}, ["mlflow.alias: is reserved by MLflow"]),
}


@pytest.fixture
def train_setup(registry, tmp_path):
    """A config file pointing at the test registry; returns (write(raw) -> path, storage folder)."""
    storage = tmp_path / "runs"

    def write(raw: dict) -> Path:
        base = {"data": {"path": str(tmp_path / "no-data-needed")},
                "train": {"storage_path": str(storage)},
                "mlflow": {"tracking_uri": registry["uri"], "registered_model": MODEL_NAME, "experiment": "hostile"}}
        for section, values in raw.items():
            base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(base))  # JSON is YAML
        return path

    return write, storage


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_refused_by_dotted_key(registry, train_setup, capsys, case):
    raw, problems = BAD_CONFIGS[case]
    write, storage = train_setup
    config = write(raw)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    for problem in problems:
        assert any(p.startswith(problem) for p in info.value.problems), (problem, info.value.problems)
    code, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"llmrec-dist train: invalid config in {config}:")
    assert all(problem.split(":")[0] in err for problem in problems)
    assert not storage.exists()
    assert registry_state(registry["uri"]) == registry["state"]


def test_a_config_that_is_not_a_mapping_exits_2_naming_the_file(tmp_path, capsys):
    config = tmp_path / "flat.yaml"
    config.write_text("just some words\n")
    code, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2 and str(config) in err and "expected a mapping of sections" in err
    assert "Traceback" not in err


def test_yaml_python_tags_are_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"data:\n  path: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    code, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2 and "not valid YAML" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("name, message", [
    ("../../etc", "search.name: must be a plain name"), ("a/b", "search.name: must be a plain name"),
    ("C:sweeps", "search.name: must be a plain name"), (".hidden", "search.name: must not start with '.'"),
    ("sweep\n2", "search.name: must not contain control characters"),
    (" spaced ", "search.name: must be a non-empty name without surrounding spaces"),
])
def test_sweep_name_cannot_leave_its_storage_folder(tmp_path, capsys, name, message):
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({"data": {"path": str(tmp_path / "d")}, "train": {"epochs": 3},
                                  "search": {"name": name, "storage_path": str(tmp_path / "sweeps"),
                                             "space": {"train.lr": {"choice": [0.01]}}}}))
    code, err = run_cli(capsys, "tune", "--config", str(config))
    assert code == 2 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_config_through_a_real_process(train_setup, registry, tmp_path):
    """What a user sees: exit 2, the problems by dotted key, no traceback, nothing created."""
    write, storage = train_setup
    config = write({"train": {"lr": "fast", "epochz": 1}, "mlflow": {"registered_model": "../x"}})
    result = run_cli_process("train", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for key in ("train.lr: expected a number", "train.epochz: unknown key", "mlflow.registered_model: must be"):
        assert key in result.stderr
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()
    assert registry_state(registry["uri"]) == registry["state"]


# ============================================================================ recommender, pyfunc, CLI
BAD_HISTORIES = {
    "ints": ([1, 2, 3], r"row 0: history\[0\] must be an item id string, got int \(1\)"),
    "numpy_ints": (np.array([4, 5]), r"row 0: history\[0\] must be an item id string, got int"),
    "none": (None, r"row 0: history must be a list of item id strings, got NoneType"),
    "none_inside": ([item_id(1), None], r"row 0: history\[1\] must be an item id string, got NoneType"),
    "dict": ({"items": [item_id(1)]}, r"row 0: history must be a list of item id strings, got dict"),
    "nested_lists": ([[item_id(1), item_id(2)]], r"row 0: history\[0\] must be an item id string, got list"),
    "huge_nested_list": ([item_id(1), list(range(10**6))],
                         r"row 0: history\[1\] must be an item id string, got list \(<list of 1000000 values>\)"),
    "float_nan": ([item_id(1), float("nan")], r"row 0: history\[1\] must be an item id string, got float"),
    "bytes": ([b"item-001"], r"row 0: history\[0\] must be an item id string, got bytes"),
    "plain_string": (item_id(1), r"row 0: history must be a list of item id strings, got str"),
}


@pytest.mark.parametrize("case", list(BAD_HISTORIES))
def test_bad_history_is_refused_naming_the_row(rec, case):
    history, message = BAD_HISTORIES[case]
    frame = pd.DataFrame({"history": pd.Series([history], dtype=object)})
    with pytest.raises(ValueError, match=message) as info:
        rec.predict_frame(frame)
    assert len(str(info.value)) < 300  # a huge value is never echoed whole
    with pytest.raises(ValueError, match=message.replace("row 0: ", r"histories\[0\]: ")):
        rec.recommend([history])


@pytest.mark.parametrize("k, message", [
    (-1, r"k must be between 1 and the catalogue size \(30\), got -1"),
    (0, r"k must be between 1 and the catalogue size \(30\), got 0"),
    ("ten", r"k must be a positive integer, got str \('ten'\)"),
    (NUM_ITEMS + 1, r"k must be between 1 and the catalogue size \(30\), got 31"),
    (2.5, r"k must be a positive integer, got float"),
    (True, r"k must be a positive integer, got bool"),
    (float("inf"), r"k must be a positive integer, got float"),
])
def test_bad_k_is_refused(rec, k, message):
    with pytest.raises(ValueError, match=message):
        rec.recommend([[item_id(1)]], k=k)
    with pytest.raises(ValueError, match="row 0: " + message):
        rec.predict_frame(pd.DataFrame({"history": [[item_id(1)]], "k": pd.Series([k], dtype=object)}))


@pytest.mark.parametrize("k, message", [
    ("ten", "argument -k: invalid int value: 'ten'"),
    ("-1", "-k must be a positive integer, got -1"),
    ("0", "-k must be a positive integer, got 0"),
    (str(NUM_ITEMS + 1), "k must be between 1 and the catalogue size (30), got 31"),
])
def test_recommend_cli_bad_k(registry, capsys, k, message):
    code, err = run_cli(capsys, "recommend", "--model", str(registry["package"]), "--history", item_id(1), "-k", k)
    assert code == 2 and message in err and "Traceback" not in err


def test_million_item_history_is_quick_and_lean(rec):
    """Only the last max_len known items feed the model; every distinct seen item is excluded."""
    head = [item_id(1 + i % 7) for i in range(10**6 - 20)]  # items 1..7, a million times over
    tail = [item_id(i) for i in range(10, 30)]               # the last max_len (20) items
    history = head + tail
    tracemalloc.start()
    started = time.perf_counter()
    try:
        (out,) = rec.recommend([history], k=NUM_ITEMS)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 20, seconds  # typically well under 1 s; generous for a loaded CI machine
    assert peak < 64 * 2**20, peak  # a few arrays of 10^6 ints, no per-item objects
    (short,) = rec.recommend([[item_id(i) for i in range(1, 8)] + tail], k=NUM_ITEMS)
    assert out == short
    assert sorted(out["item_ids"]) == [item_id(8), item_id(9), item_id(30)]


def test_million_unknown_ids_warn_once_and_fall_back(rec):
    history = [f"nope-{i}" for i in range(10**6)]
    started = time.perf_counter()
    with pytest.warns(UnknownItemWarning, match=r"skipped 1000000 unknown .* and 999995 more") as record:
        (out,) = rec.recommend([history], k=3)
    assert time.perf_counter() - started < 20 and len(record) == 1
    assert out == rec.recommend([[]], k=3)[0]  # the popularity fallback


def test_pyfunc_from_the_registry_refuses_bad_input_and_changes_nothing(registry):
    """Through ``mlflow.pyfunc``, MLflow enforces the signature first: a value of the wrong type is refused
    by MLflow (naming the column and the type); values of the right type are checked by the recommender,
    which names every bad row."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from llmrec_dist.tracking import use_tracking_uri

    with use_tracking_uri(registry["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    with pytest.raises(ValueError) as info:
        model.predict(pd.DataFrame({"history": [[item_id(1)], [], [item_id(2)]], "k": [0, 5, NUM_ITEMS + 1]}))
    text = str(info.value)
    assert "row 0: k must be between 1" in text and "row 2: k must be between 1" in text and "row 1" not in text
    for history, problem in [([1, 2], "Can not safely convert int64"), (None, "got NoneType"),
                             (item_id(1), "got str")]:
        with pytest.raises(MlflowException, match=f"(?s)Failed to enforce schema.*{problem}"):
            model.predict(pd.DataFrame({"history": pd.Series([[item_id(1)], history], dtype=object)}))
    assert registry_state(registry["uri"]) == registry["state"]


def _damage_package(name: str, package: Path) -> None:
    if name == "recommender_json_not_json":
        (package / "recommender.json").write_text("{oops")
    elif name == "model_json_num_items":
        meta = json.loads((package / "model.json").read_text())
        (package / "model.json").write_text(json.dumps({**meta, "num_items": "ten"}))
    elif name == "model_json_wrong_type":
        meta = json.loads((package / "model.json").read_text())
        (package / "model.json").write_text(json.dumps({**meta, "model": {**meta["model"], "max_len": "long"}}))
    elif name == "default_k_wrong_type":
        settings = json.loads((package / "recommender.json").read_text())
        (package / "recommender.json").write_text(json.dumps({**settings, "default_k": "ten"}))
    elif name == "items_truncated":
        data = (package / "items.parquet").read_bytes()
        (package / "items.parquet").write_bytes(data[: len(data) // 2])
    elif name == "items_wrong_schema":
        pq.write_table(pa.table({"id": ["a"]}), package / "items.parquet")
    elif name == "weights_garbage":
        (package / "model.safetensors").write_bytes(b"\x00" * 64)


PACKAGE_CASES = {
    "recommender_json_not_json": r"recommender\.json: not valid UTF-8 JSON",
    "model_json_num_items": r"model\.json: num_items must be a positive integer, got 'ten'",
    "model_json_wrong_type": r"model\.max_len: expected an integer; got 'long'",
    "default_k_wrong_type": r"recommender\.json: default_k must be a positive integer, got 'ten'",
    "items_truncated": r"items\.parquet: not a readable Parquet file .*the model package is damaged",
    "items_wrong_schema": r"items\.parquet: does not have the items schema",
    "weights_garbage": r"model\.safetensors: not a safetensors weights file",
}


@pytest.mark.parametrize("case", list(PACKAGE_CASES))
def test_damaged_package_is_named(registry, tmp_path, capsys, case):
    package = Path(shutil.copytree(registry["package"], tmp_path / "package"))
    _damage_package(case, package)
    with pytest.raises(ValueError, match=PACKAGE_CASES[case]):
        Recommender.from_folder(package)
    code, err = run_cli(capsys, "recommend", "--model", str(package), "--history", item_id(1))
    assert code == 2
    assert re.search(PACKAGE_CASES[case], error_line(err, "recommend"))


def test_catalogue_file_not_utf8(tmp_path):
    from llmrec_dist.cli.recommend import read_catalogue

    path = tmp_path / "catalogue.csv"
    data = b"item_id,text\na,fine\nb,Caf\xe9\n"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"catalogue\.csv: not valid UTF-8 at byte offset {data.index(E_ACUTE)} \(line 3"):
        read_catalogue(str(path))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot read it as Parquet"):
        read_catalogue(str(tmp_path / "broken.parquet"))


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"item_id": [], "text": []}), "the catalogue is empty"),
    (pd.DataFrame({"item_id": ["a", None], "text": ["x", "y"]}), "row 1: missing item_id"),
    (pd.DataFrame({"item_id": ["a", "b"], "text": ["x", None]}), "row 1: missing text"),
    (pd.DataFrame({"item_id": ["a", "b"], "text": ["x", 3]}), r"row 1: text must be a string, got int \(3\)"),
    (pd.DataFrame({"item_id": ["a", "a"], "text": ["x", "y"]}), "row 1: item_id 'a' repeats row 0"),
    (pd.DataFrame({"item_id": [["a"]], "text": ["x"]}), "row 0: item_id must be a string or integer, got list"),
    (pd.DataFrame({"item_id": ["a"], "text": ["x"], "popularity": [-3]}), "row 0: popularity must be a non-negative"),
    (pd.DataFrame({"item_id": ["a"], "text": ["x"], "popularity": ["many"]}), "row 0: popularity must be a non-neg"),
])
def test_bad_catalogue_rows_are_named(frame, message):
    from llmrec_dist.registry.recommender import _catalogue_columns

    with pytest.raises(ValueError, match=message):
        _catalogue_columns(frame)


# ============================================================================ training
def _train_config(dataset: Path, registry: dict, tmp_path: Path, *overrides: str):
    return load_config(QUICKSTART, [f"data.path={dataset}", f"train.storage_path={tmp_path / 'runs'}",
                                    f"mlflow.tracking_uri={registry['uri']}", f"mlflow.registered_model={MODEL_NAME}",
                                    "mlflow.experiment=hostile-train", "model.hidden_size=16", "model.max_len=20",
                                    "train.epochs=1", "train.batch_size=64", "scaling.num_workers=1", *overrides])


def test_training_refuses_a_dataset_failing_its_hash(dataset, registry, tmp_path):
    from mlflow import MlflowClient

    from llmrec_dist.train.launcher import train

    _hash_mismatch(dataset)
    with pytest.raises(DatasetError, match="does not match its manifest"):
        train(_train_config(dataset, registry, tmp_path))
    assert not (tmp_path / "runs").exists()  # nothing written before the check
    assert MlflowClient(registry["uri"]).get_experiment_by_name("hostile-train") is None  # no run created
    assert registry_state(registry["uri"]) == registry["state"]


def test_train_cli_refuses_a_dataset_failing_its_hash(dataset, registry, tmp_path, capsys):
    _hash_mismatch(dataset)
    config = tmp_path / "config.yaml"
    config.write_text(QUICKSTART.read_text())
    code, err = run_cli(capsys, "train", "--config", str(config), f"data.path={dataset}",
                        f"mlflow.tracking_uri={registry['uri']}", f"train.storage_path={tmp_path / 'runs'}")
    assert code == 2
    assert "does not match its manifest" in error_line(err, "train")


def _assert_ray_healthy(ray) -> None:
    assert ray.cluster_resources().get("CPU", 0) >= 4

    @ray.remote
    def ping(x):
        return x + 1

    assert ray.get(ping.remote(41), timeout=60) == 42


@pytest.mark.integration
def test_corrupt_shard_without_hash_check_does_not_hurt_ray_or_registry(ray_cluster, dataset, registry, tmp_path):
    """With data.verify_hash=false a damaged shard still fails the run before it starts; Ray keeps
    working and nothing is registered."""
    from llmrec_dist.train.launcher import train

    _truncate(dataset)
    with pytest.raises(Exception):  # noqa: B017 - which exception is the launcher's business (see below)
        train(_train_config(dataset, registry, tmp_path, "data.verify_hash=false"))
    _assert_ray_healthy(ray_cluster)
    assert registry_state(registry["uri"]) == registry["state"]


# With data.verify_hash=false the launcher still reads every file's Parquet footer (dataset_format.check_files)
# before the MLflow run, run.json or Ray exist.
@pytest.mark.integration
def test_corrupt_shard_without_hash_check_is_named_before_anything_starts(ray_cluster, dataset, registry, tmp_path):
    from mlflow import MlflowClient

    from llmrec_dist.train.launcher import train

    _truncate(dataset)
    with pytest.raises(DatasetError, match=r"train/part-00000\.parquet: not a readable Parquet file"):
        train(_train_config(dataset, registry, tmp_path, "data.verify_hash=false"))
    assert not (tmp_path / "runs").exists()
    assert MlflowClient(registry["uri"]).get_experiment_by_name("hostile-train") is None
    _assert_ray_healthy(ray_cluster)
