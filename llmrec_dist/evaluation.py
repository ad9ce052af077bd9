"""Full-ranking evaluation of a :class:`SequenceRecommender`, single-process or sharded over DDP ranks.

Each rank scores the users ``rank, rank + world, rank + 2·world, …`` of the split, accumulates metric
*sums*, and one all-reduce adds them up — so the numbers equal a single-process evaluation of the
same checkpoint (tested). Subsets of the rows are also accumulated apart (:func:`row_subsets`): those
whose target is a cold item (``prepare --cold-items``), reported as ``{split}_cold_{metric}_at_{k}``, and
those whose target falls in each bucket of training frequency (``eval.freq_buckets``), reported as
``{split}_freq_{bucket}_{metric}_at_{k}`` with buckets named by :func:`freq_bucket_names`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from llmrec_dist.batching import eval_batch
from llmrec_dist.config import EvalConfig
from llmrec_dist.data.dataset_format import COLD_FIELD, item_popularity, split_files, with_cold_column
from llmrec_dist.metrics import RankingAccumulator, rankable_scores, target_ranks
from llmrec_dist.sharding import refresh_text_cache


@dataclass
class EvalRows:
    """Histories (original order, most recent last) and targets of one split's rows for this rank.

    ``cold[i]``: the target of row ``i`` is a cold item (default: none is).
    ``freq[i]``: the training frequency of row ``i``'s target, its ``popularity`` in items.parquet
    (default None: unknown, so these rows fall in no ``eval.freq_buckets`` bucket).
    """

    histories: list[np.ndarray]
    targets: np.ndarray
    cold: np.ndarray | None = None
    freq: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.cold is None:
            self.cold = np.zeros(len(self.targets), dtype=bool)
        self.cold = np.asarray(self.cold, dtype=bool)
        if self.freq is not None:
            self.freq = np.asarray(self.freq, dtype=np.int64)
        for name in ("cold", "freq"):
            value = getattr(self, name)
            if value is not None and value.shape != (len(self.targets),):
                raise ValueError(f"{name} has shape {value.shape}, expected ({len(self.targets)},)")

    def __len__(self) -> int:
        return len(self.targets)


def _list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]


def load_eval_rows(dataset_path: str, split: str, rank: int = 0, world_size: int = 1,
                   max_users: int = 0) -> EvalRows:
    """This rank's share (every ``world_size``-th row, in user order) of the ``valid`` or ``test`` split;
    with ``max_users`` > 0, of its fixed subset of every ``ceil(rows / max_users)``-th row.

    Read one part file at a time, keeping only this rank's rows: memory is this rank's share, not the
    split's. ``cold`` is all false for datasets prepared before the column existed. ``freq`` is each
    target's ``popularity`` in items.parquet (read once): its count in the *train* split's histories,
    whatever the model trained on, so a refit's test rows are still bucketed by the train split's counts.
    """
    files = split_files(dataset_path, split)
    total = sum(pq.read_metadata(f).num_rows for f in files) if max_users > 0 else 0
    stride = max(1, -(-total // max_users)) if max_users > 0 else 1
    tables, first = [], 0
    for file in files:
        names = pq.read_schema(file).names
        columns = ["user_idx", "items", "target"] + [COLD_FIELD.name] * (COLD_FIELD.name in names)
        table = with_cold_column(pq.read_table(file, columns=columns))
        position = np.arange(first, first + len(table))  # row number in the split (parts are in user order)
        first += len(table)
        kept = (position % stride == 0) & ((position // stride) % world_size == rank)
        tables.append(table.filter(pa.array(kept)))
    table = pa.concat_tables(tables).sort_by("user_idx")
    targets = table.column("target").to_numpy().astype(np.int64)
    return EvalRows(_list_column(table, "items"), targets, table.column(COLD_FIELD.name).to_numpy().astype(bool),
                    item_popularity(dataset_path)[targets])


def freq_bucket_names(freq_buckets: list[int]) -> list[str]:
    """Names of the training-frequency buckets whose lower edges after 0 are ``freq_buckets``: a bucket
    ``lo..hi`` is ``{lo}_{hi}`` (``{lo}`` when lo == hi), the last one ``{lo}_plus``. ``[1, 5, 20]`` →
    ``["0", "1_4", "5_19", "20_plus"]``; ``[2, 10]`` → ``["0_1", "2_9", "10_plus"]``; ``[]`` → none."""
    if not freq_buckets:
        return []
    lows, highs = [0, *freq_buckets], [b - 1 for b in freq_buckets]
    return [str(lo) if lo == hi else f"{lo}_{hi}" for lo, hi in zip(lows, highs)] + [f"{lows[-1]}_plus"]


def row_subsets(rows: EvalRows, freq_buckets: list[int]) -> list[tuple[str, np.ndarray]]:
    """``(name, member)`` for every subset of ``rows`` whose metrics are reported apart: ``cold_``
    (a cold target), then ``freq_{bucket}_`` for each bucket of :func:`freq_bucket_names` (the rows
    whose target's training frequency falls in it; none when ``rows.freq`` is None). ``member`` is a
    bool per row. How many subsets there are depends on ``freq_buckets`` only, so it is the same on
    every rank."""
    subsets = [("cold_", rows.cold)]
    names = freq_bucket_names(freq_buckets)
    if rows.freq is None:
        bucket = np.full(len(rows), -1)
    else:  # bucket 0 below the first edge, bucket i from edge i - 1 on
        bucket = np.searchsorted(np.asarray(freq_buckets, dtype=np.int64), rows.freq, side="right")
    return subsets + [(f"freq_{name}_", bucket == i) for i, name in enumerate(names)]


def length_sorted_batches(rows: EvalRows, batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of ``batch_size``, shortest histories first.

    A batch is padded to its longest history, so batching rows of similar length cuts the padded
    positions the model reads (ml-1m validation with max_len 200: 58 % of those of batches in user
    order). The metrics are sums over rows, so the order does not change them.
    """
    lengths = np.fromiter((len(h) for h in rows.histories), dtype=np.int64, count=len(rows))
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


SCORE_BUDGET = 1 << 25  # scores in one evaluation batch's [users, items] matrix (128 MB of float32)


def eval_batch_rows(batch_size: int, num_items: int) -> int:
    """Users per evaluation batch: ``eval.batch_size``, fewer when the catalogue is so large that a
    batch's score matrix would pass :data:`SCORE_BUDGET` (a 10^6-item catalogue: 33 users a batch), so
    that full-ranking memory stays bounded whatever the catalogue's size."""
    return max(1, min(batch_size, SCORE_BUDGET // (num_items + 1)))


@torch.no_grad()
def item_table(model) -> torch.Tensor:
    """Every item's vector [N + 1, H], computed once per evaluation.

    A trainable LM tower whose output cache is out of date (its weights changed since the last refresh)
    first runs the LM over the catalogue, split over the ranks (:func:`llmrec_dist.sharding.refresh_text_cache`);
    the table is then read from the cache. Every rank must call it.
    """
    refresh_text_cache(model.items)
    return model.items.all_items()


@torch.no_grad()
def evaluate(model, rows: EvalRows, num_items: int, cfg: EvalConfig, max_len: int,
             device: torch.device | str = "cpu", prefix: str = "",
             observe: Callable[[np.ndarray, torch.Tensor, torch.Tensor], None] | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``rows``; all-reduced over ranks when torch.distributed is initialised.

    Returns ``{prefix}{metric}_at_{k}``, ``{prefix}coverage_at_{coverage_k}`` and ``{prefix}users``
    over all rows and, for each subset of :func:`row_subsets` that has rows on some rank, the same
    metrics without coverage over those rows: ``{prefix}cold_{metric}_at_{k}`` and
    ``{prefix}cold_users`` (cold targets), ``{prefix}freq_{bucket}_{metric}_at_{k}`` and
    ``{prefix}freq_{bucket}_users`` (``cfg.freq_buckets``; e.g. ``test_freq_1_4_ndcg_at_10``).

    Every rank must call this (the all-reduce is a sync point), even one with no rows or no rows of
    some subset: each makes exactly one all-reduce of the same size.

    ``observe(row_indices, ranks, rankable_scores)`` is called once per batch, e.g. by
    :class:`PerUserResults` to keep every row's rank and top-K list (the fairness report).
    """
    was_training = model.training
    model.eval()
    table = item_table(model)
    subsets = row_subsets(rows, cfg.freq_buckets)
    acc = RankingAccumulator(cfg.ks, num_items, cfg.coverage_k, device=device)
    subset_accs = [RankingAccumulator(cfg.ks, num_items, None, device=device) for _ in subsets]
    for idx in length_sorted_batches(rows, eval_batch_rows(cfg.batch_size, num_items)):
        batch = eval_batch([rows.histories[i] for i in idx], rows.targets[idx], max_len, cfg.exclude_seen)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = rankable_scores(model.score_next(batch["seq"], table).float(), batch["targets"],
                                 batch.get("history"))
        ranks = target_ranks(scores, batch["targets"])
        acc.add_ranks(ranks, scores)
        if observe is not None:
            observe(idx, ranks, scores)
        for (_, member), subset_acc in zip(subsets, subset_accs):
            if (in_batch := member[idx]).any():
                subset_acc.add_ranks(ranks[torch.from_numpy(in_batch).to(device)])
    # One tensor, so every rank makes the same single collective whatever rows it has.
    accs = [acc, *subset_accs]
    state = torch.cat([a.state() for a in accs])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(state, op=dist.ReduceOp.SUM)
    model.train(was_training)
    state, *subset_states = torch.split(state, [a.state_size() for a in accs])
    out = acc.result(state, prefix=prefix)
    for (name, _), subset_acc, subset_state in zip(subsets, subset_accs, subset_states):
        if subset_acc.count(subset_state) > 0:
            out.update(subset_acc.result(subset_state, prefix=f"{prefix}{name}"))
    return out


class PerUserResults:
    """Per-row results of one :func:`evaluate` pass (pass it as ``observe``): ``ranks`` [rows] (0-based,
    pessimistic, as the metrics use them) and ``top`` [rows, k] (item indices of the top ``k`` of the
    rankable scores, best first), in the order of the rows. This rank's rows only."""

    def __init__(self, num_rows: int, k: int) -> None:
        self.k = k
        self.ranks = np.full(num_rows, -1, dtype=np.int64)
        self.top = np.zeros((num_rows, k), dtype=np.int64)

    def __call__(self, idx: np.ndarray, ranks: torch.Tensor, scores: torch.Tensor) -> None:
        self.ranks[idx] = ranks.cpu().numpy()
        top = scores.topk(min(self.k, scores.shape[1]), dim=1).indices.cpu().numpy()
        self.top[idx, :top.shape[1]] = top
