"""Work on the whole catalogue split over DDP ranks: each rank computes a slice of the rows and one
all-gather assembles the table on every rank (a single process computes it all).

Used where a trainable LM tower must run over every item: refreshing its output cache
(:func:`refresh_text_cache`) before validation, every ``train.lm_refresh_steps`` steps, and when
evaluation finds the cache out of date. Every rank must call these functions (the all-gather is a
sync point); whether they do anything depends only on state that is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def gather_rows(fn: Callable[[torch.Tensor], torch.Tensor], total: int, device) -> torch.Tensor:
    """``fn(ids)`` for ``ids = 0 .. total - 1`` as one ``[total, D]`` tensor: rank r computes the r-th of
    ``world`` equal slices, an all-gather joins them."""
    if not _distributed():
        return fn(torch.arange(total, device=device))
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = -(-total // world)
    part = fn(torch.arange(rank * per_rank, min(total, (rank + 1) * per_rank), device=device))
    padded = part.new_zeros((per_rank, part.shape[1]))
    padded[:len(part)] = part
    gathered = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered)[:total]


@torch.no_grad()
def refresh_text_cache(items) -> bool:
    """Recompute a trainable LM tower's output cache (every item's pooled LM output, in eval mode, split
    over the ranks) when it is out of date; returns whether it ran. Other item encoders: nothing."""
    if not getattr(items, "needs_lm_pass", lambda: False)():
        return False
    was_training = items.training
    items.eval()
    try:
        table = gather_rows(items.lm_text, items.num_items + 1, items.token_ids.device)
    finally:
        items.train(was_training)
    items.set_text_cache(table)
    return True
