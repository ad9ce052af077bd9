"""(history, candidate, label) pairs of the rating and click tasks, from a prepared dataset's splits.

The three tasks share one leave-one-out split: the validation pair of a user is (the validation row's
history, its target), the test pair (the test row's history, its target). What the label is:

- ``rating``: the target event's explicit feedback (``target_feedback``), regression;
- ``click`` from explicit feedback: 1 when that rating is at least a threshold (4 by default), else 0;
- ``click`` from implicit feedback: the target is a positive (1), and ``ratio`` negatives (0) are drawn
  for it uniformly among the items the user never interacted with (in any split), seeded, distinct.

Negatives are drawn by rejection against each user's interacted items, so a user who has interacted
with (nearly) the whole catalogue is an error rather than a silent duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Pairs:
    """One row per (user, candidate): ``history`` holds each row's item history (ragged, as offsets
    into ``history_items``), ``candidate`` the item scored, ``label`` the rating or the 0/1 click."""

    user_idx: np.ndarray        # int64 [P]
    history_offsets: np.ndarray  # int64 [P + 1]
    history_items: np.ndarray   # int64 [sum of lengths]
    candidate: np.ndarray       # int64 [P]
    label: np.ndarray           # float32 [P]
    history_feedback: np.ndarray | None = None  # float32, aligned with history_items (tables with feedback)

    def __len__(self) -> int:
        return len(self.candidate)

    def history(self, row: int) -> np.ndarray:
        return self.history_items[self.history_offsets[row]:self.history_offsets[row + 1]]

    def feedback(self, row: int) -> np.ndarray | None:
        """The explicit feedback of ``history(row)``'s events, or None without feedback."""
        if self.history_feedback is None:
            return None
        return self.history_feedback[self.history_offsets[row]:self.history_offsets[row + 1]]

    def shard(self, rank: int, world: int) -> "Pairs":
        """The rows ``rank``, ``rank + world``, ... (a worker's share of a distributed evaluation)."""
        rows = np.arange(rank, len(self), world)
        lengths = np.diff(self.history_offsets)[rows]
        gather = _ranges(self.history_offsets[rows], lengths)
        return Pairs(self.user_idx[rows], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     self.history_items[gather], self.candidate[rows], self.label[rows],
                     None if self.history_feedback is None else self.history_feedback[gather])


def click_labels(ratings: np.ndarray, threshold: float = 4.0) -> np.ndarray:
    """0/1 float32 click labels from explicit ratings: 1 where ``rating >= threshold``."""
    return (np.asarray(ratings, dtype=np.float64) >= threshold).astype(np.float32)


def interacted_items(split_tables: dict[str, pa.Table]) -> dict[int, np.ndarray]:
    """Every user's interacted items, sorted and unique: the test history plus the valid and test
    targets (a cold target is in no history, only here)."""
    out: dict[int, list] = {}
    test = split_tables["test"]
    histories = test.column("items").to_pylist()
    for user, history, target in zip(test.column("user_idx").to_pylist(), histories, test.column("target").to_pylist()):
        out[user] = history + [target]
    valid = split_tables["valid"]
    for user, target in zip(valid.column("user_idx").to_pylist(), valid.column("target").to_pylist()):
        out.setdefault(user, []).append(target)
    return {user: np.unique(np.asarray(items, dtype=np.int64)) for user, items in out.items()}


def sample_unseen(seen: list[np.ndarray], count: int, num_items: int, seed: int) -> np.ndarray:
    """``count`` distinct items per row from ``1..num_items`` that are not in that row's sorted ``seen``
    items, uniformly, with ``np.random.default_rng(seed)``; int64 ``[rows, count]``.

    Raises ``ValueError`` when a row has fewer than ``count`` unseen items."""
    rows = len(seen)
    out = np.zeros((rows, count), dtype=np.int64)
    if count == 0 or rows == 0:
        return out
    for row, items in enumerate(seen):
        if num_items - len(items) < count:
            raise ValueError(f"row {row}: only {num_items - len(items)} items are unseen, {count} negatives "
                             "wanted; lower the negative ratio")
    rng = np.random.default_rng(seed)
    filled = np.zeros(rows, dtype=np.int64)
    pending = np.arange(rows)
    while len(pending):
        draws = rng.integers(1, num_items + 1, size=len(pending))
        for row, item in zip(pending, draws):
            items = seen[row]
            position = np.searchsorted(items, item)
            if position < len(items) and items[position] == item:
                continue
            if item in out[row, :filled[row]]:
                continue
            out[row, filled[row]] = item
            filled[row] += 1
        pending = pending[filled[pending] < count]
    return out


def eval_pairs(split_tables: dict[str, pa.Table], split: str, task: str, *, num_items: int,
               ratio: int = 1, seed: int = 0, threshold: float | None = None) -> Pairs:
    """The ``split`` (``valid`` or ``test``) pairs of ``task`` (see the module docstring).

    ``split_tables`` are the dataset's tables (``read_split``; with the feedback columns for ``rating``
    and for ``click`` from ratings). ``task="click"`` with ``threshold`` labels the target by its rating;
    without, the target is a positive and ``ratio`` negatives are drawn per user (seeded by ``seed`` and
    the split, so valid and test draw differently and every epoch evaluates the same pairs).
    """
    if split not in ("valid", "test"):
        raise ValueError(f"pairs are evaluated on valid or test, got {split!r}")
    if task not in ("rating", "click"):
        raise ValueError(f"task must be 'rating' or 'click', got {task!r}")
    table = split_tables[split]
    users = table.column("user_idx").to_numpy().astype(np.int64)
    targets = table.column("target").to_numpy().astype(np.int64)
    items = table.column("items").combine_chunks()
    lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = items.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    flat_feedback = None
    if "feedback" in table.column_names:
        flat_feedback = table.column("feedback").combine_chunks().flatten().to_numpy(
            zero_copy_only=False).astype(np.float32)
    needs_feedback = task == "rating" or threshold is not None
    if needs_feedback and "target_feedback" not in table.column_names:
        raise ValueError(f"task {task!r}{' with a rating threshold' if task == 'click' else ''} needs a dataset "
                         "with explicit feedback (ratings): prepare it from data with ratings")
    if task == "rating":
        labels = table.column("target_feedback").to_numpy().astype(np.float32)
        return _pairs(users, lengths, flat, targets, labels, repeat=1, flat_feedback=flat_feedback)
    if threshold is not None:
        labels = click_labels(table.column("target_feedback").to_numpy(), threshold)
        return _pairs(users, lengths, flat, targets, labels, repeat=1, flat_feedback=flat_feedback)
    if ratio < 1:
        raise ValueError(f"click pairs from implicit feedback need ratio >= 1 negatives per positive, got {ratio}")
    seen = interacted_items(split_tables)
    negatives = sample_unseen([seen[u] for u in users.tolist()], ratio, num_items,
                              seed * 2 + (1 if split == "test" else 0))
    candidates = np.concatenate([targets[:, None], negatives], axis=1)
    labels = np.zeros(candidates.shape, dtype=np.float32)
    labels[:, 0] = 1.0
    return _pairs(users, lengths, flat, candidates.reshape(-1), labels.reshape(-1), repeat=ratio + 1,
                  flat_feedback=flat_feedback)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The int64 indices ``starts[i] .. starts[i] + lengths[i] - 1`` of every row, concatenated."""
    if not len(starts):
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]).astype(np.int64)


def _pairs(users, lengths, flat, candidates, labels, repeat: int, flat_feedback=None) -> Pairs:
    """Pairs with each user's history repeated for its ``repeat`` consecutive candidates."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    row_lengths = np.repeat(lengths, repeat)
    gather = _ranges(np.repeat(offsets[:-1], repeat), row_lengths)
    return Pairs(user_idx=np.repeat(users, repeat),
                 history_offsets=np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64),
                 history_items=flat[gather].astype(np.int64),
                 candidate=np.asarray(candidates, dtype=np.int64),
                 label=np.asarray(labels, dtype=np.float32),
                 history_feedback=None if flat_feedback is None else flat_feedback[gather].astype(np.float32))
