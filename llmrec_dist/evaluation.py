"""Full-ranking evaluation of a :class:`SequenceRecommender`, single-process or sharded over DDP ranks.

Each rank scores the users ``rank, rank + world, rank + 2·world, …`` of the split, accumulates metric
*sums*, and one all-reduce adds them up — so the numbers equal a single-process evaluation of the
same checkpoint (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from llmrec_dist.batching import eval_batch
from llmrec_dist.config import EvalConfig
from llmrec_dist.data.layout import split_files
from llmrec_dist.metrics import RankingAccumulator


@dataclass
class EvalRows:
    """Histories (original order, most recent last) and targets of one split's rows for this rank."""

    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def _list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]


def load_eval_rows(dataset_path: str, split: str, rank: int = 0, world_size: int = 1) -> EvalRows:
    """This rank's share (every ``world_size``-th row, in user order) of the ``valid`` or ``test`` split."""
    table = pa.concat_tables(pq.read_table(f, columns=["user_idx", "items", "target"])
                             for f in split_files(dataset_path, split))
    table = table.sort_by("user_idx")
    table = table.take(np.arange(rank, len(table), world_size))
    return EvalRows(_list_column(table, "items"), table.column("target").to_numpy().astype(np.int64))


@torch.no_grad()
def evaluate(model, rows: EvalRows, num_items: int, cfg: EvalConfig, max_len: int,
             device: torch.device | str = "cpu", prefix: str = "") -> dict[str, float]:
    """Metrics of ``model`` on ``rows``; all-reduced over ranks when torch.distributed is initialised.

    Every rank must call this (the all-reduce is a sync point), even one with no rows.
    """
    was_training = model.training
    model.eval()
    acc = RankingAccumulator(cfg.ks, num_items, cfg.coverage_k, device=device)
    for start in range(0, len(rows), cfg.batch_size):
        stop = start + cfg.batch_size
        batch = eval_batch(rows.histories[start:stop], rows.targets[start:stop], max_len, cfg.exclude_seen)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = model.score_next(batch["seq"]).float()
        acc.update(scores, batch["targets"], batch.get("history"))
    state = acc.state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(state, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return acc.result(state, prefix=prefix)
