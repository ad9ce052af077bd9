"""Explanations by leave-one-out: which history items made the model recommend an item.

The contribution of history position ``i`` to item ``j`` is ``score(j | history) - score(j | history
without position i)``: what the model itself loses when it no longer sees that item. Only the last
``MAX_POSITIONS`` positions of the model's input are tried (older ones rarely matter to a sequence
model, and each position costs one more sequence in the batch); all ablated histories of all users
go through the model in one forward pass (in chunks of ``chunk`` sequences for large batches).
"""

from __future__ import annotations

import numpy as np
import torch

from llmrec_dist.batching import left_pad

MAX_POSITIONS = 20
MAX_BECAUSE = 3


def ablated(rows: list[int], positions: int = MAX_POSITIONS) -> tuple[list[list[int]], list[int]]:
    """The histories ``rows`` without each one of its last ``positions`` items, and the position (index
    in ``rows``) each leaves out, most recent first."""
    dropped = list(range(len(rows) - 1, max(len(rows) - positions, 0) - 1, -1))
    return [rows[:i] + rows[i + 1:] for i in dropped], dropped


@torch.no_grad()
def leave_one_out(model, rows: list[list[int]], items: list[np.ndarray], full: torch.Tensor, max_len: int,
                  table: torch.Tensor | None = None, positions: int = MAX_POSITIONS,
                  chunk: int = 1024) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per history: ``(dropped, contribution)``, ``dropped`` the positions tried (indices into its row,
    most recent first) and ``contribution`` [len(dropped), len(items[u])] the score each of its
    ``items`` loses without that position. ``full`` [B, N + 1]: the model's scores of the whole
    histories (unmasked, as ``score_next`` returns them); ``table``: the item table, computed once."""
    table = model.items.all_items() if table is None else table
    sequences, owners, dropped_of = [], [], []
    for u, row in enumerate(rows):
        seqs, dropped = ablated(row, positions)
        sequences += seqs
        owners += [u] * len(seqs)
        dropped_of.append(np.asarray(dropped, dtype=np.int64))
    scores = []
    for start in range(0, len(sequences), chunk):
        seq = torch.from_numpy(left_pad(sequences[start:start + chunk], max_len))
        wanted = torch.from_numpy(np.concatenate([items[owners[s]] for s in range(start, start + len(seq))]))
        counts = [len(items[owners[s]]) for s in range(start, start + len(seq))]
        picked = model.score_next(seq, table).float()
        scores.append(picked[torch.repeat_interleave(torch.arange(len(seq)), torch.tensor(counts)), wanted])
    flat = torch.cat(scores) if scores else torch.zeros(0)
    out, offset = [], 0
    for u, dropped in enumerate(dropped_of):
        n, m = len(dropped), len(items[u])
        without = flat[offset:offset + n * m].view(n, m)
        offset += n * m
        base = full[u, torch.from_numpy(np.asarray(items[u], dtype=np.int64))].float()
        out.append((dropped, (base[None, :] - without).numpy().astype(np.float64)))
    return out


def because(row: list[int], dropped: np.ndarray, contribution: np.ndarray,
            top: int = MAX_BECAUSE) -> list[tuple[list[int], list[float]]]:
    """Per recommended item (a column of ``contribution``): the history items (item_idx) that raised its
    score most, at most ``top``, with their contributions, largest first. Only positive contributions
    count; an item seen at several tried positions counts once, with its largest contribution."""
    out = []
    for column in contribution.T:
        best: dict[int, float] = {}
        for position, value in zip(dropped, column):
            item = row[position]
            if value > 0 and value > best.get(item, -np.inf):
                best[item] = float(value)
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:top]
        out.append(([item for item, _ in ranked], [value for _, value in ranked]))
    return out
