"""Recommendation Transformers.

``SequenceRecommender`` = an item representation (anything implementing :class:`ItemEncoder`) + a Hugging
Face Transformer stack fed with ``inputs_embeds``. Scores are dot products between the sequence state and
every item's vector; the input and output item vectors are the same (tied).

Sequences are LEFT-padded with item 0 and positions are anchored at the most recent item (it always sits
at position ``max_len - 1``), so a batch can be padded to its own longest row without changing outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model

from llmrec_dist.config import ModelConfig

PAD = 0


class ItemEncoder(nn.Module):
    """The item-representation interface the recommender depends on.

    ``lookup(ids)`` gives vectors for the items of a batch (any shape of ids, PAD included);
    ``all_items()`` gives the ``[num_items + 1, hidden]`` table used to score the whole catalogue
    (row 0 = padding, never recommended). A text tower implements the same two methods.
    """

    hidden_size: int

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def all_items(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class IdItemEncoder(ItemEncoder):
    """A learned embedding per item id (row 0 is padding and stays zero)."""

    def __init__(self, num_items: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=PAD)
        nn.init.normal_(self.embedding.weight, std=hidden_size ** -0.5)
        with torch.no_grad():
            self.embedding.weight[PAD].zero_()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def all_items(self) -> torch.Tensor:
        return self.embedding.weight


class SequenceRecommender(nn.Module):
    """SASRec-style next-item model over a GPT-2 (causal, pre-LayerNorm) Transformer stack."""

    def __init__(self, items: ItemEncoder, num_layers: int, num_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.items = items
        self.max_len = max_len
        hidden = items.hidden_size
        self.input_scale = math.sqrt(hidden)
        config = GPT2Config(
            vocab_size=1, n_positions=max_len, n_embd=hidden, n_layer=num_layers, n_head=num_heads,
            n_inner=4 * hidden, activation_function="gelu", resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        self.encoder = GPT2Model(config)
        # The token table is never used (we pass inputs_embeds). Dropping it keeps DDP from waiting
        # for gradients that never come, so find_unused_parameters can stay off.
        self.encoder.wte = nn.Identity()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` [B, L] left-padded item ids → hidden states [B, L, H] (causal)."""
        length = seq.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len={self.max_len}")
        positions = torch.arange(self.max_len - length, self.max_len, device=seq.device).expand_as(seq)
        mask = (seq != PAD).long()
        embeds = self.items.lookup(seq) * self.input_scale
        return self.encoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state

    def catalogue_logits(self, states: torch.Tensor) -> torch.Tensor:
        """States [..., H] → scores over the catalogue [..., N + 1]; the padding item scores -inf."""
        logits = states @ self.items.all_items().T
        logits[..., PAD] = float("-inf")
        return logits

    def forward(self, seq: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step: full-softmax cross-entropy of the next item at every non-padding position.

        The loss lives inside ``forward`` so DDP sees every parameter used in one call.
        """
        states = self.encode(seq)
        keep = targets != PAD
        logits = self.catalogue_logits(states[keep])
        positions = keep.sum()
        # sum / count rather than mean: a batch whose sequences are all single items has no target.
        loss = F.cross_entropy(logits, targets[keep], reduction="sum") / positions.clamp(min=1)
        return {"loss": loss, "positions": positions}

    @torch.no_grad()
    def score_next(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores [B, N + 1] for the item following each left-padded history."""
        return self.catalogue_logits(self.encode(seq)[:, -1])


def build_model(cfg: ModelConfig, num_items: int) -> SequenceRecommender:
    """Build the recommender described by ``cfg`` for a catalogue of ``num_items`` items."""
    builders = {"id": lambda: IdItemEncoder(num_items, cfg.hidden_size)}
    if cfg.item_repr not in builders:
        raise ValueError(f"model.item_repr: unknown {cfg.item_repr!r}; valid: {', '.join(builders)}")
    if cfg.backbone != "causal":
        raise ValueError(f"model.backbone: unknown {cfg.backbone!r}; valid: causal")
    return SequenceRecommender(builders[cfg.item_repr](), cfg.num_layers, cfg.num_heads, cfg.max_len, cfg.dropout)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
