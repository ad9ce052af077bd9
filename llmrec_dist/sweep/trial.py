"""One sweep trial: a Tune function trainable that runs a whole distributed training run.

The Ray Train V2 pattern: the trial (a light Tune actor, ``search.trial_driver_cpus``) builds and fits a
``TorchTrainer``; ``TuneReportCallback`` forwards rank 0's per-epoch reports to Tune, so ASHA sees
``valid_*`` metrics each epoch and can stop the trial (Tune then kills the trial and, with it, the
trainer it owns). The trial logs into its own MLflow child run of the sweep's parent run; the Train
run keeps its checkpoints under ``<sweep>/trials/<trial id>``, so a trial restarted by ``--resume``
continues from its last checkpoint and the same child run.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

TAG_PARENT = "mlflow.parentRunId"
TAG_SWEEP = "llmrec.sweep"
TAG_TRIAL = "llmrec.trial_id"
TAG_STATUS = "llmrec.trial_status"


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}`` (Tune hands the trainable nested params)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """``{trial id: MLflow run id}`` of the sweep's child runs."""
    from llmrec_dist.tracking import client

    runs = client(tracking_uri).search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
    return {r.data.tags[TAG_TRIAL]: r.info.run_id for r in runs if TAG_TRIAL in r.data.tags}


def child_run(sweep: dict, trial_id: str, trial_name: str, params: dict[str, Any]) -> str:
    """The trial's MLflow run under the sweep's parent: the existing one when a trial is resumed."""
    from llmrec_dist.tracking import client

    uri = sweep["tracking_uri"]
    found = child_runs(uri, sweep["experiment_id"], sweep["parent_run_id"]).get(trial_id)
    if found:
        client(uri).set_terminated(found, "RUNNING")
        return found
    tags = {TAG_PARENT: sweep["parent_run_id"], TAG_SWEEP: sweep["name"], TAG_TRIAL: trial_id,
            TAG_STATUS: "running", **{f"llmrec.search.{k}": str(v) for k, v in params.items()}}
    return client(uri).create_run(sweep["experiment_id"], run_name=trial_name, tags=tags).info.run_id


def pin_cluster_address() -> None:
    """Give the trial's Ray Train controller (and its placement-group cleaner) this cluster's address.

    When ASHA stops a trial, Tune kills it and its Train controller; a detached cleaner then frees the
    worker group's placement group, finding the controller through the State API. Without RAY_ADDRESS
    it looks the cluster up from the machine, and with several Ray instances on one machine it gives up:
    the placement group leaks and the next trials wait for CPUs forever. Ray Train propagates a fixed
    set of variables to the controller; RAY_ADDRESS is added to it (when this Ray version has the set).
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        from ray.train.v2._internal import constants

        constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
    except (ImportError, AttributeError):  # another Ray version: the cleaner keeps its own lookup
        pass


def run_trial(params: dict, sweep: dict) -> None:
    """The Tune trainable (bound to the sweep's context with ``tune.with_parameters``)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llmrec_dist.sweep.search import apply_params
    from llmrec_dist.tracking import client, end_run
    from llmrec_dist.train.launcher import build_text_cache, build_trainer

    ctx = ray.tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    flat = flatten(params)
    cfg = apply_params(sweep["train_raw"], flat, sweep["source"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=sweep["trials_path"]))
    run_id = child_run(sweep, trial_id, trial_name, flat)
    pin_cluster_address()
    try:
        build_text_cache(cfg)
        trainer = build_trainer(cfg, sweep["manifest"], run_id, sweep["tracking_uri"], run_name=trial_id,
                                callbacks=[TuneReportCallback()])
        result = trainer.fit()
        if result.error:
            raise result.error
    except Exception:  # a trial stopped by the scheduler is killed, not raised into; the driver tags it
        c = client(sweep["tracking_uri"])
        # A trial the scheduler stopped can still be unwinding here after the driver tagged it
        # early_stopped (seen on a loaded machine): a status the driver already wrote stands.
        if c.get_run(run_id).data.tags.get(TAG_STATUS) == "running":
            c.set_tag(run_id, TAG_STATUS, "failed")
            end_run(sweep["tracking_uri"], run_id, "FAILED")
        raise
    client(sweep["tracking_uri"]).set_tag(run_id, TAG_STATUS, "completed")
    end_run(sweep["tracking_uri"], run_id, "FINISHED")
