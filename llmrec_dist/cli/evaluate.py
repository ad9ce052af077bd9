"""`llmrec-dist evaluate`: full-ranking metrics of a saved model on a prepared dataset (a rating/click
model's checkpoint: its task's metrics on the same pairs as in training)."""

from __future__ import annotations

import json

from llmrec_dist.config import EvalConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a registered model or a checkpoint with full ranking",
        description="Rank the whole catalogue for every user of a split and report HR/NDCG/MRR@K and "
                    "coverage, and HR/NDCG/MRR@K of the rows whose target is a cold item and of those whose "
                    "target's training frequency falls in each bucket 0, 1-4, 5-19, 20+ (the eval.freq_buckets "
                    "default). --model takes an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, "
                    "runs:/RUN_ID/model) or a local checkpoint / model-package folder. A rating or click "
                    "model's checkpoint (task.type) reports its task's metrics instead (RMSE/MAE or AUC/GAUC/"
                    "log loss) on the same validation/test pairs as its training run.")
    p.add_argument("--model", required=True, help="MLflow model URI or local checkpoint folder")
    p.add_argument("--data", required=True, help="prepared dataset folder the model was trained on")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="split to rank (default test)")
    p.add_argument("--ks", default="5,10,20", help="comma-separated cut-offs (default 5,10,20)")
    p.add_argument("--include-seen", action="store_true", help="keep history items in the ranking")
    p.add_argument("--workers", type=int, default=1,
                   help="shard users over this many Ray Train workers (default 1: in this process)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI for models:/ and runs:/ URIs")
    p.add_argument("--no-verify", action="store_true",
                   help="skip recomputing the dataset's content hash (its files are still checked to exist and "
                        "be readable Parquet)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model whose text encoder runs its own Python code (model.trust_remote_code); "
                        "refused by default")
    p.add_argument("--rerank", default="", metavar="MODEL",
                   help="a rating or click model (URI or folder, same dataset) that re-orders --model's top "
                        "--top-n for each user: reports the retriever alone and the chain (test_rerank_…); "
                        "the rest of the ranking stays in retriever order")
    p.add_argument("--top-n", type=int, default=100, help="with --rerank: how many of the retriever's items the "
                                                          "re-ranker re-orders (default 100)")
    p.add_argument("--blend", default="0", help="with --rerank: weight of the retriever's standardised score "
                                                "added to the re-ranker's (0 = re-ranker alone); several, "
                                                "comma-separated, report one chain each (default 0)")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    report = p.add_argument_group(
        "fairness and bias report",
        "--report adds NDCG@10/HR@10 by users' training-history length and by each user attribute of the "
        "dataset's users.parquet (gaps and ratios over groups of >= 20 users), and popularity bias (mean "
        "popularity and long-tail share of the top-10 against the histories, coverage@10, Gini of "
        "exposure); writes report.json, report.md, report.png and logs them to the MLflow run "
        "fairness-<split>. In this process only: not with --workers > 1 or --rerank, nor for rating/click "
        "models")
    report.add_argument("--report", action="store_true", help="also write and log the fairness/bias report")
    report.add_argument("--report-dir", default="", metavar="DIR",
                        help="where the report files go (default: fairness-report-<split> in the working folder)")
    report.add_argument("--experiment", default="llmrec", metavar="NAME",
                        help="MLflow experiment of the report's run (default %(default)s); the run goes to "
                             "--tracking-uri (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")


def run(args) -> int:
    import sys

    from llmrec_dist.offline_eval import Rerank, evaluate_saved_model
    from llmrec_dist.saved_model import resolve_model_folder

    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
        if not ks or min(ks) <= 0 or args.workers <= 0:
            raise ValueError
    except ValueError:
        print(f"llmrec-dist evaluate: --ks must be positive integers and --workers >= 1; got "
              f"--ks {args.ks!r} --workers {args.workers}", file=sys.stderr)
        return 2
    try:
        blends = tuple(float(b) for b in args.blend.split(",") if b.strip())
        if not blends or args.top_n <= 0 or any(b < 0 or b != b for b in blends):
            raise ValueError
    except ValueError:
        print(f"llmrec-dist evaluate: --top-n must be a positive integer and --blend non-negative numbers; got "
              f"--top-n {args.top_n} --blend {args.blend!r}", file=sys.stderr)
        return 2
    refused = [flag for flag, given in (("--workers > 1", args.workers > 1), ("--rerank", bool(args.rerank)))
               if given]
    if args.report and refused:
        print(f"llmrec-dist evaluate: --report runs in this process on the model alone; drop {' and '.join(refused)}",
              file=sys.stderr)
        return 2
    if not args.report and (args.report_dir or args.experiment != "llmrec"):
        print("llmrec-dist evaluate: --report-dir and --experiment are only used with --report", file=sys.stderr)
        return 2
    cfg = EvalConfig(ks=ks, exclude_seen=not args.include_seen, coverage_k=max(ks) if 10 not in ks else 10)
    from mlflow.exceptions import MlflowException

    if args.report:
        return _run_report(args, cfg)

    try:
        folder = resolve_model_folder(args.model, args.tracking_uri)
        rerank = Rerank(str(resolve_model_folder(args.rerank, args.tracking_uri)), args.top_n, blends) \
            if args.rerank else None
        metrics = evaluate_saved_model(folder, args.data, args.split, cfg, num_workers=args.workers,
                                       verify=not args.no_verify, trust_remote_code=args.trust_remote_code,
                                       rerank=rerank)
    except (OSError, ValueError, MlflowException) as exc:  # bad model, dataset or URI: one line, exit 2
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"llmrec-dist evaluate: {message}", file=sys.stderr)
        return 2
    _print_metrics(metrics, args.json)
    return 0


def _print_metrics(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    width = max(28, *map(len, metrics))  # bucket keys (valid_freq_20_plus_ndcg_at_10) are longer
    for key, value in metrics.items():
        print(f"{key:{width}s} {value:.6f}" if isinstance(value, float) else f"{key:{width}s} {value}")


def _run_report(args, cfg) -> int:
    """``evaluate --report``: the usual metrics and the fairness/bias report, one pass in this process."""
    import sys

    from mlflow.exceptions import MlflowException

    from llmrec_dist.fairness_report import fairness_report
    from llmrec_dist.saved_model import resolve_model_folder
    from llmrec_dist.tracking import resolve_tracking_uri

    report_dir = args.report_dir or f"fairness-report-{args.split}"
    try:
        folder = resolve_model_folder(args.model, args.tracking_uri)
        metrics, report, paths, run_id = fairness_report(
            folder, args.data, args.split, cfg, report_dir, resolve_tracking_uri(args.tracking_uri),
            args.experiment, model=args.model, verify=not args.no_verify, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, MlflowException) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"llmrec-dist evaluate: {message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"metrics": metrics, "report": {k: v for k, v in report.items() if k != "metrics"},
                          "files": [str(p) for p in paths], "run_id": run_id}, indent=2))
        return 0
    _print_metrics(metrics, False)
    k = report["k"]
    for name, grouping in report["groupings"].items():
        gap = grouping[f"ndcg_at_{k}"]
        print(f"fairness {name:22s} NDCG@{k} gap {gap['gap'] if gap['gap'] is not None else float('nan'):.4f} "
              f"over {gap['groups_compared']} groups (best {gap['best']}, worst {gap['worst']})")
    pop = report["popularity"]
    ratio = pop["popularity_ratio"]
    print(f"popularity ratio {ratio if ratio is not None else float('nan'):.2f}, long tail in top-{k} "
          f"{pop['long_tail_share_recommended']:.4f} vs histories {pop['long_tail_share_history']:.4f}, "
          f"coverage@{k} {pop['coverage']:.4f}, Gini of exposure {pop['gini_exposure']:.4f}")
    print(f"report: {', '.join(str(p) for p in paths)}; MLflow run {run_id} (fairness-{args.split})")
    return 0
