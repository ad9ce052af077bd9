"""`llmrec-dist quickstart`: the embedded default end to end, in ./llmrec-quickstart/."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="synthetic data → 2-worker training → registry → a recommendation",
        description="Prepare the synthetic catalogue, train the quickstart config with 2 DDP workers on a "
                    "local Ray cluster (or RAY_ADDRESS), register the model in a local MLflow store and ask "
                    "it for one recommendation. Everything is written under --workdir.")
    p.add_argument("--workdir", default="llmrec-quickstart",
                   help="folder for the dataset, checkpoints and MLflow store (default ./llmrec-quickstart)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.epochs=3")


def log_dir(args) -> str:
    """The quickstart's log file goes with everything else it writes, under --workdir."""
    return f"{args.workdir}/logs"


def run(args) -> int:
    from llmrec_dist.console import say
    from llmrec_dist.quickstart import run_quickstart

    run_quickstart(args.workdir, args.overrides, echo=say)
    return 0
