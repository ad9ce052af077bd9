"""Evaluating a saved model (checkpoint folder, model package or MLflow model URI) on a prepared dataset,
in this process or sharded over Ray Train workers (same numbers either way)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llmrec_dist.config import EvalConfig, absolute
from llmrec_dist.data.dataset_format import num_items as manifest_num_items
from llmrec_dist.data.dataset_format import checked_manifest, read_manifest
from llmrec_dist.evaluation import evaluate, load_eval_rows
from llmrec_dist.saved_model import check_saved_model, load_model


def _check_dataset(meta: dict, manifest: dict, data_path: str) -> None:
    if meta.get("dataset_hash") != manifest["content_hash"]:
        raise ValueError(f"the model was trained on dataset {meta.get('dataset_hash')} but {data_path} is "
                         f"{manifest['content_hash']}: item indices would not match")


def evaluate_here(folder: Path, data_path: str, split: str, cfg: EvalConfig, rank: int = 0,
                  world: int = 1, device: torch.device | str = "cpu", trust_remote_code: bool = False,
                  manifest: dict | None = None) -> dict[str, float]:
    """Metrics of the saved model in ``folder`` on this rank's share of ``split``. ``manifest``: the
    dataset's, when the caller has already read it."""
    model, meta = load_model(folder, data_path, trust_remote_code)
    manifest = manifest or read_manifest(data_path)
    _check_dataset(meta, manifest, data_path)
    if meta.get("task") is not None:  # a rating/click model: its task's pairs and metrics
        from llmrec_dist.pointwise import evaluate_pairs, record_rule, task_pairs

        record = meta["task"]
        [pairs] = task_pairs(data_path, manifest, record, (split,), rank, world)
        return evaluate_pairs(model.to(device), pairs, record_rule(record, manifest), cfg.batch_size, device,
                              prefix=f"{split}_")
    rows = load_eval_rows(data_path, split, rank, world, cfg.max_users)
    return evaluate(model.to(device), rows, manifest_num_items(manifest), cfg, meta["model"]["max_len"],
                    device, prefix=f"{split}_")


def evaluate_per_user(folder: Path, data_path: str, split: str, cfg: EvalConfig, k: int = 10, verify: bool = True,
                      trust_remote_code: bool = False, device: torch.device | str = "cpu"):
    """The usual metrics of a next-item model (as :func:`evaluate_saved_model` with one worker) and, from
    the same pass, every user's rank and top-``k`` list: ``(metrics, manifest, rows, PerUserResults)``.

    Single-process only. A rating/click model (``task.type``) is refused with a ``ValueError``: it
    scores given pairs and ranks no catalogue, so it has no top-K lists to report on.
    """
    from llmrec_dist.evaluation import PerUserResults

    manifest = checked_manifest(data_path, verify)
    model, meta = load_model(folder, data_path, trust_remote_code)
    _check_dataset(meta, manifest, data_path)
    if meta.get("task") is not None:
        raise ValueError(f"{folder}: a {meta['task']['type']} model scores pairs and ranks no catalogue; the "
                         "fairness report needs a next-item model")
    rows = load_eval_rows(data_path, split)
    results = PerUserResults(len(rows), k)
    metrics = evaluate(model.to(device), rows, manifest_num_items(manifest), cfg, meta["model"]["max_len"],
                       device, prefix=f"{split}_", observe=results)
    return metrics, manifest, rows, results


@dataclass(frozen=True)
class Rerank:
    """A re-ranker chained after the evaluated retriever (:mod:`llmrec_dist.rerank`): the saved rating or
    click model in ``folder`` re-orders the retriever's ``top_n``, for each of ``blends``."""

    folder: str
    top_n: int = 100
    blends: tuple[float, ...] = (0.0,)


def evaluate_chain_here(folder: Path, rerank: Rerank, data_path: str, split: str, cfg: EvalConfig, rank: int = 0,
                        world: int = 1, device: torch.device | str = "cpu", trust_remote_code: bool = False,
                        manifest: dict | None = None) -> dict[str, float]:
    """Metrics of the retriever in ``folder`` alone (``{split}_…``) and chained with ``rerank``
    (``{split}_rerank_{blend}_…`` per blend; with one blend, ``{split}_rerank_…``) on this rank's share."""
    from llmrec_dist.pointwise import record_rule
    from llmrec_dist.rerank import evaluate_chain, pointwise_rescorer, read_history_feedback

    manifest = manifest or read_manifest(data_path)
    retriever, meta = load_model(folder, data_path, trust_remote_code)
    reranker, rerank_meta = load_model(Path(rerank.folder), data_path, trust_remote_code)
    for m in (meta, rerank_meta):
        _check_dataset(m, manifest, data_path)
    if meta.get("task") is not None:
        raise ValueError(f"{folder}: the retriever must be a next-item model, this one is a "
                         f"{meta['task']['type']} model")
    record = rerank_meta.get("task")
    if record is None:
        raise ValueError(f"{rerank.folder}: the re-ranker must be a rating or click model (task.type), this one "
                         "is a next-item model")
    rows = load_eval_rows(data_path, split, rank, world)
    feedback = read_history_feedback(data_path, split, rank, world) if record["feedback_input"] else None
    rescore = pointwise_rescorer(reranker.to(device), record_rule(record, manifest), rows, feedback, device)
    figures = evaluate_chain(retriever.to(device), rescore, rows, manifest_num_items(manifest), cfg,
                             meta["model"]["max_len"], rerank.top_n, list(rerank.blends), device, prefix=f"{split}_")
    out = dict(figures.pop(None))
    for blend, values in figures.items():
        name = chain_prefix(split, blend, rerank.blends)
        out.update({name + key.removeprefix(f"{split}_"): value for key, value in values.items()})
    return out


def chain_prefix(split: str, blend: float, blends) -> str:
    """The metric prefix of the chain with ``blend`` among ``blends``: ``{split}_rerank_`` (one blend),
    ``{split}_rerank_{blend}_`` (several)."""
    return f"{split}_rerank_" if len(blends) == 1 else f"{split}_rerank_{blend:g}_"


def split_chain_figures(figures: dict[str, float], split: str, blend: float,
                        blends) -> tuple[dict[str, float], dict[str, float]]:
    """``(retriever alone, chain with blend)`` of :func:`evaluate_chain_here`'s figures, named without the
    split (``ndcg_at_10``, ...)."""
    chain, mine = f"{split}_rerank_", chain_prefix(split, blend, blends)
    alone = {k.removeprefix(f"{split}_"): v for k, v in figures.items() if not k.startswith(chain)}
    return alone, {k.removeprefix(mine): v for k, v in figures.items() if k.startswith(mine)}


def _eval_loop_per_worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    args = (config["data_path"], config["split"], EvalConfig(**config["eval"]), ctx.get_world_rank(),
            ctx.get_world_size(), ray.train.torch.get_device(), config["trust_remote_code"], config["manifest"])
    if config.get("rerank"):
        return evaluate_chain_here(Path(config["folder"]), Rerank(**config["rerank"]), *args)
    return evaluate_here(Path(config["folder"]), *args)


def evaluate_saved_model(folder: Path, data_path: str, split: str, cfg: EvalConfig,
                         num_workers: int = 1, cpus_per_worker: float = 1.0, verify: bool = True,
                         trust_remote_code: bool = False, rerank: Rerank | None = None) -> dict[str, float]:
    """Metrics of a saved model; ``num_workers > 1`` shards users over Ray Train workers. ``rerank``: also
    the metrics of the chain of this retriever and that re-ranker (:func:`evaluate_chain_here`).

    What can be refused is refused here, on the driver, before any worker starts: the dataset's files
    are checked against its manifest's content hash (``verify``; a damaged, missing or modified shard is
    named), and the saved model's ``model.json`` and weights header are checked (``ValueError`` for a
    damaged one, or one that needs remote code without ``trust_remote_code``).
    """
    manifest = checked_manifest(data_path, verify)
    if num_workers <= 1 and rerank is not None:
        return evaluate_chain_here(folder, rerank, data_path, split, cfg, trust_remote_code=trust_remote_code,
                                   manifest=manifest)
    if num_workers <= 1:
        return evaluate_here(folder, data_path, split, cfg, trust_remote_code=trust_remote_code, manifest=manifest)
    for saved in (folder, *([rerank.folder] if rerank else [])):
        _check_dataset(check_saved_model(Path(saved), trust_remote_code), manifest, data_path)
    import dataclasses

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmrec_dist.ray_setup import init_ray

    init_ray(num_workers, cpus_per_worker)
    with tempfile.TemporaryDirectory(prefix="llmrec-eval-") as storage:
        trainer = TorchTrainer(
            _eval_loop_per_worker,
            train_loop_config={"folder": str(Path(folder).resolve()), "data_path": absolute(data_path),
                               "split": split, "eval": dataclasses.asdict(cfg),
                               "trust_remote_code": trust_remote_code, "manifest": manifest,
                               "rerank": dataclasses.asdict(rerank) if rerank else None},
            scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(storage_path=storage),
        )
        return trainer.fit().return_value
