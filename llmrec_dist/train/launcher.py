"""Driver side of a training run: Ray, the TorchTrainer, and the MLflow run around it.

    verify dataset → MLflow run (RUNNING) → TorchTrainer.fit() (workers; rank 0 logs) →
    package the best checkpoint → log pyfunc → register + gate the alias → run FINISHED
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmrec_dist.config import Config, absolute
from llmrec_dist.data.layout import read_manifest, verify_dataset
from llmrec_dist.ray_setup import init_ray
from llmrec_dist.tracking import end_run, resolve_tracking_uri, start_run

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    tracking_uri: str
    metrics: dict
    checkpoint_path: str
    model_uri: str = ""
    registration: dict = field(default_factory=dict)
    seconds: float = 0.0


def build_trainer(cfg: Config, run_id: str, tracking_uri: str, run_name: str, callbacks: list | None = None):
    """The TorchTrainer for ``cfg``: train split streamed through Ray Data, evaluation splits read per rank.
    ``callbacks``: Ray Train callbacks (a sweep passes Tune's report callback)."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmrec_dist.data.layout import split_files
    from llmrec_dist.train.recipe import train_loop_per_worker

    train_ds = ray.data.read_parquet(split_files(cfg.data.path, "train"), columns=["items"])
    if cfg.data.materialize:
        train_ds = train_ds.materialize()
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.train.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.selection_metric(),
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=1),
            callbacks=callbacks,
        ),
    )


def train(cfg: Config) -> TrainOutcome:
    """Train, evaluate, log and (if ``mlflow.registered_model`` is set) register one model."""
    started = time.perf_counter()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)),
                              train=dataclasses.replace(cfg.train, storage_path=absolute(cfg.train.storage_path)))
    manifest = verify_dataset(cfg.data.path) if cfg.data.verify_hash else read_manifest(cfg.data.path)
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    run_id = start_run(tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name,
                       tags={"llmrec.dataset_hash": manifest["content_hash"],
                             "llmrec.source": str(manifest["source"].get("type", ""))})
    try:
        build_text_cache(cfg)
        init_ray(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
        trainer = build_trainer(cfg, run_id, tracking_uri, run_name=f"train-{run_id[:12]}")
        result = trainer.fit()
        if result.error:
            raise result.error
        metrics = dict(result.return_value or result.metrics or {})
        outcome = TrainOutcome(run_id, tracking_uri, metrics, result.checkpoint.path)
        with result.checkpoint.as_directory() as folder:
            _publish(cfg, outcome, Path(folder), manifest)
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    end_run(tracking_uri, run_id, "FINISHED")
    outcome.seconds = time.perf_counter() - started
    return outcome


def build_text_cache(cfg: Config) -> None:
    """Compute the frozen LM's item embeddings (or lower-layer outputs for top_k) once, on the driver,
    so that the workers load them instead of each running the LM over the catalogue."""
    if cfg.model.item_repr == "id" or cfg.model.freeze not in ("frozen", "top_k"):
        return
    from llmrec_dist.text_tower import load_text_features

    started = time.perf_counter()
    features = load_text_features(cfg)
    log.info("text features (%s, %s): %s in %.1f s", cfg.model.text_encoder, cfg.model.freeze,
             "cache hit" if features.cache_hit else "computed", time.perf_counter() - started)


def _publish(cfg: Config, outcome: TrainOutcome, checkpoint_dir: Path, manifest: dict) -> None:
    """Log the best model as a pyfunc and, if configured, register it and gate the alias."""
    from llmrec_dist.registry.package import build_model_package
    from llmrec_dist.registry.pyfunc import log_model_package
    from llmrec_dist.registry.promotion import register_and_promote

    with tempfile.TemporaryDirectory() as tmp:
        package = build_model_package(checkpoint_dir, cfg.data.path, Path(tmp) / "package", cfg.eval)
        outcome.model_uri = log_model_package(package, outcome.tracking_uri, outcome.run_id)
    if cfg.mlflow.registered_model:
        metric_key = cfg.selection_metric()
        outcome.registration = register_and_promote(
            outcome.tracking_uri, outcome.run_id, outcome.model_uri, cfg.mlflow.registered_model,
            cfg.mlflow.alias, metric_key, outcome.metrics[metric_key], manifest["content_hash"])
