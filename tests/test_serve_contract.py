"""The serve verb without Ray: its config section, the HTTP request checks, the model source and the
answer of a batch (on a tiny package), the deployment options and the Serve config file."""

import argparse
import contextlib
import json
from pathlib import Path

import pytest
import yaml

from llmrec_dist.config import ConfigError
from llmrec_dist.serving.requests import (
    RecommendRequest,
    RequestError,
    check_supported,
    decode_body,
    parse_recommend,
)
from llmrec_dist.serving.settings import ServeConfig, load_serve_config, serve_config_from_dict
from registry_fixtures import NUM_ITEMS, item_id, make_package, make_reranker_package
from mlflow_db import sqlite_uri

ROOT = Path(__file__).resolve().parents[1]
CFG = ServeConfig(model="models:/m@champion", max_k=50, max_history=100)


# ------------------------------------------------------------------------------------------ config
def test_shipped_serve_config_is_valid():
    cfg = load_serve_config(ROOT / "configs" / "serve.yaml", ["serve.port=9001"], {"model": "models:/m@champion"})
    assert cfg.port == 9001 and cfg.model == "models:/m@champion" and cfg.cpus_per_replica == 0.5
    assert cfg.to_dict() == {**ServeConfig().to_dict(), "model": "models:/m@champion", "port": 9001}


def test_config_problems_are_reported_at_once_with_dotted_keys():
    with pytest.raises(ConfigError) as err:
        serve_config_from_dict({"serve": {"prot": 80, "port": "x", "max_k": 0, "default_diversity": 2,
                                          "autoscaling": "yes"}, "train": {}})
    problems = err.value.problems
    assert any(p.startswith("serve.prot: unknown key (did you mean serve.port?)") for p in problems)
    assert "serve.port: expected an integer; got 'x'" in problems
    assert "serve.max_k: must be > 0; got 0" in problems
    assert "serve.default_diversity: must be in [0, 1]; got 2" in problems
    assert "serve.autoscaling: expected true/false; got 'yes'" in problems
    assert any(p.startswith("train: unknown key") for p in problems)


def test_config_cross_checks_and_flags():
    with pytest.raises(ConfigError, match="serve.model: required"):
        load_serve_config(None, [])
    with pytest.raises(ConfigError, match=r"serve.min_replicas: must not exceed serve.max_replicas \(1\)"):
        load_serve_config(None, ["serve.autoscaling=true", "serve.min_replicas=2", "serve.max_replicas=1"],
                          {"model": "x"})
    with pytest.raises(ConfigError, match="serve.max_ongoing_requests: must be at least serve.max_batch_size"):
        load_serve_config(None, ["serve.max_batch_size=64"], {"model": "x"})
    with pytest.raises(ConfigError, match="serve.model: the alias 'latest' is reserved"):
        load_serve_config(None, [], {"model": "models:/m@latest"})
    with pytest.raises(ConfigError, match="a serve override must look like serve.key=value"):
        load_serve_config(None, ["train.lr=1"], {"model": "x"})
    cfg = load_serve_config(None, ["serve.port=9000"], {"model": "m", "port": 9100, "host": None})
    assert (cfg.port, cfg.host) == (9100, "127.0.0.1")  # a flag wins over an override; None is not set


# ---------------------------------------------------------------------------------------- requests
def _status(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as err:
        call()
    assert "\n" not in err.value.message
    return err.value.status, err.value.message


def test_decode_body():
    assert decode_body(b'{"history": []}', 100) == {"history": []}
    assert _status(lambda: decode_body(b"x" * 101, 100))[0] == 413
    status, message = _status(lambda: decode_body(b'{"history": ["\xff"]}', 100))
    assert status == 400 and "not valid UTF-8" in message
    for body in (b"", b"  ", b"{", b"history=a", b'{"k": NaN}', b'{"k": Infinity}', b"[" * 50000):
        status, message = _status(lambda: decode_body(body, 10**6))
        assert status == 400 and ("JSON" in message or "empty" in message), (body[:10], message)


def test_parse_recommend_happy_path_and_defaults():
    assert parse_recommend({"history": ["a", "b"]}, CFG) == RecommendRequest(["a", "b"])
    got = parse_recommend({"history": [], "k": 5.0, "exclude": ["c"], "diversity": 1, "explain": True}, CFG)
    assert got == RecommendRequest([], 5, ["c"], 1.0, True)
    assert parse_recommend({"history": []}, ServeConfig(default_diversity=0.25)).diversity == 0.25


@pytest.mark.parametrize("body, needle", [
    ([], "expected a JSON object"),
    ("a", "expected a JSON object"),
    ({}, "history: required"),
    ({"history": "a,b"}, "history: expected an array"),
    ({"history": ["a", 7]}, "history[1]: expected an item id string, got number 7"),
    ({"history": [None]}, "history[0]: expected an item id string, got null"),
    ({"history": [["a"]]}, "history[0]: expected an item id string, got array"),
    ({"history": ["a"] * 101}, "history: at most 100 item ids, got 101"),
    ({"history": [], "exclude": "a"}, "exclude: expected an array"),
    ({"history": [], "exclude": [1]}, "exclude[0]: expected an item id string"),
    ({"history": [], "k": 0}, "k: must be in 1..50, got 0"),
    ({"history": [], "k": -1}, "k: must be in 1..50"),
    ({"history": [], "k": 51}, "k: must be in 1..50, got 51"),
    ({"history": [], "k": 2.5}, "k: expected an integer in 1..50, got number 2.5"),
    ({"history": [], "k": "10"}, "k: expected an integer in 1..50, got string"),
    ({"history": [], "k": True}, "k: expected an integer in 1..50, got boolean"),
    ({"history": [], "k": None}, "k: expected an integer"),
    ({"history": [], "diversity": -0.1}, "diversity: must be in [0, 1], got -0.1"),
    ({"history": [], "diversity": 1.5}, "diversity: must be in [0, 1]"),
    ({"history": [], "diversity": "high"}, "diversity: expected a number in [0, 1], got string"),
    ({"history": [], "diversity": False}, "diversity: expected a number in [0, 1], got boolean"),
    ({"history": [], "explain": "yes"}, "explain: expected true or false, got string"),
    ({"history": [], "explain": 1}, "explain: expected true or false, got number"),
    ({"history": [], "user": "u1"}, 'unknown field(s) "user"; valid fields: history, k, exclude, diversity, explain'),
])
def test_parse_recommend_refuses(body, needle):
    status, message = _status(lambda: parse_recommend(body, CFG))
    assert status == 400 and needle in message, message


def test_unsupported_options_are_refused_only_when_used():
    none = {"exclude": False, "diversity": False, "explain": False}
    check_supported(RecommendRequest(["a"], exclude=[], diversity=0.0, explain=False), none)
    status, message = _status(lambda: check_supported(RecommendRequest(["a"], diversity=0.5, explain=True), none))
    assert status == 400 and message == "diversity, explain not supported by this model (it supports: none)"
    check_supported(RecommendRequest(["a"], exclude=["b"]), {**none, "exclude": True})


# ------------------------------------------------------------------------------ source and answers
@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("serve-package"), seed=0)


def test_source_kinds():
    from llmrec_dist.serving.source import ModelSource

    alias = ModelSource("models:/shop@champion", "sqlite:///x.db")
    assert (alias.kind, alias.name, alias.alias, alias.follows_alias) == ("alias", "shop", "champion", True)
    fixed = ModelSource("models:/shop/3", "sqlite:///x.db")
    assert (fixed.kind, fixed.name, fixed.version, fixed.current_version()) == ("version", "shop", "3", "3")
    assert ModelSource("runs:/abc/model", "").kind == "uri"
    folder = ModelSource("some/relative/folder", "")
    assert folder.kind == "folder" and Path(folder.uri).is_absolute()


def test_source_loads_a_package_and_reports_its_options(package):
    from llmrec_dist.serving.source import ModelSource, supported_options

    source = ModelSource(str(package), "")
    assert source.check() == ""
    loaded = source.load()
    assert loaded.version == "" and loaded.name == str(package)
    assert loaded.options == supported_options(loaded.servable.recommend)
    assert supported_options(lambda histories, k, *, exclude=None, explain=False: None) == \
        {"exclude": True, "diversity": False, "explain": True}


def test_source_refuses_what_is_not_a_next_item_model(package, tmp_path):
    from llmrec_dist.serving.source import ModelSource, ModelSourceError

    reranker = make_reranker_package(tmp_path / "click", package.parent / "dataset")
    with pytest.raises(ModelSourceError, match="is a rating or click model: serve answers next-item requests"):
        ModelSource(str(reranker), "").check()
    with pytest.raises(ModelSourceError, match="is a click model"):
        ModelSource(str(reranker), "").load()
    with pytest.raises(ModelSourceError, match="no such folder"):
        ModelSource(str(tmp_path / "missing"), "").check()
    db = sqlite_uri(tmp_path / 'mlflow.db')
    with pytest.raises(ModelSourceError, match="no alias 'champion' on a registered model 'nope'"):
        ModelSource("models:/nope@champion", db).check()
    with pytest.raises(ModelSourceError, match="no version 2 of a registered model 'nope'"):
        ModelSource("models:/nope/2", db).check()


def test_answer_batch_matches_the_recommender(package):
    from llmrec_dist.registry.recommender import Recommender, UnknownItemWarning
    from llmrec_dist.serving.app import answer_batch
    from llmrec_dist.serving.source import Loaded

    rec = Recommender.from_folder(package)
    loaded = Loaded(rec, "shop", "7", {"exclude": False, "diversity": False, "explain": False})
    requests = [RecommendRequest([item_id(1), item_id(2)], k=5), RecommendRequest([], k=3),
                RecommendRequest(["unknown", item_id(4)], k=NUM_ITEMS + 10)]
    answers = answer_batch(loaded, requests)
    for request, answer in zip(requests, answers):
        with pytest.warns(UnknownItemWarning) if "unknown" in request.history else contextlib.nullcontext():
            expected = rec.recommend([request.history], min(request.k, NUM_ITEMS))[0]
        assert [i["item_id"] for i in answer["items"]] == expected["item_ids"]
        assert [i["score"] for i in answer["items"]] == pytest.approx(expected["scores"], rel=1e-5)  # batched
        assert answer["model"] == {"name": "shop", "version": "7"}
        assert all("because" not in i for i in answer["items"])
    assert len(answers[2]["items"]) == NUM_ITEMS - 1  # capped at the catalogue, the history item left out


def test_answer_batch_passes_options_the_model_takes(package):
    """A stand-in with the keyword arguments being added to Recommender.recommend: they reach it per
    group of requests, and ``because`` comes back."""
    from llmrec_dist.serving.app import answer_batch
    from llmrec_dist.serving.source import Loaded, supported_options

    calls = []

    class WithOptions:
        num_items = 5

        def recommend(self, histories, k, *, exclude=None, diversity=0.0, explain=False):
            calls.append({"histories": histories, "k": k, "exclude": exclude, "diversity": diversity,
                          "explain": explain})
            out = []
            for history, n in zip(histories, k):
                row = {"item_ids": [f"x{i}" for i in range(n)], "scores": [1.0] * n}
                if explain:
                    row["because"] = [history[-1:] for _ in range(n)]
                out.append(row)
            return out

    stand_in = WithOptions()
    loaded = Loaded(stand_in, "m", "1", supported_options(stand_in.recommend))
    assert loaded.options == {"exclude": True, "diversity": True, "explain": True}
    answers = answer_batch(loaded, [RecommendRequest(["a"], k=2, exclude=["x9"]),
                                    RecommendRequest(["b"], k=9, explain=True),
                                    RecommendRequest(["c"], k=1, diversity=0.5)])
    assert len(calls) == 3
    assert calls[0] == {"histories": [["a"]], "k": [2], "exclude": [["x9"]], "diversity": 0.0, "explain": False}
    assert calls[1]["explain"] is True and calls[1]["k"] == [5]  # capped at the catalogue
    assert calls[2]["diversity"] == 0.5
    assert answers[1]["items"][0] == {"item_id": "x0", "score": 1.0, "because": ["b"]}
    assert "because" not in answers[0]["items"][0]


# ------------------------------------------------------------------------- deployment and CLI
def test_deployment_options():
    from llmrec_dist.serving.app import deployment_options

    fixed = deployment_options(ServeConfig(num_replicas=3, cpus_per_replica=0.25))
    assert fixed == {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 32, "num_replicas": 3,
                     "logging_config": {"enable_access_log": False}}
    assert deployment_options(ServeConfig(access_log=True))["logging_config"] == {"enable_access_log": True}
    scaled = deployment_options(ServeConfig(autoscaling=True, min_replicas=1, max_replicas=4))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0}
    assert "num_replicas" not in scaled


def _args(*argv):
    from llmrec_dist.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["serve", *argv])


def test_cli_refuses_before_starting_anything(tmp_path, capsys, package):
    from llmrec_dist.cli import serve

    db = sqlite_uri(tmp_path / 'mlflow.db')
    assert serve.run(_args("--model", "models:/nope@champion", "--tracking-uri", db)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # before it: MLflow's own log lines
    assert err.startswith("llmrec-dist serve: models:/nope@champion: no alias")
    reranker = make_reranker_package(tmp_path / "click", package.parent / "dataset")
    assert serve.run(_args("--model", str(reranker))) == 2
    assert "is a rating or click model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="serve.max_k: must be > 0"):
        serve.run(_args("--model", str(package), "serve.max_k=0"))


def test_cli_writes_a_serve_deploy_config(tmp_path, package):
    from llmrec_dist.cli import serve
    from llmrec_dist.serving.app import build

    target = tmp_path / "deploy" / "serve-config.yaml"
    assert serve.run(_args("--model", str(package), "--port", "9123", "--write-config", str(target),
                           "serve.num_replicas=2")) == 0
    text = target.read_text()
    assert text.startswith("# Ray Serve config") and "serve deploy" in text.splitlines()[1]
    written = yaml.safe_load(text)
    assert written["http_options"] == {"host": "127.0.0.1", "port": 9123}
    (application,) = written["applications"]
    assert application["import_path"] == "llmrec_dist.serving.app:build" and application["route_prefix"] == "/"
    assert application["args"]["model"] == str(package) and application["args"]["num_replicas"] == 2
    json.dumps(application["args"])  # plain values only
    # The builder serve deploy calls accepts the args as written.
    app = build(application["args"])
    assert app is not None


def test_bench_histories_from_a_dataset_and_a_file(synthetic_dataset, tmp_path):
    from llmrec_dist.bench.serve_load import percentiles, read_histories
    from llmrec_dist.data.dataset_format import read_items

    histories = read_histories(str(synthetic_dataset), limit=50)
    known = set(read_items(synthetic_dataset).column("item_id").to_pylist())
    assert len(histories) == 50 and all(h and set(h) <= known for h in histories)
    lines = tmp_path / "h.txt"
    lines.write_text('a, b\n["c"]\n{"history": ["d", "e"]}\n\n')
    assert read_histories(str(lines)) == [["a", "b"], ["c"], ["d", "e"]]
    lines.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="h.txt:1: expected a list of item id strings"):
        read_histories(str(lines))
    with pytest.raises(FileNotFoundError):
        read_histories(str(tmp_path / "missing"))
    assert percentiles([0.001, 0.002, 0.003])["p50_ms"] == pytest.approx(2.0)
