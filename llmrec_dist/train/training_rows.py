"""The rows training sees: the train split's histories (a refit's: the test split's, through each user's
validation item), one per user, or, with ``data.windows``, one per window of a long history
(:func:`llmrec_dist.batching.history_windows`). The driver cuts the windows before Ray Data splits the
rows over the workers, so every worker still gets an equal share, and the driver counts them once to
size the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmrec_dist.batching import history_windows, num_windows, window_shape
from llmrec_dist.config import Config
from llmrec_dist.data.dataset_format import history_lengths, num_train_rows, read_parquet_file, split_files


def training_rows(cfg: Config, manifest: Mapping) -> int:
    """Rows of one training epoch, before they are split over the workers (less ``data.holdout_users``)."""
    split = cfg.training_split()
    if not cfg.data.windows and cfg.data.holdout_users <= 0:
        return num_train_rows(manifest, split)
    if cfg.data.holdout_users > 0:
        tables = [without_holdout(read_parquet_file(f, columns=["user_key", "items"]), cfg)
                  for f in split_files(cfg.data.path, split)]
        lengths = np.concatenate([pc.list_value_length(t.column("items")).to_numpy() for t in tables] or [[]])
        if not cfg.data.windows:
            return len(lengths)
    else:
        lengths = history_lengths(cfg.data.path, split)
    size, stride = window_shape(cfg.model.backbone, cfg.model.max_len)
    return int(num_windows(lengths, size, stride).sum())


def without_holdout(table: pa.Table, cfg: Config) -> pa.Table:
    """``table``'s rows less the users ``data.holdout_users`` leaves out of training (by ``user_key``)."""
    if cfg.data.holdout_users <= 0:
        return table
    from llmrec_dist.privacy import held_out

    return table.filter(pa.array(~held_out(table.column("user_key").to_pylist(), cfg.data.holdout_users)))


def windowed_table(table: pa.Table, cfg: Config) -> pa.Table:
    """``table``'s ``items`` histories cut into training windows, in row order, latest window first.
    With ``train.exclude_seen`` (next item) each window row keeps the history before it (the softmax
    leaves it out). A ``feedback`` column (rating/click tasks) is cut with its events."""
    size, stride = window_shape(cfg.model.backbone, cfg.model.max_len)
    column, prefix = table.column("items"), cfg.train.exclude_seen and cfg.task.type == "next_item"
    if "feedback" not in table.column_names:
        rows = [w for items in column.to_pylist() for w in history_windows(items, size, stride, prefix)]
        return pa.table({"items": pa.array(rows, type=column.type)})
    feedback = table.column("feedback")
    rows, values = [], []
    for items, events in zip(column.to_pylist(), feedback.to_pylist()):
        for window in history_windows(range(len(items)), size, stride, prefix):  # event positions
            rows.append(items[window[0]:window[-1] + 1])
            values.append(events[window[0]:window[-1] + 1])
    return pa.table({"items": pa.array(rows, type=column.type), "feedback": pa.array(values, type=feedback.type)})
