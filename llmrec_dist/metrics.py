"""Full-ranking metrics: HR@K, NDCG@K, MRR@K and catalogue coverage@K.

Protocol: every item of the catalogue is ranked (no sampled negatives); items already in
the user's history are excluded when ``exclude_seen`` (the target itself always stays rankable); the
padding item 0 is never ranked. Ties count against the target (pessimistic rank), so a model that
scores everything equally gets nothing.

:class:`RankingAccumulator` keeps *sums* (float64) and counts, so shards evaluated on different workers
combine exactly by summation — a distributed evaluation equals a single-process one.
"""

from __future__ import annotations

import torch

PAD = 0
METRICS = ("hr", "ndcg", "mrr")


def mask_seen(scores: torch.Tensor, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Set the scores of history items (except each row's target) to -inf; returns a new tensor."""
    scores = scores.clone()
    target_scores = scores.gather(1, targets[:, None])
    scores.scatter_(1, history, float("-inf"))
    scores.scatter_(1, targets[:, None], target_scores)
    scores[:, PAD] = float("-inf")
    return scores


def rankable_scores(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
    """A new tensor of the scores the ranking sees: padding at -inf and, given ``history`` ([B, L] padded
    with 0), the history items except each row's target too (None keeps seen items)."""
    if history is not None:
        return mask_seen(scores, history, targets)
    scores = scores.clone()
    scores[:, PAD] = float("-inf")
    return scores


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of each target: items scoring higher, plus other items scoring equal."""
    target_scores = scores.gather(1, targets[:, None])
    higher = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1
    return higher + ties


class RankingAccumulator:
    """Accumulates ranking metrics over batches; ``state()`` is a flat tensor that sums across workers."""

    def __init__(self, ks: list[int], num_items: int, coverage_k: int | None, device: torch.device | str = "cpu"):
        """``coverage_k=None`` skips coverage (e.g. for a subset of the users)."""
        self.ks = sorted(set(ks))
        self.coverage_k = coverage_k
        self.sums = torch.zeros(len(METRICS) * len(self.ks) + 1, dtype=torch.float64, device=device)
        self.recommended = torch.zeros(num_items + 1 if coverage_k else 0, dtype=torch.float64, device=device)

    def update(self, scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None) -> None:
        """``scores`` [B, N+1]; ``targets`` [B]; ``history`` [B, L] padded with 0, or None to keep seen items."""
        scores = rankable_scores(scores, targets, history)
        self.add_ranks(target_ranks(scores, targets), scores)

    def add_ranks(self, ranks: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Accumulate rows by their 0-based target ranks [B] (from :func:`target_ranks` of
        :func:`rankable_scores`); ``scores``, those rankable scores [B, N+1], are needed for coverage only.
        Several accumulators (all rows, a subset of them) can share one ranking this way."""
        ranks = ranks.to(torch.float64)
        i = 0
        for metric in METRICS:
            for k in self.ks:
                hit = ranks < k
                if metric == "hr":
                    value = hit.to(torch.float64)
                elif metric == "ndcg":
                    value = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0)
                else:
                    value = torch.where(hit, 1.0 / (ranks + 1.0), 0.0)
                self.sums[i] += value.sum()
                i += 1
        self.sums[-1] += len(ranks)
        if self.coverage_k:
            if scores is None:
                raise ValueError("coverage needs the rankable scores of the rows")
            top = scores.topk(self.coverage_k, dim=1).indices
            self.recommended.index_fill_(0, top.flatten(), 1.0)

    def state(self) -> torch.Tensor:
        """One tensor to all-reduce with SUM (coverage entries are clamped back to 0/1 afterwards)."""
        return torch.cat([self.sums, self.recommended])

    def state_size(self) -> int:
        """Length of ``state()``, to split a concatenation of several accumulators' states."""
        return len(self.sums) + len(self.recommended)

    def count(self, state: torch.Tensor | None = None) -> float:
        """Number of users accumulated in ``state`` (default: this accumulator's own)."""
        state = self.state() if state is None else state
        return state[len(self.sums) - 1].item()

    def result(self, state: torch.Tensor | None = None, prefix: str = "") -> dict[str, float]:
        """Metric means from a (possibly all-reduced) state: ``{prefix}{metric}_at_{k}``, coverage, users."""
        state = self.state() if state is None else state
        sums, recommended = state[: len(self.sums)], state[len(self.sums):]
        count = sums[-1].item()
        if count == 0:
            raise ValueError("no users were evaluated")
        out = {}
        i = 0
        for metric in METRICS:
            for k in self.ks:
                out[f"{prefix}{metric}_at_{k}"] = sums[i].item() / count
                i += 1
        if self.coverage_k:
            num_items = len(recommended) - 1
            out[f"{prefix}coverage_at_{self.coverage_k}"] = (recommended[1:] > 0).sum().item() / num_items
        out[f"{prefix}users"] = count
        return out
