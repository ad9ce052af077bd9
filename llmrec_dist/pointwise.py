"""Rating and click prediction with the bi-encoder: the sequence backbone reads the user's history (with
the past ratings as an input feature where the data has them), the item tower represents the candidate,
and a small head combines the two into a rating or a click logit.

Training reads a train row once, causally: the state after event t scores event t + 1, so a row of n
events gives n - 1 (history, candidate, label) pairs in one pass, each with exactly the history the
leave-one-out evaluation gives its target (:mod:`llmrec_dist.pairs`). Labels:

- ``rating``: the next event's rating; MSE or Huber on the rating scale; the prediction is the train
  ratings' mean + an item bias (ID towers) + the head, clipped to the declared range at evaluation;
- ``click`` from ratings: 1 when the next event's rating is at least ``click_threshold``; BCE on logits;
- ``click`` from implicit feedback: the next event is a positive and ``negatives`` items the user never
  interacted with in the row are drawn per position as negatives (seeded, from the items that occur in
  training, so a cold item is never pushed down for being unseen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmrec_dist.batching import left_pad
from llmrec_dist.data.dataset_format import feedback_of, num_items as manifest_num_items, read_split
from llmrec_dist.metrics import auc, gauc, log_loss, mae, rmse
from llmrec_dist.pairs import Pairs, click_labels, eval_pairs

PAD = 0


@dataclass(frozen=True)
class LabelRule:
    """How a task turns events into labels. ``threshold`` > 0 (click): labels from feedback by threshold;
    ``negatives`` > 0 (click without feedback labels): sampled negatives per positive. ``low``/``high``:
    the feedback's range (ratings are fed to the backbone scaled to [0, 1] by it)."""

    task: str
    threshold: float = 0.0
    negatives: int = 0
    low: float = 0.0
    high: float = 1.0

    def scaled(self, feedback: np.ndarray) -> np.ndarray:
        return (np.asarray(feedback, dtype=np.float32) - self.low) / max(self.high - self.low, 1e-6)


def label_rule(task: str, feedback: dict | None, click_threshold: float, negatives: int) -> LabelRule:
    """The rule for ``task`` on a dataset whose manifest ``feedback`` is ``feedback`` (None: implicit).
    Click labels come from ratings by ``click_threshold`` (0 = ignore ratings), from 0/1 labels as they
    are, else from ``negatives`` sampled items per positive."""
    low, high = (feedback["min"], feedback["max"]) if feedback else (0.0, 1.0)
    if task == "rating":
        if feedback is None or feedback.get("kind") != "rating":
            raise ValueError("task.type=rating needs a dataset with ratings (manifest feedback kind 'rating'); "
                             "prepare it from data with ratings (MovieLens, or --rating-col)")
        return LabelRule("rating", low=low, high=high)
    if task != "click":
        raise ValueError(f"pointwise tasks are rating and click, got {task!r}")
    if feedback is not None and feedback.get("kind") == "label":
        return LabelRule("click", threshold=0.5, low=low, high=high)
    if feedback is not None and click_threshold > 0:
        return LabelRule("click", threshold=click_threshold, low=low, high=high)
    if negatives < 1:
        raise ValueError("task.negatives: click from implicit feedback needs >= 1 negative per positive")
    return LabelRule("click", negatives=negatives, low=low, high=high)


def record_rule(record: dict, manifest) -> LabelRule:
    """The label rule of a task section or :func:`task_record` on the dataset of ``manifest``."""
    return label_rule(record["type"], feedback_of(manifest), record["click_threshold"], record["negatives"])


def task_record(task: dict, manifest, seed: int) -> dict:
    """What a saved rating/click model keeps of its task (``model.json``'s ``task``): the config section,
    ``feedback_input`` as it took effect, the rating range and the seed of the evaluation negatives."""
    rule = record_rule(task, manifest)
    return {**task, "feedback_input": bool(task["feedback_input"] and feedback_of(manifest) is not None),
            "range": [rule.low, rule.high], "eval_seed": seed}


def wrap_model(base: nn.Module, record: dict, offset: float = 0.0, dropout: float = 0.0) -> "PointwiseRecommender":
    """The bi-encoder around ``base`` for a :func:`task_record` (a saved offset is restored with the weights)."""
    loss = record["loss"] if record["loss"] != "auto" else ("mse" if record["type"] == "rating" else "bce")
    return PointwiseRecommender(base, record["type"], loss, feedback_input=record["feedback_input"],
                                item_bias=record["item_bias"], offset=offset, huber_delta=record["huber_delta"],
                                dropout=dropout, clip=tuple(record["range"]) if record["type"] == "rating" else None)


def task_pairs(data_path: str, manifest, record: dict, splits: tuple[str, ...], rank: int = 0,
               world: int = 1) -> list[Pairs]:
    """This worker's share of each of ``splits``' pairs of a :func:`task_record`'s task on the dataset
    (the valid and test tables are read once: they are all the pairs and their negatives need)."""
    rule = record_rule(record, manifest)
    has_feedback = feedback_of(manifest) is not None
    tables = {s: read_split(data_path, s, feedback=has_feedback) for s in ("valid", "test")}
    return [eval_pairs(tables, split, rule.task, num_items=manifest_num_items(manifest),
                       ratio=record["eval_negatives"], seed=record["eval_seed"],
                       threshold=rule.threshold if rule.threshold > 0 else None).shard(rank, world)
            for split in splits]


def training_batch(items, feedback, max_len: int, rule: LabelRule, rng: np.random.Generator,
                   pool: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
    """Train rows → ``(seq, seq_feedback, candidates, labels)``: the last ``max_len`` inputs of each row
    left-padded to the longest ``[B, L]``, their scaled feedback ``[B, L]`` (zeros without feedback), the candidates of
    every position ``[B, L, C]`` (C = 1, or 1 + negatives for implicit click; PAD = no pair) and their
    labels ``[B, L, C]``. ``pool``: the items negatives are drawn from (default every item id present in
    ``items`` is allowed; pass the trained items)."""
    rows = [np.asarray(r, dtype=np.int64)[-(max_len + 1):] for r in items]
    seq = left_pad([r[:-1] for r in rows], max_len)
    nxt = left_pad([r[1:] for r in rows], max_len)
    fb_in = np.zeros(seq.shape, dtype=np.float32)
    fb_next = np.zeros(seq.shape, dtype=np.float32)
    if feedback is not None:
        for b, (row, fb) in enumerate(zip(rows, feedback)):
            fb = np.asarray(fb, dtype=np.float32)[-len(row):]
            n = len(row) - 1
            if n > 0:
                fb_in[b, seq.shape[1] - n:] = rule.scaled(fb[:-1])
                fb_next[b, seq.shape[1] - n:] = fb[1:]
    keep = nxt != PAD
    if rule.task == "rating":
        candidates, labels = nxt[:, :, None], fb_next[:, :, None]
    elif rule.threshold > 0:
        candidates, labels = nxt[:, :, None], np.where(keep, click_labels(fb_next, rule.threshold), 0)[:, :, None]
    else:
        candidates = np.concatenate([nxt[:, :, None], _negatives(rows, keep, rule.negatives, rng, pool)], axis=2)
        labels = np.zeros(candidates.shape, dtype=np.float32)
        labels[:, :, 0] = 1.0
        candidates = np.where(keep[:, :, None], candidates, PAD)
    return (torch.from_numpy(seq), torch.from_numpy(fb_in), torch.from_numpy(np.ascontiguousarray(candidates)),
            torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)))


def _negatives(rows, keep: np.ndarray, count: int, rng: np.random.Generator, pool: np.ndarray | None):
    """``[B, L, count]`` items not in each row, drawn from ``pool``; a draw that keeps hitting the row's
    own items after a few tries is PAD (no pair), never a positive labelled 0."""
    batch, length = keep.shape
    pool = np.arange(1, max((int(r.max()) for r in rows if len(r)), default=1) + 1) if pool is None else pool
    out = pool[rng.integers(0, len(pool), size=(batch, length, count))]
    for b, row in enumerate(rows):
        for _ in range(8):
            bad = np.isin(out[b], row)
            if not bad.any():
                break
            out[b][bad] = pool[rng.integers(0, len(pool), size=int(bad.sum()))]
        else:
            out[b][np.isin(out[b], row)] = PAD
    return out


class PointwiseRecommender(nn.Module):
    """Bi-encoder for rating and click: ``base`` (a :class:`llmrec_dist.model.SequenceRecommender` with a
    causal backbone) encodes the history and represents the candidate; the score is their dot product
    (the next-item model's score) plus a head over ``[state, item, state * item]``. Without the dot
    product the head, fed item vectors that start near zero, learns item popularity and little else
    (synthetic click data: validation AUC 0.615 against popularity's 0.619, and 0.84 with it after
    five epochs). ``feedback_input``: add a learned vector of each past event's scaled
    rating to its item vector. ``item_bias``: a learned per-item bias (an ID parameter). ``offset``: the
    train ratings' mean (rating), 0 (click). ``loss``: ``mse``, ``huber`` or ``bce``."""

    def __init__(self, base: nn.Module, task: str, loss: str, feedback_input: bool, item_bias: bool,
                 offset: float = 0.0, huber_delta: float = 1.0, dropout: float = 0.1,
                 clip: tuple[float, float] | None = None):
        super().__init__()
        if base.backbone != "causal":
            raise ValueError("the bi-encoder reads histories causally: model.backbone must be causal")
        self.base, self.task, self.loss_name, self.huber_delta, self.clip = base, task, loss, huber_delta, clip
        hidden = base.items.hidden_size
        self.feedback_proj = nn.Linear(1, hidden) if feedback_input else None
        # The mean of the history's (scaled) ratings, the user's own bias: it starts as "the user's mean
        # rating" (weight = the rating range, bias = range minimum - offset) and training shrinks it.
        self.history_mean = None
        if feedback_input and task == "rating" and clip is not None:
            self.history_mean = nn.Linear(1, 1)
            with torch.no_grad():
                self.history_mean.weight.fill_(clip[1] - clip[0])
                self.history_mean.bias.fill_(clip[0] - offset)
        self.item_bias = nn.Embedding(base.items.num_items + 1, 1, padding_idx=PAD) if item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)
        self.head = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.register_buffer("offset", torch.tensor(float(offset)))

    @property
    def items(self):  # the LM output cache refresh and checkpoints find the item tower here
        return self.base.items

    @property
    def mask_id(self) -> int:
        return self.base.mask_id

    def score(self, seq: torch.Tensor, seq_feedback: torch.Tensor, candidates: torch.Tensor,
              last_only: bool = False) -> torch.Tensor:
        """Predictions (ratings, or click logits) for ``candidates`` ``[B, L, C]`` (``[B, C]`` with
        ``last_only``: the candidates of the state after the whole history)."""
        ids, inverse = torch.unique(torch.cat([seq.reshape(-1), candidates.reshape(-1)]), return_inverse=True)
        vectors = self.base.items.represent(ids)
        n_in = seq.numel()
        inputs = vectors[inverse[:n_in]].view(*seq.shape, -1)
        if self.feedback_proj is not None:
            inputs = inputs + self.feedback_proj(seq_feedback.unsqueeze(-1)) * (seq != PAD).unsqueeze(-1)
        flat = inputs.reshape(n_in, -1)
        states = self.base.encode(seq, flat, torch.arange(n_in, device=seq.device).view_as(seq))
        if last_only:
            states = states[:, -1:]
            candidates = candidates.unsqueeze(1)
        cand = vectors[inverse[n_in:]].view(*candidates.shape, -1)
        states = states.unsqueeze(2).expand_as(cand)
        # the dot product (the next-item model's score) plus the head over both vectors
        out = (states * cand).sum(-1) + self.head(torch.cat([states, cand, states * cand], dim=-1)).squeeze(-1)
        out = out + self.offset
        if self.item_bias is not None:
            out = out + self.item_bias(candidates).squeeze(-1)
        if self.history_mean is not None:
            real = (seq != PAD).to(seq_feedback.dtype)
            mean = (seq_feedback * real).cumsum(1) / real.cumsum(1).clamp(min=1)  # causal: events so far
            mean = mean[:, -1:] if last_only else mean
            out = out + self.history_mean(mean.unsqueeze(-1).to(out.dtype)).expand_as(out)
        return out[:, 0] if last_only else out

    def forward(self, seq, seq_feedback, candidates, labels) -> dict[str, torch.Tensor]:
        """Training step: the loss over every (position, candidate) pair whose candidate is not PAD."""
        keep = candidates != PAD
        predictions = self.score(seq, seq_feedback, candidates)[keep]
        wanted = labels[keep].to(predictions.dtype)
        if self.loss_name == "bce":
            loss = F.binary_cross_entropy_with_logits(predictions, wanted, reduction="sum")
        elif self.loss_name == "huber":
            loss = F.huber_loss(predictions, wanted, reduction="sum", delta=self.huber_delta)
        else:
            loss = F.mse_loss(predictions, wanted, reduction="sum")
        positions = keep.sum()
        out = {"loss": loss / positions.clamp(min=1), "positions": positions}
        anchor = getattr(self.base.items, "take_anchor_loss", lambda: None)()
        if anchor is not None:
            out["loss"] = out["loss"] + anchor
        return out

    @torch.no_grad()
    def predict(self, histories, feedback, candidates: torch.Tensor, rule: LabelRule,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """Ratings (clipped to the range) or click logits of ``candidates`` after each history: one per
        history ``[B]``, or several ``[B, C]`` (a re-ranker scoring a retriever's top C)."""
        max_len = self.base.max_len
        rows = [np.asarray(h, dtype=np.int64)[-max_len:] for h in histories]
        seq = torch.from_numpy(left_pad(rows, max_len)).to(device)
        fb = np.zeros(seq.shape, dtype=np.float32)
        if feedback is not None:
            for b, (row, values) in enumerate(zip(rows, feedback)):
                if len(row):
                    fb[b, seq.shape[1] - len(row):] = rule.scaled(np.asarray(values, dtype=np.float32)[-len(row):])
        out = self.score(seq, torch.from_numpy(fb).to(device), candidates.to(device).view(len(rows), -1),
                         last_only=True)
        out = out.float().view(candidates.shape)
        if self.task == "rating" and self.clip is not None:
            out = out.clamp(*self.clip)
        return out


def evaluate_pairs(model: PointwiseRecommender, pairs: Pairs, rule: LabelRule, batch_size: int,
                   device: torch.device | str = "cpu", prefix: str = "") -> dict[str, float]:
    """The task's metrics over ``pairs`` (this worker's share; with several ranks the predictions are
    gathered first, so every rank returns the figures of all pairs, equal to one process's)."""
    was_training = model.training
    model.eval()
    predictions = []
    for start in range(0, len(pairs), batch_size):
        rows = range(start, min(start + batch_size, len(pairs)))
        histories = [pairs.history(r) for r in rows]
        feedback = [pairs.feedback(r) for r in rows] if pairs.history_feedback is not None else None
        candidates = torch.from_numpy(pairs.candidate[start:start + len(rows)])
        predictions.append(model.predict(histories, feedback, candidates, rule, device).cpu())
    model.train(was_training)
    mine = (torch.cat(predictions) if predictions else torch.zeros(0), torch.from_numpy(pairs.label),
            torch.from_numpy(pairs.user_idx))
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        mine = tuple(torch.cat([part[i] for part in gathered]) for i in range(3))
    scores, labels, users = mine
    if rule.task == "rating":
        figures = {"rmse": rmse(scores, labels), "mae": mae(scores, labels)}
    else:
        figures = {"auc": auc(scores, labels), "gauc": gauc(scores, labels, users), "logloss": log_loss(scores, labels)}
    return {f"{prefix}{k}": v for k, v in figures.items()} | {f"{prefix}pairs": float(len(labels))}
