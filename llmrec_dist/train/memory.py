"""Pre-flight estimate of a training worker's peak memory, checked before Ray starts.

A worker's peak resident memory is modelled as

    process       Python, torch, transformers, Ray and the data pipeline (a measured constant)
  + held          what the run keeps for its whole life: the model's weights, the gradients and AdamW
                  state of the trainable ones, the best weights kept for the final test, the items'
                  token ids, the LM output cache and a ``top_k`` lower-layer cache
  + transient     the largest of the phases that never overlap:
                    a training step: the sequence model's activations, the softmax (logits, their
                    softmax and gradient over the catalogue or the sampled candidates) and a trainable
                    LM's activations for ``train.lm_items_per_step`` items x text tokens x its
                    trainable depth (every distinct item of the step when that key is 0);
                    evaluation: a batch of scores over the catalogue, and a refresh of the LM output
                    cache (a chunk of items through the LM without gradient);
                    a checkpoint: more copies of the weights and optimiser state, serialised.

The batch shapes come from the data: one epoch of one worker's batches is cut the way training cuts
them (shuffle, length buckets, windows), so the peak step's positions, width and distinct items are the
data's own. The activation constants (floats kept per token and layer) follow the layers' structure and
were checked against measured peaks by ``llmrec-dist bench lm-memory``; the benchmark prints the estimate
next to every measurement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmrec_dist.config import Config

MB = 2**20
F32 = 4
# Python + torch + transformers + pyarrow in one process, before any model or data (measured by
# bench lm-memory: 600-620 MB), and what a Ray Train worker adds to it: Ray's core worker, the data
# iterator and, on rank 0 (the peak worker), the MLflow client (measured on Beauty, 2 workers:
# rank 1 peaked 170 MB above a bare process with the same model, rank 0 another 190 MB above it).
PROCESS_MB = 620.0
RAY_WORKER_EXTRA_MB = 360.0
# Items per LM chunk outside training (cache refresh, evaluation): TextItemEncoder.chunk.
LM_CHUNK = 512
# What an LM's blocks hold per token in a training step, over what _block_floats counts: measured by
# bench lm-memory with all-MiniLM-L6-v2 (sdpa attention, CPU), 9.2 MB per item of 32 tokens through the
# 6 layers against 5.5 MB counted, about 1.6x: the attention's own saved tensors and the backward's
# gradient buffers, alive at the peak with what the forward saved.
LM_BLOCK_OVERHEAD = 1.6
# glibc keeps part of what a step frees, and the next step's tensors rarely fit the same holes exactly.
ALLOCATOR_SLACK = 1.15


@dataclass(frozen=True)
class LMShape:
    """What the estimate needs of a Hugging Face encoder, read from its config (no weights loaded)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    params: int


def lm_shape(model_cfg) -> LMShape:
    """The text encoder's shape from its ``config.json``; parameters counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModel

    from llmrec_dist.text_tower import resolve_text_encoder

    source = resolve_text_encoder(model_cfg.text_encoder)
    config = AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code,
                                        local_files_only=Path(source).is_dir())
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModel.from_config(config).parameters())
    hidden = config.hidden_size
    return LMShape(hidden=hidden, layers=config.num_hidden_layers,
                   intermediate=getattr(config, "intermediate_size", 4 * hidden),
                   heads=config.num_attention_heads, params=params)


@dataclass(frozen=True)
class StepShape:
    """The largest training step of one worker's epoch, as the data makes it."""

    rows: int = 0        # sequences in a batch
    width: int = 0       # padded length of the batch
    positions: int = 0   # positions with a target (softmax rows)
    distinct: int = 0    # distinct items of the batch (inputs and targets)


def peak_step(cfg: Config, rows: list, seed: int = 0, max_rows: int = 200_000) -> StepShape:
    """Cut one worker's share of ``rows`` (training histories, windows already cut) into an epoch of
    batches exactly as training does, and return the maximum of each shape over the batches. At most
    ``max_rows`` rows are read (a random sample of larger splits keeps the batch statistics)."""
    from llmrec_dist.batching import shuffled_batches
    from llmrec_dist.worker.recipe import TrainingPairs

    rng = np.random.default_rng(seed)
    share = rows[::cfg.scaling.num_workers]
    if len(share) > max_rows:
        share = [share[i] for i in rng.choice(len(share), max_rows, replace=False)]
    pairs = TrainingPairs(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, exclude_seen=False)),
                          mask_id=0, seed=seed)
    best = StepShape()
    for batch in shuffled_batches(share, cfg.per_worker_batch_size(), cfg.model.max_len, cfg.data.length_buckets,
                                  rng):
        seq, targets = pairs(batch)[:2]
        both = np.concatenate([seq.numpy().ravel(), targets.numpy().ravel()])
        shape = StepShape(rows=len(batch), width=seq.shape[1], positions=int((targets != 0).sum()),
                          distinct=len(np.unique(both[both != 0])))
        best = StepShape(*(max(a, b) for a, b in zip(dataclasses.astuple(best), dataclasses.astuple(shape))))
    return best


@dataclass
class MemoryEstimate:
    """A worker's estimated peak, in MB, with the part each component contributes."""

    held: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    process_mb: float = PROCESS_MB

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values())) if self.phases else "-"

    @property
    def total_mb(self) -> float:
        transient = max((sum(parts.values()) for parts in self.phases.values()), default=0.0)
        return self.process_mb + sum(self.held.values()) + ALLOCATOR_SLACK * transient

    def largest(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` largest components (held, and the peak phase's), largest first."""
        parts = {**self.held, **self.phases.get(self.peak_phase, {})}
        return sorted(parts.items(), key=lambda kv: -kv[1])[:n]

    def summary(self) -> str:
        parts = ", ".join(f"{name} {mb:,.0f} MB" for name, mb in self.largest())
        return f"about {self.total_mb / 1024:.1f} GiB per worker (largest: {parts})"

    def as_dict(self) -> dict:
        return {"total_mb": self.total_mb, "process_mb": self.process_mb, "held_mb": self.held,
                "phases_mb": self.phases, "peak_phase": self.peak_phase}


def _block_floats(hidden: int, ffn: int, heads: int, width: int, gated: bool) -> int:
    """Floats a Transformer block keeps per token for the backward pass: its input, Q, K and V, the
    attention output and its projection's input, both norms' inputs and outputs (8 x hidden), the
    feed-forward's activations (2 x ffn, 3 x for a gated one) and the attention weights with their
    dropout mask (2 x heads x width)."""
    return 8 * hidden + (3 if gated else 2) * ffn + 2 * heads * width


def estimate_worker_memory(cfg: Config, num_items: int, step: StepShape, lm: LMShape | None = None,
                           text_tokens: int | None = None, params: dict[str, int] | None = None,
                           ray_worker: bool = True) -> MemoryEstimate:
    """Estimate one worker's peak for ``cfg`` on a catalogue of ``num_items`` items whose largest step is
    ``step``. ``lm``: the text encoder's shape (needed unless ``model.item_repr=id``); ``text_tokens``:
    the padded token width of the item texts (default ``model.text_max_len``); ``params``: the model's
    ``params_total`` / ``params_trainable`` when known (default: counted from the config's shapes)."""
    from llmrec_dist.model import softmax_negatives

    m, t = cfg.model, cfg.train
    n = num_items + 1
    text = m.item_repr != "id"
    trainable_lm = text and m.freeze != "frozen"
    tokens = text_tokens or m.text_max_len
    est = MemoryEstimate(process_mb=PROCESS_MB + (RAY_WORKER_EXTRA_MB if ray_worker else 0.0))

    # ---- held for the whole run
    counts = params or model_parameters(cfg, num_items, lm)
    held_params, trainable = counts["params_held"], counts["params_trainable"]
    est.held["weights"] = held_params * F32 / MB
    est.held["best weights"] = held_params * F32 / MB
    est.held["gradients + AdamW state"] = trainable * 3 * F32 / MB
    if cfg.private():  # DP-SGD holds privacy.user_chunk per-user gradients before Opacus adds them up
        est.held[f"per-user gradients (DP, {cfg.privacy.user_chunk} users)"] = (
            cfg.privacy.user_chunk * trainable * F32 / MB)
    if text:
        est.held["token ids"] = 2 * n * tokens * 8 / MB
        est.held["LM output cache"] = n * lm.hidden * F32 / MB
        if m.freeze == "top_k":
            est.held["top_k lower-layer cache"] = n * tokens * lm.hidden * F32 / MB
            est.held["LM weights (below top_k)"] = lm.params * F32 / MB
        # loading the LM reads its weights into tensors and builds the model (two copies at once); what
        # is not kept as the model's weights is freed, but the allocator keeps it for the whole run (a
        # frozen LM is dropped once its cache is built: both copies). Measured by bench lm-memory: a
        # frozen MiniLM's setup left 190 MB behind it on Beauty.
        est.held["LM loading (kept by the allocator)"] = (2 if m.freeze == "frozen" else 1) * lm.params * F32 / MB

    # ---- a training step
    negatives = softmax_negatives(m, t)
    ffn = m.ffn_size or (8 * math.ceil(m.hidden_size / 3) if m.block == "llama" else 4 * m.hidden_size)
    block = _block_floats(m.hidden_size, ffn, m.num_heads, step.width, gated=m.block == "llama")
    train = {"sequence activations": step.rows * step.width * (m.num_layers * block + 4 * m.hidden_size) * F32 / MB}
    candidates = min(n, step.distinct + negatives) if negatives else n
    train["softmax"] = step.positions * candidates * 3 * F32 / MB
    if t.exclude_seen:
        train["softmax"] += step.rows * n / MB  # earlier-item flags, one byte each
    if trainable_lm:
        distinct = step.distinct + negatives if negatives else step.distinct
        lm_items = min(t.lm_items_per_step, distinct) if t.lm_items_per_step else distinct
        depth = m.freeze_k if m.freeze == "top_k" else lm.layers
        lm_block = LM_BLOCK_OVERHEAD * _block_floats(lm.hidden, lm.intermediate, lm.heads, tokens, gated=False)
        # + the lower-cache gather (top_k) or the embeddings
        per_token = depth * lm_block + (lm.hidden if m.freeze == "top_k" else 3 * lm.hidden)
        # with activation checkpointing one chunk's activations are alive at a time (in its recompute)
        alive = min(t.lm_checkpoint_items, lm_items) if t.lm_checkpoint_items else lm_items
        what = f"{alive:,} of {lm_items:,} items" if alive < lm_items else f"{lm_items:,} items"
        train[f"LM activations ({what} x {tokens} tokens x {depth} layers)"] = alive * tokens * per_token * F32 / MB
        if alive < lm_items:  # measured by bench lm-memory, not derived: with checkpointing a step still
            # grows by about one block's activations per LM item outside the chunk (1.3-1.7 MB per item of
            # 32 tokens on MiniLM, full and lora alike)
            train["LM items outside the recomputed chunk"] = (lm_items - alive) * tokens * lm_block * F32 / MB
        train["text vectors"] = distinct * (lm.hidden * 3 + m.hidden_size * 4) * F32 / MB
    est.phases["training step"] = train

    # ---- evaluation (an LM cache refresh first, for a trainable LM)
    evaluation = {"scores": cfg.eval.batch_size * n * 5 * F32 / MB,
                  "item table": n * m.hidden_size * 2 * F32 / MB}
    if trainable_lm:
        evaluation["LM output cache refresh"] = LM_CHUNK * tokens * (
            6 * lm.hidden + lm.intermediate + lm.heads * tokens) * F32 / MB
    est.phases["evaluation"] = evaluation

    # ---- a checkpoint: weights copied, both weight files serialised, the optimiser state pickled
    est.phases["checkpoint"] = {"weights copies": 3 * held_params * F32 / MB,
                                "optimiser state": trainable * 2 * F32 / MB}
    return est


def model_parameters(cfg: Config, num_items: int, lm: LMShape | None) -> dict[str, int]:
    """``params_held`` (in memory as parameters: a frozen LM is not) and ``params_trainable`` of the model
    ``cfg`` builds, counted by building it on the meta device (no memory, no encoder weights read)."""
    import torch

    from llmrec_dist.model import build_model
    from llmrec_dist.text_tower import TextFeatures

    m = cfg.model
    text = None
    if m.item_repr != "id":
        features = TextFeatures(m.freeze, lm.hidden, lm.params, torch.zeros(1, 1, dtype=torch.long),
                                torch.zeros(1, 1, dtype=torch.long), pooled=torch.zeros(1, lm.hidden))
        if m.freeze != "frozen":  # the LM's own weights: counted from its shape, not built here
            features.strategy = "frozen"
        text = features
    with torch.device("meta"):
        model = build_model(dataclasses.replace(m, freeze="frozen") if text is not None else m, num_items,
                            text=text)
    held = sum(p.numel() for p in model.parameters())
    trainable = held
    if m.item_repr != "id" and m.freeze != "frozen":
        per_layer = (lm.params - _lm_embedding_params(lm)) // lm.layers
        lm_trainable = {"full": lm.params, "top_k": m.freeze_k * per_layer,
                        "lora": lm.layers * len(m.lora_targets) * m.lora_r * 2 * lm.hidden}[m.freeze]
        held += lm.params if m.freeze != "top_k" else m.freeze_k * per_layer
        trainable += lm_trainable
    return {"params_held": held, "params_trainable": trainable}


def _lm_embedding_params(lm: LMShape) -> int:
    """The LM's parameters outside its blocks (embeddings, norms): what the block count does not scale."""
    block = 4 * lm.hidden * lm.hidden + 2 * lm.hidden * lm.intermediate
    return max(0, lm.params - lm.layers * block)


# --------------------------------------------------------------------------------------------- pre-flight
# Ray's own processes on a node (raylet, GCS, dashboard, the Train controller) and the driver.
RAY_PROCESSES_MB = 1500.0
# The config keys that shrink each component, named when a config does not fit.
KEYS = {
    "LM activations": ("train.lm_checkpoint_items", "train.lm_items_per_step", "model.text_max_len"),
    "softmax": ("train.batch_size", "train.loss=sampled", "train.num_negatives"),
    "sequence activations": ("train.batch_size", "model.max_len"),
    "top_k lower-layer cache": ("model.text_max_len", "model.freeze_k"),
    "LM loading": ("model.text_encoder",),
    "LM items outside": ("train.lm_items_per_step", "model.text_max_len"),
    "scores": ("eval.batch_size",),
    "gradients + AdamW state": ("model.freeze",),
    "weights": ("model.freeze",),
    "best weights": ("model.freeze",),
    "LM output cache refresh": ("model.text_max_len",),
}


class MemoryPreflightError(ValueError):
    """The config's estimated peak does not fit the memory a worker can use; the message is one line."""


def text_token_width(cfg: Config, texts: list[str], sample: int = 20_000, seed: int = 0) -> int:
    """The padded token width of the item texts (the longest, at most ``model.text_max_len``), from the
    tokenizer alone, over a random sample of at most ``sample`` texts."""
    from transformers import AutoTokenizer

    from llmrec_dist.text_tower import resolve_text_encoder

    source = resolve_text_encoder(cfg.model.text_encoder)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code,
                                              local_files_only=Path(source).is_dir())
    if len(texts) > sample:
        texts = [texts[i] for i in np.random.default_rng(seed).choice(len(texts), sample, replace=False)]
    lengths = [len(ids) for ids in tokenizer([str(t) for t in texts], truncation=True,
                                             max_length=cfg.model.text_max_len)["input_ids"]]
    return max(lengths, default=1)


def estimate_for_dataset(cfg: Config, manifest: dict, texts: list[str] | None = None) -> MemoryEstimate:
    """The estimate for ``cfg`` on its dataset: batch shapes from the training rows, the LM's shape from
    its config file, the text width from its tokenizer over the item ``texts`` (read from the dataset
    when not given; no model weights are loaded)."""
    from llmrec_dist.data.dataset_format import num_items, read_item_texts, read_split
    from llmrec_dist.train.training_rows import windowed_table

    table = read_split(cfg.data.path, cfg.training_split())
    rows = (windowed_table(table, cfg) if cfg.data.windows else table).column("items").to_pylist()
    lm = tokens = None
    if cfg.model.item_repr != "id":
        lm = lm_shape(cfg.model)
        tokens = text_token_width(cfg, read_item_texts(cfg.data.path) if texts is None else texts)
    # DP-SGD runs one user at a time: its largest step is the largest single history
    shaped = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, batch_size=cfg.scaling.num_workers * cfg.train.grad_accum)) if cfg.private() else cfg
    return estimate_worker_memory(cfg, num_items(manifest), peak_step(shaped, rows), lm, text_tokens=tokens)


def local_worker_budget_mb(num_workers: int) -> tuple[float, str]:
    """Memory one of ``num_workers`` workers of a local Ray can use before Ray's memory monitor kills it
    (``RAY_memory_usage_threshold`` of the machine's memory, default 0.95), after what the machine already
    uses and Ray's own processes; and how it was worked out, for messages."""
    import os

    import psutil

    vm = psutil.virtual_memory()
    threshold = float(os.environ.get("RAY_memory_usage_threshold", "0.95"))
    usable = vm.total * threshold / MB - (vm.total - vm.available) / MB - RAY_PROCESSES_MB
    how = (f"{vm.total / 2**30:.1f} GiB here, {vm.available / 2**30:.1f} GiB free, "
           f"{num_workers} worker{'s' * (num_workers > 1)}")
    return usable / num_workers, how


def cluster_worker_budget_mb(cfg: Config) -> tuple[float, str]:
    """On a running Ray cluster: the smallest node that can host a worker, its ``memory`` resource shared
    by as many workers as its CPUs (and GPUs) let it hold (at most ``scaling.num_workers``)."""
    import ray

    budgets = []
    for node in ray.nodes():
        res = node.get("Resources", {})
        if not node.get("Alive") or res.get("CPU", 0) < cfg.scaling.cpus_per_worker:
            continue
        if cfg.scaling.use_gpu and res.get("GPU", 0) < cfg.scaling.gpus_per_worker:
            continue
        fit = int(res["CPU"] // cfg.scaling.cpus_per_worker)
        if cfg.scaling.use_gpu:
            fit = min(fit, int(res["GPU"] // cfg.scaling.gpus_per_worker))
        per_node = min(max(fit, 1), cfg.scaling.num_workers)
        budgets.append((res.get("memory", 0) / MB / per_node, per_node))
    if not budgets:  # nodes that start on demand (autoscaling): nothing to check against yet
        return float("inf"), "no node that can host a worker is up yet"
    budget, per_node = min(budgets)
    return budget, f"the smallest node's Ray memory shared by {per_node} worker{'s' * (per_node > 1)}"


def check_fits(estimate: MemoryEstimate, budget_mb: float, how: str) -> None:
    """Raise :class:`MemoryPreflightError` naming the estimate, the budget and the keys to change."""
    if estimate.total_mb <= budget_mb:
        return
    keys: list[str] = []
    for name, _ in estimate.largest(4):
        for prefix, names in KEYS.items():
            if name.startswith(prefix):
                keys += [k for k in names if k not in keys]
    keys += [k for k in ("scaling.num_workers",) if k not in keys]
    raise MemoryPreflightError(
        f"not started: the config needs {estimate.summary()}, but a worker can use about "
        f"{max(budget_mb, 0) / 1024:.1f} GiB ({how}); lower {', '.join(keys)}, or pass --force to start anyway")
