"""Registry end to end against a REAL `mlflow server` (SQLite backend, served artifacts).

Logs model packages into a run, registers versions and checks that the alias moves only when the new
version beats the holder on the same dataset; then loads ``models:/NAME@champion`` through
``mlflow.pyfunc.load_model`` and the ``recommend`` CLI verb.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from llmrec_dist.registry.recommender import Recommender
from mlflow_server import mlflow_server_fixture
from registry_fixtures import item_id, make_package

pytestmark = pytest.mark.integration

NAME = "llmrec-test"
ALIAS = "champion"
METRIC = "valid_ndcg_at_10"


mlflow_server = mlflow_server_fixture  # the module's fixture (tests/mlflow_server.py)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Three packages: a and b share a dataset (different weights), c is on another dataset."""
    root = tmp_path_factory.mktemp("packages")
    return {"a": make_package(root / "a", seed=0), "b": make_package(root / "b", seed=1),
            "c": make_package(root / "c", seed=2, salt=" (v2)")}


def _hash(package: Path) -> str:
    return json.loads((package / "manifest.json").read_text())["content_hash"]


@pytest.fixture(scope="module")
def registered(mlflow_server, packages):
    """Log + register five versions in the order the promotion rules care about."""
    from llmrec_dist.registry.promotion import register_and_promote
    from llmrec_dist.registry.pyfunc import log_model_package
    from llmrec_dist.tracking import client, end_run, start_run

    uri = mlflow_server
    run_id = start_run(uri, "registry-test", run_name="registry")
    uris = {key: log_model_package(pkg, uri, run_id, name=f"model_{key}") for key, pkg in packages.items()}
    status_after_logging = client(uri).get_run(run_id).info.status
    steps = [("first", "a", 0.30), ("worse", "a", 0.20), ("equal", "a", 0.30), ("better", "b", 0.40),
             ("other_dataset", "c", 0.99)]
    results = {}
    for label, key, value in steps:
        results[label] = register_and_promote(uri, run_id, uris[key], NAME, ALIAS, METRIC, value,
                                              _hash(packages[key]))
    end_run(uri, run_id)
    return {"uri": uri, "run_id": run_id, "model_uris": uris, "results": results,
            "status_after_logging": status_after_logging}


def test_logging_keeps_the_run_open_and_pickles_nothing(registered, tmp_path):
    import mlflow.artifacts

    from llmrec_dist.tracking import use_tracking_uri

    assert registered["status_after_logging"] == "RUNNING"
    with use_tracking_uri(registered["uri"]):
        local = Path(mlflow.artifacts.download_artifacts(registered["model_uris"]["a"], dst_path=str(tmp_path)))
    assert not list(local.rglob("*.pkl"))  # models from code: nothing pickled, no torch model
    assert "set_model(RecommenderPyfunc())" in (local / "llmrec_recommender.py").read_text()
    assert (local / "artifacts" / "package" / "model.safetensors").is_file()
    mlmodel = (local / "MLmodel").read_text()
    assert "history" in mlmodel and "item_ids" in mlmodel  # the explicit signature
    assert "llmrec_dist==" in (local / "requirements.txt").read_text()


def test_alias_moves_only_when_earned(registered, packages):
    from llmrec_dist.registry.promotion import champion_info
    from llmrec_dist.tracking import client

    r = registered["results"]
    assert (r["first"]["version"], r["first"]["promoted"], r["first"]["previous"]) == (1, True, None)
    assert (r["worse"]["promoted"], r["worse"]["previous"]) == (False, 1)
    assert "does not beat" in r["worse"]["reason"]
    assert r["equal"]["promoted"] is False  # strictly better only
    assert (r["better"]["version"], r["better"]["promoted"], r["better"]["previous"]) == (4, True, 1)
    assert r["other_dataset"]["promoted"] is False and r["other_dataset"]["previous"] == 4
    assert "not comparable" in r["other_dataset"]["reason"]
    assert {res["name"] for res in r.values()} == {NAME}

    info = champion_info(registered["uri"], NAME, ALIAS)
    assert info["version"] == 4 and info["metric_value"] == 0.40 and info["metric_key"] == METRIC
    assert info["dataset_hash"] == _hash(packages["b"]) and info["run_id"] == registered["run_id"]
    assert champion_info(registered["uri"], NAME, "no-such-alias") is None
    assert champion_info(registered["uri"], "no-such-model", ALIAS) is None

    tags = client(registered["uri"]).get_model_version(NAME, "5").tags
    assert tags["dataset_hash"] == _hash(packages["c"]) and float(tags["metric_value"]) == 0.99
    assert tags["metric_key"] == METRIC and tags["run_id"] == registered["run_id"]


def test_champion_loads_through_pyfunc_and_matches_the_package(registered, packages, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    frame = pd.DataFrame({"history": [[item_id(1), item_id(2)], [], [item_id(5)] * 3], "k": [5, 3, 7]})
    got = model.predict(frame)
    expected = Recommender.from_folder(packages["b"]).predict_frame(frame)
    assert got["item_ids"].tolist() == expected["item_ids"].tolist()
    assert got["scores"].tolist() == expected["scores"].tolist()  # exactly: same code, same weights
    records = model.predict([{"history": [item_id(1), item_id(2)], "k": 5}])
    assert records["item_ids"].tolist()[0] == expected["item_ids"].tolist()[0]
    by_run = mlflow.pyfunc.load_model(f"runs:/{registered['run_id']}/model_b")  # linked to its run
    assert by_run.predict(frame)["scores"].tolist() == expected["scores"].tolist()


def _cli_args(*argv: str):
    from llmrec_dist.cli import recommend

    parser = argparse.ArgumentParser()
    recommend.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["recommend", *argv])


def test_recommend_cli_against_the_server(registered, packages, monkeypatch, capsys):
    from llmrec_dist.cli import recommend

    history = [item_id(3), item_id(9)]
    expected = Recommender.from_folder(packages["b"]).recommend([history], k=4)[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    args = _cli_args("--model", f"models:/{NAME}@{ALIAS}", "--history", ",".join(history), "-k", "4", "--json")
    assert recommend.run(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in payload["recommendations"]] == expected["item_ids"]
    assert [r["score"] for r in payload["recommendations"]] == expected["scores"]
    assert [r["text"] for r in payload["recommendations"]] == expected["texts"]

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    args = _cli_args("--model", f"models:/{NAME}/1", "--tracking-uri", registered["uri"],
                     "--history", ",".join(history), "-k", "4")
    assert recommend.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    expected_a = Recommender.from_folder(packages["a"]).recommend([history], k=4)[0]
    assert [line.split()[1] for line in lines[1:]] == expected_a["item_ids"]

    args = _cli_args("--model", "models:/no-such-model@champion", "--tracking-uri", registered["uri"],
                     "--history", item_id(1))
    assert recommend.run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmrec-dist recommend:")


def test_a_chain_registers_and_serves_as_one_model(registered, packages, tmp_path, monkeypatch, capsys):
    """Registry round trip of a retriever + re-ranker chain: logged, registered, loaded by alias through
    mlflow.pyfunc, answering like the chain built from its parts; `recommend --rerank` chains two URIs."""
    import mlflow.pyfunc

    from llmrec_dist.cli import recommend
    from llmrec_dist.registry.promotion import register_and_promote
    from llmrec_dist.registry.pyfunc import log_model_package
    from llmrec_dist.registry.reranker import Chain, Reranker, build_chain_package
    from llmrec_dist.tracking import end_run, start_run
    from registry_fixtures import make_reranker_package

    uri = registered["uri"]
    reranker = make_reranker_package(tmp_path / "reranker", packages["b"].parent / "dataset")
    chain_dir = build_chain_package(packages["b"], reranker, tmp_path / "chain", top_n=6, blend=0.0)
    run_id = start_run(uri, "registry-test", run_name="chain")
    chain_uri = log_model_package(chain_dir, uri, run_id, name="chain")
    reranker_uri = log_model_package(reranker, uri, run_id, name="reranker")
    outcome = register_and_promote(uri, run_id, chain_uri, "llmrec-chain", "champion", "valid_ndcg_at_10", 0.5,
                                   _hash(packages["b"]))
    end_run(uri, run_id)
    assert outcome["promoted"] and outcome["version"] == 1

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/llmrec-chain@champion")
    frame = pd.DataFrame({"history": [[item_id(1), item_id(2)], [item_id(5)]], "k": [8, 3]})
    expected = Chain(Recommender.from_folder(packages["b"]), Reranker.from_folder(reranker), 6).predict_frame(frame)
    got = model.predict(frame)
    assert got["item_ids"].tolist() == expected["item_ids"].tolist()
    for row_got, row_expected in zip(got["scores"].tolist(), expected["scores"].tolist()):
        assert row_got == pytest.approx(row_expected)
    alone = Recommender.from_folder(packages["b"]).predict_frame(frame)
    assert got["item_ids"].tolist() != alone["item_ids"].tolist()  # the re-ranker changed the order
    # the re-ranker alone through pyfunc: candidates in, candidates ordered out
    scored = mlflow.pyfunc.load_model(reranker_uri).predict(
        pd.DataFrame({"history": [[item_id(1)]], "candidates": [[item_id(2), item_id(29), item_id(3)]]}))
    assert sorted(scored["item_ids"][0]) == sorted([item_id(2), item_id(29), item_id(3)])

    history = [item_id(1), item_id(2)]
    capsys.readouterr()  # MLflow's own lines while logging
    args = _cli_args("--model", f"models:/{NAME}/4", "--rerank", reranker_uri, "--top-n", "6",
                     "--history", ",".join(history), "-k", "8", "--json")
    assert recommend.run(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in payload["recommendations"]] == expected["item_ids"][0]
    args = _cli_args("--model", reranker_uri, "--history", item_id(1))
    assert recommend.run(args) == 2
    assert "it scores candidates" in capsys.readouterr().err
