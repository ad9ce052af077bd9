"""Turning rows of item sequences into left-padded tensors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

PAD = 0


def left_pad(rows: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Keep each row's last ``max_len`` items and left-pad with 0 to the longest kept row."""
    kept = [np.asarray(r[-max_len:], dtype=np.int64) for r in rows]
    width = max((len(r) for r in kept), default=0) or 1
    out = np.zeros((len(kept), width), dtype=np.int64)
    for i, r in enumerate(kept):
        if len(r):
            out[i, width - len(r):] = r
    return out


def next_item_batch(sequences: Sequence[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs for next-item prediction: inputs = seq[:-1], targets = seq[1:], both left-padded.

    The last ``max_len + 1`` items of each sequence are used; a sequence of one item gives no target
    (its row is all padding and contributes no loss).
    """
    window = [np.asarray(s[-(max_len + 1):], dtype=np.int64) for s in sequences]
    # Input and target rows have equal lengths, so both pad to the same width.
    inputs = left_pad([w[:-1] for w in window], max_len)
    targets = left_pad([w[1:] for w in window], max_len)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def earlier_items(sequences: Sequence[Sequence[int]], window: int) -> torch.Tensor:
    """What lies before each row's last ``window`` items (the part a batch builder does not feed the
    model), left-padded to the longest such part, at least 1 wide (all PAD when nothing does)."""
    before = [np.asarray(s[:max(0, len(s) - window)], dtype=np.int64) for s in sequences]
    return torch.from_numpy(left_pad(before, max((len(b) for b in before), default=0) or 1))


def shuffled_batches(rows: Sequence[Sequence[int]], batch_size: int, max_len: int, length_buckets: int,
                     rng: np.random.Generator) -> Iterator[list]:
    """One epoch over ``rows`` in one process: shuffled, then cut into :func:`length_bucketed` batches
    ``length_buckets`` batches at a time, as a training worker cuts its shard."""
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    chunk = batch_size * length_buckets
    chunks = (shuffled[i:i + chunk] for i in range(0, len(shuffled), chunk))
    return length_bucketed(chunks, batch_size, max_len, rng)


def window_shape(backbone: str, max_len: int) -> tuple[int, int]:
    """(size, stride) of training windows: the causal backbone reads ``max_len + 1`` items (inputs and
    next-item targets), the bidirectional one ``max_len`` (every item can be masked)."""
    return (max_len + 1, max_len) if backbone == "causal" else (max_len, max_len)


def history_windows(items: Sequence[int], size: int, stride: int, prefix: bool = False) -> list[Sequence[int]]:
    """A history cut into windows of at most ``size`` items, latest first, ``stride`` apart: with
    ``size = stride + 1`` every item but the first is a next-item target in exactly one window (and
    has the window's earlier items as context). A history that fits is one window, itself.

    ``prefix``: each window comes with every item before it (the row is the history up to the window's
    last item). Batch builders still read the last ``size`` items as the window and the rest as
    :func:`earlier_items` (for ``train.exclude_seen``)."""
    if len(items) <= size:
        return [items]
    overlap = size - stride
    out, end = [], len(items)
    while end > overlap:
        out.append(items[0 if prefix else max(0, end - size):end])
        end -= stride
    return out


def num_windows(lengths: np.ndarray, size: int, stride: int) -> np.ndarray:
    """How many windows :func:`history_windows` cuts from histories of these lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.where(lengths <= size, 1, -(-(lengths - (size - stride)) // stride))


def eval_batch(histories: Sequence[Sequence[int]], targets: Sequence[int], max_len: int,
               exclude_seen: bool) -> dict[str, torch.Tensor]:
    """Model input (last ``max_len`` items), targets, and the full history for masking seen items."""
    out = {
        "seq": torch.from_numpy(left_pad(histories, max_len)),
        "targets": torch.as_tensor(np.asarray(targets, dtype=np.int64)),
    }
    if exclude_seen:
        out["history"] = torch.from_numpy(left_pad(histories, max(len(h) for h in histories) or 1))
    return out


def length_bucketed(chunks: Iterable[Sequence[Sequence[int]]], batch_size: int, max_len: int,
                    rng: np.random.Generator, length=len) -> Iterator[list]:
    """Cut each chunk of rows into batches of rows with similar (truncated) lengths, in random order.

    A chunk of ``k * batch_size`` shuffled rows becomes ``k`` batches, so padding is set by rows of
    similar length instead of by the longest row of a random batch. Every row is used exactly once and
    the number of batches per chunk is ``ceil(len(chunk) / batch_size)``, so DDP workers with equal
    shards take equal numbers of steps. ``length``: a row's length (rows that carry more than their items,
    e.g. ``(items, feedback)``, say which part counts).
    """
    for chunk in chunks:
        lengths = np.fromiter((min(length(r), max_len + 1) for r in chunk), dtype=np.int64, count=len(chunk))
        order = np.argsort(lengths, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for j in rng.permutation(len(batches)):
            yield [chunk[i] for i in batches[j]]


def cloze_batch(sequences: Sequence[Sequence[int]], max_len: int, mask_ratio: float, mask_id: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT4Rec training pairs: the last ``max_len`` items with a ``mask_ratio`` share replaced by
    ``mask_id`` (at least one per non-empty row); targets hold the original item at masked positions
    and PAD elsewhere. Both are left-padded to the longest row."""
    inputs = left_pad([np.asarray(s, dtype=np.int64) for s in sequences], max_len)
    real = inputs != PAD
    masked = real & (rng.random(inputs.shape) < mask_ratio)
    # Rows where nothing was drawn mask their most recent item (the inference-time position).
    empty = real.any(1) & ~masked.any(1)
    masked[empty, -1] = True
    targets = np.where(masked, inputs, PAD)
    inputs = np.where(masked, mask_id, inputs)
    return torch.from_numpy(inputs), torch.from_numpy(targets)
