"""Two stages: a next-item model (the retriever) ranks the whole catalogue, a rating or click model (the
re-ranker) re-orders the retriever's top N, and the rest of the catalogue keeps the retriever's order.

The re-ranker reads the retriever's score as a feature through ``blend``: within the top N the chain's
score is ``z(re-ranker) + blend * z(retriever)``, each standardised over the user's N candidates (their
scales differ: a click logit, a rating, a retriever logit). ``blend = 0`` is the re-ranker alone; a
large blend gives back the retriever's order. The blend is a serving setting chosen on validation
(``llmrec-dist bench rerank``), not a trained weight.

Evaluation is full ranking, as for a retriever alone: the same users, histories left out of the
ranking in the same way, and a target outside the retriever's top N keeps its retriever rank (so the
chain's HR@K for K >= N equals the retriever's).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from llmrec_dist.batching import eval_batch
from llmrec_dist.config import EvalConfig
from llmrec_dist.data.dataset_format import split_files
from llmrec_dist.evaluation import EvalRows, item_table, length_sorted_batches, row_subsets
from llmrec_dist.metrics import RankingAccumulator, rankable_scores, target_ranks

Rescore = Callable[[np.ndarray, torch.Tensor], torch.Tensor]  # (row indices, candidates [B, N]) -> [B, N]


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean over its finite entries, over their standard deviation (1 when they are
    all equal); a non-finite entry stays -inf."""
    finite = torch.isfinite(scores)
    count = finite.sum(1, keepdim=True).clamp(min=1)
    values = torch.where(finite, scores, 0.0)
    mean = values.sum(1, keepdim=True) / count
    spread = (torch.where(finite, values - mean, 0.0).pow(2).sum(1, keepdim=True) / count).sqrt()
    out = (values - mean) / torch.where(spread > 1e-6, spread, 1.0)
    return torch.where(finite, out, float("-inf"))


def chain_scores(retrieval: torch.Tensor, rerank: torch.Tensor, blend: float) -> torch.Tensor:
    """The chain's scores of a user's top-N candidates (``[B, N]`` each); a candidate the retriever
    could not rank (-inf: a history item left out) stays -inf."""
    out = standardised(torch.where(torch.isfinite(retrieval), rerank.float(), float("-inf")))
    if blend:
        out = out + blend * standardised(retrieval.float())
    return out


def top_candidates(rankable: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, items)`` of each row's ``top_n`` best items (``[B, N]``, N at most the catalogue)."""
    return rankable.topk(min(top_n, rankable.shape[1] - 1), dim=1)


def chain_ranks(rankable: torch.Tensor, targets: torch.Tensor, top_scores: torch.Tensor, top_items: torch.Tensor,
                rerank: torch.Tensor, blend: float) -> torch.Tensor:
    """0-based ranks of ``targets`` in the chain's ranking: its position among the re-ordered top N
    (ties pessimistic, as :func:`llmrec_dist.metrics.target_ranks`) or, outside the top N, its
    retriever rank (the top N's re-ordering moves no item past position N)."""
    return _ranks_in_chain(rankable, targets, top_items, chain_scores(top_scores, rerank, blend))


def _ranks_in_chain(rankable: torch.Tensor, targets: torch.Tensor, top_items: torch.Tensor,
                    chained: torch.Tensor) -> torch.Tensor:
    """:func:`chain_ranks` from the chain's scores of the top N."""
    hit = top_items == targets[:, None]
    found = hit.any(1)
    target_score = torch.where(hit, chained, 0.0).sum(1, keepdim=True)
    inside = (chained > target_score).sum(1) + (chained == target_score).sum(1) - 1
    return torch.where(found, inside, target_ranks(rankable, targets))


@torch.no_grad()
def evaluate_chain(retriever, rescore: Rescore, rows: EvalRows, num_items: int, cfg: EvalConfig, max_len: int,
                   top_n: int, blends: list[float], device: torch.device | str = "cpu",
                   prefix: str = "") -> dict[float, dict[str, float]]:
    """Full-ranking metrics of the chain for each of ``blends`` (``{blend: metrics}``, the metrics named
    as :func:`llmrec_dist.evaluation.evaluate` names them), and of the retriever alone under key
    ``None``. ``rescore(row_indices, candidates)``: the re-ranker's scores of each row's candidates.
    All-reduced over ranks when torch.distributed is initialised (every rank must call it)."""
    retriever.eval()
    table = item_table(retriever)
    subsets = row_subsets(rows, cfg.freq_buckets)
    keys: list[float | None] = [None, *blends]
    accs = {key: RankingAccumulator(cfg.ks, num_items, cfg.coverage_k, device=device) for key in keys}
    subset_accs = {key: [RankingAccumulator(cfg.ks, num_items, None, device=device) for _ in subsets] for key in keys}
    for idx in length_sorted_batches(rows, cfg.batch_size):
        batch = eval_batch([rows.histories[i] for i in idx], rows.targets[idx], max_len, cfg.exclude_seen)
        batch = {k: v.to(device) for k, v in batch.items()}
        rankable = rankable_scores(retriever.score_next(batch["seq"], table).float(), batch["targets"],
                                   batch.get("history"))
        top_scores, top_items = top_candidates(rankable, top_n)
        rerank = rescore(idx, top_items).to(device)
        for key in keys:
            if key is None:
                ranks, shown = target_ranks(rankable, batch["targets"]), rankable
            else:
                chained = chain_scores(top_scores, rerank, key)
                ranks = _ranks_in_chain(rankable, batch["targets"], top_items, chained)
                shown = _chain_rankable(rankable, top_items, chained)
            accs[key].add_ranks(ranks, shown)
            for (_, member), subset_acc in zip(subsets, subset_accs[key]):
                if (in_batch := member[idx]).any():
                    subset_acc.add_ranks(ranks[torch.from_numpy(in_batch).to(device)])
    every = [acc for key in keys for acc in (accs[key], *subset_accs[key])]
    state = torch.cat([a.state() for a in every])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(state, op=dist.ReduceOp.SUM)
    parts = iter(torch.split(state, [a.state_size() for a in every]))
    out = {}
    for key in keys:
        figures = accs[key].result(next(parts), prefix=prefix)
        for (name, _), subset_acc in zip(subsets, subset_accs[key]):
            part = next(parts)
            if subset_acc.count(part) > 0:
                figures.update(subset_acc.result(part, prefix=f"{prefix}{name}"))
        out[key] = figures
    return out


def _chain_rankable(rankable: torch.Tensor, top_items: torch.Tensor, chained: torch.Tensor) -> torch.Tensor:
    """Scores whose order is the chain's (for coverage): the top N above every other item, in the
    chain's order (``chained``) among themselves."""
    lifted = chained - torch.where(torch.isfinite(chained), chained, 0.0).amin(1, keepdim=True) + 1.0
    ceiling = torch.where(torch.isfinite(rankable), rankable, float("-inf")).amax(1, keepdim=True)
    out = rankable.clone()
    out.scatter_(1, top_items, torch.where(torch.isfinite(chained), ceiling + lifted, float("-inf")))
    return out


def read_history_feedback(dataset_path: str, split: str, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """The ratings of each history of this rank's share of ``split``, aligned with
    :func:`llmrec_dist.evaluation.load_eval_rows`'s histories (same files, order and sharding)."""
    tables = [pq.read_table(file, columns=["user_idx", "feedback"]) for file in split_files(dataset_path, split)]
    table = pa.concat_tables(tables).sort_by("user_idx")
    table = table.take(np.arange(rank, len(table), world_size))
    column = table.column("feedback").combine_chunks()
    offsets, values = column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False).astype(np.float32)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def pointwise_rescorer(reranker, rule, rows: EvalRows, feedback: list[np.ndarray] | None,
                       device: torch.device | str = "cpu") -> Rescore:
    """``rescore`` for :func:`evaluate_chain` from a :class:`llmrec_dist.pointwise.PointwiseRecommender`
    (``feedback``: the rows' history ratings, when the re-ranker reads them)."""
    reranker.eval()

    def rescore(idx: np.ndarray, candidates: torch.Tensor) -> torch.Tensor:
        return reranker.predict([rows.histories[i] for i in idx],
                                None if feedback is None else [feedback[i] for i in idx],
                                candidates.cpu(), rule, device)

    return rescore
