"""Assemble a self-contained model package from a checkpoint and its dataset.

The package is what the registry stores (as the pyfunc's ``package`` artifact) and what
:class:`llmrec_dist.registry.recommender.Recommender` loads; its files are the saved-model format
(:mod:`llmrec_dist.saved_model`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import save_file

from llmrec_dist.config import EvalConfig
from llmrec_dist.data.dataset_format import read_items, read_manifest, write_manifest, write_parquet
from llmrec_dist.saved_model import (
    ITEMS_FILE,
    LM_PREFIXES,
    MODEL_META_FILE,
    PACKAGE_FORMAT_VERSION,
    RECOMMENDER_FILE,
    TEXT_CACHE_DIR,
    TEXT_ENCODER_DIR,
    WEIGHTS_FILE,
    build_for_weights,
    is_cross_encoder,
    load_weights_strict,
    model_config,
    read_model_meta,
    read_safetensors,
    restore_model,
    serving_config,
)

DEFAULT_K = 10


def build_model_package(checkpoint_dir: str | Path, dataset_path: str | os.PathLike,
                        out_dir: str | Path, eval_cfg: EvalConfig | None = None,
                        manifest: dict | None = None) -> Path:
    """Write a model package folder to ``out_dir`` and return its path.

    ``checkpoint_dir`` is the FINAL checkpoint of a run (its ``model.safetensors`` holds the best
    weights). Refuses (ValueError) a checkpoint trained on another dataset than ``dataset_path``,
    weights that do not fit the checkpoint's model config, and an items table that does not match
    ``num_items``. ``out_dir`` must not exist or be empty; it appears only when complete. ``manifest``:
    the dataset's, when the caller has already read it.
    """
    checkpoint_dir = Path(checkpoint_dir)
    out_dir = Path(out_dir).absolute()
    eval_cfg = eval_cfg or EvalConfig()

    meta = read_model_meta(checkpoint_dir)
    if "dataset_hash" not in meta:
        raise ValueError(f"{checkpoint_dir / MODEL_META_FILE}: lacks dataset_hash")
    manifest = manifest or read_manifest(dataset_path)
    if meta["dataset_hash"] != manifest["content_hash"]:
        raise ValueError(
            f"checkpoint {str(checkpoint_dir)!r} was trained on dataset {meta['dataset_hash']}, but "
            f"{str(dataset_path)!r} has content_hash {manifest['content_hash']}; package the "
            "checkpoint with the dataset it was trained on")

    num_items = int(meta["num_items"])
    items = read_items(dataset_path)
    if items.num_rows != num_items:
        raise ValueError(f"checkpoint has num_items={num_items} but {dataset_path}/{ITEMS_FILE} "
                         f"has {items.num_rows} items")

    model_cfg = model_config(meta, str(checkpoint_dir / MODEL_META_FILE))
    weights = read_safetensors(checkpoint_dir / WEIGHTS_FILE)
    texts = [str(t) for t in items.sort_by("item_idx").column("text").to_pylist()]
    if meta.get("privacy"):  # exact counts over every user's history are not private: none ship
        where = items.schema.get_field_index("popularity")
        items = items.set_column(where, items.schema.field(where), pa.array([0] * items.num_rows, type=pa.int64()))
    settings = {
        "format_version": PACKAGE_FORMAT_VERSION,
        "exclude_seen": eval_cfg.exclude_seen,
        "default_k": DEFAULT_K,
        "dataset_hash": manifest["content_hash"],
        "num_items": num_items,
    }
    _check_free(out_dir)
    temp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(6)}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp.mkdir()
    try:
        if is_cross_encoder(meta.get("task")):
            meta = {**meta, "trained_freeze": model_cfg.freeze,
                    "model": _export_cross_encoder(model_cfg, weights, num_items, texts, meta["task"],
                                                   checkpoint_dir, temp)}
        elif model_cfg.item_repr == "id":
            # Fail here, not at serving time, if the weights do not fit the recorded model config.
            with torch.device("meta"):
                skeleton = build_for_weights(model_cfg, num_items, None, None, meta.get("task"))
            try:
                skeleton.load_state_dict(weights, strict=True, assign=True)
            except RuntimeError as err:
                raise ValueError(f"{checkpoint_dir / WEIGHTS_FILE} does not fit the model in "
                                 f"{MODEL_META_FILE}: {err}") from None
            shutil.copyfile(checkpoint_dir / WEIGHTS_FILE, temp / WEIGHTS_FILE)
        else:
            meta = {**meta, "trained_freeze": model_cfg.freeze,
                    "model": _export_text_model(model_cfg, weights, num_items, texts, dataset_path,
                                                checkpoint_dir, temp, meta.get("task"))}
        (temp / MODEL_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        write_parquet(items, temp / ITEMS_FILE)  # read + write also works for s3:// datasets
        write_manifest(temp, manifest)
        (temp / RECOMMENDER_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        _check_free(out_dir)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir


def _export_text_model(cfg, weights: dict, num_items: int, texts: list[str], dataset_path, checkpoint_dir: Path,
                       temp: Path, task: dict | None = None) -> dict:
    """Write the LM-tower model in serving form; returns the ``model`` section of its model.json.

    Whatever the training strategy, the package holds the trained LM as one plain Hugging Face
    encoder in ``text_encoder/`` (top layers put back, LoRA merged), the other weights in
    ``model.safetensors``, and the item-text embeddings in ``text_cache/``; serving runs it ``frozen``.
    """
    from llmrec_dist.text_tower import load_text_encoder, text_cache_dir

    trained = build_for_weights(cfg, num_items, texts, text_cache_dir(str(dataset_path)), task)
    load_weights_strict(trained, weights, str(checkpoint_dir / WEIGHTS_FILE))
    base_lm, tokenizer = load_text_encoder(cfg.text_encoder, cfg.trust_remote_code)
    return _write_serving_form(trained, trained.items.export_encoder(base_lm), tokenizer, cfg, weights, num_items,
                               texts, temp, task, temp / TEXT_CACHE_DIR)


def _export_cross_encoder(cfg, weights: dict, num_items: int, texts: list[str], task: dict, checkpoint_dir: Path,
                          temp: Path) -> dict:
    """Write a cross-encoder in serving form: its encoder (LoRA merged) as a plain Hugging Face model +
    tokenizer in ``text_encoder/``, the head in ``model.safetensors``; returns the ``model`` section."""
    trained = build_for_weights(cfg, num_items, texts, None, task)
    load_weights_strict(trained, weights, str(checkpoint_dir / WEIGHTS_FILE))
    return _write_serving_form(trained, trained.export_encoder(), trained.tokens.tokenizer, cfg, weights, num_items,
                               texts, temp, task, None)


def _write_serving_form(trained, encoder, tokenizer, cfg, weights: dict, num_items: int, texts: list[str],
                        temp: Path, task: dict | None, cache_dir: Path | None) -> dict:
    """``encoder`` + ``tokenizer`` into ``text_encoder/``, the other weights into ``model.safetensors``; then
    rebuild the served model from what was written (filling ``cache_dir``) and check it scores like
    ``trained``: the package must serve exactly what was evaluated. Returns the serving ``model`` section."""
    with _no_progress_bars():  # transformers' "Writing model shards" bar, for one file, on the user's console
        encoder.save_pretrained(temp / TEXT_ENCODER_DIR)
    tokenizer.save_pretrained(temp / TEXT_ENCODER_DIR)
    save_file({k: v.contiguous() for k, v in weights.items() if not k.startswith(LM_PREFIXES)},
              str(temp / WEIGHTS_FILE))
    serving = dataclasses.replace(cfg, freeze="frozen", text_encoder=TEXT_ENCODER_DIR)
    served = restore_model(temp, serving_config(serving, temp), num_items, texts, cache_dir, task)
    with torch.no_grad():
        expected, got = _probe_scores(trained.eval(), num_items), _probe_scores(served, num_items)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise ValueError("the exported model does not reproduce the trained model's scores "
                         f"(max difference {(expected - got).abs().max().item():.3g})")
    return dataclasses.asdict(serving)


def _probe_scores(model, num_items: int) -> torch.Tensor:
    """Scores of a few items after a short history: the catalogue's (next-item) or the candidates' (rating/click)."""
    probe = torch.arange(1, min(num_items, 8) + 1).unsqueeze(0)
    if hasattr(model, "score_next"):
        return model.score_next(probe)
    if hasattr(model, "score_pairs"):  # the cross-encoder
        return model.predict([probe[0].numpy()], None, probe, None)
    return model.score(probe, torch.zeros(probe.shape), probe, last_only=True)


@contextmanager
def _no_progress_bars():
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _check_free(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"package output {str(out_dir)!r} already exists and is not an empty "
                              "folder; choose another path or remove it")
