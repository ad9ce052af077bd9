"""MLflow plumbing shared by the driver and rank 0.

The boundary: the *driver* resolves the tracking URI, creates the experiment and the run, and later
logs/registers the model; *rank 0* alone logs params, per-epoch metrics and artifacts into that run
through :class:`RunLogger`. Other ranks get a logger that does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite store in the working directory.

    Relative SQLite paths are made absolute because Ray workers run in other directories.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain folder: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """Local stores keep artifacts next to the database; a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").as_uri()
    return None


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for ``name``, creating it (with an explicit artifact location) if needed."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(tracking_uri: str, experiment: str, run_name: str = "", tags: dict | None = None) -> str:
    """Create a run (status RUNNING) and return its id; the caller ends it with :func:`end_run`."""
    exp_id = ensure_experiment(tracking_uri, experiment)
    run = client(tracking_uri).create_run(exp_id, run_name=run_name or None, tags=tags or {})
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


class RunLogger:
    """Logs into one existing MLflow run; a disabled logger (non-zero ranks) does nothing."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool = True):
        self.run_id = run_id
        self.enabled = enabled and bool(run_id)
        self._client = client(tracking_uri) if self.enabled else None

    def params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=items)

    def tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def logged_steps(self, key: str) -> set[int]:
        """Steps already logged for ``key`` (used on resume so no epoch is logged twice)."""
        if not self.enabled:
            return set()
        return {m.step for m in self._client.get_metric_history(self.run_id, key)}

    def text(self, content: str, artifact_file: str) -> None:
        if not self.enabled:
            return
        self._client.log_text(self.run_id, content, artifact_file)

    def yaml(self, data: dict, artifact_file: str) -> None:
        self.text(yaml.safe_dump(data, sort_keys=False), artifact_file)

    def file(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._client.log_artifact(self.run_id, str(path), artifact_path)


_TRACKING_ENV = "MLFLOW_TRACKING_URI"


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the ``with`` body, then restore the previous state.

    ``mlflow.set_tracking_uri`` also writes $MLFLOW_TRACKING_URI; both are put back afterwards, so
    library calls do not leak a global setting into the caller's process.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_uri = getattr(tracking_utils, "_tracking_uri", None)
    previous_env = os.environ.get(_TRACKING_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop(_TRACKING_ENV, None)
        else:
            os.environ[_TRACKING_ENV] = previous_env
