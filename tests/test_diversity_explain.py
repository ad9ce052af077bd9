"""Diversity (MMR), exclusion and explanations of the serving model, on a tiny random package (no Ray)."""

from __future__ import annotations

import argparse
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec_dist.batching import left_pad
from llmrec_dist.diversity import mmr_select, normalised_relevance, pool_size
from llmrec_dist.metrics import catalogue_coverage, intra_list_diversity
from llmrec_dist.registry.recommender import Recommender, UnknownItemWarning
from registry_fixtures import NUM_ITEMS, item_id, item_text, make_package, make_reranker_package
from mlflow_db import sqlite_uri
from text_fixtures import make_tiny_encoder

HISTORIES = [[item_id(i) for i in h] for h in ([1, 2, 3], [4], [5, 9, 12, 3, 7, 22, 8], list(range(1, 26)))]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("divx"))


@pytest.fixture(scope="module")
def rec(package):
    return Recommender.from_folder(package)


def indices(rec, ids):
    return [rec.index[i] for i in ids]


GENRES = ["space opera", "murder mystery", "romantic comedy", "cooking show", "war documentary"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny random BERT reading the package's item texts and the genre texts."""
    texts = [item_text(i) for i in range(1, NUM_ITEMS + 1)] + GENRES
    return str(make_tiny_encoder(tmp_path_factory.mktemp("divx-enc"), texts))


@pytest.fixture(scope="module")
def genre_rec(package, encoder):
    """The package's model over a catalogue whose texts are five genres (item i: genre i mod 5), MMR on the
    text embeddings: items of one genre have one text, so one vector."""
    base = Recommender.from_folder(package)
    rec = Recommender(base.model, base.item_ids, [GENRES[i % 5] for i in range(1, NUM_ITEMS + 1)],
                      base.popularity)
    return rec.use_diversity_space("text", encoder)


# ------------------------------------------------------------------------------------------ metrics
def test_intra_list_diversity_by_hand():
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    # list 1: items 1, 2 orthogonal -> distance 1. list 2: items 1, 3, 4: cos(1,3)=1/sqrt2, cos(1,4)=-1,
    # cos(3,4)=-1/sqrt2 -> distances 1-0.7071, 2, 1+0.7071 -> mean 4/3. A single item has no pair.
    value = intra_list_diversity([[1, 2], torch.tensor([1, 3, 4]), [2]], vectors)
    assert value == pytest.approx((1 + 4 / 3) / 2)
    assert math.isnan(intra_list_diversity([[1]], vectors))


def test_catalogue_coverage_by_hand():
    assert catalogue_coverage([[1, 2], [2, 3], torch.tensor([3, 0])], num_items=6) == pytest.approx(3 / 6)
    assert catalogue_coverage([], num_items=4) == 0
    with pytest.raises(ValueError, match="num_items"):
        catalogue_coverage([[1]], num_items=0)


# ----------------------------------------------------------------------------------------------- MMR
def test_normalised_relevance():
    out = normalised_relevance(torch.tensor([[3.0, 1.0, 2.0, -math.inf], [5.0, 5.0, -math.inf, -math.inf]]))
    assert out[0, :3].tolist() == [1.0, 0.0, 0.5] and out[0, 3] == -math.inf
    assert out[1, :2].tolist() == [1.0, 1.0]


def test_mmr_picks_the_unlike_item_on_a_constructed_case():
    # items 0-2 nearly identical and the most relevant, item 3 orthogonal and less relevant
    vectors = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [0.0, 1.0]]])
    relevance = torch.tensor([[1.0, 0.99, 0.98, 0.5]])
    plain = mmr_select(relevance, vectors, 2, 0.0)[0].tolist()
    diverse = mmr_select(relevance, vectors, 2, 0.5)[0].tolist()
    assert plain == [0, 1] and diverse == [0, 3]
    table = vectors[0]
    assert intra_list_diversity([diverse], table) > intra_list_diversity([plain], table) + 0.9
    # a short pool: picks stop at -1; one λ per row
    short = mmr_select(torch.tensor([[1.0, -math.inf], [1.0, 0.5]]), torch.ones(2, 2, 2), 2, torch.tensor([0.3, 0.0]))
    assert short.tolist() == [[0, -1], [0, 1]]
    assert pool_size(3) == 50 and pool_size(20) == 100


# ---------------------------------------------------------------------------------------- diversity
def test_lambda_zero_is_the_plain_ranking_exactly(rec):
    plain = rec.recommend(HISTORIES, [3, 10, 5, 4])
    for lam in (0.0, 0, [0.0] * 4):
        assert rec.recommend(HISTORIES, [3, 10, 5, 4], diversity=lam) == plain
    assert set(plain[0]) == {"item_ids", "scores", "texts"}  # no new keys when the options are off


def test_diversity_raises_ild(rec):
    vectors = torch.cat([torch.zeros(1, rec.item_vectors().shape[1]), torch.from_numpy(rec.item_vectors())])
    ild = {}
    for lam in (0.0, 0.5, 1.0):
        lists = [indices(rec, r["item_ids"]) for r in rec.recommend(HISTORIES, 5, diversity=lam)]
        assert all(len(ids) == 5 == len(set(ids)) for ids in lists)
        ild[lam] = intra_list_diversity(lists, vectors)
    assert ild[0.5] > ild[0.0] and ild[1.0] >= ild[0.5]
    one = rec.recommend(HISTORIES[:1], 5, diversity=0.5)[0]
    assert one["item_ids"][0] == rec.recommend(HISTORIES[:1], 5)[0]["item_ids"][0]  # the first pick is the best
    # per-history λ: only the rows asking for it change
    mixed = rec.recommend(HISTORIES[:2], 5, diversity=[0.0, 0.5])
    alone = rec.recommend(HISTORIES[:1], 5)[0]  # a batch of one: scores equal up to float rounding
    assert mixed[0]["item_ids"] == alone["item_ids"]
    np.testing.assert_allclose(mixed[0]["scores"], alone["scores"], rtol=0, atol=1e-5)
    assert mixed[1]["item_ids"] == rec.recommend(HISTORIES[1:2], 5, diversity=0.5)[0]["item_ids"]


def test_text_space_spreads_a_list_over_the_genres(genre_rec, package):
    vectors = genre_rec.diversity_vectors()
    assert vectors.shape == (NUM_ITEMS + 1, 32)
    torch.testing.assert_close(vectors[1], vectors[6])  # one genre, one text, one vector
    assert float(torch.nn.functional.cosine_similarity(vectors[1], vectors[2], dim=0)) < 0.999
    model_space = Recommender(genre_rec.model, genre_rec.item_ids, genre_rec.texts, genre_rec.popularity)
    for history in HISTORIES:
        plain = genre_rec.recommend([history], 5)[0]
        assert model_space.recommend([history], 5)[0] == plain  # the space changes nothing at λ = 0
        spread = genre_rec.recommend([history], 5, diversity=1.0)[0]
        # λ = 1: after the best item, each pick is the least like those picked: a new genre while one is left
        assert spread["item_ids"][0] == plain["item_ids"][0]
        assert sorted(spread["texts"]) == sorted(GENRES)
    text_ild, model_ild = {}, {}
    for name, which in (("text", genre_rec), ("model", model_space)):
        lists = [indices(which, r["item_ids"]) for r in which.recommend(HISTORIES, 5, diversity=0.5)]
        text_ild[name] = intra_list_diversity(lists, vectors)
        model_ild[name] = intra_list_diversity(lists, model_space.diversity_vectors())
    assert text_ild["text"] > text_ild["model"] and model_ild["model"] > model_ild["text"]
    # an empty history (the popularity fallback) is diversified in the same space
    popular = genre_rec.recommend([[]], 5, diversity=1.0)[0]
    assert sorted(popular["texts"]) == sorted(GENRES)


def test_text_vectors_are_the_encoders_mean_pooled_output(genre_rec, encoder):
    from transformers import AutoModel, AutoTokenizer

    lm, tokenizer = AutoModel.from_pretrained(encoder).eval(), AutoTokenizer.from_pretrained(encoder)
    batch = tokenizer([GENRES[1], GENRES[3]], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = lm(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)  # item 1 reads GENRES[1], item 3 GENRES[3]
    torch.testing.assert_close(genre_rec.diversity_vectors()[[1, 3]], expected, rtol=1e-4, atol=1e-5)


def test_diversity_space_errors(package, encoder, tmp_path):
    rec = Recommender.from_folder(package)
    with pytest.raises(ValueError, match="diversity_space must be one of model, text, got 'txt'"):
        rec.use_diversity_space("txt")
    with pytest.raises(ValueError, match="text_encoder is the encoder of diversity_space text"):
        rec.use_diversity_space("model", encoder)
    with pytest.raises(FileNotFoundError, match="cannot load a Hugging Face encoder"):
        rec.use_diversity_space("text", str(tmp_path / "no-such-encoder"))
    assert rec.diversity_space == "model"  # a failed switch changes nothing
    assert rec.use_diversity_space("text", encoder).use_diversity_space("model").diversity_vectors() is rec._table()


def test_item_vectors_are_what_the_model_scores_against(rec):
    vectors = rec.item_vectors()
    assert vectors.shape == (NUM_ITEMS, 16) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, rec.model.items.all_items().detach()[1:].numpy())


# ------------------------------------------------------------------------------------------ exclude
def test_exclude_is_honoured(rec):
    plain = rec.recommend(HISTORIES, 5)
    dropped = [r["item_ids"][:2] + ["not-an-item"] for r in plain]
    out = rec.recommend(HISTORIES, 5, exclude=dropped)
    for p, o, d in zip(plain, out, dropped):
        assert not set(d) & set(o["item_ids"]) and o["item_ids"][:3] == p["item_ids"][2:]
    # the popularity fallback and a diversified list honour it too
    popular = rec.recommend([[]], 3)[0]["item_ids"]
    assert rec.recommend([[]], 3, exclude=[popular[:1]])[0]["item_ids"][:2] == popular[1:]
    diverse = rec.recommend(HISTORIES, 5, diversity=0.6, exclude=dropped)
    assert all(not set(d) & set(o["item_ids"]) for o, d in zip(diverse, dropped))
    assert rec.recommend(HISTORIES, 5, exclude=[None, [], (), np.array([], dtype=object)]) == plain


def test_exclude_applies_when_seen_items_are_kept(tmp_path):
    keep = Recommender.from_folder(make_package(tmp_path, exclude_seen=False))
    history = HISTORIES[0]
    plain = keep.recommend([history], 5)[0]["item_ids"]
    out = keep.recommend([history], 5, exclude=[[plain[0]]])[0]["item_ids"]
    assert out == plain[1:] + out[-1:] and plain[0] not in out


# ------------------------------------------------------------------------------------------ explain
def test_explain_returns_history_items_with_their_contributions(rec):
    plain = rec.recommend(HISTORIES, 5)
    out = rec.recommend(HISTORIES, 5, explain=True)
    for history, p, o in zip(HISTORIES, plain, out):
        assert o["item_ids"] == p["item_ids"]
        np.testing.assert_allclose(o["scores"], p["scores"], atol=1e-6)
        assert len(o["because"]) == len(o["because_scores"]) == 5
        for ids, values in zip(o["because"], o["because_scores"]):
            assert 0 < len(ids) <= 3 or history == HISTORIES[1]
            assert set(ids) <= set(history[-20:]) and len(set(ids)) == len(ids)
            assert all(v > 0 for v in values) and values == sorted(values, reverse=True)
    assert rec.recommend([[]], 2, explain=True)[0]["because"] == [[], []]


def test_leave_one_out_matches_a_hand_rescore(rec):
    history = HISTORIES[2]
    out = rec.recommend([history], 4, explain=True)[0]
    rows = indices(rec, history)
    with torch.no_grad():
        full = rec.model.score_next(torch.from_numpy(left_pad([rows], rec.max_len)))[0]
        for item, ids, values in zip(out["item_ids"], out["because"], out["because_scores"]):
            target = rec.index[item]
            drops = {}
            for position, idx in enumerate(rows):
                without = rows[:position] + rows[position + 1:]
                score = rec.model.score_next(torch.from_numpy(left_pad([without], rec.max_len)))[0, target]
                drops[history[position]] = max(drops.get(history[position], -np.inf), (full[target] - score).item())
            expected = sorted(((v, i) for i, v in drops.items() if v > 0), reverse=True)[:3]
            assert ids == [i for _, i in expected]
            np.testing.assert_allclose(values, [v for v, _ in expected], rtol=1e-4, atol=1e-6)


def test_explain_only_on_the_rows_asking(rec):
    out = rec.recommend(HISTORIES[:2], 3, explain=[False, True])
    assert "because" not in out[0] and "because" in out[1]


# --------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, message", [
    ({"diversity": -0.1}, "diversity must be a number between 0 and 1, got -0.1"),
    ({"diversity": 1.5}, "diversity must be a number between 0 and 1"),
    ({"diversity": "0.3"}, "diversity must be a number between 0 and 1"),
    ({"diversity": True}, "diversity must be a number"),
    ({"diversity": float("nan")}, "diversity must be a number"),
    ({"diversity": [0.1]}, "diversity has 1 values for 2 histories"),
    ({"diversity": [0.1, 2]}, r"diversity\[1\] must be a number between 0 and 1"),
    ({"explain": "yes"}, "explain must be true or false"),
    ({"explain": 1}, "explain must be true or false"),
    ({"exclude": "item-001"}, "exclude must be a list with one list of item id strings per history"),
    ({"exclude": [["item-001"]]}, "exclude has 1 lists for 2 histories"),
    ({"exclude": [["item-001"], [7]]}, r"exclude\[1\]: exclude list\[0\] must be an item id string, got int"),
    ({"exclude": [["item-001"], "item-002"]}, r"exclude\[1\]: exclude list must be a list"),
])
def test_bad_options_raise(rec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rec.recommend(HISTORIES[:2], 3, **kwargs)


def test_predict_frame_options_and_their_errors(rec):
    df = pd.DataFrame({"history": HISTORIES[:3], "k": [3, 3, 3],
                       "exclude": [[item_id(30)], None, []], "diversity": [0.0, 0.4, np.nan],
                       "explain": [True, False, None]})
    out = rec.predict_frame(df)
    assert list(out.columns) == ["item_ids", "scores", "because", "because_scores"]
    direct = rec.recommend(HISTORIES[:3], 3, exclude=[[item_id(30)], [], []], diversity=[0.0, 0.4, 0.0],
                           explain=[True, False, False])
    assert out["item_ids"].tolist() == [r["item_ids"] for r in direct]
    assert out["because"].iloc[0] == direct[0]["because"] and out["because"].iloc[1] is None
    old = rec.predict_frame(pd.DataFrame({"history": HISTORIES[:1], "k": [3]}))
    assert list(old.columns) == ["item_ids", "scores"]
    bad = pd.DataFrame({"history": HISTORIES[:3], "exclude": [[1], None, None], "diversity": [0.1, 3.0, 0.0],
                        "explain": [True, False, "no"]})
    with pytest.raises(ValueError) as info:
        rec.predict_frame(bad)
    text = str(info.value)
    assert "row 0: exclude[0] must be an item id string" in text
    assert "row 1: diversity must be a number between 0 and 1, got 3.0" in text
    assert "row 2: explain must be true or false" in text


# ------------------------------------------------------------------------------------ chain, pyfunc
def test_chain_honours_exclude_and_refuses_the_rest(package, tmp_path):
    from llmrec_dist.registry.reranker import Chain, Reranker

    reranker = Reranker.from_folder(make_reranker_package(tmp_path, package.parent / "dataset"))
    chain = Chain(Recommender.from_folder(package), reranker, top_n=10)
    plain = chain.recommend(HISTORIES[:2], 4)
    dropped = [r["item_ids"][:2] for r in plain]
    out = chain.recommend(HISTORIES[:2], 4, exclude=dropped)
    assert all(not set(d) & set(o["item_ids"]) for o, d in zip(out, dropped))
    frame = chain.predict_frame(pd.DataFrame({"history": HISTORIES[:2], "k": [4, 4], "exclude": dropped}))
    assert frame["item_ids"].tolist() == [o["item_ids"] for o in out]
    for column, value in (("diversity", 0.3), ("explain", True)):
        with pytest.raises(ValueError, match=f"a chain does not support {column}"):
            chain.predict_frame(pd.DataFrame({"history": HISTORIES[:1], column: [value]}))


def test_pyfunc_round_trip_with_new_and_old_frames(package, encoder, tmp_path):
    import mlflow

    from llmrec_dist.registry.pyfunc import log_model_package, model_signature
    from llmrec_dist.tracking import end_run, start_run, use_tracking_uri

    signature = model_signature()
    assert {c.name: c.required for c in signature.inputs.inputs} == {
        "history": True, "k": False, "exclude": False, "diversity": False, "explain": False}
    uri = sqlite_uri(tmp_path / 'mlflow.db')
    run_id = start_run(uri, "divx")
    model_uri = log_model_package(package, uri, run_id)
    end_run(uri, run_id)
    with use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(model_uri)
    rec = Recommender.from_folder(package)
    old = model.predict(pd.DataFrame({"history": HISTORIES[:2], "k": [3, 2]}))
    assert list(old.columns) == ["item_ids", "scores"]
    assert old["item_ids"].tolist() == [r["item_ids"] for r in rec.recommend(HISTORIES[:2], [3, 2])]
    assert len(model.predict(pd.DataFrame({"history": HISTORIES[:1]}))["item_ids"].iloc[0]) == 10
    new = model.predict(pd.DataFrame({"history": HISTORIES[:2], "k": [3, 2], "exclude": [[item_id(30)], []],
                                      "diversity": [0.5, 0.0], "explain": [True, True]}))
    expected = rec.recommend(HISTORIES[:2], [3, 2], exclude=[[item_id(30)], []], diversity=[0.5, 0.0], explain=True)
    assert new["item_ids"].tolist() == [r["item_ids"] for r in expected]
    assert [list(map(list, b)) for b in new["because"]] == [r["because"] for r in expected]

    # model_config picks where MMR measures similarity (MLflow passes on only keys the model was logged with)
    with use_tracking_uri(uri):
        text_model = mlflow.pyfunc.load_model(model_uri, model_config={"diversity_space": "text",
                                                                       "text_encoder": encoder})
        with pytest.raises(ValueError, match="diversity_space must be one of model, text, got 'genre'"):
            mlflow.pyfunc.load_model(model_uri, model_config={"diversity_space": "genre"})
    assert text_model.unwrap_python_model().recommender.diversity_space == "text"
    # the opt-in of load_servable(trust_remote_code=True) reaches load_context too (MLflow dropped it once)
    from llmrec_dist.registry.loading import load_servable

    _, predict = load_servable(model_uri, uri, trust_remote_code=True)
    assert predict.__self__.model_config["trust_remote_code"] is True
    assert model.model_config == {"trust_remote_code": False, "diversity_space": "model", "text_encoder": ""}
    assert model.unwrap_python_model().recommender.diversity_space == "model"
    rec.use_diversity_space("text", encoder)
    frame = text_model.predict(pd.DataFrame({"history": HISTORIES, "diversity": [0.7] * 4}))
    assert frame["item_ids"].tolist() == [r["item_ids"] for r in rec.recommend(HISTORIES, diversity=0.7)]


# ---------------------------------------------------------------------------------------------- CLI
def _cli_args(*argv: str):
    from llmrec_dist.cli import recommend

    parser = argparse.ArgumentParser()
    recommend.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["recommend", *argv])


def test_cli_exclude_diversity_explain(rec, package, capsys):
    from llmrec_dist.cli import recommend

    history = ",".join(HISTORIES[2])
    plain = rec.recommend(HISTORIES[2:3], 3)[0]["item_ids"]
    assert recommend.run(_cli_args("--model", str(package), "--history", history, "-k", "3",
                                   "--exclude", f"{plain[0]},nope", "--json")) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in payload["recommendations"]][:2] == plain[1:]

    expected = rec.recommend(HISTORIES[2:3], 3, diversity=0.5, explain=True)[0]
    assert recommend.run(_cli_args("--model", str(package), "--history", history, "-k", "3",
                                   "--diversity", "0.5", "--explain")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 2 * 3
    for n, item in enumerate(expected["item_ids"]):
        assert lines[1 + 2 * n].split()[1] == item
        titles = "; ".join(" ".join(rec.text_of(b).split())[:39] for b in expected["because"][n])
        assert lines[2 + 2 * n].strip().startswith("because: ")
        assert lines[2 + 2 * n].strip()[len("because: "):len("because: ") + 20] == titles[:20]

    assert recommend.run(_cli_args("--model", str(package), "--history", history, "-k", "3", "--explain",
                                   "--json")) == 0
    rows = json.loads(capsys.readouterr().out)["recommendations"]
    assert [b["item_id"] for b in rows[0]["because"]] == rec.recommend(HISTORIES[2:3], 3, explain=True)[0]["because"][0]


def test_cli_bad_diversity_exits_2(package, capsys):
    from llmrec_dist.cli import recommend

    assert recommend.run(_cli_args("--model", str(package), "--history", item_id(1), "--diversity", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diversity must be a number between 0 and 1" in err[0]


def test_cli_diversity_space_text(package, encoder, capsys):
    from llmrec_dist.cli import recommend

    history = ",".join(HISTORIES[3])
    rec = Recommender.from_folder(package).use_diversity_space("text", encoder)
    expected = rec.recommend(HISTORIES[3:], 5, diversity=0.8)[0]["item_ids"]
    assert recommend.run(_cli_args("--model", str(package), "--history", history, "-k", "5", "--diversity", "0.8",
                                   "--diversity-space", "text", "--text-encoder", encoder, "--json")) == 0
    assert [r["item_id"] for r in json.loads(capsys.readouterr().out)["recommendations"]] == expected
    assert recommend.run(_cli_args("--model", str(package), "--history", history, "--diversity", "0.8",
                                   "--text-encoder", encoder)) == 2
    assert "--text-encoder is the encoder of --diversity-space text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli_args("--model", str(package), "--history", history, "--diversity-space", "words")


def test_served_model_source_applies_the_space(package, encoder, tmp_path):
    from llmrec_dist.serving.settings import serve_config_from_dict
    from llmrec_dist.serving.source import ModelSource, ModelSourceError

    loaded = ModelSource(str(package), "", diversity_space="text", text_encoder=encoder).load()
    assert loaded.servable.diversity_space == "text" and loaded.servable.diversity_encoder == encoder
    assert ModelSource(str(package), "").load().servable.diversity_space == "model"
    with pytest.raises(ModelSourceError, match="serve.diversity_space=text: .*cannot load"):
        ModelSource(str(package), "", diversity_space="text", text_encoder=str(tmp_path / "nope")).load()
    cfg = serve_config_from_dict({"serve": {"model": str(package), "diversity_space": "text"}})
    assert (cfg.diversity_space, cfg.text_encoder) == ("text", "")
    with pytest.raises(Exception, match="serve.diversity_space: expected one of 'model', 'text'"):
        serve_config_from_dict({"serve": {"model": str(package), "diversity_space": "genre"}})


def test_unknown_exclude_ids_do_not_warn(rec):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownItemWarning)
        rec.recommend(HISTORIES[:1], 3, exclude=[["nope"]])


# ------------------------------------------------------------------------------------- benchmarks
def _rows(rec):
    from llmrec_dist.evaluation import EvalRows

    histories = [np.asarray(indices(rec, h)) for h in HISTORIES]
    return EvalRows(histories, np.array([6, 10, 13, 27]))


def test_bench_diversity_curve_and_choice(rec, tmp_path):
    from llmrec_dist.bench.diversity import chosen_lambda, diversity_curve, plot

    rows = _rows(rec)
    curve = diversity_curve(rec, rows, [0.0, 0.5])
    served = rec.recommend(HISTORIES, 10)
    lists = [indices(rec, r["item_ids"]) for r in served]
    hits = [lst.index(t) for lst, t in zip(lists, rows.targets) if t in lst]
    assert curve[0]["hr_at_10"] == len(hits) / 4
    assert curve[0]["ndcg_at_10"] == pytest.approx(sum(1 / math.log2(r + 2) for r in hits) / 4)
    table = torch.cat([torch.zeros(1, 16), torch.from_numpy(rec.item_vectors())])
    assert curve[0]["ild_at_10"] == pytest.approx(intra_list_diversity(lists, table))
    assert curve[0]["coverage_at_10"] == pytest.approx(catalogue_coverage(lists, NUM_ITEMS))
    diverse = [indices(rec, r["item_ids"]) for r in rec.recommend(HISTORIES, 10, diversity=0.5)]
    assert curve[1]["ild_at_10"] == pytest.approx(intra_list_diversity(diverse, table))

    assert math.isnan(curve[0]["ild_text_at_10"])  # no text vectors given
    text = torch.randn(NUM_ITEMS + 1, 8, generator=torch.Generator().manual_seed(3))
    with_text = diversity_curve(rec, rows, [0.0, 0.5], text_vectors=text)
    assert with_text[1]["ild_text_at_10"] == pytest.approx(intra_list_diversity(diverse, text))
    assert [r["ild_at_10"] for r in with_text] == [r["ild_at_10"] for r in curve]

    made = [{"lambda": 0.0, "ndcg_at_10": 0.10, "ild_at_10": 0.5, "coverage_at_10": 0.1},
            {"lambda": 0.2, "ndcg_at_10": 0.099, "ild_at_10": 0.6, "coverage_at_10": 0.2},
            {"lambda": 0.5, "ndcg_at_10": 0.097, "ild_at_10": 0.7, "coverage_at_10": 0.3}]
    chosen = chosen_lambda(made)
    assert chosen["lambda"] == 0.2 and chosen["ild_gain"] == pytest.approx(0.1)
    assert chosen["ild_gain_relative"] == pytest.approx(0.2) and math.isnan(chosen["ild_text_gain"])
    for row, ild in zip(made, (0.4, 0.5, 0.6)):
        row["ild_text_at_10"] = ild
    assert chosen_lambda(made)["ild_text_gain_relative"] == pytest.approx(0.25)
    png = plot(made, chosen, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_explain_faithfulness_and_latency(rec):
    from llmrec_dist.bench.explain import explain_latency, faithfulness

    figures = faithfulness(rec, _rows(rec))
    assert figures["users_single_item"] == 1  # the one-item history has nothing to compare with
    assert figures["users_compared"] + figures["users_unexplained"] == 3
    for row in figures["rows"]:
        assert 0 <= row["rank_rate"] + row["rank_tie_rate"] <= 1 and 0 <= row["score_rate"] <= 1
    latency = explain_latency(rec, _rows(rec), requests=3)
    assert [r["mode"] for r in latency] == ["plain", "explain"] and "added_p50_ms" in latency[1]


def test_bench_lambdas_argument():
    from llmrec_dist.cli.bench import _lambdas

    assert _lambdas("0.3,0.1") == [0.0, 0.1, 0.3]
    for bad in ("", "a", "1.5", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _lambdas(bad)


def test_bench_report_renders_both(rec, tmp_path):
    from llmrec_dist.bench import common, report
    from llmrec_dist.bench.diversity import chosen_lambda, diversity_curve
    from llmrec_dist.bench.explain import explain_latency, faithfulness

    curve = diversity_curve(rec, _rows(rec), [0.0, 0.3])
    common.write_result(tmp_path, "diversity", config={}, figures={"rows": curve, "chosen": chosen_lambda(curve)})
    text = diversity_curve(rec, _rows(rec), [0.0, 0.3], text_vectors=torch.randn(NUM_ITEMS + 1, 4))
    common.write_result(tmp_path, "diversity", label="text", config={"space": "text"},
                        figures={"rows": text, "chosen": chosen_lambda(text)})
    figures = faithfulness(rec, _rows(rec))
    figures["latency"] = explain_latency(rec, _rows(rec), requests=2)
    common.write_result(tmp_path, "explain", config={}, figures=figures)
    text = report.render(common.read_results(tmp_path))
    assert "| diversity: MMR on model vectors | λ 0.3: ILD@10 0." in text
    assert "| diversity: MMR on text vectors (text) | λ 0.3: ILD@10 model 0." in text
    assert "%), text " in text and "nan" not in text
    assert "explanations: faithful vs random item" in text
    assert "explanations: latency" in text
