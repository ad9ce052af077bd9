"""Driver side of a training run: Ray, the TorchTrainer, and the MLflow run around it.

    verify dataset → MLflow run (RUNNING) + <storage>/train-<run id>/run.json → TorchTrainer.fit()
    (workers; rank 0 logs) → package the best checkpoint → log pyfunc → register + gate the alias →
    run FINISHED

Faults: a failed worker group restarts from the latest checkpoint (``train.max_failures``); a killed
driver is re-submitted with ``train(resume=folder)`` (``llmrec-dist train --resume FOLDER``), which reads
``run.json`` and continues the same MLflow run from the latest checkpoint (Ray Train restores a run with
the same name and storage path).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llmrec_dist import console, storage
from llmrec_dist.config import Config, absolute, config_from_dict
from llmrec_dist.data.dataset_format import checked_manifest, read_item_texts
from llmrec_dist.metrics import higher_is_better
from llmrec_dist.ray_setup import describe_ray, init_ray
from llmrec_dist.registry.publish import publish_model
from llmrec_dist.train.progress import EpochLines
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
    config: Config | None = None           # the config the run trained with
    validated: TrainOutcome | None = None  # train.refit: the validated run that chose this refit's epochs


def _data_config(cfg: Config):
    """Ray Train's data config: the train split is streamed and split over the workers; deterministic
    ingest (``data.deterministic``) preserves block order and assigns blocks without locality, so the
    split, and therefore a restarted run, is reproducible."""
    from ray.train import DataConfig

    if not cfg.data.deterministic:
        return DataConfig(datasets_to_split=["train"])
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options, enable_shard_locality=False)


def _train_loop(loop_config: dict):
    """Each worker's entry point: the recipe, imported in the worker. The driver never imports it
    (transformers and the model code: about 5 s on 2 cores), so the workers start that much sooner."""
    from llmrec_dist.worker.recipe import train_loop_per_worker

    return train_loop_per_worker(loop_config)


def build_trainer(cfg: Config, manifest: dict, run_id: str, tracking_uri: str, run_name: str,
                  callbacks: list | None = None, loop=None, extra_loop_config: dict | None = None,
                  privacy=False):
    """The TorchTrainer for ``cfg``: train split streamed through Ray Data, evaluation splits read per rank.
    ``manifest``: the dataset's, as the driver read (and checked) it; it travels to the workers with the
    loop config, so no one reads it again.
    ``callbacks``: Ray Train callbacks (a sweep passes Tune's report callback). ``loop``: another
    per-worker function than the training recipe (the ingest benchmark's), given the same loop config
    plus ``extra_loop_config``. ``privacy``: the run's DP-SGD plan when the caller has worked it out
    (:func:`privacy_plan`; None = not private), else it is worked out here."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmrec_dist.train.oom import StopOnOutOfMemory
    from llmrec_dist.train.training_rows import training_rows

    # DP-SGD workers read their users themselves (Poisson sampling needs random access to them)
    if privacy is False:
        privacy = privacy_plan(cfg, manifest)
    datasets = {} if privacy else {"train": train_dataset(cfg, manifest)}
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        loop or _train_loop,
        # rows of an epoch, counted once here (with data.windows that reads the histories' lengths)
        # (a private run's rows are its users, already counted by its plan)
        train_loop_config={"config": cfg.to_dict(), "manifest": manifest, "run_id": run_id,
                           "tracking_uri": tracking_uri,
                           "train_rows": privacy.users if privacy else training_rows(cfg, manifest),
                           "privacy": privacy.to_dict() if privacy else None, **(extra_loop_config or {})},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        datasets=datasets,
        dataset_config=_data_config(cfg) if datasets else None,
        run_config=RunConfig(
            name=run_name,
            storage_path=cfg.train.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               # a refit has no validation: None keeps the newest
                                               checkpoint_score_attribute=(
                                                   None if cfg.train.refit_epochs else cfg.selection_metric()),
                                               checkpoint_score_order=(
                                                   "max" if higher_is_better(cfg.eval.metric) else "min")),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[StopOnOutOfMemory(), *(callbacks or [])],  # a memory kill is not retried
        ),
    )


def train_dataset(cfg: Config, manifest: dict | None = None):
    """The histories trained on (the ``items`` column of :meth:`Config.training_split`) as a Ray Dataset.

    Materialised splits up to ``data.driver_read_mb`` are read here with pyarrow and handed to the
    object store as they are, one block per file in file order. Ray Data's read tasks would first
    start worker processes and import Ray Data in them: about 20 s for ml-1m's 6,040 rows on 2 cores,
    against well under a second. Larger or streamed (``data.materialize: false``) splits are read by
    Ray Data tasks. With ``data.windows``, long histories become several rows here, before the split.
    """
    import pyarrow.parquet as pq
    import ray.data

    from llmrec_dist.data.dataset_format import feedback_of, read_manifest, split_files
    from llmrec_dist.train.training_rows import windowed_table, without_holdout

    if cfg.data.deterministic:  # blocks keep file order, so every worker gets the same rows every run
        ray.data.DataContext.get_current().execution_options.preserve_order = True

    files = split_files(cfg.data.path, cfg.training_split())
    columns = ["items"] + (["user_key"] if cfg.data.holdout_users > 0 else [])
    if cfg.task.type != "next_item" and feedback_of(manifest or read_manifest(cfg.data.path)) is not None:
        columns.append("feedback")  # rating/click: each event's rating or label
    kept = [c for c in columns if c != "user_key"]  # user_key only picks data.holdout_users' rows
    if cfg.data.materialize and sum(map(storage.size, files)) <= cfg.data.driver_read_mb * 2**20:
        tables = [without_holdout(pq.read_table(f, columns=columns), cfg).select(kept) for f in files]
        return ray.data.from_arrow([windowed_table(t, cfg) for t in tables] if cfg.data.windows else tables)
    train_ds = ray.data.read_parquet(files, columns=columns)
    if cfg.data.holdout_users > 0:  # the audit's non-members never reach a worker
        train_ds = train_ds.map_batches(lambda t: without_holdout(t, cfg).select(kept), batch_format="pyarrow")
    if cfg.data.windows:
        train_ds = train_ds.map_batches(partial(windowed_table, cfg=cfg), batch_format="pyarrow")
    return train_ds.materialize() if cfg.data.materialize else train_ds


def with_absolute_paths(cfg: Config) -> Config:
    """``data.path``, ``train.storage_path`` and a ``train.init_from`` folder made absolute: Ray workers
    run in other directories."""
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, path=absolute(cfg.data.path)),
        train=dataclasses.replace(cfg.train, storage_path=absolute(cfg.train.storage_path),
                                  init_from=absolute_model(cfg.train.init_from)))


def absolute_model(model: str) -> str:
    """A saved model's folder made absolute; MLflow and object-store URIs (and "") unchanged."""
    from llmrec_dist.saved_model import is_model_uri

    return model if not model or is_model_uri(model) else absolute(model)


def check_init_from(cfg: Config, manifest: dict) -> None:
    """A ``train.init_from`` model that cannot start this run (missing, another task, another dataset):
    one line naming the key, before any run is opened. The workers check its weights when they load it."""
    if not cfg.train.init_from:
        return
    from llmrec_dist.saved_model import check_saved_model, resolve_model_folder

    try:
        folder = resolve_model_folder(cfg.train.init_from, cfg.mlflow.tracking_uri)
        meta = check_saved_model(folder, trust_remote_code=False)
    except Exception as err:  # a missing folder, an unknown URI, an unreadable model.json: all the same here
        raise TrainError(f"train.init_from: {' '.join(str(err).split())}") from None
    if meta.get("task") is not None:
        raise TrainError(f"train.init_from: {folder} is a {meta['task'].get('type', '?')} model; only a next-item "
                         "model can start a run")
    if meta.get("dataset_hash") != manifest["content_hash"]:
        raise TrainError(f"train.init_from: {folder} was trained on dataset {meta.get('dataset_hash')}, "
                         f"{cfg.data.path} is {manifest['content_hash']}: its item indices would not match")


class TrainError(ValueError):
    """A run that cannot start or continue (e.g. a bad --resume folder); the message says what to do."""


RUN_FILE = "run.json"


def run_name(run_id: str) -> str:
    """Ray Train's name for the run of MLflow run ``run_id``: its folder under train.storage_path."""
    return f"train-{run_id[:12]}"


def read_run_state(folder: str) -> dict:
    try:
        return storage.read_json(storage.join(folder, RUN_FILE))
    except (FileNotFoundError, OSError, ValueError):
        raise TrainError(f"{folder}: no readable {RUN_FILE} here; --resume takes the run folder that "
                         "`llmrec-dist train` printed when the run started "
                         "(<train.storage_path>/train-<run id>)") from None


def _reopen_run(tracking_uri: str, run_id: str, folder: str) -> None:
    """Mark an interrupted MLflow run RUNNING again (it continues; no new run is created)."""
    from llmrec_dist.tracking import client

    c = client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except Exception as err:
        raise TrainError(f"{folder}: MLflow run {run_id} is not in {tracking_uri} ({err})") from None
    if run.info.status == "FINISHED":
        raise TrainError(f"{folder}: MLflow run {run_id} already finished; nothing to resume")
    resumes = int(run.data.tags.get("llmrec.resumes", "0")) + 1
    c.set_tag(run_id, "llmrec.resumes", str(resumes))
    c.set_terminated(run_id, "RUNNING")


class OutOfMemoryStop(TrainError):
    """A worker was killed for lack of memory and the run stopped without retrying (one-line message)."""


def preflight_memory(cfg: Config, manifest: dict, force: bool = False, texts: list[str] | None = None):
    """Estimate a worker's peak memory for ``cfg`` (:mod:`llmrec_dist.train.memory`) and, on a local Ray,
    refuse a config that cannot fit before anything starts (``force`` skips the refusal). On a cluster
    (``RAY_ADDRESS``) the check runs once connected (:func:`check_cluster_memory`); on GPUs it is not
    checked (activations live in GPU memory). Returns the estimate."""
    import os

    from llmrec_dist.train.memory import check_fits, estimate_for_dataset, local_worker_budget_mb

    estimate = estimate_for_dataset(cfg, manifest, texts)
    log.info("memory estimate: %s", estimate.summary())
    if not force and not cfg.scaling.use_gpu and not os.environ.get("RAY_ADDRESS"):
        check_fits(estimate, *local_worker_budget_mb(cfg.scaling.num_workers))
    return estimate


def check_cluster_memory(cfg: Config, estimate, force: bool = False) -> None:
    """The memory check against the nodes of the Ray cluster this process is connected to."""
    import os

    from llmrec_dist.train.memory import check_fits, cluster_worker_budget_mb

    if not force and not cfg.scaling.use_gpu and os.environ.get("RAY_ADDRESS"):
        check_fits(estimate, *cluster_worker_budget_mb(cfg))


def _oom_stop(err: BaseException, tracking_uri: str, run_id: str, estimate) -> OutOfMemoryStop | None:
    """The one-line stop for a worker killed for lack of memory, with the last peak rank 0 logged."""
    from llmrec_dist.train.oom import find_worker_oom, out_of_memory_line

    oom = find_worker_oom(err)
    if oom is None:
        return None
    peak = None
    try:
        from llmrec_dist.tracking import client

        history = client(tracking_uri).get_metric_history(run_id, "peak_rss_mb")
        peak = history[-1].value if history else None
    except Exception:  # the line matters more than the figure
        pass
    return OutOfMemoryStop(out_of_memory_line(oom, peak, estimate.total_mb if estimate else None))


def train(cfg: Config | None = None, resume: str | None = None, force: bool = False,
          echo=None) -> TrainOutcome:
    """Train, evaluate, log and (if ``mlflow.registered_model`` is set) register one model.

    ``resume``: the folder of an interrupted run (``<train.storage_path>/train-<run id>``). The run goes
    on from its latest checkpoint with its saved config, in the same MLflow run. ``force``: start even
    when the memory estimate says a worker cannot fit (:func:`preflight_memory`). ``echo``: a function
    that shows the user a line (the run folder, where Ray logs, one line per epoch); without it those
    lines are logged and no epoch lines are made. With ``train.refit``, the validated run is followed by
    a refit (:func:`refit_after`), which is returned (and registered, if the config registers).
    """
    first = _train_once(cfg, resume, force, echo)
    if not first.config.train.refit:
        return first
    return refit_after(first, force, echo, register=True)


def refit_after(validated: TrainOutcome, force: bool = False, echo=None, register: bool = False) -> TrainOutcome:
    """The refit a validated run chooses (its best epoch + 1 epochs through each user's validation item),
    a second MLflow run tagged with the first; the refit is returned, ``.validated`` set. ``train.refit``
    calls it after the validated run (also one resumed with ``--resume``: its saved config says refit),
    with ``register``: the refit, not the validated run, is registered under ``mlflow.registered_model``,
    gated on the validated run's validation metric (a refit has none: it trains on the validation items).
    ``bench quality --refit`` calls it for any config, without: there the validated run registers."""
    epochs = int(validated.metrics["best_epoch"]) + 1
    (echo or log.info)(f"refit: training again through each user's validation item for {epochs} epochs "
                       f"(the best epoch of run {validated.run_id})")
    cfg = validated.config
    key = cfg.selection_metric()
    # the refit's own config registers nothing (a run with train.refit_epochs has no metric to gate on) ...
    refit_cfg = _registering(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, refit=False,
                                                                                refit_epochs=epochs)), "")
    # ... the chain registers it under the validated run's name and metric
    gate = (cfg.mlflow.registered_model, key, validated.metrics[key]) if register else None
    outcome = _train_once(refit_cfg, None, force, echo, tags={"llmrec.refit_of": validated.run_id}, gate=gate)
    outcome.validated = validated
    return outcome


def _registering(cfg: Config, name: str) -> Config:
    """``cfg`` with ``mlflow.registered_model`` set to ``name`` ("" = register nothing)."""
    return dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, registered_model=name))


def _train_once(cfg: Config | None, resume: str | None, force: bool, echo,
                tags: dict | None = None, gate: tuple[str, str, float] | None = None) -> TrainOutcome:
    """One MLflow run. ``gate``: (registered model, metric, value) a refit is registered under and gated on,
    in place of its own metrics (it has no validation metric). The validated run of ``train.refit``
    registers nothing: its refit does."""
    started = time.perf_counter()
    say = echo or log.info
    if resume:
        folder = absolute(resume.rstrip("/"))
        state = read_run_state(folder)
        cfg = config_from_dict(state["config"], source=storage.join(folder, RUN_FILE))
    elif cfg is None:
        raise ValueError("train needs a config or a run folder to resume")
    else:
        cfg = with_absolute_paths(cfg)
    manifest = checked_manifest(cfg.data.path, cfg.data.verify_hash)  # before any run is opened
    check_task_data(cfg, manifest)
    check_init_from(cfg, manifest)
    if (privacy := privacy_plan(cfg, manifest)) is not None:
        say(f"privacy: (epsilon {privacy.planned_epsilon:.3g}, delta {privacy.delta:.2g}) over "
            f"{privacy.epochs} epochs of {privacy.steps_per_epoch} steps, noise multiplier "
            f"{privacy.noise_multiplier:.3g}, sampling rate {privacy.sample_rate:.3g}")
    texts = read_item_texts(cfg.data.path) if cfg.model.item_repr != "id" else None  # read once, here
    estimate = preflight_memory(cfg, manifest, force, texts)  # and before Ray starts
    if resume:
        tracking_uri, run_id = state["tracking_uri"], state["run_id"]
        _reopen_run(tracking_uri, run_id, folder)
        say(f"resuming MLflow run {run_id} from the latest checkpoint in {folder}")
    else:
        tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
        run_id = start_run(tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name,
                           tags={"llmrec.dataset_hash": manifest["content_hash"],
                                 "llmrec.source": str(manifest["source"].get("type", "")),
                                 "llmrec.memory_estimate_mb": f"{estimate.total_mb:.0f}", **(tags or {})})
        folder = storage.join(cfg.train.storage_path, run_name(run_id))
        storage.write_json(storage.join(folder, RUN_FILE),
                           {"run_id": run_id, "tracking_uri": tracking_uri, "config": cfg.to_dict()})
        say(f"MLflow run {run_id}; checkpoints in {folder} (if interrupted: llmrec-dist train --resume {folder})")
    try:
        build_text_cache(cfg, say, texts)
        clock = {"process_start": process_start_time(), "ray_init": time.time()}
        init_ray(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)
        if echo:
            echo(describe_ray())
        check_cluster_memory(cfg, estimate, force)
        clock["ray_ready"] = time.time()
        trainer = build_trainer(cfg, manifest, run_id, tracking_uri, run_name=run_name(run_id),
                                extra_loop_config={"clock": clock}, privacy=privacy)
        clock["trainer_built"] = time.time()  # the trainer holds this dict and sends it to the workers in fit()
        console.quiet_libraries()  # Ray Data and Ray Train, imported by build_trainer
        shown = None if cfg.train.refit_epochs else cfg.selection_metric()  # a refit does not validate
        epoch_lines = EpochLines(tracking_uri, run_id, cfg.epochs_to_run(), shown, echo) if echo else nullcontext()
        try:
            with epoch_lines:  # one line per epoch, read from what rank 0 logs to MLflow
                result = trainer.fit()
            if result.error:
                raise result.error
        except Exception as err:
            if (stop := _oom_stop(err, tracking_uri, run_id, estimate)) is not None:
                raise stop from None
            raise
        metrics = dict(result.return_value or result.metrics or {})
        outcome = TrainOutcome(run_id, tracking_uri, metrics,
                               storage.uri_of(result.checkpoint.filesystem, result.checkpoint.path), config=cfg)
        key, gated, publish_cfg = cfg.selection_metric(), metrics, cfg
        if gate:  # a refit, registered under the validated run's name and gated on its metric
            name, key, value = gate
            gated, publish_cfg = {**metrics, key: value}, _registering(cfg, name)
        elif cfg.train.refit:  # the validated run: the refit that follows is the call's model
            publish_cfg = _registering(cfg, "")
        with result.checkpoint.as_directory() as checkpoint_dir:
            published = publish_model(Path(checkpoint_dir), publish_cfg, manifest, tracking_uri, run_id, key, gated)
        outcome.model_uri, outcome.registration = published.model_uri, published.registration
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise
    end_run(tracking_uri, run_id, "FINISHED")
    outcome.seconds = time.perf_counter() - started
    return outcome


def privacy_plan(cfg: Config, manifest: dict):
    """The DP-SGD schedule of a private run (None otherwise), fixed here on the driver; a target the
    accountant cannot reach is a :class:`TrainError` naming the key, before Ray starts."""
    if not cfg.private():
        return None
    from llmrec_dist.privacy import PrivacyError, plan
    from llmrec_dist.train.training_rows import training_rows

    try:
        return plan(cfg, training_rows(cfg, manifest))
    except PrivacyError as err:
        raise TrainError(str(err)) from None


def check_task_data(cfg: Config, manifest: dict) -> None:
    """A rating/click task the dataset cannot label (rating without ratings, ...): one line, before Ray."""
    if cfg.task.type == "next_item":
        return
    from llmrec_dist.data.dataset_format import feedback_of
    from llmrec_dist.pointwise import label_rule

    try:
        label_rule(cfg.task.type, feedback_of(manifest), cfg.task.click_threshold, cfg.task.negatives)
    except ValueError as err:
        raise TrainError(f"{cfg.data.path}: {err}") from None


def process_start_time() -> float:
    """When this process started (wall clock): the start of the user's command."""
    import psutil

    return psutil.Process().create_time()


def build_text_cache(cfg: Config, say=log.info, texts: list[str] | None = None) -> None:
    """Compute the pretrained LM's item embeddings (and, for top_k, the lower layers' outputs) once, on
    the driver, so that the workers load them instead of each running the LM over the catalogue."""
    if cfg.model.item_repr == "id":
        return
    from llmrec_dist.text_tower import load_text_features

    started = time.perf_counter()
    features = load_text_features(cfg, texts)
    say(f"text features ({cfg.model.text_encoder}, {cfg.model.freeze}): "
        f"{'cache hit' if features.cache_hit else 'computed'} in {time.perf_counter() - started:.1f} s")
