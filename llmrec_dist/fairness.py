"""Fairness and popularity-bias figures of a ranking, from per-user results (pure functions).

Inputs are plain arrays: each user's 0-based target rank (as :func:`llmrec_dist.metrics.target_ranks`
gives it), each user's top-K item indices, a group label per user, item popularity over item_idx
``0..N`` (index 0 is padding). :mod:`llmrec_dist.fairness_report` gathers them from a model and a
dataset and renders the report.

Definitions (all hand-checked in tests/test_fairness.py):

- per-user NDCG@K = ``1 / log2(rank + 2)`` if ``rank < K`` else 0; HR@K = ``rank < K``.
- a grouping's *gap* is ``max − min`` of the group means, its *ratio* ``max / min`` (None when the min
  is 0), both over the groups with at least ``min_users`` users only; smaller groups are reported and
  flagged ``small`` but left out of the gap, since a handful of users gives a noisy mean.
- *short head*: the most popular items that together hold ``head_share`` (80 %) of the training
  interactions: items sorted by popularity (ties by item_idx), the fewest whose cumulative count
  reaches the share; every other item (never-seen ones too) is *long tail*.
- *coverage@K*: distinct items in any top-K list / N.
- *Gini of exposure*: Gini coefficient of the number of top-K lists each of the N items appears in
  (never-recommended items count with 0): 0 when every item is shown equally often, ``1 − 1/N``
  when one item takes all exposure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

HISTORY_EDGES = (10, 20, 50, 100)
MIN_GROUP_USERS = 20
HEAD_SHARE = 0.8
UNKNOWN = "(unknown)"


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k of one target at 0-based ``ranks``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def hr_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user HR@k (1.0 when the target is in the top k)."""
    return (np.asarray(ranks) < k).astype(np.float64)


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """Labels of the buckets cut at ``edges``: ``(10, 20, 50, 100)`` → ``<10, 10-19, 20-49, 50-99, 100+``."""
    edges = list(edges)
    if not edges or sorted(set(edges)) != edges or edges[0] <= 0:
        raise ValueError(f"bucket edges must be increasing positive integers, got {edges}")
    middle = [f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo) for lo, hi in zip(edges, edges[1:])]
    return [f"<{edges[0]}", *middle, f"{edges[-1]}+"]


def length_buckets(lengths: np.ndarray, edges: Sequence[int] = HISTORY_EDGES) -> np.ndarray:
    """The bucket label of each length (object array), buckets as in :func:`bucket_labels`."""
    labels = np.asarray(bucket_labels(edges), dtype=object)
    return labels[np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right")]


def group_table(groups: np.ndarray, values: Mapping[str, np.ndarray], min_users: int = MIN_GROUP_USERS,
                order: Sequence[str] | None = None) -> list[dict]:
    """One row per group: ``{"group", "users", <metric>: mean, ..., "small"}``.

    ``order``: the groups in this order first (e.g. bucket labels, low to high; absent ones skipped),
    then the rest largest first (ties by name). ``small``: fewer than ``min_users`` users.
    """
    groups = np.asarray(groups, dtype=object)
    names, counts = np.unique(groups, return_counts=True)
    count_of = dict(zip(names.tolist(), counts.tolist()))
    first = [g for g in (order or []) if g in count_of]
    rest = sorted((g for g in count_of if g not in first), key=lambda g: (-count_of[g], str(g)))
    rows = []
    for group in first + rest:
        member = groups == group
        row = {"group": str(group), "users": int(count_of[group])}
        row.update({name: float(np.asarray(v, dtype=np.float64)[member].mean()) for name, v in values.items()})
        row["small"] = row["users"] < min_users
        rows.append(row)
    return rows


def gap_and_ratio(rows: Sequence[dict], metric: str) -> dict:
    """``{"gap", "ratio", "best", "worst", "groups_compared"}`` of ``metric`` over the rows not flagged
    ``small``; gap and ratio are None with fewer than two such groups, the ratio also when the min is 0."""
    kept = [r for r in rows if not r["small"]]
    if len(kept) < 2:
        return {"gap": None, "ratio": None, "best": None, "worst": None, "groups_compared": len(kept)}
    best = max(kept, key=lambda r: r[metric])
    worst = min(kept, key=lambda r: r[metric])
    high, low = best[metric], worst[metric]
    return {"gap": high - low, "ratio": high / low if low > 0 else None, "best": best["group"],
            "worst": worst["group"], "groups_compared": len(kept)}


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative ``values``: ``Σ (2i − n − 1) x_i / (n Σ x)`` over x sorted ascending,
    i = 1..n; 0 for equal values (and for all zeros)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        raise ValueError("gini of an empty array")
    if (x < 0).any():
        raise ValueError("gini needs non-negative values")
    total = x.sum()
    if total == 0:
        return 0.0
    n = x.size
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def short_head(popularity: np.ndarray, share: float = HEAD_SHARE) -> np.ndarray:
    """Bool flags over item_idx ``0..N``: the item is in the short head (see the module doc); index 0 false."""
    pop = np.asarray(popularity, dtype=np.float64)
    head = np.zeros(len(pop), dtype=bool)
    total = pop[1:].sum()
    if total == 0:
        return head
    order = np.argsort(-pop[1:], kind="stable") + 1  # most popular first, ties by item_idx
    cumulative = np.cumsum(pop[order])
    size = int(np.searchsorted(cumulative, share * total - 1e-9 * total, side="left")) + 1
    head[order[:size]] = True
    return head


def exposure(top: np.ndarray, num_items: int) -> np.ndarray:
    """How many top-K lists each item ``1..N`` appears in (length N; padding and out-of-range ignored)."""
    counts = np.bincount(np.asarray(top, dtype=np.int64).ravel(), minlength=num_items + 1)[: num_items + 1]
    return counts[1:]


def coverage(top: np.ndarray, num_items: int) -> float:
    """Share of the N items that appear in some top-K list."""
    return float((exposure(top, num_items) > 0).sum() / num_items)


def popularity_bias(top: np.ndarray, histories: Sequence[np.ndarray], popularity: np.ndarray,
                    head_share: float = HEAD_SHARE) -> dict:
    """Popularity figures of the top-K lists (``top`` [users, K]) against the users' histories.

    ``mean_popularity_recommended``: mean over users of the mean training popularity of their top-K;
    ``mean_popularity_history``: the same over each user's history; ``popularity_ratio`` their ratio.
    ``long_tail_share_recommended``: share of all top-K slots filled with long-tail items;
    ``long_tail_share_history``: share of all history events on long-tail items.
    """
    pop = np.asarray(popularity, dtype=np.float64)
    top = np.asarray(top, dtype=np.int64)
    num_items = len(pop) - 1
    tail = ~short_head(pop, head_share)
    tail[0] = False
    histories = [np.asarray(h, dtype=np.int64) for h in histories]
    nonempty = [h for h in histories if len(h)]
    rec_pop = float(pop[top].mean(axis=1).mean()) if top.size else 0.0
    hist_pop = float(np.mean([pop[h].mean() for h in nonempty])) if nonempty else 0.0
    events = np.concatenate(nonempty) if nonempty else np.zeros(0, dtype=np.int64)
    head_items = int((~tail[1:]).sum())
    return {
        "mean_popularity_recommended": rec_pop,
        "mean_popularity_history": hist_pop,
        "popularity_ratio": rec_pop / hist_pop if hist_pop > 0 else None,
        "long_tail_share_recommended": float(tail[top].mean()) if top.size else 0.0,
        "long_tail_share_history": float(tail[events].mean()) if events.size else 0.0,
        "short_head_items": head_items,
        "short_head_share": head_share,
        "coverage": coverage(top, num_items),
        "gini_exposure": gini(exposure(top, num_items)),
    }
