"""`llmrec-dist` command line: one sub-command per workflow, each in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from llmrec_dist import __version__, console
from llmrec_dist.storage import StorageError
from llmrec_dist.cli import bench, chain, evaluate, prepare, quickstart, recommend, serve, train, tune
from llmrec_dist.config import ConfigError
from llmrec_dist.data.dataset_format import DatasetError

VERBS = {"prepare": prepare, "train": train, "evaluate": evaluate, "recommend": recommend,
         "serve": serve, "chain": chain, "tune": tune, "quickstart": quickstart, "bench": bench}

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmrec-dist",
        description="Train Transformer / language-model recommenders on Ray, tracked in MLflow. "
                    "Each command writes its full log (Ray's and MLflow's output too) to "
                    f"./{console.DEFAULT_LOG_DIR}/<command>-<time>.log (${console.LOG_DIR_ENV} moves it).")
    parser.add_argument("--version", action="version", version=f"llmrec-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything on the console too: every log record at DEBUG, Ray's and "
                             "MLflow's output, the Ray workers' output")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, module in VERBS.items():
        module.add_parser(sub)
        sub.choices[name].set_defaults(func=module.run)
    return parser


def _log_file(args):
    """``<verb>[-<kind>]-<time>.log``, in the verb's own folder when it has one (the quickstart's)."""
    name = args.verb + (f"-{args.kind}" if getattr(args, "kind", None) else "")
    folder = getattr(VERBS[args.verb], "log_dir", None)
    return name, console.default_log_file(name, folder(args) if folder else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name, path = _log_file(args)
    session = console.start(name, args.verbose, path)
    log.info("llmrec-dist %s", " ".join(sys.argv[1:] if argv is None else argv))
    try:
        code = args.func(args) or 0
        if session.used_ray:  # what Ray and MLflow said is in the file
            console.say_err(f"full log: {console.shown_path(session.path)}")
        return code
    except (ConfigError, DatasetError, FileNotFoundError, StorageError) as exc:
        log.info("refused: %s", exc, exc_info=True)  # the traceback in the log file only
        print(f"llmrec-dist {args.verb}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; full log: {console.shown_path(session.path)}", file=sys.stderr)
        return 130
    except Exception as exc:  # one line here, the traceback in the log file
        console.log_failure(exc)
        print(console.failure_line(args.verb, exc), file=sys.stderr)
        return 1
    finally:
        console.close()


if __name__ == "__main__":
    sys.exit(main())
