"""Serving a rating/click model (Reranker) and a retriever + re-ranker chain, from packages on disk."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec_dist.registry.recommender import Recommender
from llmrec_dist.registry.reranker import Chain, Reranker, build_chain_package, load_serving
from registry_fixtures import item_id, make_package, make_reranker_package


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    retriever = make_package(root / "retriever", seed=0)
    dataset = root / "retriever" / "dataset"
    return {"retriever": retriever, "reranker": make_reranker_package(root / "reranker", dataset),
            "reads_ratings": make_reranker_package(root / "fb", dataset, seed=6, feedback_input=True),
            "other": make_package(root / "other", seed=1, salt=" (v2)"), "root": root}


def test_reranker_orders_candidates_by_the_models_probability(parts):
    reranker = Reranker.from_folder(parts["reranker"])
    history, candidates = [item_id(1), item_id(2)], [item_id(i) for i in (3, 30, 10, 20)]
    out = reranker.predict_frame(pd.DataFrame({"history": [history], "candidates": [candidates]}))
    logits = reranker.model.predict([np.array([1, 2])], None, torch.tensor([[3, 30, 10, 20]]), reranker.rule)[0]
    expected = sorted(zip(candidates, torch.sigmoid(logits).tolist()), key=lambda p: -p[1])
    assert out["item_ids"][0] == [i for i, _ in expected]
    assert out["scores"][0] == pytest.approx([p for _, p in expected], abs=1e-6)
    assert all(0 < p < 1 for p in out["scores"][0])
    assert out["item_ids"][0][0] == item_id(30)  # the largest item bias wins here


def test_reranker_input_errors_name_the_row(parts):
    reranker = Reranker.from_folder(parts["reranker"])
    with pytest.raises(ValueError, match="row 1: candidate 'nope' is not in the model's catalogue"):
        reranker.predict_frame(pd.DataFrame({"history": [[item_id(1)], [item_id(1)]],
                                             "candidates": [[item_id(2)], ["nope"]]}))
    with pytest.raises(ValueError, match=r"row 0: candidates\[1\] must be an item id string, got int"):
        reranker.predict_frame(pd.DataFrame({"history": [[item_id(1)]], "candidates": [[item_id(2), 7]]}))
    with pytest.raises(ValueError, match="'history' and 'candidates' columns"):
        reranker.predict_frame(pd.DataFrame({"history": [[item_id(1)]]}))
    with pytest.raises(ValueError, match="a next-item model ranks the catalogue"):
        Reranker.from_folder(parts["retriever"])
    with pytest.raises(ValueError, match="scores candidate items"):
        Recommender.from_folder(parts["reranker"])


def test_a_reranker_that_reads_ratings_needs_them(parts):
    reranker = Reranker.from_folder(parts["reads_ratings"])
    frame = pd.DataFrame({"history": [[item_id(1), item_id(2)]], "candidates": [[item_id(3), item_id(4)]]})
    with pytest.raises(ValueError, match="add a 'feedback' column"):
        reranker.predict_frame(frame)
    with pytest.raises(ValueError, match=r"row 0: feedback must hold one finite rating per history id \(2\)"):
        reranker.predict_frame(frame.assign(feedback=[[4.0]]))
    low = reranker.predict_frame(frame.assign(feedback=[[0.0, 0.0]]))
    high = reranker.predict_frame(frame.assign(feedback=[[1.0, 1.0]]))
    assert low["scores"][0] != high["scores"][0]  # the ratings reach the model


def test_chain_reorders_the_top_n_and_keeps_the_rest(parts):
    retriever, reranker = Recommender.from_folder(parts["retriever"]), Reranker.from_folder(parts["reranker"])
    history = [item_id(4), item_id(9), item_id(2)]
    wide = retriever.recommend([history], k=12)[0]
    chain = Chain(retriever, reranker, top_n=5, blend=0.0)
    got = chain.recommend([history], k=12)[0]
    head = wide["item_ids"][:5]
    probability = dict(zip(head, reranker.score([history], [head])[0]))
    assert got["item_ids"][:5] == sorted(head, key=lambda i: -probability[i])  # the re-ranker's order
    assert got["item_ids"][5:] == wide["item_ids"][5:]  # the rest in retriever order, retriever scores
    assert got["scores"][5:] == wide["scores"][5:]
    assert not set(got["item_ids"]) & set(history)  # the history stays out
    # a huge blend gives the retriever's order back; k below top N cuts the re-ordered head
    assert Chain(retriever, reranker, 5, 1e6).recommend([history], k=12)[0]["item_ids"] == wide["item_ids"]
    assert chain.recommend([history], k=3)[0]["item_ids"] == got["item_ids"][:3]
    # no known item: the retriever's popularity fallback, untouched
    assert chain.recommend([["unknown"]], k=4)[0] == retriever.recommend([[]], k=4)[0]


def test_chain_package_round_trip_and_refusals(parts, tmp_path):
    folder = build_chain_package(parts["retriever"], parts["reranker"], tmp_path / "chain", top_n=5, blend=0.5)
    assert json.loads((folder / "chain.json").read_text())["top_n"] == 5
    chain = load_serving(folder)
    assert isinstance(chain, Chain) and chain.blend == 0.5
    frame = pd.DataFrame({"history": [[item_id(4), item_id(9)], []], "k": [6, 2]})
    direct = Chain(Recommender.from_folder(parts["retriever"]), Reranker.from_folder(parts["reranker"]), 5, 0.5)
    assert chain.predict_frame(frame)["item_ids"].tolist() == direct.predict_frame(frame)["item_ids"].tolist()
    with pytest.raises(ValueError, match="a chain needs both from the same dataset"):
        build_chain_package(parts["other"], parts["reranker"], tmp_path / "bad", 5, 0.0)
    with pytest.raises(ValueError, match="a next-item model ranks the catalogue"):
        build_chain_package(parts["retriever"], parts["retriever"], tmp_path / "bad2", 5, 0.0)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()
    (folder / "chain.json").write_text(json.dumps({"format_version": 1, "top_n": 0, "blend": 0.0}))
    with pytest.raises(ValueError, match=r"chain.json: top_n must be a positive integer, got 0"):
        load_serving(folder)
    (folder / "chain.json").write_text("{not json")
    with pytest.raises(ValueError, match="chain.json: not valid UTF-8 JSON"):
        load_serving(folder)


def test_a_chain_whose_reranker_reads_ratings_takes_a_feedback_column(parts):
    chain = Chain(Recommender.from_folder(parts["retriever"]), Reranker.from_folder(parts["reads_ratings"]), 5)
    history = [item_id(4), item_id(9)]
    with pytest.raises(ValueError, match="add a 'feedback' column"):
        chain.predict_frame(pd.DataFrame({"history": [history], "k": [3]}))
    out = chain.predict_frame(pd.DataFrame({"history": [history], "k": [3], "feedback": [[4.0, 2.0]]}))
    assert len(out["item_ids"][0]) == 3
