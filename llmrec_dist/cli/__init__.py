"""`llmrec-dist` command line: one sub-command per workflow, each in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from llmrec_dist import __version__
from llmrec_dist.cli import bench, evaluate, prepare, quickstart, recommend, train, tune
from llmrec_dist.config import ConfigError
from llmrec_dist.data.layout import DatasetError

VERBS = {"prepare": prepare, "train": train, "evaluate": evaluate, "recommend": recommend,
         "tune": tune, "quickstart": quickstart, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmrec-dist",
        description="Train Transformer / language-model recommenders on Ray, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"llmrec-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, module in VERBS.items():
        module.add_parser(sub)
        sub.choices[name].set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (ConfigError, DatasetError, FileNotFoundError) as exc:
        print(f"llmrec-dist {args.verb}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
