"""Maximal marginal relevance (MMR): re-ranking a candidate pool for diversity.

Each step picks the candidate maximising ``(1 - λ)·relevance - λ·max cosine similarity to the items
already picked``, relevance min-max normalised within the pool (so λ weighs two quantities in [0, 1]
and [-1, 1] whatever the scale of the model's scores). The pool is the user's top
``pool_size(k)`` items. ``λ = 0`` is the plain ranking, and callers short-circuit it to the plain top-k
so that it is reproduced exactly (ties included).

Works on a batch of users at once: ``relevance`` [B, P] (``-inf`` marks an empty slot of a short pool),
``vectors`` [B, P, H] the pool items' vectors (the model's output item vectors, what it scores against).
"""

from __future__ import annotations

import torch

MIN_POOL = 50
POOL_FACTOR = 5


def pool_size(k: int) -> int:
    """Candidates MMR re-ranks for a top ``k``: ``max(5k, 50)``."""
    return max(POOL_FACTOR * k, MIN_POOL)


def normalised_relevance(relevance: torch.Tensor) -> torch.Tensor:
    """Per row, min-max normalised to [0, 1] over the finite entries (``-inf`` stays ``-inf``); a row whose
    finite entries are all equal gets 1 for each."""
    finite = torch.isfinite(relevance)
    low = torch.where(finite, relevance, torch.inf).amin(1, keepdim=True)
    high = torch.where(finite, relevance, -torch.inf).amax(1, keepdim=True)
    span = (high - low)
    scaled = torch.where(span > 0, (relevance - low) / torch.where(span > 0, span, 1.0), 1.0)
    return torch.where(finite, scaled, -torch.inf)


def mmr_select(relevance: torch.Tensor, vectors: torch.Tensor, k: int, lam: torch.Tensor | float) -> torch.Tensor:
    """Positions [B, k] in the pool of the items MMR picks, in pick order; ``-1`` once a row's finite
    candidates run out. ``lam``: one λ in [0, 1] for every row, or one per row [B]."""
    batch, size = relevance.shape
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(batch)[:, None]
    rel = normalised_relevance(relevance.double())
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # [B, P, P]
    available = torch.isfinite(rel)
    closest = torch.zeros(batch, size, dtype=torch.float64)  # max similarity to the picked; 0 before the first
    picks = torch.full((batch, k), -1, dtype=torch.long)
    rows = torch.arange(batch)
    for step in range(min(k, size)):
        value = torch.where(available, (1 - lam) * rel - lam * closest, -torch.inf)
        best = value.argmax(1)
        ok = available[rows, best]
        picks[:, step] = torch.where(ok, best, -1)
        available[rows[ok], best[ok]] = False
        picked = similarity[rows, best]  # [B, P]
        closest = torch.where(ok[:, None], picked if step == 0 else torch.maximum(closest, picked), closest)
    return picks
