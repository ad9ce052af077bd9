"""`llmrec-dist train`: one distributed training run described by a YAML config plus overrides."""

from __future__ import annotations

import argparse
import json

from llmrec_dist.cli.resumable import config_or_resume_error
from llmrec_dist.config import TASK_METRICS, config_from_dict, describe, load_config
from llmrec_dist.console import say, say_err


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train, evaluate, log to MLflow and register a model",
        description="Train a recommender with Ray Train (DDP over scaling.num_workers workers), evaluate it "
                    "with full ranking, log the run to MLflow and register the model when "
                    "mlflow.registered_model is set. Works on a local Ray, or on a cluster when RAY_ADDRESS "
                    "is set.",
        epilog="Config keys (set in YAML or as section.key=value overrides):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--resume", metavar="FOLDER",
                   help="continue an interrupted run from its latest checkpoint, in the same MLflow run: "
                        "FOLDER is <train.storage_path>/train-<run id>, printed when the run started")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. train.lr=3e-4 scaling.num_workers=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the estimated peak memory of a worker (and what a worker can use here) and exit")
    p.add_argument("--force", action="store_true",
                   help="start even when the memory estimate says a worker will not fit")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")


def run(args) -> int:
    import sys

    if (code := config_or_resume_error("train", "run", args)) is not None:
        return code
    from llmrec_dist.data.dataset_format import DatasetError
    from llmrec_dist.train.launcher import TrainError, read_run_state, train
    from llmrec_dist.train.memory import MemoryPreflightError

    cfg = load_config(args.config, args.overrides) if args.config else None
    try:
        if args.print_config:
            import yaml

            raw = cfg.to_dict() if cfg else read_run_state(args.resume)["config"]
            print(yaml.safe_dump(raw, sort_keys=False))
            return 0
        if args.estimate_memory:
            print_memory_estimate(cfg or config_from_dict(read_run_state(args.resume)["config"]))
            return 0
        # progress on stderr with --json, so that stdout stays one JSON document
        outcome = train(cfg, resume=args.resume, force=args.force, echo=say_err if args.json else say)
    except (TrainError, DatasetError, MemoryPreflightError) as err:
        print(f"llmrec-dist train: {err}", file=sys.stderr)
        return 2
    print_outcome(outcome, as_json=args.json)
    return 0


def print_memory_estimate(cfg) -> None:
    """The pre-flight estimate, part by part, and the local budget it is checked against."""
    from llmrec_dist.data.dataset_format import checked_manifest
    from llmrec_dist.train.launcher import with_absolute_paths
    from llmrec_dist.train.memory import estimate_for_dataset, local_worker_budget_mb

    cfg = with_absolute_paths(cfg)
    estimate = estimate_for_dataset(cfg, checked_manifest(cfg.data.path, cfg.data.verify_hash))
    print(f"estimated peak per worker: {estimate.total_mb:,.0f} MB")
    print(f"  process (Python, torch, Ray): {estimate.process_mb:,.0f} MB")
    for name, mb in estimate.held.items():
        print(f"  held: {name}: {mb:,.0f} MB")
    for phase, parts in estimate.phases.items():
        mark = "  <- the peak" if phase == estimate.peak_phase else ""
        print(f"  {phase}: {sum(parts.values()):,.0f} MB{mark}")
        for name, mb in parts.items():
            print(f"    {name}: {mb:,.0f} MB")
    budget, how = local_worker_budget_mb(cfg.scaling.num_workers)
    print(f"a worker can use about {budget:,.0f} MB on this machine ({how})")


def print_outcome(outcome, as_json: bool = False) -> None:
    summary = {"run_id": outcome.run_id, "tracking_uri": outcome.tracking_uri, "model_uri": outcome.model_uri,
               "registration": outcome.registration, "seconds": round(outcome.seconds, 1),
               "metrics": outcome.metrics}
    if outcome.validated is not None:
        summary["validated"] = {"run_id": outcome.validated.run_id, "metrics": outcome.validated.metrics}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    m = outcome.metrics
    chosen = (f"refit through the validation item, {m['refit_epochs']} epochs" if m.get("refit_epochs")
              else f"best epoch {int(m.get('best_epoch', 0)) + 1} of {m.get('epochs_run')}")  # 1-based, as the epoch lines
    say(f"\nrun {outcome.run_id}: {chosen}, {outcome.seconds:.0f} s")
    if outcome.validated is not None:  # train.refit: the run that chose the refit's epochs
        v, shown = outcome.validated.metrics, outcome.validated.config.selection_metric()
        say(f"  chosen by run {outcome.validated.run_id}: best epoch {int(v.get('best_epoch', 0)) + 1} of "
            f"{v.get('epochs_run')}, {shown}={v.get(shown, float('nan')):.4f}, test ndcg@10="
            f"{v.get('test_ndcg_at_10', float('nan')):.4f} (without the refit)")
    for split in ("valid", "test", "test_cold"):
        cells = [f"{name}@{k}={m[f'{split}_{name}_at_{k}']:.4f}"
                 for name in ("hr", "ndcg", "mrr") for k in (10,) if f"{split}_{name}_at_{k}" in m]
        cells += [f"{name}={m[f'{split}_{name}']:.4f}" for names in TASK_METRICS.values() for name in names
                  if f"{split}_{name}" in m]
        if cells:
            say(f"  {split}: " + "  ".join(cells))
    say(f"  model: {outcome.model_uri}" if outcome.model_uri else
        f"  model: the best checkpoint in {outcome.checkpoint_path} (rating/click models are not logged to "
        "MLflow yet)")
    reg = outcome.registration
    if reg:
        moved = "moved to it" if reg.get("promoted") else "not moved"
        say(f"  registered {reg['name']} version {reg['version']}; alias {moved} ({reg.get('reason', '')})")
