"""`llmrec-dist chain`: one model package (and MLflow model) of a retriever + a re-ranker."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chain", help="package a retriever + re-ranker as one model (log, register)",
        description="Chain a next-item model (--retriever) and a rating or click model (--reranker) trained on "
                    "the same dataset into one model whose predict takes the retriever's input (history, k): "
                    "the retriever's top --top-n re-ordered by the re-ranker (blended with the retriever's "
                    "score by --blend), the rest in retriever order. With --data the chain is evaluated on the "
                    "validation split (full ranking) and, with --register, registered under that NDCG@10: the "
                    "alias moves only if it beats the holder on the same dataset. Choose --top-n and --blend "
                    "with `llmrec-dist bench rerank` (on validation).")
    p.add_argument("--retriever", required=True, help="next-item model: MLflow URI or package folder")
    p.add_argument("--reranker", required=True, help="rating/click model: MLflow URI or package folder")
    p.add_argument("--top-n", type=int, default=100, help="retriever items the re-ranker re-orders (default 100)")
    p.add_argument("--blend", type=float, default=0.0, help="weight of the retriever's standardised score "
                                                            "(default 0: the re-ranker's order)")
    p.add_argument("--out", default="", help="also write the chain package to this folder")
    p.add_argument("--data", default="", help="the prepared dataset both were trained on: the chain's validation "
                                              "figures are logged (and gate --register)")
    p.add_argument("--register", default="", metavar="NAME", help="register the chain under this model name")
    p.add_argument("--alias", default="champion", help="alias moved when the chain earns it (default champion)")
    p.add_argument("--experiment", default="llmrec-chains", help="MLflow experiment of the chain's run")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")


def run(args) -> int:
    from mlflow.exceptions import MlflowException

    try:
        if args.register and not args.data:
            raise ValueError("--register needs --data: the alias moves on the chain's validation NDCG@10")
        print(publish_chain(args))
    except (ValueError, OSError, MlflowException) as err:
        print(f"llmrec-dist chain: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
        return 2
    return 0


def publish_chain(args) -> str:
    """Build, evaluate (with --data), log and register (with --register) the chain; returns a summary."""
    import shutil

    from llmrec_dist.config import EvalConfig
    from llmrec_dist.offline_eval import Rerank, evaluate_saved_model, split_chain_figures
    from llmrec_dist.saved_model import resolve_model_folder
    from llmrec_dist.registry.promotion import register_and_promote
    from llmrec_dist.registry.pyfunc import log_model_package
    from llmrec_dist.registry.reranker import build_chain_package
    from llmrec_dist.tracking import client, end_run, resolve_tracking_uri, start_run

    uri = resolve_tracking_uri(args.tracking_uri)
    retriever = resolve_model_folder(args.retriever, uri)
    reranker = resolve_model_folder(args.reranker, uri)
    with tempfile.TemporaryDirectory(prefix="llmrec-chain-") as tmp:
        package = build_chain_package(retriever, reranker, Path(tmp) / "chain", args.top_n, args.blend)
        metrics = {}
        if args.data:
            figures = evaluate_saved_model(retriever, args.data, "valid", EvalConfig(),
                                           rerank=Rerank(str(reranker), args.top_n, (args.blend,)))
            alone, chain = split_chain_figures(figures, "valid", args.blend, (args.blend,))
            metrics = {f"valid_{k}": v for k, v in chain.items()} | {f"valid_retriever_{k}": v for k, v in alone.items()}
        run_id = start_run(uri, args.experiment, run_name="chain")
        try:
            c = client(uri)
            for key, value in {"retriever": args.retriever, "reranker": args.reranker, "top_n": args.top_n,
                               "blend": args.blend}.items():
                c.log_param(run_id, key, str(value))
            for key, value in metrics.items():
                c.log_metric(run_id, key, float(value))
            model_uri = log_model_package(package, uri, run_id)
            lines = [f"logged the chain as {model_uri} (run {run_id})"]
            if metrics:
                lines.append(f"validation NDCG@10: chain {metrics['valid_ndcg_at_10']:.4f}, retriever alone "
                             f"{metrics['valid_retriever_ndcg_at_10']:.4f}")
            if args.register:
                from llmrec_dist.data.dataset_format import read_manifest

                outcome = register_and_promote(uri, run_id, model_uri, args.register, args.alias, "valid_ndcg_at_10",
                                               metrics["valid_ndcg_at_10"], read_manifest(args.data)["content_hash"])
                lines.append(f"registered {args.register} version {outcome['version']}: {outcome['reason']}")
            if args.out:
                shutil.copytree(package, args.out)
                lines.append(f"wrote {args.out}")
        except BaseException:
            end_run(uri, run_id, "FAILED")
            raise
        end_run(uri, run_id)
    return "\n".join(lines)
