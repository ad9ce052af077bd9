"""Rating and click prediction with a cross-encoder: one Hugging Face encoder (all-MiniLM-L6-v2 by default,
any BERT-family name or local path) reads the text of the user's recent items and the candidate's text
together as one sequence pair, and a head reads its pooled output, as in BERT sequence classification.

The pair is ``[CLS] older item ; … ; most recent item [SEP] candidate [SEP]`` (BERT's pair layout and
segment ids, with the tokenizer's own [CLS] and [SEP]): the last ``task.history_items`` items of the history, each cut to
``model.text_max_len`` tokens, the oldest cut first when the pair exceeds ``task.pair_max_len`` tokens.
Where the bi-encoder encodes a history once for all its candidates, the cross-encoder runs the LM once
per (history, candidate) pair: it sees the interaction of the two texts, at a cost per pair. Training
therefore reads ``task.pairs_per_row`` positions of each train row per epoch (drawn anew each epoch)
instead of all of them.

Freezing strategies (``model.freeze``) act on the encoder: ``frozen`` trains the head alone on the pair
encoding (a linear probe), ``top_k`` the top ``model.freeze_k`` blocks and the head, ``full`` all of it,
``lora`` peft adapters (merged into a plain encoder when packaged). Labels and losses are the
bi-encoder's (:mod:`llmrec_dist.pointwise`); so are evaluation (:func:`llmrec_dist.pointwise.evaluate_pairs`)
and serving (:class:`llmrec_dist.registry.reranker.Reranker`): the model answers the same ``predict``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmrec_dist.pointwise import PAD, LabelRule, _negatives
from llmrec_dist.text_tower import _apply_lora, encoder_layers, pool

class PairTokens:
    """Each item's text as token ids (no special tokens), and the sequence pairs built from them."""

    def __init__(self, tokenizer, texts: list[str], text_max_len: int, pair_max_len: int, history_items: int):
        enc = tokenizer([str(t) for t in texts], add_special_tokens=False, truncation=True, max_length=text_max_len)
        self.items = [[]] + [list(ids) for ids in enc["input_ids"]]  # item_idx 0 (padding) has no text
        self.joiner = list(tokenizer(" ;", add_special_tokens=False)["input_ids"])
        self.tokenizer, self.pair_max_len, self.history_items = tokenizer, pair_max_len, history_items
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("task.architecture=cross_encoder: the tokenizer of model.text_encoder has no "
                             "[CLS]/[SEP] tokens; the cross-encoder reads sequence pairs with a BERT-family encoder")
        self.cls, self.sep, self.specials = tokenizer.cls_token_id, tokenizer.sep_token_id, 3
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.with_types = "token_type_ids" in tokenizer.model_input_names

    def first_segment(self, history, budget: int) -> list[int]:
        """The last ``history_items`` items' tokens, most recent last, the oldest cut to fit ``budget``."""
        out: list[int] = []
        for idx in reversed([int(i) for i in history if int(i) != PAD][-self.history_items:]):
            piece = self.items[idx] + (self.joiner if out else [])
            room = budget - len(out)
            if room <= 0:
                break
            out = piece[-room:] + out
        return out

    def encode(self, histories, candidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, token_type_ids)`` ``[P, T]`` of the pairs (history ``p``, candidate ``p``)."""
        rows = []
        for history, candidate in zip(histories, candidates):
            second = self.items[int(candidate)][: max(1, (self.pair_max_len - self.specials) // 2)]
            first = self.first_segment(history, self.pair_max_len - self.specials - len(second))
            ids = [self.cls, *first, self.sep, *second, self.sep]  # [CLS] A [SEP] B [SEP], BERT's pair layout
            rows.append((ids, [0] * (len(first) + 2) + [1] * (len(second) + 1)))
        width = max([len(ids) for ids, _ in rows] + [1])
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        type_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, types) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
            type_ids[r, :len(ids)] = torch.tensor(types)
        return input_ids, mask, type_ids


def freeze_encoder(lm: nn.Module, strategy: str, model_cfg) -> nn.Module:
    """The encoder with only what ``strategy`` trains left trainable (``lora``: wrapped with adapters)."""
    if strategy == "lora":
        return _apply_lora(lm, model_cfg)
    for param in lm.parameters():
        param.requires_grad = strategy == "full"
    if strategy == "top_k":
        for layer in encoder_layers(lm)[-model_cfg.freeze_k:]:
            for param in layer.parameters():
                param.requires_grad = True
    return lm


class CrossEncoderRecommender(nn.Module):
    """The cross-encoder for ``task`` (``rating``: regression around ``offset``, clipped to ``clip`` when
    predicting; ``click``: a logit). ``lm``: the encoder, already frozen as its strategy wants."""

    def __init__(self, lm: nn.Module, tokens: PairTokens, task: str, loss: str, strategy: str, pooling: str = "mean",
                 offset: float = 0.0, huber_delta: float = 1.0, clip: tuple[float, float] | None = None,
                 dropout: float = 0.1, batch_pairs: int = 256):
        super().__init__()
        self.lm, self.tokens, self.task, self.loss_name, self.strategy = lm, tokens, task, loss, strategy
        self.pooling, self.huber_delta, self.clip, self.batch_pairs = pooling, huber_delta, clip, batch_pairs
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(lm.config.hidden_size, 1))
        self.register_buffer("offset", torch.tensor(float(offset)))

    items = None    # no item tower: nothing for the LM output cache to refresh
    mask_id = None  # no cloze input

    def train(self, mode: bool = True):
        super().train(mode)
        if self.strategy == "frozen":  # a frozen encoder gives the same pair encoding every time
            self.lm.eval()
        return self

    def lm_parameters(self) -> list[nn.Parameter]:
        """Trainable encoder weights that take ``train.lm_lr`` (top_k, full); LoRA adapters take ``train.lr``."""
        if self.strategy not in ("top_k", "full"):
            return []
        return [p for p in self.lm.parameters() if p.requires_grad]

    def score_pairs(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """Predictions ``[P]`` (ratings before clipping, or click logits) of encoded pairs."""
        kwargs = {"token_type_ids": token_type_ids} if self.tokens.with_types else {}
        if self.strategy == "frozen":
            with torch.no_grad():
                hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        else:
            hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling)).squeeze(-1).float() + self.offset

    def forward(self, input_ids, attention_mask, token_type_ids, labels) -> dict[str, torch.Tensor]:
        """Training step over a batch of pairs (:func:`cross_training_batch`)."""
        predictions = self.score_pairs(input_ids, attention_mask, token_type_ids)
        wanted = labels.to(predictions.dtype)
        if self.loss_name == "bce":
            loss = F.binary_cross_entropy_with_logits(predictions, wanted)
        elif self.loss_name == "huber":
            loss = F.huber_loss(predictions, wanted, delta=self.huber_delta)
        else:
            loss = F.mse_loss(predictions, wanted)
        return {"loss": loss, "positions": torch.tensor(len(labels), device=labels.device)}

    @torch.no_grad()
    def predict(self, histories, feedback, candidates: torch.Tensor, rule: LabelRule,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """The bi-encoder's ``predict``: ratings (clipped) or click logits of ``candidates`` ``[B]`` or
        ``[B, C]`` after each history (``feedback`` is not read: the pair holds text only)."""
        grid = candidates.view(len(histories), -1)
        flat_histories = [h for h in histories for _ in range(grid.shape[1])]
        flat = grid.reshape(-1).tolist()
        out = []
        for start in range(0, len(flat), self.batch_pairs):
            ids, mask, types = self.tokens.encode(flat_histories[start:start + self.batch_pairs],
                                                  flat[start:start + self.batch_pairs])
            out.append(self.score_pairs(ids.to(device), mask.to(device), types.to(device)))
        scores = torch.cat(out) if out else torch.zeros(0, device=device)
        if self.task == "rating" and self.clip is not None:
            scores = scores.clamp(*self.clip)
        return scores.view(candidates.shape)

    def export_encoder(self) -> nn.Module:
        """The trained encoder as one plain Hugging Face model (LoRA merged), for a package."""
        import copy

        lm = copy.deepcopy(self.lm)
        return (lm.merge_and_unload() if self.strategy == "lora" else lm).eval()


def cross_training_batch(items, feedback, rule: LabelRule, rng: np.random.Generator, pool: np.ndarray,
                         tokens: PairTokens, pairs_per_row: int) -> tuple[torch.Tensor, ...]:
    """Train rows → ``(input_ids, attention_mask, token_type_ids, labels)``: up to ``pairs_per_row``
    positions of each row drawn at random, each position's history (the items before it) paired with its
    next item, labelled as the bi-encoder labels it; implicit click adds ``rule.negatives`` unseen items
    from ``pool`` per position (label 0)."""
    rows = [np.asarray(r, dtype=np.int64) for r in items]
    picks = [np.sort(rng.choice(np.arange(1, len(r)), size=min(pairs_per_row, len(r) - 1), replace=False))
             if len(r) > 1 else np.zeros(0, dtype=np.int64) for r in rows]
    histories, candidates, labels = [], [], []
    width = max([len(p) for p in picks] + [1])
    negatives = None
    if rule.task == "click" and rule.threshold == 0:
        negatives = _negatives(rows, np.ones((len(rows), width), dtype=bool), rule.negatives, rng, pool)
    for b, (row, chosen) in enumerate(zip(rows, picks)):
        fb = None if feedback is None else np.asarray(feedback[b], dtype=np.float32)
        for j, t in enumerate(chosen):
            history = row[:t]
            if rule.task == "rating":
                histories.append(history), candidates.append(row[t]), labels.append(float(fb[t]))
            elif rule.threshold > 0:
                histories.append(history), candidates.append(row[t]), labels.append(float(fb[t] >= rule.threshold))
            else:
                histories.append(history), candidates.append(row[t]), labels.append(1.0)
                for item in negatives[b, j]:
                    if item != PAD:
                        histories.append(history), candidates.append(item), labels.append(0.0)
    ids, mask, types = tokens.encode(histories, candidates)
    return ids, mask, types, torch.tensor(labels, dtype=torch.float32)


def build_cross_encoder(model_cfg, record: dict, texts: list[str], offset: float = 0.0,
                        lm_source: str | None = None) -> CrossEncoderRecommender:
    """The cross-encoder of a task record (``record``: :func:`llmrec_dist.pointwise.task_record`) over the
    catalogue ``texts``, its encoder loaded from ``lm_source`` (default ``model.text_encoder``)."""
    from llmrec_dist.text_tower import load_text_encoder

    lm, tokenizer = load_text_encoder(lm_source or model_cfg.text_encoder, model_cfg.trust_remote_code)
    lm = freeze_encoder(lm, model_cfg.freeze, model_cfg)
    tokens = PairTokens(tokenizer, texts, model_cfg.text_max_len, record["pair_max_len"], record["history_items"])
    loss = record["loss"] if record["loss"] != "auto" else ("mse" if record["type"] == "rating" else "bce")
    return CrossEncoderRecommender(lm, tokens, record["type"], loss, model_cfg.freeze, model_cfg.text_pooling,
                                   offset=offset, huber_delta=record["huber_delta"],
                                   clip=tuple(record["range"]) if record["type"] == "rating" else None,
                                   dropout=model_cfg.dropout)
