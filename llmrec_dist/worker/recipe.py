"""The per-worker training recipe: setup → resume → epochs (train, validate, checkpoint + report) → test.

A refit (``train.refit_epochs``) trains on the histories through each user's validation item and skips
validation: its epochs run to the end and the last one is tested.

Runs inside every Ray Train worker. The distributed boundary is this file: rank and world size from
``ray.train.get_context()``, DDP via ``ray.train.torch.prepare_model``, the data shard via
``ray.train.get_dataset_shard``, metric all-reduces inside :func:`llmrec_dist.evaluation.evaluate`, and
``ray.train.report`` once per epoch on every rank. Only rank 0 writes checkpoint files or talks to MLflow.
"""

from __future__ import annotations

import math
import random
import resource
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ray.data.collate_fn import NumpyBatchCollateFn

from llmrec_dist.batching import cloze_batch, earlier_items, length_bucketed, next_item_batch
from llmrec_dist.config import Config, config_from_dict
from llmrec_dist.cross_encoder import build_cross_encoder, cross_training_batch
from llmrec_dist.data.dataset_format import num_items as manifest_num_items
from llmrec_dist.data.dataset_format import item_counts, read_item_texts, read_split
from llmrec_dist.evaluation import evaluate, load_eval_rows
from llmrec_dist.model import build_model, count_parameters, softmax_negatives
from llmrec_dist.metrics import higher_is_better
from llmrec_dist.pointwise import (LabelRule, evaluate_pairs, record_rule, task_pairs,
                                   task_record, training_batch, wrap_model)
from llmrec_dist.privacy import PrivacyPlan, PrivateStep, held_out, poisson_batches, secret_seed, shard_of
from llmrec_dist.profiling import StepProfiler, region
from llmrec_dist.saved_model import WEIGHTS_FILE, init_from_saved, resolve_model_folder
from llmrec_dist.sharding import refresh_text_cache
from llmrec_dist.text_tower import load_text_features
from llmrec_dist.tracking import RunLogger
from llmrec_dist.worker import checkpoint as ckpt
from llmrec_dist.worker.optim import build_optimizer, build_scheduler


class TrainingPairs:
    """Rows of the train split → left-padded (inputs, targets): next-item pairs for the causal
    backbone, cloze (masked-item) pairs for the bidirectional one. With ``train.exclude_seen`` a third
    tensor holds each row's items before the part the model reads, for the softmax to leave out."""

    def __init__(self, cfg: Config, mask_id: int, seed: int):
        self.model_cfg, self.mask_id, self.exclude_seen = cfg.model, mask_id, cfg.train.exclude_seen
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows):
        max_len = self.model_cfg.max_len
        if self.model_cfg.backbone == "bidirectional":
            pairs, window = cloze_batch(rows, max_len, self.model_cfg.mask_ratio, self.mask_id, self.rng), max_len
        else:
            pairs, window = next_item_batch(rows, max_len), max_len + 1
        return (*pairs, earlier_items(rows, window)) if self.exclude_seen else pairs

    @staticmethod
    def rows_of(batch) -> Any:
        return batch["items"]

    row_length = staticmethod(len)


class PointwisePairs:
    """Rows of the train split (with their feedback) → the rating/click bi-encoder's
    ``(seq, seq_feedback, candidates, labels)`` (:func:`llmrec_dist.pointwise.training_batch`);
    implicit-click negatives come from ``pool`` (the items that occur in training)."""

    def __init__(self, cfg: Config, rule: LabelRule, seed: int, pool: np.ndarray):
        self.max_len, self.rule, self.pool = cfg.model.max_len, rule, pool
        self.rng = np.random.default_rng(seed)

    def __call__(self, rows):
        items = [row[0] for row in rows]
        feedback = [row[1] for row in rows] if rows and rows[0][1] is not None else None
        return training_batch(items, feedback, self.max_len, self.rule, self.rng, self.pool)

    @staticmethod
    def rows_of(batch) -> list:
        feedback = batch["feedback"] if "feedback" in batch else [None] * len(batch["items"])
        return list(zip(batch["items"], feedback))

    @staticmethod
    def row_length(row) -> int:
        return len(row[0])


class CrossPairs(PointwisePairs):
    """Rows of the train split → the cross-encoder's tokenised (history, candidate) pairs and labels
    (:func:`llmrec_dist.cross_encoder.cross_training_batch`): ``task.pairs_per_row`` positions per row."""

    def __init__(self, cfg: Config, rule: LabelRule, seed: int, pool: np.ndarray, tokens):
        super().__init__(cfg, rule, seed, pool)
        self.tokens, self.pairs_per_row = tokens, cfg.task.pairs_per_row

    def __call__(self, rows):
        items = [row[0] for row in rows]
        feedback = [row[1] for row in rows] if rows and rows[0][1] is not None else None
        return cross_training_batch(items, feedback, self.rule, self.rng, self.pool, self.tokens, self.pairs_per_row)


class PairsCollate(NumpyBatchCollateFn):
    """Ray Data collate: a batch of train rows → the training step's tensors."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __call__(self, batch):
        return self.pairs(self.pairs.rows_of(batch))


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)  # sync point: every rank passes here once per epoch
    return t.tolist()


def _peak_rss_mb(device) -> list[float]:
    """Every worker's peak resident memory so far, in MiB, in rank order (all ranks take part)."""
    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], device=device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine.item()]
    peaks = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, mine)
    return [p.item() for p in peaks]


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (all ranks take part)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [node]
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def autocast_for(cfg: Config, device: torch.device):
    """A context factory for the forward pass: bf16 autocast on CUDA GPUs, plain fp32 elsewhere."""
    enabled = cfg.scaling.use_gpu and device.type == "cuda"
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def ddp_kwargs(cfg: Config) -> dict:
    """DistributedDataParallel options. Every trainable parameter takes part in every step's loss for
    every backbone, item representation and freezing strategy (the LM's unused pooler is dropped when
    the encoder loads; a trainable LM runs at least one item per step; tests/test_text_tower.py checks
    each combination), so DDP's per-step search for unused parameters stays off: it costs a graph
    traversal per step and is only needed by models with data-dependent branches.

    Buffers are not broadcast before each forward: every buffer (token ids, the LM output cache, the
    ``top_k`` lower-layer cache, ``id_seen``, rotary tables) is built the same on every rank, and the
    LM output cache is refreshed on all ranks at once (:mod:`llmrec_dist.sharding`). DDP's default would
    copy them all from rank 0 at every step: hundreds of MB for a ``top_k`` cache."""
    return {"find_unused_parameters": False, "broadcast_buffers": False}


def build_recommender(cfg: Config, manifest: Mapping, text) -> torch.nn.Module:
    """The model ``cfg`` trains on this dataset: ``text`` = :func:`load_text_features`' result, the
    softmax's negatives from ``train.loss`` and ``train.negatives_from`` (and ``train.exclude_seen``),
    and for ``id+text`` the items that get an ID vector (``model.id_min_count`` training interactions)."""
    if cfg.task.type != "next_item":
        return build_pointwise(cfg, manifest, text)
    counts = None
    # With privacy nothing here may read the users' histories: every item gets an ID vector and may be a
    # negative (the config refuses train.negatives_from=trained and model.id_min_count > 1).
    if not cfg.private() and (cfg.model.item_repr == "id+text" or cfg.train.negatives_from == "trained"):
        counts = item_counts(cfg.data.path, cfg.training_split())
    trained = None if counts is None else counts > 0
    return build_model(cfg.model, manifest_num_items(manifest), text=text,
                       num_negatives=softmax_negatives(cfg.model, cfg.train),
                       id_seen=counts >= cfg.model.id_min_count if counts is not None and cfg.model.item_repr == "id+text"
                       else None,
                       exclude_seen=cfg.train.exclude_seen, lm_items_per_step=cfg.train.lm_items_per_step,
                       lm_checkpoint_items=cfg.train.lm_checkpoint_items,
                       negative_items=trained if cfg.train.negatives_from == "trained" else None,
                       lm_anchor=cfg.train.lm_anchor)


def build_pointwise(cfg: Config, manifest: Mapping, text) -> torch.nn.Module:
    """The rating/click model: the bi-encoder (the configured backbone and item tower, no softmax, plus the
    head) or, with ``task.architecture=cross_encoder``, the cross-encoder. A rating model starts from the
    mean of the train split's ratings. The bi-encoder's backbone keeps the items that occur in training
    (``negative_pool``): implicit-click negatives are drawn from them."""
    record = task_record(cfg.to_dict()["task"], manifest, cfg.train.seed)
    offset = 0.0
    if record["type"] == "rating":
        train = read_split(cfg.data.path, cfg.training_split(), feedback=True)
        offset = float(np.mean(train.column("feedback").combine_chunks().flatten().to_numpy(zero_copy_only=False)))
    if cfg.task.architecture == "cross_encoder":
        return build_cross_encoder(cfg.model, record, read_item_texts(cfg.data.path), offset=offset)
    counts = item_counts(cfg.data.path, cfg.training_split())
    base = build_model(cfg.model, manifest_num_items(manifest), text=text,
                       id_seen=counts >= cfg.model.id_min_count if cfg.model.item_repr == "id+text" else None,
                       lm_items_per_step=cfg.train.lm_items_per_step,
                       lm_checkpoint_items=cfg.train.lm_checkpoint_items, negative_items=counts > 0,
                       lm_anchor=cfg.train.lm_anchor)
    return wrap_model(base, record, offset=offset, dropout=cfg.model.dropout)


@dataclass(frozen=True)
class PointwiseTask:
    """A rating/click run's task: its record (saved in ``model.json``), label rule and negative pool."""

    record: dict
    rule: LabelRule
    pool: np.ndarray               # the items implicit-click negatives are drawn from
    tokens: Any = None             # the cross-encoder's item tokens (its pairs are built from them)

    def pairs(self, cfg: Config, seed: int) -> PointwisePairs:
        """This epoch's batch builder of the task's model."""
        if self.tokens is not None:
            return CrossPairs(cfg, self.rule, seed, self.pool, self.tokens)
        return PointwisePairs(cfg, self.rule, seed, self.pool)


def steps_per_epoch(cfg: Config, train_users: int, world_size: int) -> int:
    """Optimiser steps per epoch when ``world_size`` workers share ``train_users`` rows."""
    rows_per_worker = train_users // world_size  # Ray Data's equal split drops the remainder
    micro_batches = math.ceil(rows_per_worker / cfg.per_worker_batch_size())
    return max(1, math.ceil(micro_batches / cfg.train.grad_accum))


def epoch_seeds(seed: int, epoch: int, world: int, rank: int) -> tuple[int, int]:
    """(this rank's seed, the seed every rank shares) for one epoch, fixed by (seed, epoch, rank) so an
    epoch re-run after a restart sees the same randomness as in an uninterrupted run. The rank's seed
    drives dropout, negatives and shuffling; the shared one orders the length buckets."""
    return seed * 1000 + epoch * world + rank, seed * 1000 + epoch


def epoch_batches(shard, cfg: Config, seed: int, order_seed: int, mask_id: int, task=None):
    """This worker's training batches for one epoch, streamed from its Ray Data shard: next-item
    (inputs, targets), or with ``task`` (a :class:`PointwiseTask`) the rating/click pairs.

    ``seed`` (per rank) drives the shuffle and the per-batch randomness; ``order_seed`` (the same on
    every rank) orders the length buckets. With a shared order every rank takes a batch of the same
    length quantile of its chunk at each step, so no rank waits in the all-reduce for another one
    padding to a longer batch."""
    per_worker, shuffle = cfg.per_worker_batch_size(), cfg.data.shuffle_buffer or None
    shuffle_seed = seed if shuffle else None
    pairs = TrainingPairs(cfg, mask_id, seed) if task is None else task.pairs(cfg, seed)
    if cfg.data.length_buckets == 1:
        return shard.iter_torch_batches(batch_size=per_worker, collate_fn=PairsCollate(pairs),
                                        local_shuffle_buffer_size=shuffle, local_shuffle_seed=shuffle_seed)
    chunks = (pairs.rows_of(batch) for batch in shard.iter_batches(
        batch_size=per_worker * cfg.data.length_buckets, batch_format="numpy",
        local_shuffle_buffer_size=shuffle, local_shuffle_seed=shuffle_seed))
    rows = length_bucketed(chunks, per_worker, cfg.model.max_len, np.random.default_rng(order_seed),
                           length=pairs.row_length)
    return (pairs(batch) for batch in rows)


def _optimizer_step(model, optimizer, scheduler, cfg: Config) -> None:
    with region("optimizer"):
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model, batches, optimizer, scheduler, cfg: Config, device, amp,
                    profiler: StepProfiler | None = None) -> dict[str, float]:
    """One pass over this worker's shard; returns summed loss/positions/sequences for all-reduce and
    the wall-clock times at which the first batch arrived and the first optimiser step finished.
    Phases are marked with :func:`llmrec_dist.profiling.region` for ``profiler``
    (``train.profile_steps``)."""
    model.train()
    loss_sum = positions = sequences = 0.0
    micro = 0
    first_batch_at = first_step_at = None
    optimizer.zero_grad(set_to_none=True)
    pin = device.type == "cuda"  # page-locked host memory: the copy overlaps the previous step
    batches = iter(batches)
    while True:
        with region("data"):
            batch = next(batches, None)
            if batch is None:
                break
            first_batch_at = first_batch_at or time.time()
            if pin:
                batch = [t.pin_memory() for t in batch]
            # next item: (inputs, targets), and with train.exclude_seen the items before the inputs;
            # rating/click: (inputs, their feedback, candidates, labels)
            tensors = [t.to(device, non_blocking=True) for t in batch]
        micro += 1
        step_now = micro % cfg.train.grad_accum == 0
        # Gradients are all-reduced only on the micro-batch that steps the optimiser.
        sync = nullcontext() if step_now or not hasattr(model, "no_sync") else model.no_sync()
        with sync, amp():
            with region("forward"):
                out = model(*tensors)
            with region("backward"):
                (out["loss"] / cfg.train.grad_accum).backward()
        if step_now:
            _optimizer_step(model, optimizer, scheduler, cfg)
            first_step_at = first_step_at or time.time()
            if cfg.train.lm_refresh_steps and scheduler.last_epoch % cfg.train.lm_refresh_steps == 0:
                refresh_text_cache(getattr(model, "module", model).items)  # all ranks: same step count
        n = out["positions"].item()
        loss_sum += out["loss"].item() * n
        positions += n
        sequences += len(tensors[0])
        if profiler is not None:
            profiler.step()
    if micro % cfg.train.grad_accum:  # a last, partial accumulation still updates the model
        _optimizer_step(model, optimizer, scheduler, cfg)
        first_step_at = first_step_at or time.time()
    return {"loss_sum": loss_sum, "positions": positions, "sequences": sequences,
            "first_batch_at": first_batch_at, "first_step_at": first_step_at}


def private_rows(cfg: Config, rank: int, world: int) -> list[np.ndarray]:
    """This worker's users under DP: the training split's histories whose keyed hash falls to ``rank``
    (not Ray Data's split: Poisson sampling needs every row at hand, and a user's worker must not depend
    on the other users), less the audit's held-out users."""
    table = read_split(cfg.data.path, cfg.training_split())
    keys = table.column("user_key").to_pylist()
    mine = (shard_of(keys, world) == rank) & ~held_out(keys, cfg.data.holdout_users)
    items = table.column("items").to_pylist()
    return [np.asarray(items[i], dtype=np.int64) for i in np.flatnonzero(mine)]


def _check_replicas_agree(model: torch.nn.Module, device) -> None:
    """Without DDP, every rank must hold the same weights (same seeded start, same all-reduced noisy
    steps); a cheap checksum per epoch catches a rank that drifted (all ranks take part)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(device)
    sums = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, total)
    if max(s.item() for s in sums) - min(s.item() for s in sums) > 1e-6 * max(1.0, abs(total.item())):
        raise RuntimeError(f"DP-SGD ranks hold different weights (checksums {[s.item() for s in sums]})")


def train_one_epoch_private(run: "WorkerRun", seed: int) -> dict[str, float]:
    """One DP-SGD epoch: ``steps_per_epoch`` Poisson-sampled steps over this worker's users, each user's
    gradient computed on that user alone (:class:`llmrec_dist.privacy.PrivateStep`). Every rank takes the
    same number of steps (the noisy sums are all-reduced once per step)."""
    cfg, core, device = run.cfg, run.core, run.device
    pairs = TrainingPairs(cfg, core.mask_id, seed)
    rng = np.random.default_rng(secret_seed())  # the sample must not be reproducible from the config

    def loss_of(row):
        tensors = [t.to(device) for t in pairs([row])]
        with run.amp():
            out = core(*tensors)
        return out["loss"], out["positions"].item()

    core.train()
    loss_sum = positions = sequences = 0.0
    first_batch_at = first_step_at = None
    for index in poisson_batches(len(run.train_shard), run.privacy.sample_rate, run.privacy.steps_per_epoch, rng):
        first_batch_at = first_batch_at or time.time()
        with region("private_step"):
            step_loss, step_positions = run.dp.step([run.train_shard[i] for i in index], loss_of)
        run.scheduler.step()
        first_step_at = first_step_at or time.time()
        if cfg.train.lm_refresh_steps and run.scheduler.last_epoch % cfg.train.lm_refresh_steps == 0:
            refresh_text_cache(core.items)
        loss_sum, positions, sequences = loss_sum + step_loss, positions + step_positions, sequences + len(index)
    _check_replicas_agree(core, device)
    return {"loss_sum": loss_sum, "positions": positions, "sequences": sequences,
            "first_batch_at": first_batch_at, "first_step_at": first_step_at}


# ------------------------------------------------------------------------------------------ the recipe
def train_loop_per_worker(loop_config: dict) -> dict:
    """Every worker runs this: setup → resume → epochs (train, validate, checkpoint + report) → test.
    Rank, DDP wrap and data shard are taken in :func:`setup`; ``ray.train.report`` (a barrier) is called in
    :func:`checkpoint_and_report` and :func:`evaluate_best_and_finish`."""
    run = setup(loop_config)
    progress = resume_or_start(run)
    if progress.result is not None:  # the run had finished: a restarted worker group returns at once
        return progress.result
    for epoch in range(progress.start_epoch, run.cfg.epochs_to_run()):
        metrics, once = train_and_validate(run, progress, epoch)
        stop = progress.record(run, epoch, metrics)
        checkpoint_and_report(run, progress, epoch, metrics, once)
        if stop:
            break
    return evaluate_best_and_finish(run, progress)


@dataclass
class WorkerRun:
    """What :func:`setup` builds once per worker and every later step reads."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    amp: Callable                  # the forward pass's autocast context factory
    log: RunLogger                 # rank 0 logs to MLflow; the other ranks' logger does nothing
    manifest: Mapping
    model: torch.nn.Module         # DDP-wrapped when world > 1
    core: torch.nn.Module          # the unwrapped model (what checkpoints and evaluation see)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_shard: Any               # this worker's Ray Data shard of the train split
    valid_rows: Any                # None for a refit: it trains on the validation targets
    test_rows: Any
    text: Any                      # the LM tower's TextFeatures, None for an ID model
    nodes: list[str]               # the Ray node of every rank
    clock: dict | None             # the driver's wall-clock start-up times (train() only)
    reached: dict = field(default_factory=dict)  # this worker's start-up milestones (wall clock)
    task: PointwiseTask | None = None  # rating/click runs
    privacy: PrivacyPlan | None = None  # DP-SGD runs: the schedule the driver fixed
    dp: PrivateStep | None = None       # ... and the step that clips, noises and accounts

    def evaluate(self, rows, prefix: str) -> dict:
        """The task's metrics on ``rows`` (this worker's share; every rank gets the figures of all)."""
        if self.task is not None:
            return evaluate_pairs(self.core, rows, self.task.rule, self.cfg.eval.batch_size, self.device, prefix)
        return evaluate(self.core, rows, self.num_items, self.cfg.eval, self.cfg.model.max_len, self.device,
                        prefix=prefix)

    @property
    def refit(self) -> bool:
        return self.cfg.train.refit_epochs > 0

    @property
    def num_items(self) -> int:
        return manifest_num_items(self.manifest)

    def meta(self) -> dict:
        """The checkpoint's ``model.json``."""
        meta = {"model": self.cfg.to_dict()["model"], "num_items": self.num_items,
                "dataset_hash": self.manifest["content_hash"]}
        if self.dp is not None:  # the package of a private model carries no popularity counts
            meta["privacy"] = {"epsilon": self.dp.epsilon(), "delta": self.privacy.delta}
        if self.task is not None:  # what loading the model and evaluating it again need
            meta["task"] = self.task.record
        return meta


def setup(loop_config: dict) -> WorkerRun:
    """Rank, device, model (wrapped for DDP), optimiser and schedule, this worker's data."""
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    reached = {"loop_start": time.time()}
    manifest = loop_config["manifest"]  # read and checked once, by the driver
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    random.seed(cfg.train.seed)
    text = load_text_features(cfg)
    privacy = PrivacyPlan(**loop_config["privacy"]) if loop_config.get("privacy") else None
    # DP-SGD computes each user's gradient on that user alone and all-reduces the noisy sum itself
    # (Opacus's DistributedDPOptimizer): no DDP wrapper; every rank starts from the same seeded weights.
    model = build_recommender(cfg, manifest, text)
    if cfg.train.init_from:  # the same weights on every rank (DDP's own broadcast would also give rank 0's)
        init_from_saved(model, resolve_model_folder(cfg.train.init_from, loop_config["tracking_uri"]),
                        manifest["content_hash"])
    model = ray.train.torch.prepare_model(model,
                                          parallel_strategy=None if privacy else "ddp",
                                          parallel_strategy_kwargs=None if privacy else ddp_kwargs(cfg))
    nodes = _worker_nodes()
    core = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(core, cfg.train)
    steps = privacy.steps_per_epoch if privacy else steps_per_epoch(cfg, loop_config["train_rows"], world)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    dp = PrivateStep(core, optimizer, privacy, world, cfg.privacy.user_chunk) if privacy else None
    reached["model_ready"] = time.time()
    refit = cfg.train.refit_epochs > 0
    task = None
    if cfg.task.type == "next_item":
        valid_rows = None if refit else load_eval_rows(cfg.data.path, "valid", rank, world, cfg.eval.max_users)
        test_rows = load_eval_rows(cfg.data.path, "test", rank, world, cfg.eval.max_users)
    else:  # rating/click: (history, candidate, label) pairs on the same split
        record = task_record(cfg.to_dict()["task"], manifest, cfg.train.seed)
        valid_rows, test_rows = task_pairs(cfg.data.path, manifest, record, ("valid", "test"), rank, world)
        if cfg.task.architecture == "cross_encoder":  # negatives: the items that occur in training
            pool, tokens = np.flatnonzero(item_counts(cfg.data.path, cfg.training_split()) > 0), core.tokens
        else:
            pool, tokens = core.base.negative_pool.cpu().numpy(), None
        task = PointwiseTask(record, record_rule(record, manifest), pool, tokens)
    train_shard = private_rows(cfg, rank, world) if privacy else ray.train.get_dataset_shard("train")
    reached["eval_rows_ready"] = time.time()
    return WorkerRun(cfg, rank, world, device, autocast_for(cfg, device),
                     RunLogger(loop_config["tracking_uri"], loop_config["run_id"], enabled=rank == 0),
                     manifest, model, core, optimizer, scheduler, train_shard, valid_rows, test_rows, text, nodes,
                     loop_config.get("clock"), reached, task, privacy, dp)


def signed(value: float, metric: str) -> float:
    """``value`` of ``metric`` as a score where larger is better (RMSE, MAE, log loss are negated)."""
    return value if higher_is_better(metric) else -value


@dataclass
class Progress:
    """Where the run stands: what a checkpoint's ``state.pt`` saves and a restart restores."""

    best_weights: dict
    logged: set                    # epochs already in MLflow (none is logged twice)
    start_epoch: int = 0
    best_value: float = -math.inf  # the selection metric's best, signed so that larger is better
    best_epoch: int = -1
    stale: int = 0                 # epochs since the selection metric last improved
    history: list = field(default_factory=list)
    result: dict | None = None     # set when the restored checkpoint is the finished run's

    def record(self, run: WorkerRun, epoch: int, metrics: dict) -> bool:
        """Keep the epoch's metrics and the best weights; True when early stopping ends the run."""
        if run.refit:  # the newest epoch is the model
            self.best_epoch, self.best_weights = epoch, ckpt.cpu_state_dict(run.core)
        elif (score := signed(metrics[run.cfg.selection_metric()], run.cfg.selection_metric())) > self.best_value:
            self.best_value, self.best_epoch, self.stale = score, epoch, 0
            self.best_weights = ckpt.cpu_state_dict(run.core)
        else:
            self.stale += 1
        self.history.append(metrics)
        return not run.refit and run.cfg.train.patience > 0 and self.stale >= run.cfg.train.patience

    def state(self, run: WorkerRun, epoch: int) -> dict:
        state = {"epoch": epoch, "best_value": self.best_value, "best_epoch": self.best_epoch, "stale": self.stale,
                 "history": self.history, "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict()}
        if run.dp is not None:  # the privacy spent so far goes on after a restart
            state["accountant"] = run.dp.accountant.state_dict()
        return state


def resume_or_start(run: WorkerRun) -> Progress:
    """Restore Ray Train's latest checkpoint (a restarted worker group or a resumed driver), or log the
    new run's params; either way tag the run with where it runs."""
    log, core = run.log, run.core
    # Epochs already in MLflow: a restarted worker group (or a resumed driver) logs none of them twice.
    progress = Progress(best_weights=ckpt.cpu_state_dict(core),
                        logged=log.logged_steps("train_loss"))  # logged every epoch, validated (or refit) alike
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as folder:
            folder = Path(folder)
            state = ckpt.read_state(folder)
            ckpt.load_weights(core, folder / WEIGHTS_FILE)
            progress.best_weights = ckpt.read_weights(folder / ckpt.BEST_FILE)
        if state.get("finished"):
            progress.result = state["result"]
            return progress
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        if run.dp is not None:
            run.dp.accountant.load_state_dict(state["accountant"])
        progress.start_epoch, progress.best_value = state["epoch"] + 1, state["best_value"]
        progress.best_epoch, progress.stale, progress.history = state["best_epoch"], state["stale"], state["history"]
        # Epochs reported before a failure but not yet in MLflow are logged now, none twice. Epochs
        # logged but newer than this checkpoint (Ray Train had not recorded it yet) run again and are
        # not logged again: the re-run repeats them exactly (per-epoch seeds, deterministic data).
        for row in progress.history:
            if row["epoch"] not in progress.logged:
                log.metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        log.metrics({"resumed_at_epoch": progress.start_epoch}, step=progress.start_epoch)
    else:
        if progress.logged:  # restarted before Ray Train had recorded any checkpoint: from scratch, same seeds
            log.metrics({"resumed_at_epoch": 0}, step=0)
        private = {} if run.privacy is None else {
            "privacy.noise_multiplier_used": run.privacy.noise_multiplier, "privacy.delta_used": run.privacy.delta,
            "privacy.sample_rate": run.privacy.sample_rate, "privacy.steps_per_epoch": run.privacy.steps_per_epoch,
            "privacy.planned_epsilon": run.privacy.planned_epsilon, "privacy.users": run.privacy.users}
        log.params({**run.cfg.flat(), **count_parameters(core), **private,
                    "dataset.content_hash": run.manifest["content_hash"]})
        log.yaml(run.cfg.to_dict(), "config.yaml")
        log.yaml(dict(run.manifest), "dataset_manifest.yaml")
        if run.cfg.train.init_from and not run.refit:  # where a continued model starts, the mark to beat
            log.metrics({f"init_{k}": v for k, v in run.evaluate(run.valid_rows, prefix="valid_").items()}, step=0)
    # "computed" here means the driver's cache was not found.
    cache = ("hit" if run.text.cache_hit else "computed") if run.text is not None else "-"
    log.tags({"llmrec.worker_nodes": ",".join(run.nodes), "llmrec.num_nodes": len(set(run.nodes)),
              "llmrec.device": run.device.type, "llmrec.text_cache": cache})
    return progress


def train_and_validate(run: WorkerRun, progress: Progress, epoch: int) -> tuple[dict, dict]:
    """One epoch on this worker's shard, its figures summed over the ranks, then validation. Returns the
    epoch's metrics and the figures logged once (epoch 0's profile and start-up times)."""
    cfg, core = run.cfg, run.core
    t0 = time.perf_counter()
    epoch_seed, order_seed = epoch_seeds(cfg.train.seed, epoch, run.world, run.rank)
    torch.manual_seed(epoch_seed)
    refresh_text_cache(core.items)  # a trainable LM's output cache, if a refit epoch or a restore left it stale
    batches = None if run.dp is not None else epoch_batches(run.train_shard, cfg, epoch_seed, order_seed,
                                                            mask_id=core.mask_id, task=run.task)
    # Epoch 0 may be profiled (train.profile_steps): where a step's time goes.
    # (not under DP-SGD: its steps are per-user passes, which the step profile's phases do not describe)
    profiler = (StepProfiler(run.model, cfg.train.profile_steps)
                if cfg.train.profile_steps and epoch == 0 and run.dp is None else None)
    with profiler or nullcontext():
        if run.dp is not None:
            stats = train_one_epoch_private(run, epoch_seed)
        else:
            stats = train_one_epoch(run.model, batches, run.optimizer, run.scheduler, cfg, run.device, run.amp,
                                    profiler)
    train_seconds = time.perf_counter() - t0
    loss_sum, positions, sequences = _all_reduce_sum(
        [stats["loss_sum"], stats["positions"], stats["sequences"]], run.device)
    once = _first_epoch_figures(run, stats, profiler) if epoch == 0 else {}

    t_valid = time.perf_counter()
    valid = {} if run.refit else run.evaluate(run.valid_rows, prefix="valid_")
    peaks = _peak_rss_mb(run.device)
    metrics = {
        "epoch": epoch,
        "train_loss": loss_sum / max(positions, 1),
        "train_sequences": sequences,
        "sequences_per_s": sequences / train_seconds,
        "epoch_seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds,
        "lr": run.scheduler.get_last_lr()[0],
        "peak_rss_mb": max(peaks),
        **{f"peak_rss_mb_rank{r}": mb for r, mb in enumerate(peaks)},
        **valid,
    }
    if run.dp is not None:  # the privacy spent by the end of this epoch (at delta)
        metrics["privacy_epsilon"], metrics["privacy_delta"] = run.dp.epsilon(), run.privacy.delta
    if not run.refit:
        metrics["valid_seconds"] = time.perf_counter() - t_valid
    if profiler is not None and run.rank == 0 and epoch not in progress.logged:
        run.log.text(profiler.table(), "profile.txt")
    return metrics, once


def _first_epoch_figures(run: WorkerRun, stats: dict, profiler: StepProfiler | None) -> dict:
    """Figures of epoch 0 only, logged with its metrics (rank 0): the profile and the start-up cost."""
    once = profiler.summary() if profiler is not None and run.rank == 0 else {}
    clock = run.clock
    if stats["first_step_at"] and clock:
        once["startup_seconds"] = stats["first_step_at"] - clock["process_start"]
        once["ray_init_to_first_step_seconds"] = stats["first_step_at"] - clock["ray_init"]
        # Where the start-up goes: seconds after ray.init at which each milestone was reached.
        milestones = {"ray_ready": clock["ray_ready"], "trainer_built": clock["trainer_built"], **run.reached,
                      "first_batch": stats["first_batch_at"], "first_step": stats["first_step_at"]}
        once.update({f"startup_{k}_at_s": t - clock["ray_init"] for k, t in milestones.items()})
    return once


def checkpoint_and_report(run: WorkerRun, progress: Progress, epoch: int, metrics: dict, once: dict) -> None:
    """Checkpoint + report: every rank reports (a barrier); only rank 0 attaches files and logs."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, written = None, {}
        if run.rank == 0:
            t_write = time.perf_counter()
            ckpt.write_checkpoint(Path(tmp), weights=ckpt.cpu_state_dict(run.core),
                                  best_weights=progress.best_weights, meta=run.meta(),
                                  state=progress.state(run, epoch))
            written = {"checkpoint_mb": ckpt.folder_bytes(Path(tmp)) / 2**20,
                       "checkpoint_write_seconds": time.perf_counter() - t_write}
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        t_report = time.perf_counter()
        # epochs_done (1-based) is the time axis of a sweep's ASHA scheduler (llmrec_dist.sweep).
        ray.train.report({**metrics, "best_epoch": progress.best_epoch, "epochs_done": epoch + 1},
                         checkpoint=checkpoint)
        # report() uploads the checkpoint to train.storage_path and waits for every rank.
        written["checkpoint_report_seconds"] = time.perf_counter() - t_report
    if epoch not in progress.logged:
        run.log.metrics({**{k: v for k, v in metrics.items() if k != "epoch"}, **written, **once}, step=epoch)


def evaluate_best_and_finish(run: WorkerRun, progress: Progress) -> dict:
    """Test the best weights, log them, and write the final checkpoint: it holds the best weights as its
    model and marks the run finished, so a restarted worker group returns at once instead of training
    again."""
    cfg, core = run.cfg, run.core
    core.load_state_dict(progress.best_weights)
    best_row = next(row for row in progress.history if row["epoch"] == progress.best_epoch)
    best_valid = {k: v for k, v in best_row.items() if k.startswith("valid_")}
    test = run.evaluate(run.test_rows, prefix="test_")
    result = {**best_valid, **test, "best_epoch": progress.best_epoch, "epochs_run": len(progress.history)}
    if run.dp is not None:  # every epoch run counts, not only the best one's
        result["privacy_epsilon"], result["privacy_delta"] = run.dp.epsilon(), run.privacy.delta
    if run.refit:
        result["refit_epochs"] = cfg.train.refit_epochs
    run.log.metrics({f"best_{k}": v for k, v in best_valid.items()} | test, step=progress.best_epoch)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if run.rank == 0:
            ckpt.write_checkpoint(Path(tmp), weights=progress.best_weights, best_weights=progress.best_weights,
                                  meta=run.meta(),
                                  state={"finished": True, "result": result, "history": progress.history})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**result, "final": 1}, checkpoint=checkpoint)
    return result
