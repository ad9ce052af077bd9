"""Driver side of a sweep: size the trials to the cluster, run Ray Tune, then report and register.

    check resources → parent MLflow run → Tuner(run_trial × search space, ASHA).fit()
      → tag each child run (completed / early_stopped / failed) → results table + plots on the parent
      → best trial: test metrics, pyfunc in its child run, register, gate the alias → parent FINISHED

Sweep folder (``search.storage_path/<name>``)::

    sweep.json     parent run id, tracking URI, the validated sweep config: what --resume needs
    tune/          Ray Tune's experiment state
    trials/<id>/   each trial's Ray Train run (checkpoints)

Resuming (``--resume <folder>``) restores Tune's state: finished trials are not run again, trials that
were running restart from their last Train checkpoint into the same child run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmrec_dist import console, storage
from llmrec_dist.config import absolute
from llmrec_dist.metrics import higher_is_better
from llmrec_dist.sweep.search import SweepConfig, sweep_from_dict
from llmrec_dist.sweep.trial import TAG_STATUS, TAG_SWEEP, child_runs, run_trial

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"


class SweepError(RuntimeError):
    """A sweep that cannot run as asked (resources, an existing or missing sweep folder)."""


# ----------------------------------------------------------------------------------------- resources
@dataclass
class ResourcePlan:
    concurrency: int
    trial_cpus: float                # driver + workers
    trial_gpus: float
    local_cpus: int | None = None    # logical CPUs for a local Ray we start (None: joining a cluster)
    notes: list[str] = field(default_factory=list)


def plan_resources(sweep: SweepConfig, capacity: dict) -> ResourcePlan:
    """How many trials run at once on ``capacity`` ({"CPU", "GPU", "node_CPU", "node_GPU", "local"}).

    Refuses (SweepError) a trial larger than the cluster or a worker larger than any node. On an
    existing cluster one CPU is left to Ray Data's read tasks when the cluster has it (without it the
    read starves); a local Ray is started with enough logical CPUs for the trials plus one.
    """
    s, search = sweep.base.scaling, sweep.search
    worker_cpus = s.num_workers * s.cpus_per_worker
    trial_cpus = worker_cpus + search.trial_driver_cpus
    trial_gpus = s.num_workers * s.gpus_per_worker if s.use_gpu else 0.0
    ask = (f"a trial asks for {s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU"
           + (f" + {s.gpus_per_worker:g} GPU" if s.use_gpu else "")
           + f" + {search.trial_driver_cpus:g} CPU for its driver")
    hint = "; lower scaling.num_workers / scaling.cpus_per_worker or use a bigger cluster"
    if capacity.get("local"):
        cpus_limit = capacity["CPU"]
        if worker_cpus > cpus_limit:
            raise SweepError(f"{ask}, but this machine has {cpus_limit:g} CPUs{hint}")
    else:
        if trial_cpus > capacity["CPU"]:
            raise SweepError(f"{ask}, but the cluster has {capacity['CPU']:g} CPUs{hint}")
        if s.cpus_per_worker > capacity.get("node_CPU", capacity["CPU"]):
            raise SweepError(f"{ask}, but no node has more than {capacity['node_CPU']:g} CPUs{hint}")
    if trial_gpus > capacity.get("GPU", 0):
        raise SweepError(f"{ask}, but the cluster has {capacity.get('GPU', 0):g} GPUs; set scaling.use_gpu=false "
                         "or add GPU nodes")
    if s.use_gpu and s.gpus_per_worker > capacity.get("node_GPU", capacity.get("GPU", 0)):
        raise SweepError(f"{ask}, but no node has {s.gpus_per_worker:g} GPUs")

    notes = []
    if capacity.get("local"):
        fits = max(1, math.floor(capacity["CPU"] / worker_cpus))
    else:
        spare = capacity["CPU"] - trial_cpus
        reserve = 1.0 if spare >= 1.0 else 0.0
        if reserve == 0:
            notes.append("no CPU is left for Ray Data beside one trial; its read may be slow")
        fits = max(1, math.floor((capacity["CPU"] - reserve) / trial_cpus))
    if trial_gpus:
        fits = min(fits, max(1, math.floor(capacity["GPU"] / trial_gpus)))
    wanted = search.max_concurrent_trials or fits
    concurrency = max(1, min(wanted, fits, search.num_trials()))
    if search.max_concurrent_trials > fits:
        notes.append(f"search.max_concurrent_trials={search.max_concurrent_trials} does not fit; "
                     f"running {concurrency} at once")
    local_cpus = math.ceil(concurrency * trial_cpus) + 1 if capacity.get("local") else None
    return ResourcePlan(concurrency, trial_cpus, trial_gpus, local_cpus, notes)


def cluster_capacity() -> dict:
    """What trials can use: the running Ray cluster's resources, or this machine for a local Ray."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        if not ray.is_initialized():
            from llmrec_dist.ray_setup import init_ray

            init_ray(1, 1)
        total = ray.cluster_resources()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        return {"CPU": total.get("CPU", 0.0), "GPU": total.get("GPU", 0.0),
                "node_CPU": max((n.get("CPU", 0.0) for n in nodes), default=0.0),
                "node_GPU": max((n.get("GPU", 0.0) for n in nodes), default=0.0), "local": False}
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count()), "local": True}


# ----------------------------------------------------------------------------------------- state
def _write_state(folder: str, state: dict) -> None:
    storage.write_json(storage.join(folder, STATE_FILE), state)


def read_state(folder: str) -> dict:
    try:
        return storage.read_json(storage.join(folder, STATE_FILE))
    except (FileNotFoundError, OSError):
        raise SweepError(f"{folder}: no {STATE_FILE} here; --resume takes the sweep folder that a "
                         "previous `llmrec-dist tune` printed") from None


# ----------------------------------------------------------------------------------------- Tune
def param_space(sweep: SweepConfig) -> dict:
    """The search space as Tune distributions, nested by config section."""
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
              "choice": lambda *v: tune.choice(list(v)), "grid": lambda *v: tune.grid_search(list(v))}
    space: dict = {}
    for dotted, spec in sweep.search.space.items():
        (kind, args), = spec.items()
        section, key = dotted.split(".", 1)
        space.setdefault(section, {})[key] = makers[kind](*args)
    return space


def _trainable(context: dict, driver_cpus: float):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, sweep=context), {"cpu": driver_cpus})


def _tuner(sweep: SweepConfig, context: dict, plan: ResourcePlan, folder: str, resume: bool, echo=None):
    """The Tuner of a new sweep, or the restored one (``resume``). ``echo``: a function that shows the
    user one line per finished trial, in place of Tune's status tables (kept with -v and without
    ``echo``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = _trainable(context, sweep.search.trial_driver_cpus)
    tune_path = f"{folder}/{TUNE_DIR}"
    if resume:
        if not tune.Tuner.can_restore(tune_path):
            raise SweepError(f"{folder}: the sweep stopped before Ray Tune saved any state; start it again "
                             "without --resume")
        return tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
    search = sweep.search
    scheduler = None
    if search.scheduler == "asha":
        # epochs_done is 1-based and reported every epoch (not by the final test report). Rungs stop
        # short of the last epoch (max_t = epochs - 1, stop_last_trials=False), so a trial that reaches
        # its last epoch always finishes with its test evaluation and final checkpoint.
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=sweep.base.train.epochs - 1,
                                  grace_period=search.grace_period, reduction_factor=search.reduction_factor,
                                  stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=search.metric, mode="max" if higher_is_better(search.metric) else "min",
                                    scheduler=scheduler,
                                    num_samples=search.num_samples,
                                    # Tune ignores max_concurrent_trials when given a search_alg.
                                    search_alg=BasicVariantGenerator(random_state=search.seed,
                                                                     max_concurrent=plan.concurrency)),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=folder, callbacks=_trial_lines(sweep, echo),
                                  verbose=1 if echo is None or console.verbose() else 0),
    )


def _trial_lines(sweep: SweepConfig, echo) -> list:
    if echo is None:
        return []
    from llmrec_dist.sweep.progress import TrialLines

    return [TrialLines(echo, sweep.search.metric, list(sweep.search.space), sweep.search.num_trials())]


# ----------------------------------------------------------------------------------------- results
@dataclass
class TrialRow:
    trial_id: str
    run_id: str | None
    status: str                      # completed | early_stopped | failed | incomplete
    params: dict
    best_value: float
    epochs: int
    history: list[tuple[int, float]]  # (epochs_done, metric)
    metrics: dict
    checkpoint_path: str | None
    seconds: float = float("nan")     # the trial's wall time as Tune measured it (until it ended or was stopped)


def trial_rows(results, sweep: SweepConfig, parent_run_id: str, tracking_uri: str, experiment_id: str) -> list[TrialRow]:
    from llmrec_dist.sweep.trial import flatten

    metric = sweep.search.metric
    higher = higher_is_better(metric)
    run_of_trial = child_runs(tracking_uri, experiment_id, parent_run_id)
    rows = []
    for result in results:
        metrics = dict(result.metrics or {})
        frame = result.metrics_dataframe
        trial_id = metrics.get("trial_id") or (str(frame["trial_id"].iloc[-1]) if frame is not None and
                                               "trial_id" in frame and len(frame) else "")
        history, checkpoint, seconds = [], None, float("nan")
        if frame is not None and len(frame):
            if "time_total_s" in frame:
                seconds = float(frame["time_total_s"].dropna().iloc[-1])
            if "epochs_done" in frame and metric in frame:
                per_epoch = frame[frame["epochs_done"].notna()]
                history = [(int(e), float(v)) for e, v in zip(per_epoch["epochs_done"], per_epoch[metric])]
            if "checkpoint_path" in frame:
                paths = frame["checkpoint_path"].dropna()
                # Ray Train's path has no scheme: on an object store it is made a URI again
                checkpoint = storage.like(sweep.search.storage_path, str(paths.iloc[-1])) if len(paths) else None
        if result.error is not None:
            status = "failed"
        elif metrics.get("final"):
            status = "completed"
        elif history:
            status = "early_stopped" if history[-1][0] < sweep.base.train.epochs else "incomplete"
        else:
            status = "incomplete"
        values = [v for _, v in history] + ([metrics[metric]] if status == "completed" and metric in metrics else [])
        params = {k: v for k, v in flatten(result.config or {}).items() if k in sweep.search.space}
        best = (max(values) if higher else min(values)) if values else float("nan")
        rows.append(TrialRow(trial_id, run_of_trial.get(trial_id), status, params, best,
                             len(history), history, metrics, checkpoint, seconds))
    # best first: the highest value, or the lowest for RMSE, MAE and log loss
    rows.sort(key=lambda r: (math.isnan(r.best_value),
                             (-r.best_value if higher else r.best_value) if not math.isnan(r.best_value) else 0))
    return rows


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The best trial with a checkpoint (``rows`` are sorted best first), or None."""
    return next((r for r in rows if not math.isnan(r.best_value) and r.checkpoint_path), None)


def _close_child_runs(rows: list[TrialRow], tracking_uri: str) -> None:
    """Every child run ends with the status Tune saw (a trial killed by ASHA cannot do it itself)."""
    from llmrec_dist.tracking import client

    c = client(tracking_uri)
    for row in rows:
        if not row.run_id:
            continue
        c.set_tag(row.run_id, TAG_STATUS, row.status)
        status = {"failed": "FAILED", "incomplete": "KILLED"}.get(row.status, "FINISHED")
        c.set_terminated(row.run_id, status)


# ----------------------------------------------------------------------------------------- run
@dataclass
class SweepOutcome:
    folder: str
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    best: TrialRow | None
    test_metrics: dict = field(default_factory=dict)
    model_uri: str = ""
    registration: dict = field(default_factory=dict)
    seconds: float = 0.0
    plan: ResourcePlan | None = None


def _absolute_paths(raw: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    data = raw.setdefault("data", {})
    if data.get("path"):
        data["path"] = absolute(str(data["path"]))
    train = raw.get("train") or {}
    if train.get("init_from"):  # every trial starts from the same saved model
        from llmrec_dist.train.launcher import absolute_model

        train["init_from"] = absolute_model(str(train["init_from"]))
    return raw


def run_sweep(sweep: SweepConfig | None = None, resume: str | None = None, echo=None) -> SweepOutcome:
    """Run a new sweep (``sweep``) or continue an interrupted one (``resume``: its folder). ``echo``: a
    function that shows the user a line (the sweep folder, where Ray logs, one line per finished trial);
    without it those lines are logged and Tune prints its own tables."""
    from llmrec_dist.data.dataset_format import checked_manifest
    from llmrec_dist.ray_setup import init_ray
    from llmrec_dist.tracking import client, end_run, ensure_experiment, resolve_tracking_uri, start_run

    started = time.perf_counter()
    if resume:
        folder = absolute(resume.rstrip("/"))
        state = read_state(folder)
        sweep = sweep_from_dict(state["config"], state.get("source", folder))
        tracking_uri, parent_run_id = state["tracking_uri"], state["parent_run_id"]
    else:
        if sweep is None:
            raise ValueError("run_sweep needs a sweep config or a folder to resume")
        raw = _absolute_paths(sweep.to_dict())
        sweep = sweep_from_dict(raw, sweep.source)
        name = sweep.search.name or time.strftime("sweep-%Y%m%d-%H%M%S")
        folder = f"{absolute(sweep.search.storage_path)}/{name}"
        if storage.exists(folder):
            raise SweepError(f"{folder} already exists: continue it with --resume {folder}, or set "
                             "search.name to start a new sweep")
        tracking_uri = resolve_tracking_uri(sweep.base.mlflow.tracking_uri)
        parent_run_id = ""
    cfg = sweep.base
    manifest = checked_manifest(cfg.data.path, cfg.data.verify_hash)
    from llmrec_dist.train.launcher import TrainError, check_init_from

    try:
        check_init_from(cfg, manifest)
    except TrainError as err:
        raise SweepError(str(err)) from None

    plan = plan_resources(sweep, cluster_capacity())
    for note in plan.notes:
        log.warning("%s", note)
    init_ray(cfg.scaling.num_workers, cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu, local_cpus=plan.local_cpus)
    if echo:
        from llmrec_dist.ray_setup import describe_ray

        echo(describe_ray())

    experiment_id = ensure_experiment(tracking_uri, cfg.mlflow.experiment)
    if not resume:
        parent_run_id = start_run(tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name or name,
                                  tags={TAG_SWEEP: name, "llmrec.dataset_hash": manifest["content_hash"],
                                        "llmrec.sweep_folder": folder})
        _write_state(folder, {"parent_run_id": parent_run_id, "tracking_uri": tracking_uri, "name": name,
                              "experiment": cfg.mlflow.experiment, "config": sweep.to_dict(),
                              "source": sweep.source})
        _log_parent_setup(tracking_uri, parent_run_id, sweep, plan)
    else:
        name = state["name"]
        client(tracking_uri).set_terminated(parent_run_id, "RUNNING")
    (echo or log.info)(f"sweep {name}: {sweep.search.num_trials()} trial(s), {plan.concurrency} at once, each "
                       f"{plan.trial_cpus:g} CPU{f' + {plan.trial_gpus:g} GPU' if plan.trial_gpus else ''}; "
                       f"folder {folder} (if interrupted: llmrec-dist tune --resume {folder})")
    context = {"train_raw": sweep.train_raw, "source": sweep.source, "manifest": manifest, "tracking_uri": tracking_uri,
               "experiment_id": experiment_id, "parent_run_id": parent_run_id, "name": name,
               "trials_path": f"{folder}/{TRIALS_DIR}"}
    try:
        tuner = _tuner(sweep, context, plan, folder, resume=bool(resume), echo=echo)
        console.quiet_libraries()  # Ray Tune's, imported by _tuner
        results = tuner.fit()
        rows = trial_rows(results, sweep, parent_run_id, tracking_uri, experiment_id)
        _close_child_runs(rows, tracking_uri)
        outcome = SweepOutcome(folder, parent_run_id, tracking_uri, rows, best_row(rows), plan=plan)
        _report(outcome, sweep)
        if outcome.best is None:
            raise SweepError(f"no trial reported {sweep.search.metric} with a checkpoint; see the failed "
                             "trials' lines above and their errors in the log")
        _publish_best(outcome, sweep, manifest)
    except BaseException:
        end_run(tracking_uri, parent_run_id, "FAILED")
        raise
    outcome.seconds = time.perf_counter() - started
    client(tracking_uri).log_metric(parent_run_id, "sweep_seconds", outcome.seconds)
    end_run(tracking_uri, parent_run_id, "FINISHED")
    return outcome


def _log_parent_setup(tracking_uri: str, run_id: str, sweep: SweepConfig, plan: ResourcePlan) -> None:
    from llmrec_dist.tracking import RunLogger

    logger = RunLogger(tracking_uri, run_id)
    s = sweep.search
    logger.params({"search.space": json.dumps(s.space), "search.num_samples": s.num_samples,
                   "search.metric": s.metric, "search.scheduler": s.scheduler,
                   "search.grace_period": s.grace_period, "search.reduction_factor": s.reduction_factor,
                   "search.max_concurrent_trials": s.max_concurrent_trials, "search.seed": s.seed,
                   "sweep.num_trials": s.num_trials(), "sweep.concurrency": plan.concurrency,
                   "sweep.trial_cpus": plan.trial_cpus, "sweep.trial_gpus": plan.trial_gpus,
                   **{k: v for k, v in sweep.base.flat().items() if k not in s.space}})
    logger.yaml(sweep.to_dict(), "sweep.yaml")


def _report(outcome: SweepOutcome, sweep: SweepConfig) -> None:
    from llmrec_dist.sweep.report import results_csv, results_markdown, write_plots
    from llmrec_dist.tracking import RunLogger

    logger = RunLogger(outcome.tracking_uri, outcome.parent_run_id)
    rows = outcome.rows
    logger.text(results_csv(rows, sweep), "results.csv")
    logger.text(results_markdown(rows, sweep), "results.md")
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_plots(rows, sweep, Path(tmp)):
            logger.file(path)
    counts = {status: sum(r.status == status for r in rows)
              for status in ("completed", "early_stopped", "failed", "incomplete")}
    logger.metrics({f"trials_{k}": v for k, v in counts.items()}, step=0)


def _best_folder(row: TrialRow, tmp: Path) -> Path:
    """A final-style checkpoint folder of the best trial (``model.safetensors`` = its best weights)."""
    import shutil

    from ray.train import Checkpoint

    from llmrec_dist.saved_model import WEIGHTS_FILE
    from llmrec_dist.worker import checkpoint as ckpt

    local = tmp / "checkpoint"
    Checkpoint(row.checkpoint_path).to_directory(str(local))
    if row.status != "completed":  # stopped early: the last epoch's checkpoint holds the best so far apart
        shutil.copyfile(local / ckpt.BEST_FILE, local / WEIGHTS_FILE)
    return local


def _publish_best(outcome: SweepOutcome, sweep: SweepConfig, manifest: dict) -> None:
    """Test metrics of the best trial, then the publish path of ``train`` (package, pyfunc in the best
    trial's child run, registration behind the alias gate), then the parent run's summary."""
    from llmrec_dist.offline_eval import evaluate_here
    from llmrec_dist.registry.publish import publish_model
    from llmrec_dist.tracking import RunLogger, client

    best, cfg, metric = outcome.best, sweep.base, sweep.search.metric
    with tempfile.TemporaryDirectory() as tmp:
        folder = _best_folder(best, Path(tmp))
        test = {k: v for k, v in best.metrics.items() if k.startswith("test_")}
        if not test:
            test = evaluate_here(folder, cfg.data.path, "test", cfg.eval, manifest=manifest)
            RunLogger(outcome.tracking_uri, best.run_id).metrics(test, step=0)
        outcome.test_metrics = test
        privacy = {k: best.metrics[k] for k in ("privacy_epsilon", "privacy_delta") if k in best.metrics}
        published = publish_model(folder, cfg, manifest, outcome.tracking_uri, best.run_id, metric,
                                  {metric: best.best_value, **privacy})  # a private trial's version is tagged
        outcome.model_uri, outcome.registration = published.model_uri, published.registration
    RunLogger(outcome.tracking_uri, outcome.parent_run_id).metrics(
        {f"best_{metric}": best.best_value, **{f"best_{k}": v for k, v in test.items()}}, step=0)
    tags = {"llmrec.best_trial_id": best.trial_id, "llmrec.best_run_id": best.run_id,
            "llmrec.best_params": json.dumps(best.params), "llmrec.best_model_uri": outcome.model_uri}
    if outcome.registration:
        tags["llmrec.registered_version"] = str(outcome.registration["version"])
        tags["llmrec.promoted"] = str(outcome.registration["promoted"]).lower()
    c = client(outcome.tracking_uri)
    for key, value in tags.items():
        c.set_tag(outcome.parent_run_id, key, value)
