"""Publishing a trained model: package → log → register → gate, the one path of ``train`` and ``tune``.

    checkpoint folder + dataset → model package (registry/package.py) → pyfunc logged into the run
    (registry/pyfunc.py) → if ``mlflow.registered_model``: a new version, and the alias moved only when
    earned (registry/promotion.py)
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmrec_dist import console
from llmrec_dist.config import Config


@dataclass
class Published:
    model_uri: str                                     # the logged model (models:/<model id>)
    registration: dict = field(default_factory=dict)   # register_and_promote's answer; {} when not registered


def publish_model(checkpoint_dir: Path, cfg: Config, manifest: dict, tracking_uri: str, run_id: str,
                  metric_key: str, metrics: Mapping[str, float]) -> Published:
    """Package the model of ``checkpoint_dir`` (its ``model.safetensors`` holds the weights to serve) with
    the dataset ``cfg.data.path`` (``manifest``: as the driver read it), log it into run ``run_id``, and register it under
    ``cfg.mlflow.registered_model`` if set, moving ``cfg.mlflow.alias`` only if ``metrics[metric_key]``
    beats the holder's on the same dataset."""
    from llmrec_dist.registry.package import build_model_package
    from llmrec_dist.registry.promotion import register_and_promote
    from llmrec_dist.registry.pyfunc import log_model_package

    with tempfile.TemporaryDirectory() as tmp:
        package = build_model_package(checkpoint_dir, cfg.data.path, Path(tmp) / "package", cfg.eval, manifest)
        published = Published(log_model_package(package, tracking_uri, run_id))
    if cfg.mlflow.registered_model:
        console.quiet_libraries()  # logging the model turned MLflow's own prints back on
        published.registration = register_and_promote(
            tracking_uri, run_id, published.model_uri, cfg.mlflow.registered_model, cfg.mlflow.alias,
            metric_key, metrics[metric_key], manifest["content_hash"],
            privacy=(metrics["privacy_epsilon"], metrics["privacy_delta"]) if "privacy_epsilon" in metrics else None,
            replace_private=cfg.mlflow.replace_private)
    return published
