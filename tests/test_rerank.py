"""The two-stage chain's scoring and full-ranking evaluation, by hand on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmrec_dist.config import EvalConfig, ModelConfig
from llmrec_dist.evaluation import EvalRows, evaluate
from llmrec_dist.model import build_model
from llmrec_dist.rerank import chain_ranks, chain_scores, evaluate_chain, standardised, top_candidates

INF = float("-inf")


def test_standardised_rows_ignore_left_out_entries():
    out = standardised(torch.tensor([[1.0, 2.0, 3.0, INF], [5.0, 5.0, 5.0, 5.0]]))
    s = math.sqrt(2 / 3)
    assert torch.allclose(out[0, :3], torch.tensor([-1 / s, 0.0, 1 / s]))
    assert out[0, 3] == INF
    assert torch.equal(out[1], torch.zeros(4))  # equal scores: no spread, no division by zero


def test_chain_scores_blend_the_retriever_in():
    retrieval = torch.tensor([[3.0, 2.0, 1.0]])
    rerank = torch.tensor([[0.0, 0.0, 10.0]])  # z = [-0.707, -0.707, 1.414]
    alone = chain_scores(retrieval, rerank, 0.0)
    assert alone.argmax().item() == 2
    # z(retriever) = [1.2247, 0, -1.2247]; with blend 2 the first candidate wins: -0.707 + 2.449 > 1.414 - 2.449
    blended = chain_scores(retrieval, rerank, 2.0)
    assert blended.argmax().item() == 0
    assert blended[0, 0].item() == pytest.approx(-1 / math.sqrt(2) + 2 * math.sqrt(1.5), abs=1e-5)
    # a candidate the retriever left out (-inf) stays out whatever the re-ranker says
    assert chain_scores(torch.tensor([[1.0, INF]]), torch.tensor([[0.0, 99.0]]), 0.5)[0, 1] == INF


def test_chain_ranks_reorder_the_top_n_and_keep_the_rest():
    # items 1..6 (column 0 is padding); the retriever ranks 6, 5, 4, 3, 2, 1
    rankable = torch.tensor([[INF, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] * 3)
    targets = torch.tensor([6, 4, 2])
    top_scores, top_items = top_candidates(rankable, 3)
    assert top_items.tolist() == [[6, 5, 4]] * 3
    rerank = torch.tensor([[0.0, 1.0, 2.0]] * 3)  # reverses the top 3: 4, 5, 6, then 3, 2, 1
    ranks = chain_ranks(rankable, targets, top_scores, top_items, rerank, 0.0)
    assert ranks.tolist() == [2, 0, 4]  # item 2 was 5th for the retriever and stays 5th
    # a re-ranker that cannot tell the candidates apart leaves pessimistic ties inside the top N
    flat = chain_ranks(rankable, targets, top_scores, top_items, torch.zeros(3, 3), 0.0)
    assert flat.tolist() == [2, 2, 4]


def test_top_n_larger_than_the_catalogue_takes_every_item():
    scores, items = top_candidates(torch.tensor([[INF, 1.0, 2.0]]), 100)
    assert items.tolist() == [[2, 1]]


@pytest.fixture(scope="module")
def tiny_retriever():
    torch.manual_seed(0)
    cfg = ModelConfig(item_repr="id", hidden_size=16, num_layers=1, num_heads=2, max_len=8, dropout=0.0)
    return build_model(cfg, 30).eval()


def _rows(num_users: int = 40, seed: int = 1) -> EvalRows:
    rng = np.random.default_rng(seed)
    histories = [rng.choice(np.arange(1, 31), size=int(rng.integers(1, 8)), replace=False) for _ in range(num_users)]
    targets = np.array([int(rng.choice(np.setdiff1d(np.arange(1, 31), h))) for h in histories])
    return EvalRows(histories, targets)


def test_the_retriever_alone_matches_evaluate_and_a_huge_blend_gives_it_back(tiny_retriever):
    rows, cfg = _rows(), EvalConfig(ks=[1, 5, 10], batch_size=16, freq_buckets=[], coverage_k=5)
    noise = torch.Generator().manual_seed(0)

    def rescore(idx, candidates):
        return torch.randn(candidates.shape, generator=noise)

    out = evaluate_chain(tiny_retriever, rescore, rows, 30, cfg, 8, top_n=10, blends=[0.0, 1e6])
    alone = evaluate(tiny_retriever, rows, 30, cfg, 8)
    assert out[None] == pytest.approx(alone)
    for key in ("ndcg_at_5", "ndcg_at_10", "hr_at_1", "mrr_at_10"):
        assert out[1e6][key] == pytest.approx(alone[key])
    # HR at the top N is the retriever's whatever the re-ranker does: the top N keeps its items
    assert out[0.0]["hr_at_10"] == pytest.approx(alone["hr_at_10"])


def test_an_oracle_reranker_puts_every_retrieved_target_first(tiny_retriever):
    rows, cfg = _rows(), EvalConfig(ks=[1, 10, 20], batch_size=16, freq_buckets=[], coverage_k=10)

    def oracle(idx, candidates):
        return (candidates == torch.from_numpy(rows.targets[idx])[:, None]).float()

    out = evaluate_chain(tiny_retriever, oracle, rows, 30, cfg, 8, top_n=10, blends=[0.0])
    # every target the retriever has in its top 10 moves to rank 0; the others keep their ranks (> 10)
    assert out[0.0]["hr_at_1"] == pytest.approx(out[None]["hr_at_10"])
    assert out[0.0]["ndcg_at_10"] == pytest.approx(out[None]["hr_at_10"])
    assert out[0.0]["hr_at_20"] == pytest.approx(out[None]["hr_at_20"])
    assert out[None]["hr_at_1"] < out[None]["hr_at_10"]  # the test would not tell otherwise
