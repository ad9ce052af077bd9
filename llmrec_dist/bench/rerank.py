"""The two-stage benchmark: a retriever alone against the retriever + re-ranker chain, same users.

Every (top N, blend) setting is scored on validation; the best one by ``eval.metric`` (NDCG@10 by
default) is the chain reported on test, next to the retriever alone on the same test users.
"""

from __future__ import annotations

from pathlib import Path

from llmrec_dist.config import EvalConfig
from llmrec_dist.offline_eval import Rerank, evaluate_saved_model, split_chain_figures

COLUMNS = [("top_n", "top N", ""), ("blend", "blend", "g"), ("valid", "valid NDCG@10", ".4f"),
           ("valid_hr", "valid HR@10", ".4f")]


def run_rerank(retriever: Path, reranker: Path, data: str, top_ns: list[int], blends: list[float],
               cfg: EvalConfig, workers: int = 1, metric: str = "ndcg_at_10") -> dict:
    """Validation figures of every setting, the chosen one, and test figures of both sides."""
    rows = []
    for top_n in top_ns:
        valid = evaluate_saved_model(retriever, data, "valid", cfg, num_workers=workers,
                                     rerank=Rerank(str(reranker), top_n, tuple(blends)))
        for blend in blends:
            alone, chain = split_chain_figures(valid, "valid", blend, blends)
            if not rows:
                rows.append({"top_n": 0, "blend": None, "valid": alone[metric], "valid_hr": alone["hr_at_10"],
                             "retriever_alone": True})
            rows.append({"top_n": top_n, "blend": blend, "valid": chain[metric], "valid_hr": chain["hr_at_10"],
                         "retriever_alone": False})
    chosen = max(rows, key=lambda r: r["valid"])
    if chosen["retriever_alone"]:  # validation preferred no re-ranking: the chain serves the retriever's order
        alone = split_chain_figures(evaluate_saved_model(retriever, data, "test", cfg, num_workers=workers,
                                                         verify=False), "test", 0.0, (0.0,))[0]
        chain = dict(alone)
    else:
        test = evaluate_saved_model(retriever, data, "test", cfg, num_workers=workers, verify=False,
                                    rerank=Rerank(str(reranker), chosen["top_n"], (chosen["blend"],)))
        alone, chain = split_chain_figures(test, "test", chosen["blend"], (chosen["blend"],))
    return {"rows": rows, "chosen": chosen, "metric": metric, "test_retriever": alone, "test_chain": chain,
            "lift": chain[metric] / alone[metric] - 1 if alone[metric] else float("nan")}


LATENCY_COLUMNS = [("top_n", "top N", ""), ("retriever_p50_ms", "retriever p50 ms", ".1f"),
                   ("chain_p50_ms", "chain p50 ms", ".1f"), ("chain_p95_ms", "chain p95 ms", ".1f")]


def serving_latency(retriever: Path, reranker: Path, data: str, top_ns: list[int], requests: int = 50,
                    k: int = 10) -> list[dict]:
    """Milliseconds of one ``recommend`` request (one user, top ``k``) served from the two packages, the
    retriever alone and the chain for each top N, over the histories of the first ``requests``
    validation users (median and 95th percentile; one thread, CPU, after one warm-up request)."""
    import time

    import numpy as np
    import torch

    from llmrec_dist.evaluation import load_eval_rows
    from llmrec_dist.registry.recommender import Recommender
    from llmrec_dist.registry.reranker import Chain, Reranker

    alone, second = Recommender.from_folder(retriever), Reranker.from_folder(reranker)
    rows = load_eval_rows(data, "valid")
    histories = [[alone.item_ids[i - 1] for i in h] for h in rows.histories[:requests]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def timed(serve) -> np.ndarray:
            serve.recommend([histories[0]], k=k)  # warm-up
            out = []
            for history in histories:
                start = time.perf_counter()
                serve.recommend([history], k=k)
                out.append((time.perf_counter() - start) * 1000)
            return np.asarray(out)

        base = timed(alone)
        rows_out = []
        for top_n in top_ns:
            chain = timed(Chain(alone, second, top_n))
            rows_out.append({"top_n": top_n, "retriever_p50_ms": float(np.median(base)),
                             "chain_p50_ms": float(np.median(chain)), "chain_p95_ms": float(np.percentile(chain, 95)),
                             "requests": len(histories)})
        return rows_out
    finally:
        torch.set_num_threads(threads)
