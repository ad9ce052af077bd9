"""Register a model version and move an alias (e.g. ``champion``) only when it is earned.

The rule: the alias moves to the new version only if no version holds it, or the holder was evaluated
on the SAME dataset (``dataset_hash`` tag), with the same metric, and scored strictly worse (lower, or
higher for a metric where lower is better: RMSE, MAE, log loss). A holder from another dataset is never displaced: its metric is
not comparable. Every version is tagged with its dataset hash, metric name, metric value and run id,
and a differentially private one with its (``privacy_epsilon``, ``privacy_delta``). A version trained
without DP never takes the alias from a private holder unless the caller allows it
(``mlflow.replace_private``), whatever the metrics say.

Two promotions racing on the same alias are not serialised (MLflow has no compare-and-set on
aliases); run promotions from one driver.
"""

from __future__ import annotations

import math

from mlflow.exceptions import MlflowException

from llmrec_dist.metrics import higher_is_better

TAG_DATASET = "dataset_hash"
TAG_METRIC_KEY = "metric_key"
TAG_METRIC_VALUE = "metric_value"
TAG_RUN_ID = "run_id"
TAG_EPSILON = "privacy_epsilon"
TAG_DELTA = "privacy_delta"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is_missing(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _alias_holder(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if _is_missing(err):
            return None
        raise


def _decide(holder, alias: str, metric_key: str, metric_value: float, dataset_hash: str,
            private: bool = False, replace_private: bool = False) -> tuple[bool, str]:
    if holder is None:
        return True, f"no version held alias {alias!r}"
    tags, v = holder.tags, holder.version
    if TAG_EPSILON in tags and not private and not replace_private:
        return False, (f"alias {alias!r} stays on version {v}: it was trained with differential privacy "
                       f"(epsilon {tags[TAG_EPSILON]}), this version without; set mlflow.replace_private=true "
                       "to allow it")
    if tags.get(TAG_DATASET) != dataset_hash:
        return False, (f"alias {alias!r} stays on version {v}: it was evaluated on dataset "
                       f"{tags.get(TAG_DATASET, '<untagged>')}, this version on {dataset_hash}; "
                       "metrics on different datasets are not comparable")
    if tags.get(TAG_METRIC_KEY) != metric_key:
        return False, (f"alias {alias!r} stays on version {v}: it was selected by "
                       f"{tags.get(TAG_METRIC_KEY, '<untagged>')}, this version by {metric_key}")
    try:
        held = float(tags[TAG_METRIC_VALUE])
    except (KeyError, ValueError):
        return False, f"alias {alias!r} stays on version {v}: it has no readable {TAG_METRIC_VALUE} tag"
    better = metric_value > held if higher_is_better(metric_key) else metric_value < held
    if better:
        return True, f"{metric_key} {metric_value:.6g} beats version {v} ({held:.6g}) on the same dataset"
    return False, (f"alias {alias!r} stays on version {v}: {metric_key} {metric_value:.6g} does not beat "
                   f"{held:.6g}")


def register_and_promote(tracking_uri: str, run_id: str, model_uri: str, name: str, alias: str,
                         metric_key: str, metric_value: float, dataset_hash: str,
                         privacy: tuple[float, float] | None = None, replace_private: bool = False) -> dict:
    """Register a new version of ``name`` from ``model_uri`` and move ``alias`` to it if it earns it.
    ``privacy``: the (epsilon, delta) of a differentially private model (tagged on the version).

    Returns ``{"name", "version", "promoted", "reason", "previous"}``; ``previous`` is the version
    that held the alias before this call (None if none). ``version``/``previous`` are ints.
    """
    import mlflow

    from llmrec_dist.tracking import use_tracking_uri

    metric_value = float(metric_value)
    if not math.isfinite(metric_value):
        raise ValueError(f"{metric_key} must be a finite number to register a model, got {metric_value}")
    if not dataset_hash:
        raise ValueError("dataset_hash is required (the content_hash of the dataset the model was evaluated on)")
    tags = {TAG_DATASET: dataset_hash, TAG_METRIC_KEY: metric_key,
            TAG_METRIC_VALUE: repr(metric_value), TAG_RUN_ID: run_id}
    if privacy is not None:
        tags[TAG_EPSILON], tags[TAG_DELTA] = f"{privacy[0]:.6g}", f"{privacy[1]:.6g}"
    client = _client(tracking_uri)
    with use_tracking_uri(tracking_uri):
        # register_model creates the registered model if needed and resolves runs:/ and
        # models:/<model_id> URIs to the logged model (MLflow 3).
        version = mlflow.register_model(model_uri, name, tags=tags)

    holder = _alias_holder(client, name, alias)
    promoted, reason = _decide(holder, alias, metric_key, metric_value, dataset_hash,
                               private=privacy is not None, replace_private=replace_private)
    if promoted:
        client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": int(version.version), "promoted": promoted, "reason": reason,
            "previous": int(holder.version) if holder is not None else None}


def champion_info(tracking_uri: str, name: str, alias: str = "champion") -> dict | None:
    """The version holding ``alias`` with its tags, or None if the model or the alias does not exist."""
    client = _client(tracking_uri)
    try:
        holder = _alias_holder(client, name, alias)
    except MlflowException as err:
        if _is_missing(err):
            return None
        raise
    if holder is None:
        return None
    tags = dict(holder.tags)
    value = tags.get(TAG_METRIC_VALUE)
    return {"name": name, "alias": alias, "version": int(holder.version),
            "run_id": tags.get(TAG_RUN_ID) or holder.run_id,
            "source": holder.source, "dataset_hash": tags.get(TAG_DATASET),
            "metric_key": tags.get(TAG_METRIC_KEY),
            "metric_value": float(value) if value is not None else None, "tags": tags}
