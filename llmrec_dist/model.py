"""Recommendation Transformers.

``SequenceRecommender`` = an item representation (anything implementing :class:`ItemEncoder`: ID
embeddings, or the language-model tower of :mod:`llmrec_dist.text_tower`) + a Hugging Face Transformer
stack fed with ``inputs_embeds``: ``causal`` (SASRec: GPT-2 blocks, next-item targets at every position) or
``bidirectional`` (BERT4Rec: BERT blocks, cloze targets at masked positions, a mask token appended at
inference). The causal backbone can also use Llama blocks (``model.block=llama``: RMSNorm, rotary
positions, a gated feed-forward), the layer design of current LLMs. Scores are dot products between the
sequence state and item vectors; input and output item vectors are the same (tied).

Losses: full softmax over the catalogue, or — when the item tower is a trainable LM and scoring the
catalogue every step would be too costly — sampled softmax over the step's target items plus uniform
negatives, with logQ correction; each distinct item of a step is represented once. Either can leave the
user's history out of each position's softmax (``train.exclude_seen``), as evaluation leaves it out of
the ranking.

Sequences are LEFT-padded with item 0 and positions are anchored at the most recent item (it always sits
at position ``max_len - 1``), so a batch can be padded to its own longest row without changing outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from llmrec_dist.config import ModelConfig, TrainConfig
from llmrec_dist.item_encoder import PAD, IdItemEncoder, ItemEncoder
from llmrec_dist.profiling import region
from llmrec_dist.text_tower import TextItemEncoder

def build_backbone(kind: str, hidden: int, num_layers: int, num_heads: int, max_len: int,
                   dropout: float, ffn_size: int = 0, activation: str = "gelu",
                   block: str = "standard") -> nn.Module:
    """A Hugging Face Transformer stack used through ``inputs_embeds`` (its token table removed).

    ``ffn_size`` 0 means the usual 4 x ``hidden`` (8/3 x ``hidden`` for the gated ``llama`` blocks)."""
    if block == "llama":
        if kind != "causal":
            raise ValueError(f"model.block: llama blocks are causal; got model.backbone={kind!r}")
        return _llama_backbone(hidden, num_layers, num_heads, max_len, dropout, ffn_size, activation)
    if block != "standard":
        raise ValueError(f"model.block: unknown {block!r}; valid: standard, llama")
    ffn_size = ffn_size or 4 * hidden
    if kind == "causal":
        config = GPT2Config(
            vocab_size=1, n_positions=max_len, n_embd=hidden, n_layer=num_layers, n_head=num_heads,
            n_inner=ffn_size, activation_function=activation, resid_pdrop=dropout, embd_pdrop=dropout,
            attn_pdrop=dropout, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
        )
        backbone = GPT2Model(config)
        # The token table is never used (we pass inputs_embeds). Dropping it keeps DDP from waiting
        # for gradients that never come, so find_unused_parameters can stay off.
        backbone.wte = nn.Identity()
        return backbone
    if kind == "bidirectional":
        config = BertConfig(
            vocab_size=1, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=ffn_size, hidden_act=activation, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, max_position_embeddings=max_len, type_vocab_size=1,
            pad_token_id=0,
        )
        backbone = BertModel(config, add_pooling_layer=False)
        backbone.embeddings.word_embeddings = nn.Identity()
        return backbone
    raise ValueError(f"model.backbone: unknown {kind!r}; valid: causal, bidirectional")


def _llama_backbone(hidden: int, num_layers: int, num_heads: int, max_len: int, dropout: float,
                    ffn_size: int, activation: str) -> nn.Module:
    """Llama blocks for the causal backbone. Llama itself trains without dropout apart from the
    attention weights'; recommendation data is small enough to need it, so ``dropout`` is also applied
    where GPT-2 applies it: to the input vectors and to each attention and feed-forward output before
    it joins the residual stream (forward hooks, so the weights keep Llama's names)."""
    config = LlamaConfig(
        vocab_size=1, hidden_size=hidden, intermediate_size=ffn_size or 8 * math.ceil(hidden / 3),
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        hidden_act=activation, max_position_embeddings=max_len, attention_dropout=dropout,
        rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
    )
    backbone = LlamaModel(config)
    backbone.embed_tokens = nn.Identity()  # inputs_embeds only, as for GPT-2
    if dropout > 0:
        drop = nn.Dropout(dropout)
        backbone.input_dropout = drop

        def drop_inputs(module, args, kwargs):
            kwargs["inputs_embeds"] = drop(kwargs["inputs_embeds"])
            return args, kwargs

        def drop_output(module, args, output):
            return (drop(output[0]), *output[1:]) if isinstance(output, tuple) else drop(output)

        backbone.register_forward_pre_hook(drop_inputs, with_kwargs=True)
        for layer in backbone.layers:
            layer.self_attn.register_forward_hook(drop_output)
            layer.mlp.register_forward_hook(drop_output)
    return backbone


class SequenceRecommender(nn.Module):
    """Next-item recommender: item tower + causal (SASRec) or bidirectional (BERT4Rec) Transformer."""

    def __init__(self, items: ItemEncoder, num_layers: int, num_heads: int, max_len: int, dropout: float,
                 backbone: str = "causal", num_negatives: int = 0, init_std: float = 0.02,
                 ffn_size: int = 0, activation: str = "gelu", block: str = "standard",
                 exclude_seen: bool = False, negative_items: torch.Tensor | None = None):
        super().__init__()
        self.items = items
        self.max_len = max_len
        self.backbone = backbone
        self.num_negatives = num_negatives
        self.exclude_seen = exclude_seen
        hidden = items.hidden_size
        self.input_scale = math.sqrt(hidden)
        self.encoder = build_backbone(backbone, hidden, num_layers, num_heads, max_len, dropout,
                                      ffn_size, activation, block)
        if backbone == "bidirectional":
            self.mask_embedding = nn.Parameter(torch.randn(hidden) * init_std)
        # The items the training softmax may use as negatives ([N + 1] flags; None = every item). Items
        # that occur in no training history can only ever be negatives there: a trainable LM tower then
        # learns to recognise their text and bury it (the cold-item collapse), so they are left out
        # (train.negatives_from=trained). Not persistent: a training setting, not part of the model.
        flags = None
        if negative_items is not None:
            flags = torch.as_tensor(negative_items, dtype=torch.bool).clone()
            if flags.shape != (items.num_items + 1,):
                raise ValueError(f"negative_items must have num_items + 1 = {items.num_items + 1} flags, "
                                 f"got {tuple(flags.shape)}")
            flags[PAD] = False
        self.register_buffer("negative_items", flags, persistent=False)
        self.register_buffer("negative_pool", None if flags is None else flags.nonzero().squeeze(1),
                             persistent=False)

    @property
    def mask_id(self) -> int:
        """The cloze mask token's id in input sequences: one past the catalogue."""
        return self.items.num_items + 1

    def encode(self, seq: torch.Tensor, vectors: torch.Tensor | None = None,
               index: torch.Tensor | None = None) -> torch.Tensor:
        """``seq`` [B, L] left-padded item ids (mask id allowed) → hidden states [B, L, H].

        Item vectors come from ``vectors[index]`` when given (the step's items, represented once),
        else from the item tower.
        """
        length = seq.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len={self.max_len}")
        positions = torch.arange(self.max_len - length, self.max_len, device=seq.device).expand_as(seq)
        is_mask = seq == self.mask_id
        embeds = vectors[index] if vectors is not None else self.items.lookup(torch.where(is_mask, PAD, seq))
        if self.backbone == "bidirectional":
            embeds = torch.where(is_mask.unsqueeze(-1), self.mask_embedding.to(embeds.dtype), embeds)
        embeds = embeds * self.input_scale
        mask = (seq != PAD).long()
        return self.encoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state

    def catalogue_logits(self, states: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """States [..., H] → scores over the catalogue [..., N + 1]; the padding item scores -inf."""
        table = self.items.all_items() if table is None else table
        logits = states @ table.T
        logits[..., PAD] = float("-inf")
        return logits

    def forward(self, seq: torch.Tensor, targets: torch.Tensor,
                earlier: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training step: cross-entropy of the target item at every position whose target is not PAD.

        Causal: targets = the next items. Bidirectional: targets at masked positions. The loss lives
        inside ``forward`` so DDP sees every parameter used in one call. With ``exclude_seen`` the items
        a position has in view (:meth:`seen_entries`) and the row's ``earlier`` items (left-padded
        [B, E]: the history before ``seq``) score -inf in its softmax; its target never does.
        """
        keep = targets != PAD
        wanted = targets[keep]
        inputs = torch.where(seq == self.mask_id, PAD, seq)
        seen = self.seen_entries(inputs, targets, keep) if self.exclude_seen else None
        before = earlier_flags(earlier, self.items.num_items) if self.exclude_seen else None
        if self.num_negatives > 0:
            states, logits, labels = self._sampled_logits(seq, inputs, wanted, keep, seen, before)
            with region("loss"):
                loss = F.cross_entropy(logits, labels, reduction="sum")
        else:
            table = self.items.all_items(focus=torch.unique(torch.cat([inputs.reshape(-1), wanted])))
            states = self.encode(seq, table, inputs)
            with region("loss"):  # scoring the whole catalogue at every position + cross-entropy
                logits = self.catalogue_logits(states[keep], table)
                if self.negative_items is not None:  # never a target either: they occur in no history
                    logits[:, ~self.negative_items] = float("-inf")
                if seen is not None:
                    rows, where = seen
                    leave_out(logits, rows, inputs.reshape(-1)[where], before, keep, wanted)
                loss = F.cross_entropy(logits, wanted, reduction="sum")
        positions = keep.sum()
        # sum / count rather than mean: a batch whose sequences are all single items has no target.
        out = {"loss": loss / positions.clamp(min=1), "positions": positions}
        anchor = getattr(self.items, "take_anchor_loss", lambda: None)()
        if anchor is not None:  # a trainable LM held near its pretrained output (train.lm_anchor)
            out["anchor"] = anchor.detach()
            out["loss"] = out["loss"] + anchor
        return out

    def seen_entries(self, inputs: torch.Tensor, targets: torch.Tensor,
                     keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (softmax row, item) pairs a training step leaves out with ``exclude_seen``, as
        ``(rows, where)``: ``rows`` indexes the kept positions (``states[keep]``' rows), ``where`` the
        flattened ``inputs`` holding the item. A causal position has in view its own input item and
        those before it; a bidirectional (cloze) position every unmasked item of the row. An item equal
        to the position's target is kept, so a repeated item can still be learned. Costs B x L x L
        flags, independent of the catalogue's size.
        """
        batch, length = inputs.shape
        in_view = torch.ones(length, length, dtype=torch.bool, device=inputs.device)  # [t, s]
        if self.backbone == "causal":
            in_view = in_view.tril()
        items = inputs.unsqueeze(1)  # [b, 1, s]
        hit = in_view & (items != PAD) & (items != targets.unsqueeze(2)) & keep.unsqueeze(2)  # [b, t, s]
        row_of = keep.reshape(-1).cumsum(0).view(batch, length) - 1  # position (b, t) → its softmax row
        b, t, s = hit.nonzero(as_tuple=True)
        return row_of[b, t], b * length + s

    def _sampled_logits(self, seq, inputs, wanted, keep, seen=None, before=None):
        """Sampled softmax: candidates = the step's distinct targets ∪ uniform negatives, logQ-corrected.

        Each candidate's sampling probability is that of a mixture of the batch's target distribution
        and the uniform one, q(c) = (count_c + M / N) / (T + M) for T targets and M negatives drawn from
        N items (those of ``negative_items``, default the catalogue); its log is subtracted from every logit (so frequent in-batch items are not over-penalised).
        """
        if self.negative_items is None:
            n = self.items.num_items
            negatives = torch.randint(1, n + 1, (self.num_negatives,), device=seq.device)
        else:
            n = len(self.negative_pool)
            negatives = self.negative_pool[torch.randint(0, n, (self.num_negatives,), device=seq.device)]
        ids, inverse = torch.unique(torch.cat([inputs.reshape(-1), wanted, negatives]), return_inverse=True)
        vectors = self.items.represent(ids)
        n_in = inputs.numel()
        states = self.encode(seq, vectors, inverse[:n_in].view_as(inputs))
        target_pos = inverse[n_in:n_in + len(wanted)]
        candidate = torch.zeros(len(ids), dtype=torch.bool, device=seq.device)
        candidate[target_pos] = True
        candidate[inverse[n_in + len(wanted):]] = True
        candidate[ids == PAD] = False
        cand_idx = candidate.nonzero().squeeze(1)
        counts = torch.bincount(target_pos, minlength=len(ids)).to(states.dtype)
        log_q = torch.log((counts[cand_idx] + self.num_negatives / n) / (len(wanted) + self.num_negatives))
        # a distinct item's column among the candidates (-1: not a candidate)
        column = torch.full((len(ids),), -1, dtype=torch.long, device=seq.device)
        column[cand_idx] = torch.arange(len(cand_idx), device=seq.device)
        labels = column[target_pos]
        with region("loss"):
            logits = states[keep] @ vectors[cand_idx].T - log_q
            if seen is not None:  # a seen item is left out where it is a candidate
                rows, where = seen
                columns = column[inverse[:n_in][where]]
                before = None if before is None else before[:, ids[cand_idx]]
                leave_out(logits, rows[columns >= 0], columns[columns >= 0], before, keep, labels)
        return states, logits, labels

    def inference_input(self, seq: torch.Tensor) -> torch.Tensor:
        """Bidirectional models read the history followed by a mask token; causal ones the history."""
        if self.backbone != "bidirectional":
            return seq
        tail = seq[:, -(self.max_len - 1):] if self.max_len > 1 else seq[:, :0]
        return torch.cat([tail, torch.full_like(seq[:, :1], self.mask_id)], dim=1)

    @torch.no_grad()
    def score_next(self, seq: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, N + 1] for the item following each left-padded history.

        ``table`` = precomputed ``items.all_items()`` (evaluation computes it once, not per batch).
        """
        table = self.items.all_items() if table is None else table
        seq = self.inference_input(seq)
        states = self.encode(seq, table, torch.where(seq == self.mask_id, PAD, seq))[:, -1]
        return self.catalogue_logits(states, table)


def earlier_flags(earlier: torch.Tensor | None, num_items: int) -> torch.Tensor | None:
    """[B, N + 1] flags: the catalogue items in each row's ``earlier`` part; None when there is none."""
    if earlier is None or not bool((earlier != PAD).any()):
        return None
    flags = torch.zeros(len(earlier), num_items + 1, dtype=torch.bool, device=earlier.device)
    flags.scatter_(1, earlier, True)
    flags[:, PAD] = False
    return flags


def leave_out(logits: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, before: torch.Tensor | None,
              keep: torch.Tensor, labels: torch.Tensor) -> None:
    """Set to -inf, in place, the softmax entries ``(rows, columns)`` and, when ``before`` ([B, C]
    flags over the logits' columns) is given, every flagged column of each batch row's positions,
    except each position's own ``labels`` column. ``logits`` rows are the ``keep`` positions in order."""
    logits[rows, columns] = float("-inf")
    if before is not None:
        flagged = before[keep.nonzero()[:, 0]]  # [P, C]: the flags of each position's batch row
        flagged[torch.arange(len(labels), device=labels.device), labels] = False
        logits.masked_fill_(flagged, float("-inf"))


def softmax_negatives(model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """Negatives per step of the training softmax, 0 = the full catalogue. ``train.loss=auto``:
    sampled softmax exactly when an LM in the item tower trains."""
    sampled = (model_cfg.item_repr != "id" and model_cfg.freeze != "frozen" if train_cfg.loss == "auto"
               else train_cfg.loss == "sampled")
    return train_cfg.num_negatives if sampled else 0


def build_model(cfg: ModelConfig, num_items: int, text=None, num_negatives: int = 0,
                id_seen=None, exclude_seen: bool = False, lm_items_per_step: int = 0,
                lm_checkpoint_items: int = 0, negative_items=None, lm_anchor: float = 0.0) -> SequenceRecommender:
    """Build the recommender described by ``cfg`` for a catalogue of ``num_items`` items.

    ``text``: the :class:`llmrec_dist.text_tower.TextFeatures` of the catalogue, required when
    ``cfg.item_repr`` uses text. ``num_negatives`` > 0 trains with sampled softmax. ``id_seen``
    (``id+text`` only): ``num_items + 1`` flags, false for items that never occur in a training
    sequence; their ID vector is masked so that text alone represents them (default: all seen).
    ``exclude_seen`` (``train.exclude_seen``): the training softmax leaves out the items in view.
    ``lm_items_per_step`` (``train.lm_items_per_step``): a trainable LM tower runs at most this many
    of a step's distinct items with gradient, the rest from its output cache (0 = all of them).
    ``lm_checkpoint_items`` (``train.lm_checkpoint_items``): it runs them in chunks of this many, each
    recomputed in the backward pass (0 = no activation checkpointing).
    ``negative_items``: ``num_items + 1`` flags of the items the training softmax may use as negatives
    (``train.negatives_from=trained``: those that occur in training; default every item).
    ``lm_anchor`` (``train.lm_anchor``): weight of a trainable LM's pull toward its pretrained output.
    """
    if cfg.item_repr == "id":
        items: ItemEncoder = IdItemEncoder(num_items, cfg.hidden_size, cfg.init_std)
    elif cfg.item_repr in ("text", "id+text"):
        if text is None:
            raise ValueError(f"model.item_repr={cfg.item_repr!r} needs the item texts' features")
        items = TextItemEncoder(text, num_items, cfg.hidden_size, use_id=cfg.item_repr == "id+text",
                                fusion=cfg.fusion, pooling=cfg.text_pooling, freeze_k=cfg.freeze_k, lora_cfg=cfg,
                                id_seen=id_seen, init_std=cfg.init_std, grad_items=lm_items_per_step,
                                adaptor=cfg.text_adaptor, id_dropout=cfg.id_dropout, lm_anchor=lm_anchor,
                                freeze_embeddings=cfg.freeze_lm_embeddings,
                                checkpoint_items=lm_checkpoint_items, whiten=cfg.text_whiten)
    else:
        raise ValueError(f"model.item_repr: unknown {cfg.item_repr!r}; valid: id, text, id+text")
    return SequenceRecommender(items, cfg.num_layers, cfg.num_heads, cfg.max_len, cfg.dropout,
                               backbone=cfg.backbone, num_negatives=num_negatives, init_std=cfg.init_std,
                               ffn_size=cfg.ffn_size, activation=cfg.activation, block=cfg.block,
                               exclude_seen=exclude_seen, negative_items=negative_items)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total (including a frozen LM whose outputs are cached rather than held) and trainable counts."""
    items = getattr(model, "items", None)
    total = sum(p.numel() for p in model.parameters()) + getattr(items, "external_params", 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
