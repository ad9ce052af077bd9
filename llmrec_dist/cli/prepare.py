"""``llmrec-dist prepare``: build a Parquet dataset folder from a data source."""

from __future__ import annotations

import argparse
import sys
import time

from llmrec_dist.data.errors import PrepareError
from llmrec_dist.data.prepare import SOURCES, USER_HASH_ENV, prepare_dataset

DESCRIPTION = """\
Read interactions from a source, drop users with too few interactions (optionally a k-core on
items too), split each user's history leave-one-out by time (last item -> test, second-last ->
valid, the rest -> train), optionally hold a fraction of items out as cold items (--cold-items),
replace user ids with keyed hashes, and write a dataset folder: manifest.json, items.parquet,
train/ valid/ test/ part-*.parquet.

The output is written to a temporary folder next to --output and renamed into place only
when complete; an existing dataset is replaced only with --overwrite.

sources:
  synthetic   generated catalogue and users (no input files); sized by --synthetic-users,
              --synthetic-items, reproducible with --seed
  movielens   --input: a MovieLens folder or original .zip (ml-100k, ml-1m, the SASRec ml-1m
              sequences, ml-latest, ml-latest-small), variant detected from its files; the rating of
              every interaction is kept as explicit feedback (not in the SASRec sequences)
  generic     --interactions FILE and --items FILE (CSV or Parquet, by extension); --rating-col or
              --label-col keeps a rating or a 0/1 label of every interaction as explicit feedback
  sequences   --sequences FILE: one row per user, its item ids space-separated and oldest first in
              --items-col (CSV/TSV, or Parquet with that column as strings), and --items FILE as for
              generic; the order on a row is the time order, repeats are kept. A user on two rows,
              a row without items or an item missing from --items stops prepare (nothing is skipped)
"""

EPILOG = f"""\
examples:
  llmrec-dist prepare --source synthetic --output data/synthetic
  llmrec-dist prepare --source movielens --input ml-1m.zip --output data/ml-1m
  llmrec-dist prepare --source movielens --input ml-1m.zip --cold-items 0.1 --seed 1 --output data/ml-1m-cold
  llmrec-dist prepare --source generic --interactions events.parquet --items items.csv \\
      --user-col customer --item-col sku --time-col ts --item-id-col sku \\
      --text-cols title,description --output data/shop
  llmrec-dist prepare --source generic --interactions ratings.csv --items items.csv \
      --rating-col stars --rating-range 1,5 --output data/shop-ratings
  llmrec-dist prepare --source sequences --sequences ../shared/data/amazon-beauty-2014/sequences.tsv \\
      --items ../shared/data/amazon-beauty-2014/items.tsv --user-col user_idx --items-col item_seq \\
      --item-id-col item_idx --text-cols title --output data/beauty

exit status: 0 on success, 2 on bad arguments, malformed input (the message names the file,
row and problem) or an existing output without --overwrite.
The user-hash key can also come from ${USER_HASH_ENV} (safer than the command line).
"""


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number with 0 <= value < 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a fraction with 0 <= FRACTION < 1, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``prepare`` sub-command on an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "prepare",
        help="build a Parquet dataset (leave-one-out splits) from synthetic, MovieLens, generic or sequences data",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    main = parser.add_argument_group("what to prepare")
    main.add_argument("--source", required=True, choices=SOURCES, help="data source (see above)")
    main.add_argument("--output", required=True, metavar="DIR", help="dataset folder to create")
    main.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing dataset at --output (the old one is removed only after the new one is in place)",
    )

    split = parser.add_argument_group("filtering and split")
    split.add_argument(
        "--min-interactions", type=_at_least(3), default=5, metavar="N",
        help="drop users with fewer than N interactions; N >= 3 (default: %(default)s)",
    )
    split.add_argument(
        "--item-min-interactions", type=_at_least(0), default=0, metavar="N",
        help="if N > 0, iterative k-core: drop items with fewer than N interactions, alternating "
        "with the user filter until stable (default: %(default)s = off)",
    )
    split.add_argument(
        "--cold-items", type=_fraction, default=0.0, metavar="FRACTION",
        help="make round(FRACTION x items) items cold, 0 <= FRACTION < 1: chosen at random (--seed) "
        "among all items, they are removed from every train sequence and valid/test history, so "
        "only their text can represent them, and remain only as valid/test targets; the valid/test "
        "rows with a cold target (column 'cold') form the cold-start subset, reported separately by "
        "evaluation (an error if it is empty); train rows left empty are dropped "
        "(default: %(default)s = none)",
    )
    split.add_argument(
        "--seed", type=_at_least(0), default=0,
        help="seed of the cold-item choice and of the synthetic generator (default: %(default)s)",
    )
    split.add_argument(
        "--shards", type=_at_least(1), default=None, metavar="N",
        help="part files per split (default: max(2, ceil(users / 20000)), at most one per user)",
    )
    split.add_argument(
        "--user-hash-key", default=None, metavar="KEY",
        help=f"HMAC key for the user_key column (default: ${USER_HASH_ENV}, else a random key "
        "that is not stored, so user keys cannot be linked across datasets)",
    )

    stream = parser.add_argument_group(
        "streaming (data larger than memory)",
        "--stream prepares in bounded memory, whatever the input's size: rows are hashed by user into bucket "
        "files (in $TMPDIR, about the input's size), then each bucket is sorted, split and written as one "
        "part per split. For --source generic (--interactions may then be a folder of Parquet files) and "
        "--source synthetic (a generator that streams too: --synthetic-interactions). Not with "
        "--item-min-interactions, --cold-items, --rating-col/--label-col or --user-attrs")
    stream.add_argument("--stream", action="store_true", help="prepare in bounded memory (see above)")
    stream.add_argument(
        "--synthetic-interactions", type=_at_least(5), default=None, metavar="N",
        help="with --source synthetic --stream: interactions to generate, >= 5 x --synthetic-users "
        "(default: 10 x --synthetic-users)")
    stream.add_argument(
        "--rows-per-bucket", type=_at_least(1000), default=None, metavar="N",
        help="input rows per bucket (and part file) with --stream; memory grows with it (default: 1000000)")

    movielens = parser.add_argument_group("source movielens")
    movielens.add_argument("--input", metavar="PATH", help="MovieLens folder or .zip")

    synthetic = parser.add_argument_group("source synthetic")
    synthetic.add_argument(
        "--synthetic-users", type=_at_least(1), default=1000, metavar="N",
        help="number of users (default: %(default)s)",
    )
    synthetic.add_argument(
        "--synthetic-items", type=_at_least(50), default=400, metavar="N",
        help="number of items (default: %(default)s)",
    )

    generic = parser.add_argument_group(
        "source generic", "--items, --user-col, --item-id-col, --text-cols, --encoding: also for --source sequences",
    )
    generic.add_argument("--interactions", metavar="FILE", help="interactions table (.csv, .tsv or .parquet)")
    generic.add_argument("--items", metavar="FILE", help="items table (.csv, .tsv or .parquet)")
    generic.add_argument(
        "--user-col", default="user_id", metavar="C",
        help="user id column of --interactions or --sequences (default: %(default)s)",
    )
    generic.add_argument(
        "--item-col", default="item_id", metavar="C", help="item id column of --interactions (default: %(default)s)"
    )
    generic.add_argument(
        "--time-col", default="timestamp", metavar="C",
        help="time column: epoch numbers or ISO-8601 strings; '' = use file order (default: %(default)s)",
    )
    generic.add_argument(
        "--item-id-col", default="item_id", metavar="C", help="item id column of --items (default: %(default)s)"
    )
    generic.add_argument(
        "--text-cols", default="text", metavar="C1,C2",
        help="comma-separated columns of --items joined with '. ' into the item text (default: %(default)s)",
    )
    generic.add_argument(
        "--rating-col", default=None, metavar="C",
        help="column of --interactions with each interaction's rating, kept as the dataset's explicit "
        "feedback (a missing or non-numeric value stops prepare with its row)",
    )
    generic.add_argument(
        "--rating-range", default=None, metavar="LOW,HIGH",
        help="the valid range of --rating-col; a rating outside it stops prepare with its row "
        "(default: any finite number)",
    )
    generic.add_argument(
        "--label-col", default=None, metavar="C",
        help="column of --interactions with each interaction's 0/1 label (click or not), kept as the "
        "dataset's explicit feedback instead of a rating",
    )
    generic.add_argument(
        "--encoding", default="utf-8", metavar="NAME",
        help="text encoding of CSV/TSV files, e.g. latin-1 or cp1252 (Parquet text is always UTF-8); a byte "
        "that is not valid in it stops prepare with its file, row and byte offset (default: %(default)s)",
    )

    attrs = parser.add_argument_group(
        "user attributes (for `evaluate --report`)",
        "MovieLens ml-1m and ml-100k bring theirs (users.dat, u.user: gender, age band, occupation); for "
        "--source generic or sequences name a table. Written as users.parquet, keyed by the hashed user_key; "
        "not part of the dataset's content hash",
    )
    attrs.add_argument(
        "--user-attrs", default=None, metavar="FILE",
        help="user attributes table (.csv, .tsv or .parquet), one row per user, the user id in --user-col",
    )
    attrs.add_argument(
        "--user-attr-cols", default=None, metavar="C1,C2",
        help="comma-separated attribute columns of --user-attrs, kept as text (bin numeric ones first)",
    )

    sequences = parser.add_argument_group("source sequences")
    sequences.add_argument(
        "--sequences", metavar="FILE",
        help="one row per user with a header (.csv, .tsv or .parquet); a user on two rows or a row without "
        "items is an error",
    )
    sequences.add_argument(
        "--items-col", default="items", metavar="C",
        help="column of --sequences with the user's item ids, space-separated, oldest first; repeats are kept "
        "(default: %(default)s)",
    )
    parser.set_defaults(func=run)
    return parser


# Flags (dest: default) used by some sources only; the shared ones by both file sources.
_GENERIC_FLAGS = {"interactions": None, "item_col": "item_id", "time_col": "timestamp",
                  "rating_col": None, "rating_range": None, "label_col": None}
_SEQUENCES_FLAGS = {"sequences": None, "items_col": "items"}
_SHARED_FLAGS = {
    "items": None, "user_col": "user_id", "item_id_col": "item_id", "text_cols": "text", "encoding": "utf-8",
}
_SYNTHETIC_FLAGS = {"synthetic_users": 1000, "synthetic_items": 400}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _problems(args: argparse.Namespace) -> list[str]:
    """Every inconsistency between --source and the other flags, reported together."""
    problems = []
    if args.source == "movielens" and not args.input:
        problems.append("--input is required with --source movielens")
    if args.source != "movielens" and args.input:
        problems.append("--input is only used with --source movielens")
    files = {"generic": "interactions", "sequences": "sequences"}
    if args.source in files:
        problems += [
            f"{_flag(d)} is required with --source {args.source}"
            for d in (files[args.source], "items") if not getattr(args, d)
        ]
        if not any(c.strip() for c in args.text_cols.split(",")):
            problems.append("--text-cols must name at least one column")
    if args.source == "generic":
        if args.rating_col and args.label_col:
            problems.append("--rating-col and --label-col: give one feedback column, not both")
        if args.rating_range and not args.rating_col:
            problems.append("--rating-range needs --rating-col")
    if args.source in files and bool(args.user_attrs) != bool(args.user_attr_cols):
        problems.append("--user-attrs and --user-attr-cols go together")
    if args.source not in files and (args.user_attrs or args.user_attr_cols):
        problems.append("--user-attrs / --user-attr-cols are only used with --source generic or sequences "
                        "(MovieLens brings its own users file)")
    for flags, users in ((_GENERIC_FLAGS, ("generic",)), (_SEQUENCES_FLAGS, ("sequences",)),
                         (_SHARED_FLAGS, ("generic", "sequences"))):
        if args.source not in users:
            problems += [
                f"{_flag(d)} is only used with --source {' or '.join(users)}"
                for d, default in flags.items()
                if getattr(args, d) != default
            ]
    if args.stream:
        if args.source not in ("generic", "synthetic"):
            problems.append("--stream is for --source generic or synthetic")
        refused = {"item_min_interactions": 0, "cold_items": 0.0, "rating_col": None, "label_col": None,
                   "user_attrs": None, "shards": None}
        problems += [f"{_flag(d)} is not available with --stream (it needs the whole table in memory)"
                     for d, default in refused.items() if getattr(args, d) != default]
        if args.encoding.lower().replace("-", "") != "utf8":
            problems.append("--encoding: --stream reads UTF-8 text only")
    else:
        problems += [f"{_flag(d)} needs --stream" for d in ("synthetic_interactions", "rows_per_bucket")
                     if getattr(args, d) is not None]
    if args.source != "synthetic":
        problems += [
            f"{_flag(d)} is only used with --source synthetic"
            for d, default in _SYNTHETIC_FLAGS.items()
            if getattr(args, d) != default
        ]
        if args.seed != 0 and args.cold_items == 0:
            problems.append("--seed is only used with --source synthetic or --cold-items")
    return problems


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _prepare_streaming(args: argparse.Namespace) -> dict:
    from llmrec_dist.data.streaming import ROWS_PER_BUCKET, generate_interactions, prepare_streaming

    options = {"min_interactions": args.min_interactions, "user_hash_key": args.user_hash_key,
               "overwrite": args.overwrite, "rows_per_bucket": args.rows_per_bucket or ROWS_PER_BUCKET}
    if args.source == "generic":
        return prepare_streaming(args.interactions, args.items, args.output, user_col=args.user_col,
                                 item_col=args.item_col, time_col=args.time_col or None, item_id_col=args.item_id_col,
                                 text_cols=args.text_cols, **options)
    import tempfile

    from llmrec_dist.data.dataset_format import check_output_free

    check_output_free(args.output, args.overwrite)  # before generating
    interactions = args.synthetic_interactions or 10 * args.synthetic_users
    with tempfile.TemporaryDirectory(prefix="llmrec-synthetic-") as raw:
        generated = generate_interactions(raw, users=args.synthetic_users, items=args.synthetic_items,
                                          interactions=interactions, seed=args.seed)
        info = {"type": "synthetic", "variant": f"synthetic-{generated['generator']}", "parameters": generated}
        return prepare_streaming(f"{raw}/interactions", f"{raw}/items.parquet", args.output, item_id_col="item_id",
                                 text_cols=["title"], source_info=info, **options)


def run(args: argparse.Namespace) -> int:
    """Run ``prepare`` for parsed arguments; print a summary; return the exit code."""
    problems = _problems(args)
    if problems:
        for problem in problems:
            print(f"llmrec-dist prepare: error: {problem}", file=sys.stderr)
        return 2
    generic = sequences = None
    if args.source in ("generic", "sequences"):
        shared = {
            "items": args.items,
            "user_col": args.user_col,
            "item_id_col": args.item_id_col,
            "text_cols": [c.strip() for c in args.text_cols.split(",") if c.strip()],
            "encoding": args.encoding,
        }
        if args.source == "generic":
            generic = {**shared, "interactions": args.interactions, "item_col": args.item_col,
                       "time_col": args.time_col or None, "rating_col": args.rating_col,
                       "label_col": args.label_col, "rating_range": args.rating_range}
        else:
            sequences = {**shared, "sequences": args.sequences, "items_col": args.items_col}
    synthetic = None
    if args.source == "synthetic":
        synthetic = {"n_users": args.synthetic_users, "n_items": args.synthetic_items}

    started = time.perf_counter()
    try:
        if args.stream:
            manifest = _prepare_streaming(args)
        else:
            manifest = prepare_dataset(
                args.source,
                args.output,
                input=args.input,
                overwrite=args.overwrite,
                min_interactions=args.min_interactions,
                item_min_interactions=args.item_min_interactions,
                user_hash_key=args.user_hash_key,
                num_shards=args.shards,
                seed=args.seed,
                synthetic=synthetic,
                generic=generic,
                sequences=sequences,
                cold_items=args.cold_items,
                user_attributes={"file": args.user_attrs, "columns": args.user_attr_cols} if args.user_attrs else None,
            )
    except (PrepareError, ValueError, OSError) as err:
        # Bad input, bad option values (e.g. an unknown --encoding), an output that may not be written
        # (FileExistsError) or cannot be (permissions, a file in the way): one line, exit 2. Nothing is
        # left behind: the output is written to a temporary folder that is removed on any error.
        print(f"llmrec-dist prepare: error: {_one_line(err)}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    counts = manifest["counts"]
    print(
        f"prepared {args.output} ({manifest['source']['variant']}) in {seconds:.1f} s: "
        f"{counts['users']:,} users, {counts['items']:,} items, {counts['interactions']:,} "
        f"interactions ({counts['train_interactions']:,} train; {counts['raw_interactions']:,} read), "
        f"{len(manifest['shards']['train'])} shards per split, {manifest['content_hash']}"
    )
    feedback = manifest["feedback"]
    if feedback:
        print(f"explicit feedback: {feedback['kind']} from column {feedback['column']!r}, "
              f"{feedback['min']:g} to {feedback['max']:g} ({feedback['range']})")
    attributes = manifest.get("user_attributes")
    if attributes:
        print(f"user attributes: {', '.join(attributes['columns'])} for {attributes['users']:,} users "
              f"({attributes['users_without']:,} without) in {attributes['file']}")
    cold = manifest["cold_items"]
    if cold["items"]:
        print(
            f"cold items: {cold['items']:,} ({cold['fraction']:g} of the items, seed {cold['seed']}), "
            f"cold targets: {cold['valid_targets']:,} valid, {cold['test_targets']:,} test; "
            f"{cold['train_interactions_removed']:,} train interactions removed, "
            f"{cold['train_rows_dropped']:,} train rows left empty and dropped"
        )
    return 0
