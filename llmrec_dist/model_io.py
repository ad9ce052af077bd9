"""Rebuilding a trained recommender from a folder: a checkpoint (``model.json`` + weights, text
features from the dataset) or a model package (which also carries its ``text_encoder/``).

The one place that knows how a model with an LM item tower is put back together, used by offline
evaluation, packaging and the registry's :class:`~llmrec_dist.registry.recommender.Recommender`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmrec_dist.config import ModelConfig, config_from_dict
from llmrec_dist.model import SequenceRecommender, build_model

TEXT_ENCODER_DIR = "text_encoder"  # a package's trained LM (plain HF encoder + tokenizer)
TEXT_CACHE_DIR = "text_cache"      # a package's cached item-text embeddings
LM_PREFIXES = ("items.lm.", "items.top_layers.")


def model_config(meta: dict, source: str) -> ModelConfig:
    """The ``model`` section recorded in a ``model.json``, validated."""
    return config_from_dict({"model": meta["model"]}, source, require_data_path=False).model


def serving_config(cfg: ModelConfig, folder: str | os.PathLike) -> ModelConfig:
    """A package's config with its text encoder resolved to the package's own ``text_encoder/``."""
    import dataclasses

    encoder = Path(folder) / TEXT_ENCODER_DIR
    return dataclasses.replace(cfg, text_encoder=str(encoder)) if encoder.is_dir() else cfg


def build_for_weights(cfg: ModelConfig, num_items: int, texts: list[str] | None,
                      cache_dir: str | os.PathLike | None) -> SequenceRecommender:
    """A model shaped like ``cfg`` for ``num_items`` ID rows; ``texts`` (one per catalogue item, may be
    more than ``num_items`` for a refreshed catalogue) feed the LM tower when the model reads text."""
    text = None
    if cfg.item_repr != "id":
        from llmrec_dist.text_tower import prepare_text_features

        if texts is None:
            raise ValueError(f"model.item_repr={cfg.item_repr!r}: item texts are needed to rebuild the model")
        text = prepare_text_features(cfg, texts, cache_dir=cache_dir)
    return build_model(cfg, num_items, text=text)


def load_weights_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{where} does not fit the model it describes: {err}") from None
