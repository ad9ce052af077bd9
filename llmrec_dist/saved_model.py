"""The saved-model format: the files a trained model is kept in, and the one way to read it back.

Two folders hold a saved model. Both have the model part; a package adds what serving needs::

    model.safetensors   weights (loaded with safetensors only, never unpickled)
    model.json          {"model": ModelConfig fields, "num_items": N, "dataset_hash": ...,
                         rating/click models: "task": the task section, its rating range, eval seed}

    checkpoint folder (written each epoch by the per-worker recipe, :mod:`llmrec_dist.worker.checkpoint`)
      + best_model.safetensors, state.pt; a text model reads its item texts from the dataset
    model package (:func:`llmrec_dist.registry.package.build_model_package`; what the registry stores)
      + items.parquet     item_idx (1..N), item_id (original id), text, popularity
      + manifest.json     the dataset's manifest
      + recommender.json  {"format_version": 1, "exclude_seen": true, "default_k": 10, ...}
      + text_encoder/     a text model's trained LM (plain Hugging Face encoder + tokenizer)
      + text_cache/       its cached item-text embeddings

A saved model is data, not code: weights load only from safetensors; a damaged ``model.json`` is an
error naming the file; one whose text encoder needs its own Python code (``model.trust_remote_code``)
is refused unless the person loading it allows it. Offline evaluation (:func:`load_model`), packaging
and serving (:meth:`llmrec_dist.registry.recommender.Recommender.from_folder`) all read through here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmrec_dist.config import ModelConfig, config_from_dict
from llmrec_dist.data.dataset_format import ITEMS_FILE, MANIFEST_FILE, read_item_texts
from llmrec_dist.model import SequenceRecommender, build_model

WEIGHTS_FILE = "model.safetensors"
BEST_FILE = "best_model.safetensors"  # a training checkpoint's best epoch so far (its model.safetensors: the latest)
MODEL_META_FILE = "model.json"
TEXT_ENCODER_DIR = "text_encoder"  # a package's trained LM (plain HF encoder + tokenizer)
TEXT_CACHE_DIR = "text_cache"      # a package's cached item-text embeddings
# weights of the LM tower's LM (a package keeps them in text_encoder/); "base." in a rating/click bi-encoder
# and the cross-encoder's own encoder ("lm.")
LM_PREFIXES = ("items.lm.", "items.top_layers.", "base.items.lm.", "base.items.top_layers.", "lm.")

PACKAGE_FORMAT_VERSION = 1
RECOMMENDER_FILE = "recommender.json"
PACKAGE_FILES = (WEIGHTS_FILE, MODEL_META_FILE, ITEMS_FILE, MANIFEST_FILE, RECOMMENDER_FILE)
NOT_A_PACKAGE = "the model package is damaged: log or build it again"

_MAX_SHOWN_VALUE = 60  # characters of a bad value quoted in an error (a value may be huge)


def short_repr(value: Any) -> str:
    """A bad value as quoted in an error: at most a line."""
    text = repr(value) if not isinstance(value, (list, tuple, dict)) or len(value) < 100 else \
        f"<{type(value).__name__} of {len(value)} values>"
    return text if len(text) <= _MAX_SHOWN_VALUE else text[:_MAX_SHOWN_VALUE - 3] + "..."


def _with(remedy: str) -> str:
    return f"; {remedy}" if remedy else ""


def read_json(path: Path, remedy: str = "") -> dict:
    """A JSON object from ``path``, or a ValueError naming the file (and ``remedy``)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({err}){_with(remedy)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}{_with(remedy)}")
    return data


def read_model_meta(folder: str | os.PathLike, remedy: str = "") -> dict:
    """``model.json`` of a checkpoint or package, checked enough to build the model from."""
    path = Path(folder) / MODEL_META_FILE
    meta = read_json(path, remedy)
    missing = [key for key in ("model", "num_items") if key not in meta]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}{_with(remedy)}")
    value = meta["num_items"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: num_items must be a positive integer, got {short_repr(value)}{_with(remedy)}")
    return meta


def model_config(meta: dict, source: str) -> ModelConfig:
    """The ``model`` section recorded in a ``model.json``, validated."""
    return config_from_dict({"model": meta["model"]}, source, require_data_path=False).model


def serving_config(cfg: ModelConfig, folder: str | os.PathLike) -> ModelConfig:
    """A package's config with its text encoder resolved to the package's own ``text_encoder/``."""
    encoder = Path(folder) / TEXT_ENCODER_DIR
    return dataclasses.replace(cfg, text_encoder=str(encoder)) if encoder.is_dir() else cfg


def check_remote_code(requested: bool, allowed: bool, where: str | Path) -> None:
    """Refuse a saved model whose text encoder needs its own Python code unless the caller allowed it.

    ``requested`` comes from the saved ``model.json`` (data that may come from anyone); ``allowed`` from
    the person loading it. The code would run on load, so the default is to refuse.
    """
    if requested and not allowed:
        raise ValueError(f"{where}: model.trust_remote_code is true: loading this model would run Python code "
                         "shipped with its text encoder; refused (allow it explicitly with trust_remote_code=True "
                         "only for a model whose origin you trust)")


def saved_model_config(folder: Path, meta: dict, trust_remote_code: bool) -> ModelConfig:
    """The model config of a saved model, ready to build: validated, remote code refused unless allowed,
    a package's text encoder resolved to its own copy."""
    where = folder / MODEL_META_FILE
    cfg = serving_config(model_config(meta, str(where)), folder)
    check_remote_code(cfg.trust_remote_code, trust_remote_code, where)
    return cfg


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a safetensors file; anything else (a pickle renamed, a damaged file) is refused, never
    unpickled."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{path}: not a safetensors weights file ({reason}); weights are loaded only from "
                         "safetensors, never unpickled") from None


def build_for_weights(cfg: ModelConfig, num_items: int, texts: list[str] | None,
                      cache_dir: str | os.PathLike | None, task: dict | None = None) -> SequenceRecommender:
    """A model shaped like ``cfg`` for ``num_items`` ID rows; ``texts`` (one per catalogue item, may be
    more than ``num_items`` for a refreshed catalogue) feed the LM tower when the model reads text.
    ``task``: a rating/click model's ``model.json`` ``task`` record (the bi-encoder around the model)."""
    if task is not None and task.get("architecture") == "cross_encoder":
        from llmrec_dist.cross_encoder import build_cross_encoder

        if texts is None:
            raise ValueError("the cross-encoder reads item texts: they are needed to rebuild the model")
        return build_cross_encoder(cfg, task, texts[:num_items])
    text = None
    if cfg.item_repr != "id":
        from llmrec_dist.text_tower import prepare_text_features

        if texts is None:
            raise ValueError(f"model.item_repr={cfg.item_repr!r}: item texts are needed to rebuild the model")
        text = prepare_text_features(cfg, texts, cache_dir=cache_dir)
    model = build_model(cfg, num_items, text=text)
    if task is not None:
        from llmrec_dist.pointwise import wrap_model

        model = wrap_model(model, task)
    return model


def load_weights_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where} does not fit the model it describes: {err}") from None


def is_model_uri(model: str) -> bool:
    """An MLflow model URI (``models:/NAME@ALIAS``, ``runs:/ID/PATH``) or another URI, not a local path."""
    return "://" in model or model.startswith(("models:/", "runs:/"))


def resolve_model_folder(model: str, tracking_uri: str = "") -> Path:
    """A local folder holding ``model.safetensors`` + ``model.json``, downloading an MLflow model if needed."""
    path = Path(model)
    if path.is_dir():
        found = next((p.parent for p in sorted(path.rglob(MODEL_META_FILE))), None)
        if found is None or not (found / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{model}: no {MODEL_META_FILE} + {WEIGHTS_FILE} found in this folder")
        return found
    if not is_model_uri(model):
        raise FileNotFoundError(f"{model}: not a folder and not an MLflow model URI (models:/NAME@ALIAS, runs:/…)")
    import mlflow

    from llmrec_dist.tracking import resolve_tracking_uri, use_tracking_uri

    with use_tracking_uri(resolve_tracking_uri(tracking_uri)):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    return resolve_model_folder(str(local))


LM_TOWER_PREFIXES = ("items.lm.", "items.top_layers.")  # a next-item model's trainable LM weights


def init_from_saved(model: torch.nn.Module, folder: Path, dataset_hash: str, key: str = "train.init_from") -> None:
    """Start ``model`` from the weights saved in ``folder`` (a package, or a training checkpoint: its best
    epoch), for a run that continues a saved model, e.g. with its LM made trainable. Every weight of the
    saved model must fit (same item indices, same shapes); the only weights it may lack are those of a
    trainable LM tower (``model.freeze`` top_k/full/lora after a frozen model), which keep their
    pretrained values. A saved model with weights this model lacks (a trained LM, a whitening, a task
    head) is refused rather than silently dropped. Errors name ``key``. (The driver has already refused a
    model of another task or dataset, ``launcher.check_init_from``; the check here is the last guard.)"""
    meta = check_saved_model(folder, trust_remote_code=False)
    if meta.get("task") is not None or meta.get("dataset_hash") != dataset_hash:
        raise ValueError(f"{key}: {folder} is not a next-item model of dataset {dataset_hash}")
    weights = read_safetensors(folder / (BEST_FILE if (folder / BEST_FILE).is_file() else WEIGHTS_FILE))
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(LM_TOWER_PREFIXES)]
    extra = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape]
    if missing or extra or shapes:
        parts = [f"{label}: {', '.join(names[:6])}{' …' if len(names) > 6 else ''}"
                 for label, names in (("weights the saved model lacks", missing),
                                      ("weights this config lacks", extra), ("shapes differ", shapes)) if names]
        raise ValueError(f"{key}: {folder} does not fit this config's model ({'; '.join(parts)}); set the model.* "
                         f"settings as in its {MODEL_META_FILE}, changing only model.freeze (and its LM settings)")
    model.load_state_dict(weights, strict=False)


def restore_model(folder: Path, cfg: ModelConfig, num_items: int, texts: list[str] | None,
                  cache_dir: str | os.PathLike | None, task: dict | None = None) -> SequenceRecommender:
    """The model saved in ``folder`` (``cfg`` from :func:`saved_model_config`), in eval mode on CPU."""
    model = build_for_weights(cfg, num_items, texts, cache_dir, task)
    weights = read_safetensors(folder / WEIGHTS_FILE)
    if is_cross_encoder(task) and not any(k.startswith(LM_PREFIXES) for k in weights):
        # a package keeps the cross-encoder's encoder in text_encoder/ (loaded above), the head here
        weights |= {k: v for k, v in model.state_dict().items() if k.startswith(LM_PREFIXES)}
    load_weights_strict(model, weights, str(folder / WEIGHTS_FILE))
    return model.eval()



def is_cross_encoder(task: dict | None) -> bool:
    return task is not None and task.get("architecture") == "cross_encoder"


def check_saved_model(folder: Path, trust_remote_code: bool) -> dict:
    """The cheap part of :func:`load_model`: ``model.json`` valid, remote code allowed if asked for, and
    the weights file a safetensors file (its header only is read). Returns the meta."""
    from safetensors import safe_open

    meta = read_model_meta(folder)
    saved_model_config(folder, meta, trust_remote_code)
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{folder / WEIGHTS_FILE}: not a safetensors weights file ({err}); weights are "
                         "loaded only from safetensors, never unpickled") from None
    return meta


def is_package(folder: Path) -> bool:
    """A package of a text model carries its own encoder; a checkpoint reads the dataset's."""
    return (folder / TEXT_ENCODER_DIR).is_dir()


def load_model(folder: str | os.PathLike, data_path: str | None = None,
               trust_remote_code: bool = False) -> tuple[SequenceRecommender, dict]:
    """The model saved in a checkpoint or package folder, and its ``model.json``. A text model built
    from a checkpoint reads its item texts from the dataset at ``data_path`` (a package carries its own
    items and encoder).

    Weights load only from safetensors. A saved model whose text encoder needs its own Python code
    (``model.trust_remote_code`` in its ``model.json``) is refused unless ``trust_remote_code``.
    """
    folder = Path(folder)
    meta = check_saved_model(folder, trust_remote_code)
    cfg = saved_model_config(folder, meta, trust_remote_code)
    texts, cache = None, None
    task = meta.get("task")
    if task is not None and not isinstance(task, dict):
        raise ValueError(f"{folder / MODEL_META_FILE}: task must be an object, got {short_repr(task)}")
    if cfg.item_repr != "id" or is_cross_encoder(task):
        from llmrec_dist.text_tower import text_cache_dir

        packaged = is_package(folder)
        source = folder if packaged else data_path
        if source is None:
            raise ValueError(f"{folder}: a text model's checkpoint needs its dataset for the item texts")
        texts = read_item_texts(source)
        cache = folder / TEXT_CACHE_DIR if packaged else text_cache_dir(str(data_path))
    return restore_model(folder, cfg, meta["num_items"], texts, cache, task), meta
