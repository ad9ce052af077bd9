"""`llmrec-dist tune`: a Ray Tune sweep over any config keys, tracked as an MLflow parent run with one
child run per trial; the best trial is registered behind the alias gate."""

from __future__ import annotations

import argparse
import json
import math

from llmrec_dist.cli.resumable import config_or_resume_error
from llmrec_dist.config import TASK_METRICS, describe


def add_parser(sub) -> None:
    from llmrec_dist.sweep.search import describe_search

    p = sub.add_parser(
        "tune", help="hyperparameter sweep (Ray Tune + ASHA), best trial registered",
        description="Run one distributed training run per trial of the sweep file's `search` section on "
                    "a local Ray (or RAY_ADDRESS). Weak trials are stopped early by ASHA; every trial is "
                    "an MLflow child run of the sweep's parent run; the best trial is evaluated on test, "
                    "logged and, when mlflow.registered_model is set, registered (the alias moves only if "
                    "it beats the current holder). An interrupted sweep continues with --resume FOLDER.",
        epilog="Search keys (the `search` section; search.KEY=value overrides work too):\n" + describe_search()
               + "\n\nTraining config keys (sections data, model, train, eval, scaling, mlflow):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="sweep YAML: a training config plus a `search` section (see configs/)")
    p.add_argument("--resume", metavar="FOLDER",
                   help="continue the interrupted sweep in FOLDER (printed when it started); finished trials "
                        "are not run again")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. train.epochs=3 search.num_samples=4")
    p.add_argument("--print-config", action="store_true", help="print the resolved sweep config and exit")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")


def run(args) -> int:
    import sys

    from llmrec_dist.sweep.search import load_sweep

    if (code := config_or_resume_error("tune", "sweep", args)) is not None:
        return code
    sweep = load_sweep(args.config, args.overrides) if args.config else None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(sweep.to_dict(), sort_keys=False))
        return 0
    from llmrec_dist.console import say, say_err
    from llmrec_dist.sweep.driver import SweepError, run_sweep

    try:
        # progress on stderr with --json, so that stdout stays one JSON document
        outcome = run_sweep(sweep, resume=args.resume, echo=say_err if args.json else say)
    except SweepError as err:
        print(f"llmrec-dist tune: {err}", file=sys.stderr)
        return 2
    print_outcome(outcome, as_json=args.json)
    return 0


def print_outcome(outcome, as_json: bool = False) -> None:
    rows = [{"trial_id": r.trial_id, "status": r.status, "params": r.params,
             "best_value": None if math.isnan(r.best_value) else r.best_value, "epochs": r.epochs,
             "seconds": None if math.isnan(r.seconds) else round(r.seconds, 1), "run_id": r.run_id}
            for r in outcome.rows]
    summary = {"folder": outcome.folder, "parent_run_id": outcome.parent_run_id,
               "tracking_uri": outcome.tracking_uri, "seconds": round(outcome.seconds, 1), "trials": rows,
               "best_trial": outcome.best.trial_id if outcome.best else None,
               "test_metrics": outcome.test_metrics, "model_uri": outcome.model_uri,
               "registration": outcome.registration}
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"\nsweep {outcome.folder}: {len(rows)} trial(s) in {outcome.seconds:.0f} s "
          f"(MLflow parent run {outcome.parent_run_id})")
    for r in rows:
        value = "-" if r["best_value"] is None else f"{r['best_value']:.4f}"
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        print(f"  {r['trial_id']:<14} {r['status']:<13} {value:>8}  epochs {r['epochs']}  {secs:>6}  {r['params']}")
    if outcome.best:
        shown = ("_at_10", *(f"_{name}" for names in TASK_METRICS.values() for name in names))
        test = "  ".join(f"{k}={v:.4f}" for k, v in outcome.test_metrics.items() if k.endswith(shown))
        model = outcome.model_uri or "the best trial's checkpoint (rating/click models are not logged to MLflow yet)"
        print(f"  best: {outcome.best.trial_id} {outcome.best.params}\n  test: {test}\n  model: {model}")
    reg = outcome.registration
    if reg:
        moved = "moved to it" if reg.get("promoted") else "not moved"
        print(f"  registered {reg['name']} version {reg['version']}; alias {moved} ({reg.get('reason', '')})")
