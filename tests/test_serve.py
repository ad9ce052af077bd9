"""`llmrec-dist serve` end to end: the real Ray Serve app on the shared local Ray, a real MLflow server,
queried over HTTP.

Two tiny versions of one registered model (v1 holds the alias, v2 does not); one Serve app for the
module following ``models:/NAME@champion``. Checked: answers equal the package's own recommendations,
/healthz and /version, every bad request gets a one-line JSON 4xx and the replica goes on, concurrent
requests are all answered correctly, and the alias moved to v2 under load drops no request.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from llmrec_dist.registry.recommender import Recommender
from mlflow_server import mlflow_server_fixture
from ports import free_port
from registry_fixtures import NUM_ITEMS, item_id, item_text, make_package
from text_fixtures import make_tiny_encoder

pytestmark = pytest.mark.integration

mlflow_server = mlflow_server_fixture

NAME = "llmrec-serve-test"
ALIAS = "champion"
POLL_SECONDS = 0.5


def _request(url: str, body: bytes | None = None, method: str | None = None,
             headers: dict | None = None) -> tuple[int, dict, str]:
    """``(status, JSON body, raw text)`` of one HTTP request; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            text = response.read().decode()
            return response.status, json.loads(text), text
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        return err.code, json.loads(text), text


def _recommend(base: str, payload) -> tuple[int, dict, str]:
    return _request(f"{base}/recommend", json.dumps(payload).encode())


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """v1 (package a) holds the alias, v2 (package b, same dataset, other weights) does not yet."""
    from llmrec_dist.registry.promotion import register_and_promote
    from llmrec_dist.registry.pyfunc import log_model_package
    from llmrec_dist.tracking import end_run, start_run

    root = tmp_path_factory.mktemp("serve-packages")
    packages = {"a": make_package(root / "a", seed=0), "b": make_package(root / "b", seed=1)}
    content_hash = json.loads((packages["a"] / "manifest.json").read_text())["content_hash"]
    run_id = start_run(mlflow_server, "serve-test", run_name="serve")
    for key, metric in (("a", 0.3), ("b", 0.1)):
        model_uri = log_model_package(packages[key], mlflow_server, run_id, name=f"model_{key}")
        register_and_promote(mlflow_server, run_id, model_uri, NAME, ALIAS, "valid_ndcg_at_10", metric, content_hash)
    end_run(mlflow_server, run_id)
    return {"uri": mlflow_server, "packages": packages,
            "recommenders": {key: Recommender.from_folder(p) for key, p in packages.items()}}


@pytest.fixture(scope="module")
def served(ray_cluster, registered, tmp_path_factory):
    """The Serve app on a free port; Serve shut down at the end so later tests start clean."""
    from ray import serve

    from llmrec_dist.cli.serve import start
    from llmrec_dist.serving.settings import ServeConfig

    encoder = str(make_tiny_encoder(tmp_path_factory.mktemp("serve-encoder"),
                                    [item_text(i) for i in range(1, NUM_ITEMS + 1)]))
    cfg = ServeConfig(model=f"models:/{NAME}@{ALIAS}", tracking_uri=registered["uri"], port=free_port(),
                      poll_seconds=POLL_SECONDS, max_k=50, max_history=1000, app_name="serve-test",
                      diversity_space="text", text_encoder=encoder)  # MMR on the texts' embeddings
    try:
        started = time.monotonic()
        url = start(cfg)
        yield {"url": url, "startup_s": time.monotonic() - started, "encoder": encoder, **registered}
    finally:
        serve.shutdown()


def _expected(rec: Recommender, history: list[str], k: int) -> dict:
    return rec.recommend([history], k)[0]


def _check_answer(answer: dict, expected: dict) -> None:
    assert [item["item_id"] for item in answer["items"]] == expected["item_ids"]
    assert [item["score"] for item in answer["items"]] == pytest.approx(expected["scores"], rel=1e-5)


def test_recommend_happy_path(served):
    history = [item_id(3), item_id(9), item_id(4)]
    status, answer, _ = _recommend(served["url"], {"history": history, "k": 5})
    assert status == 200, answer
    assert answer["model"] == {"name": NAME, "version": "1"}
    ids = [item["item_id"] for item in answer["items"]]
    assert len(ids) == 5 and not set(ids) & set(history)
    assert set(ids) <= {item_id(i) for i in range(1, NUM_ITEMS + 1)}
    scores = [item["score"] for item in answer["items"]]
    assert scores == sorted(scores, reverse=True) and all("because" not in item for item in answer["items"])
    _check_answer(answer, _expected(served["recommenders"]["a"], history, 5))
    status, popular, _ = _recommend(served["url"], {"history": []})  # k defaults to 10: the popular items
    assert status == 200 and len(popular["items"]) == 10
    _check_answer(popular, _expected(served["recommenders"]["a"], [], 10))


def test_request_options_reach_the_model_when_it_takes_them(served):
    """exclude / diversity / explain pass through to Recommender.recommend once it takes them (else 400,
    checked with the bad requests); ``because`` is returned with explain."""
    _, version, _ = _request(f"{served['url']}/version")
    options, rec = version["options"], served["recommenders"]["a"]
    history = [item_id(3), item_id(9)]
    if not any(options.values()):
        pytest.skip("this Recommender.recommend takes none of exclude / diversity / explain")
    if options["exclude"]:
        plain = _expected(rec, history, 5)["item_ids"]
        status, answer, _ = _recommend(served["url"], {"history": history, "k": 5, "exclude": plain[:2]})
        assert status == 200 and not set(plain[:2]) & {i["item_id"] for i in answer["items"]}
    if options["explain"]:
        status, answer, _ = _recommend(served["url"], {"history": history, "k": 3, "explain": True})
        assert status == 200 and all(set(i["because"]) <= set(history) for i in answer["items"]), answer
    if options["diversity"]:
        status, answer, _ = _recommend(served["url"], {"history": history, "k": 5, "diversity": 0.5})
        assert status == 200 and len(answer["items"]) == 5
        text_space = Recommender.from_folder(served["packages"]["a"]).use_diversity_space("text", served["encoder"])
        assert [i["item_id"] for i in answer["items"]] == text_space.recommend([history], 5, diversity=0.5)[0]["item_ids"]
        assert version["diversity_space"] == "text"


def test_healthz_and_version(served):
    status, health, _ = _request(f"{served['url']}/healthz")
    assert status == 200 and health["status"] == "ok" and health["model"] == {"name": NAME, "version": "1"}
    assert health["registry_poll"]["last_error"] is None
    status, version, _ = _request(f"{served['url']}/version")
    assert status == 200
    assert (version["name"], version["version"], version["alias"], version["follows_alias"]) == (NAME, "1", ALIAS, True)
    assert set(version["options"]) == {"exclude", "diversity", "explain"} and version["loaded_at"].endswith("Z")
    assert version["num_items"] == NUM_ITEMS and version["max_k"] == 50


def _bad_requests(options: dict) -> list[tuple[str, bytes, int, str]]:
    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    cases = [
        ("unknown field", body({"history": [], "user": "u"}), 400, "unknown field"),
        ("history not a list", body({"history": "a,b"}), 400, "history: expected an array"),
        ("id not a string", body({"history": [item_id(1), 7]}), 400, "history[1]"),
        ("no history", body({"k": 3}), 400, "history: required"),
        ("k zero", body({"history": [], "k": 0}), 400, "k: must be in 1..50"),
        ("k too large", body({"history": [], "k": 51}), 400, "k: must be in 1..50"),
        ("k a string", body({"history": [], "k": "5"}), 400, "k: expected an integer"),
        ("diversity out of range", body({"history": [], "diversity": 1.5}), 400, "diversity: must be in [0, 1]"),
        ("explain not bool", body({"history": [], "explain": "yes"}), 400, "explain: expected true or false"),
        ("history too long", body({"history": ["x"] * 1001}), 400, "at most 1000 item ids"),
        ("not JSON", b"history=a", 400, "not valid JSON"),
        ("NaN", b'{"history": [], "diversity": NaN}', 400, "not valid JSON"),
        ("not UTF-8", b'{"history": ["\xff\xfe"]}', 400, "not valid UTF-8"),
        ("empty body", b"", 400, "empty"),
        ("a JSON array", body([{"history": []}]), 400, "expected a JSON object"),
        ("10 MB", b'{"history": ["' + b"x" * (10 * 2**20) + b'"]}', 413, "exceeds the limit"),
    ]
    for option, value in (("diversity", 0.5), ("explain", True), ("exclude", [item_id(1)])):
        if not options[option]:
            cases.append((f"{option} unsupported", body({"history": [], option: value}), 400,
                          "not supported by this model"))
    return cases


def test_bad_requests_get_one_line_json_4xx_and_the_replica_goes_on(served):
    url = served["url"]
    _, version, _ = _request(f"{url}/version")
    for label, body, status, needle in _bad_requests(version["options"]):
        got, answer, text = _request(f"{url}/recommend", body, method="POST")
        assert got == status, (label, got, text[:300])
        assert set(answer) == {"error"} and needle in answer["error"], (label, answer)
        assert "\n" not in text.strip(), label
    for path, method, status in (("/nope", "GET", 404), ("/recommend", "GET", 405), ("/healthz", "POST", 405)):
        got, answer, text = _request(f"{url}{path}", b"{}" if method == "POST" else None, method=method)
        assert got == status and set(answer) == {"error"} and "\n" not in text.strip(), (path, got, text)
    status, answer, _ = _recommend(url, {"history": [item_id(2)], "k": 3})
    assert status == 200 and len(answer["items"]) == 3


def test_concurrent_requests_are_batched_and_all_answered_correctly(served):
    rec = served["recommenders"]["a"]
    cases = [([item_id(1 + (i * 7) % NUM_ITEMS), item_id(1 + (i * 3) % NUM_ITEMS)], 1 + i % 10) for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda case: _recommend(served["url"], {"history": case[0], "k": case[1]}), cases))
    for (history, k), (status, answer, _) in zip(cases, answers):
        assert status == 200, answer
        _check_answer(answer, _expected(rec, history, k))
    _, health, _ = _request(f"{served['url']}/healthz")
    assert health["batching"]["largest_batch"] > 1, health["batching"]  # some requests shared a model call
    assert health["batching"]["batches"] < health["batching"]["requests"]


def test_bench_serve_against_the_app(served, tmp_path, capsys):
    """`llmrec-dist bench serve --url`: a few seconds at a low rate; the scenarios the model lacks are
    skipped with a note, and the JSON result carries the figures."""
    import argparse

    from llmrec_dist.cli import bench

    histories = tmp_path / "histories.txt"
    histories.write_text(f"{item_id(1)},{item_id(2)}\n" + json.dumps([item_id(7)]) + "\n\n")
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["bench", "serve", "--url", served["url"], "--histories", str(histories),
                              "--rate", "8", "--duration", "2", "--warmup", "0.5", "--k", "5", "--out", str(tmp_path / "out")])
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "serve.json").read_text())
    rows = {row["scenario"]: row for row in result["figures"]["rows"]}
    assert rows["plain"]["sent"] == 16 and rows["plain"]["failures"] == 0 and rows["plain"]["versions"] == {"1": 16}
    assert rows["plain"]["p50_ms"] <= rows["plain"]["p99_ms"]
    _, version, _ = _request(f"{served['url']}/version")
    for option in ("explain", "diversity"):
        assert (option in rows) == version["options"][option]
        assert (option in result["figures"]["skipped"]) != version["options"][option]
        if not version["options"][option]:
            assert f"skipped {option}: the model does not support {option}" in printed


def test_alias_switch_under_load_drops_no_request(served):
    """Concurrent clients send requests while the alias moves to v2: every request gets a 200, each answer
    is exactly what the version it names would give, and once v2 answers, v1 never answers again."""
    from llmrec_dist.tracking import client

    url, recs = served["url"], served["recommenders"]
    history, k = [item_id(5), item_id(11)], 6
    expected = {"1": _expected(recs["a"], history, k), "2": _expected(recs["b"], history, k)}
    assert expected["1"]["item_ids"] != expected["2"]["item_ids"] or expected["1"]["scores"] != expected["2"]["scores"]
    results: list[tuple[float, int, dict]] = []  # (start time, status, answer)
    lock, stop = threading.Lock(), threading.Event()

    def client_loop():
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, answer, _ = _recommend(url, {"history": history, "k": k})
            except Exception as err:  # a dropped connection counts as a failure
                status, answer = -1, {"error": repr(err)}
            with lock:
                results.append((started, status, answer))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        switched_at = time.monotonic()
        client(served["uri"]).set_registered_model_alias(NAME, ALIAS, "2")
        deadline = switched_at + 90
        while time.monotonic() < deadline:
            with lock:
                seen_v2 = [r for r in results if r[1] == 200 and r[2]["model"]["version"] == "2"]
            if len(seen_v2) >= 20:
                break
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    failures = [r for r in results if r[1] != 200]
    assert not failures, failures[:3]
    before = [r for r in results if r[0] < switched_at]
    assert before and all(r[2]["model"]["version"] == "1" for r in before)
    versions = [r[2]["model"]["version"] for r in sorted(results)]
    first_v2 = versions.index("2")  # raises if v2 never answered
    # One replica: requests that started after v2 first answered are all v2 (no flapping back).
    first_v2_start = sorted(results)[first_v2][0]
    assert all(r[2]["model"]["version"] == "2" for r in results if r[0] > first_v2_start + 0.5)
    for _, _, answer in results:
        _check_answer(answer, expected[answer["model"]["version"]])
    print(f"\nalias switch: {len(results)} requests, {len(before)} before the switch, "
          f"first v2 answer {first_v2_start - switched_at:.2f} s after it")
    _, health, _ = _request(f"{url}/healthz")
    assert health["model"]["version"] == "2"


def test_registry_errors_are_shown_and_the_model_keeps_serving(served):
    from llmrec_dist.tracking import client

    registry = client(served["uri"])
    registry.delete_registered_model_alias(NAME, ALIAS)
    try:
        deadline = time.monotonic() + 30
        while True:
            _, health, _ = _request(f"{served['url']}/healthz")
            if health["registry_poll"]["last_error"] or time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        assert "no alias 'champion'" in (health["registry_poll"]["last_error"] or ""), health
        assert health["status"] == "ok" and health["model"]["version"] == "2"
        status, answer, _ = _recommend(served["url"], {"history": [item_id(1)], "k": 2})
        assert status == 200 and answer["model"]["version"] == "2"
    finally:
        registry.set_registered_model_alias(NAME, ALIAS, "2")
