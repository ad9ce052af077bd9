"""The registry contract on a tiny random model package (no MLflow server)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec_dist.batching import left_pad
from llmrec_dist.model import build_model
from llmrec_dist.registry.package import build_model_package
from llmrec_dist.registry.recommender import Recommender, UnknownItemWarning
from mlflow_db import sqlite_uri
from registry_fixtures import (
    NUM_ITEMS,
    TINY_MODEL,
    item_id,
    make_package,
    popularity,
    write_dataset,
    write_tiny_checkpoint,
)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def rec(package):
    return Recommender.from_folder(package)


@pytest.fixture(scope="module")
def rec_keep_seen(tmp_path_factory):
    return Recommender.from_folder(make_package(tmp_path_factory.mktemp("keep"), exclude_seen=False))


def ids(*indices: int) -> list[str]:
    return [item_id(i) for i in indices]


def popular_ids(k: int) -> list[str]:
    order = sorted(range(1, NUM_ITEMS + 1), key=lambda i: (-popularity()[i - 1], i))
    return ids(*order[:k])


def recommend_quietly(rec, histories, k=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownItemWarning)
        return rec.recommend(histories, k)


# --------------------------------------------------------------------------------------- package
def test_package_layout(package, tmp_path):
    names = sorted(p.name for p in package.iterdir())
    assert names == ["items.parquet", "manifest.json", "model.json", "model.safetensors", "recommender.json"]
    settings = json.loads((package / "recommender.json").read_text())
    meta = json.loads((package / "model.json").read_text())
    manifest = json.loads((package / "manifest.json").read_text())
    assert settings["format_version"] == 1 and settings["exclude_seen"] is True and settings["default_k"] == 10
    assert meta["dataset_hash"] == manifest["content_hash"] == settings["dataset_hash"]
    assert meta["num_items"] == NUM_ITEMS and meta["model"]["max_len"] == 20


def test_package_refuses_another_dataset(tmp_path):
    manifest = write_dataset(tmp_path / "a")
    other = write_dataset(tmp_path / "b", salt=" (edited)")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", manifest["content_hash"])
    with pytest.raises(ValueError, match="trained on dataset") as info:
        build_model_package(ckpt, tmp_path / "b", tmp_path / "pkg")
    assert manifest["content_hash"] in str(info.value) and other["content_hash"] in str(info.value)
    assert not (tmp_path / "pkg").exists()


def test_package_refuses_mismatched_checkpoint(tmp_path):
    manifest = write_dataset(tmp_path / "data", num_items=NUM_ITEMS)
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", manifest["content_hash"], num_items=NUM_ITEMS + 1)
    with pytest.raises(ValueError, match=f"num_items={NUM_ITEMS + 1}"):
        build_model_package(ckpt, tmp_path / "data", tmp_path / "pkg")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt2", manifest["content_hash"])
    meta = json.loads((ckpt / "model.json").read_text())
    meta["model"]["hidden_size"] = 32
    (ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit the model"):
        build_model_package(ckpt, tmp_path / "data", tmp_path / "pkg")
    assert not list(tmp_path.glob("*pkg*"))  # nothing half-written


def test_package_refuses_non_empty_output(tmp_path, package):
    manifest = write_dataset(tmp_path / "data")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", manifest["content_hash"])
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        build_model_package(ckpt, tmp_path / "data", tmp_path / "pkg")
    assert (tmp_path / "pkg" / "keep.txt").read_text() == "mine"


def test_package_from_prepared_dataset(tmp_path):
    from llmrec_dist.data.dataset_format import read_items
    from llmrec_dist.data.prepare import prepare_dataset

    manifest = prepare_dataset("synthetic", tmp_path / "data", synthetic={"n_users": 200, "n_items": 60})
    n = manifest["counts"]["items"]
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", manifest["content_hash"], num_items=n)
    rec = Recommender.from_folder(build_model_package(ckpt, tmp_path / "data", tmp_path / "pkg"))
    items = read_items(tmp_path / "data")
    history = items.column("item_id").to_pylist()[:3]
    (out,) = rec.recommend([history], k=5)
    assert len(out["item_ids"]) == 5 and not set(out["item_ids"]) & set(history)
    texts = dict(zip(items.column("item_id").to_pylist(), items.column("text").to_pylist()))
    assert out["texts"] == [texts[i] for i in out["item_ids"]]


# ------------------------------------------------------------------------------------- recommend
def test_output_shape_and_scores_match_the_model(rec):
    histories = [ids(1, 2, 3), ids(10), ids(5, 4, 3, 2, 1)]
    out = rec.recommend(histories, k=5)
    assert len(out) == 3
    with torch.no_grad():
        raw = rec.model.score_next(torch.from_numpy(left_pad([[1, 2, 3], [10], [5, 4, 3, 2, 1]], 20)))
    for result, seen, row in zip(out, histories, raw):
        assert set(result) == {"item_ids", "scores", "texts"}
        assert len(result["item_ids"]) == len(result["scores"]) == len(result["texts"]) == 5
        assert all(isinstance(s, float) for s in result["scores"])
        assert result["scores"] == sorted(result["scores"], reverse=True)
        idx = [rec.index[i] for i in result["item_ids"]]
        np.testing.assert_allclose(result["scores"], row[idx].numpy(), rtol=0, atol=1e-6)
        # Nothing unseen outside the list scores higher than the K-th item.
        unseen = [i for i in range(1, NUM_ITEMS + 1) if item_id(i) not in seen and i not in idx]
        assert row[unseen].max().item() <= result["scores"][-1]
        assert result["texts"] == [rec.text_of(i) for i in result["item_ids"]]


def test_a_llama_block_package_scores_like_the_model_it_was_built_from(tmp_path):
    cfg = dataclasses.replace(TINY_MODEL, block="llama", activation="silu")
    loaded = Recommender.from_folder(make_package(tmp_path, seed=3, model_cfg=cfg))
    assert loaded.model.encoder.config.model_type == "llama" and not loaded.model.training
    torch.manual_seed(3)  # the same draw as the packaged checkpoint's
    model = build_model(cfg, NUM_ITEMS).eval()
    seq = torch.from_numpy(left_pad([[1, 2, 3], [10], [5, 4, 3, 2, 1]], cfg.max_len))
    torch.testing.assert_close(loaded.model.score_next(seq), model.score_next(seq), rtol=0, atol=1e-6)


def test_seen_items_are_excluded(rec, rec_keep_seen):
    history = ids(1, 2, 3, 4, 5, 6)
    (out,) = rec.recommend([history], k=NUM_ITEMS)
    assert len(out["item_ids"]) == NUM_ITEMS - 6 and not set(out["item_ids"]) & set(history)
    (kept,) = rec_keep_seen.recommend([history], k=NUM_ITEMS)
    assert sorted(kept["item_ids"]) == ids(*range(1, NUM_ITEMS + 1))


def test_unknown_ids_warn_once_and_are_skipped(rec):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = rec.recommend([["zzz", item_id(1), "yyy"], [item_id(1)]], k=5)
    unknown = [w for w in caught if issubclass(w.category, UnknownItemWarning)]
    assert len(unknown) == 1 and "'zzz'" in str(unknown[0].message) and "'yyy'" in str(unknown[0].message)
    assert out[0] == out[1]

    many = [f"unknown-{i}" for i in range(8)]
    with pytest.warns(UnknownItemWarning) as record:
        rec.recommend([many[:4], many[4:]], k=3)
    assert len(record) == 1
    message = str(record[0].message)
    assert "'unknown-4'" in message and "'unknown-5'" not in message and "and 3 more" in message


def test_empty_or_all_unknown_history_gets_popularity(rec):
    out = recommend_quietly(rec, [[], ["nope"]], k=4)
    for result in out:
        assert result["item_ids"] == popular_ids(4)  # ties (items 3 and 7) in item order
        assert result["scores"] == [float(popularity()[rec.index[i] - 1]) for i in popular_ids(4)]
    assert out[0]["item_ids"][:2] == ids(3, 7) and out[0]["scores"][:2] == [200.0, 200.0]


def test_k_validation(rec):
    for bad, match in [(0, "between 1 and the catalogue size"), (NUM_ITEMS + 1, f"\\({NUM_ITEMS}\\), got 31"),
                       (2.5, "positive integer, got float"), ("5", "positive integer, got str"),
                       (True, "positive integer, got bool"), (-3, "between 1")]:
        with pytest.raises(ValueError, match=match):
            rec.recommend([ids(1)], k=bad)
    with pytest.raises(ValueError, match="k has 1 values for 2 histories"):
        rec.recommend([ids(1), ids(2)], k=[3])
    assert len(rec.recommend([ids(1)], k=NUM_ITEMS)[0]["item_ids"]) == NUM_ITEMS - 1
    assert [len(r["item_ids"]) for r in rec.recommend([ids(1), []], k=[2, 7])] == [2, 7]
    assert len(rec.recommend([ids(1)])[0]["item_ids"]) == 10  # the package default


def test_bad_histories_raise(rec):
    with pytest.raises(ValueError, match=r"histories\[1\]: history must be a list of item id strings, got str"):
        rec.recommend([ids(1), "item-001"])
    with pytest.raises(ValueError, match=r"histories\[0\]: history\[1\] must be an item id string, got int"):
        rec.recommend([[item_id(1), 2]])


def test_long_history_uses_last_max_len_but_excludes_all(rec):
    long = ids(*range(1, 26))  # 25 items > max_len 20
    (out,) = rec.recommend([long], k=NUM_ITEMS)
    assert sorted(out["item_ids"]) == ids(*range(26, NUM_ITEMS + 1))
    (tail,) = rec.recommend([long[-20:]], k=NUM_ITEMS)
    expected = [(i, s) for i, s in zip(tail["item_ids"], tail["scores"]) if i not in long[:5]]
    assert list(zip(out["item_ids"], out["scores"])) == expected


def test_batch_equals_one_by_one(rec):
    rng = np.random.default_rng(0)
    histories = [ids(*rng.integers(1, NUM_ITEMS + 1, size=n)) for n in (1, 3, 7, 20, 24, 2, 11, 5)]
    histories += [[], ["nope", item_id(4)]]
    ks = [int(k) for k in rng.integers(1, 12, size=len(histories))]
    default_batch, rec.batch_size = rec.batch_size, 3  # several forward passes, differently padded
    try:
        batched = recommend_quietly(rec, histories, ks)
    finally:
        rec.batch_size = default_batch
    single = [recommend_quietly(rec, [h], k)[0] for h, k in zip(histories, ks)]
    for b, s in zip(batched, single):
        assert b["item_ids"] == s["item_ids"]
        np.testing.assert_allclose(b["scores"], s["scores"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- DataFrame
def test_predict_frame_contract(rec):
    df = pd.DataFrame({"history": [ids(1, 2), [], np.array(ids(9), dtype=object)], "k": [3, np.nan, 5]},
                      index=[10, 11, 12])
    out = rec.predict_frame(df)
    assert list(out.columns) == ["item_ids", "scores"] and list(out.index) == [10, 11, 12]
    assert [len(v) for v in out["item_ids"]] == [3, 10, 5]
    assert out["item_ids"].iloc[1] == popular_ids(10)
    assert out["item_ids"].iloc[0] == rec.recommend([ids(1, 2)], k=3)[0]["item_ids"]
    assert all(isinstance(s, float) for s in out["scores"].iloc[0])
    no_k = rec.predict_frame(pd.DataFrame({"history": [ids(1)]}))
    assert len(no_k["item_ids"].iloc[0]) == 10


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"items": [["a"]]}), "must have a 'history' column"),
    (pd.DataFrame({"history": [["a"], 3]}), "row 1: history must be a list of item id strings, got int"),
    (pd.DataFrame({"history": [None]}), "row 0: history must be a list of item id strings, got NoneType"),
    (pd.DataFrame({"history": ["item-001"]}), "row 0: history must be a list of item id strings, got str"),
    (pd.DataFrame({"history": [[item_id(1), 7]]}), r"row 0: history\[1\] must be an item id string, got int"),
    (pd.DataFrame({"history": [[], []], "k": [0, 100]}),
     "row 0: k must be between 1 and the catalogue size .* row 1: k must be between"),
    (pd.DataFrame({"history": [[]], "k": ["3"]}), "row 0: k must be a positive integer, got str"),
])
def test_predict_frame_rejects_bad_input(rec, frame, message):
    with pytest.raises(ValueError, match=message):
        rec.predict_frame(frame)


def test_predict_frame_reports_all_problems_at_once(rec):
    frame = pd.DataFrame({"history": [1, ["a"], 2.0], "k": [1, 0, 1]})
    with pytest.raises(ValueError) as info:
        rec.predict_frame(frame)
    text = str(info.value)
    assert "row 0: history" in text and "row 1: k" in text and "row 2: history" in text


# --------------------------------------------------------------------------------- pyfunc wrapper
def test_pyfunc_wrapper_is_light_and_matches(rec, package):
    from llmrec_dist.registry.pyfunc import RecommenderPyfunc, as_frame

    wrapper = RecommenderPyfunc()
    assert len(pickle.dumps(wrapper)) < 1000
    wrapper.load_context(types.SimpleNamespace(artifacts={"package": str(package)}))
    assert len(pickle.dumps(wrapper)) < 1000  # even loaded, the model is never pickled
    rows = [{"history": ids(1, 2), "k": 4}, {"history": [], "k": 2}]
    out = wrapper.predict(None, rows)
    expected = rec.predict_frame(pd.DataFrame(rows))
    assert out["item_ids"].tolist() == expected["item_ids"].tolist()
    assert out["scores"].tolist() == expected["scores"].tolist()
    assert wrapper.predict(None, rows[0])["item_ids"].tolist() == expected["item_ids"].tolist()[:1]
    with pytest.raises(ValueError, match="input must be a DataFrame"):
        as_frame("item-001")


# ------------------------------------------------------------------------------------------- CLI
def _cli_args(*argv: str):
    from llmrec_dist.cli import recommend

    parser = argparse.ArgumentParser()
    recommend.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["recommend", *argv])


def test_cli_recommend_from_folder(rec, package, capsys):
    from llmrec_dist.cli import recommend

    args = _cli_args("--model", str(package), "--history", f"{item_id(1)}, {item_id(2)}", "-k", "3")
    assert args.func is recommend.run
    assert recommend.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = rec.recommend([ids(1, 2)], k=3)[0]
    assert lines[0].split()[:3] == ["rank", "item", "id"] and len(lines) == 4
    for rank, (line, item) in enumerate(zip(lines[1:], expected["item_ids"]), start=1):
        assert line.split()[:2] == [str(rank), item]
        assert len(line) < 120  # text truncated

    assert recommend.run(_cli_args("--model", str(package), "--history", "", "-k", "2", "--json")) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in payload["recommendations"]] == popular_ids(2)
    assert payload["recommendations"][0]["text"] == rec.text_of(popular_ids(1)[0])


@pytest.mark.parametrize("argv, message", [
    (["-k", "0"], "-k must be a positive integer"),
    (["-k", "1000"], "k must be between 1 and the catalogue size"),
    (["--model", "/nonexistent/model/folder"], ""),
])
def test_cli_errors_exit_2_with_one_line(package, capsys, argv, message, tmp_path, monkeypatch):
    from llmrec_dist.cli import recommend

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path / 'db.sqlite'))
    base = ["--model", str(package), "--history", item_id(1)]
    assert recommend.run(_cli_args(*base, *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmrec-dist recommend: ") and message in err[0]
