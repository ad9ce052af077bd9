"""Full-ranking metrics: HR@K, NDCG@K, MRR@K and catalogue coverage@K; intra-list diversity of top-K lists.

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


def intra_list_diversity(lists: list, vectors: torch.Tensor) -> float:
    """Intra-list diversity (ILD): per list, the mean cosine distance ``1 - cos(v_i, v_j)`` over its
    pairs of items, averaged over the lists with at least two items (NaN when none has).

    ``lists``: per user the recommended item indices (any sequence of ints, or a [B, K] tensor); ``vectors``
    [N + 1, H]: the item vectors indexed by those indices (the model's output item vectors).
    """
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    total, counted = 0.0, 0
    for items in lists:
        items = torch.as_tensor(items, dtype=torch.long).reshape(-1)
        n = len(items)
        if n < 2:
            continue
        v = unit[items]
        similarity = v @ v.T
        pairs = (similarity.sum() - similarity.diagonal().sum()) / 2
        total += 1.0 - pairs.item() / (n * (n - 1) / 2)
        counted += 1
    return total / counted if counted else float("nan")


def catalogue_coverage(lists: list, num_items: int) -> float:
    """Catalogue coverage: the share of the ``num_items`` items (indices 1..N) that appear in at least
    one of the ``lists`` (per user the recommended item indices)."""
    if num_items < 1:
        raise ValueError(f"num_items must be positive, got {num_items}")
    shown = set()
    for items in lists:
        shown.update(int(i) for i in torch.as_tensor(items, dtype=torch.long).reshape(-1).tolist())
    shown.discard(PAD)
    return len(shown) / num_items


# ---------------------------------------------------------------------------------------------
# Pointwise metrics of the rating and click tasks
# ---------------------------------------------------------------------------------------------
# Rating (regression): RMSE and MAE. Click (binary): AUC, GAUC (per-user AUC, weighted by the user's
# number of pairs, over the users who have both a positive and a negative) and log loss. All take
# one value per (user, item) pair; a distributed evaluation gathers the pairs first (they are few: a
# handful per user), so the figures equal a single-process evaluation exactly.

LOWER_IS_BETTER = ("rmse", "mae", "logloss")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (``valid_rmse``, ``ndcg_at_10``, ...) is the better one."""
    name = metric.removeprefix("valid_").removeprefix("test_")
    return name not in LOWER_IS_BETTER


def rmse(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Root mean squared error."""
    _check_pairs(predictions, targets)
    return torch.sqrt(((predictions.double() - targets.double()) ** 2).mean()).item()


def mae(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean absolute error."""
    _check_pairs(predictions, targets)
    return (predictions.double() - targets.double()).abs().mean().item()


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of the click probabilities ``sigmoid(logits)`` (from logits, so a
    confident mistake costs a large finite loss, not infinity)."""
    _check_pairs(logits, labels)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()).item()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random negative,
    ties counting one half (Mann-Whitney U from average ranks). NaN without both classes."""
    _check_pairs(scores, labels)
    labels = labels.double()
    positives = labels.sum().item()
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores.double())
    return ((ranks[labels == 1].sum().item() - positives * (positives + 1) / 2) / (positives * negatives))


def gauc(scores: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> float:
    """Group AUC: each user's AUC over their own pairs, averaged with the user's pair count as weight,
    over the users who have both a positive and a negative pair. NaN when no user has both."""
    _check_pairs(scores, labels)
    total = weight = 0.0
    for user in torch.unique(users):
        rows = users == user
        value = auc(scores[rows], labels[rows])
        if value == value:  # not NaN
            count = int(rows.sum())
            total += value * count
            weight += count
    return total / weight if weight else float("nan")


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` in ascending order, tied values sharing their average rank."""
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    new_group = torch.ones(len(values), dtype=torch.bool)
    new_group[1:] = ordered[1:] != ordered[:-1]
    group = torch.cumsum(new_group.long(), 0) - 1
    positions = torch.arange(1, len(values) + 1, dtype=torch.float64)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    counts = torch.zeros_like(sums).index_add_(0, group, torch.ones_like(positions))
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = (sums / counts)[group]
    return ranks


def _check_pairs(values: torch.Tensor, targets: torch.Tensor) -> None:
    if values.shape != targets.shape or values.dim() != 1 or len(values) == 0:
        raise ValueError(f"expected two non-empty 1-d tensors of one length, got shapes "
                         f"{tuple(values.shape)} and {tuple(targets.shape)}")
