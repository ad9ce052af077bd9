"""Argument rules shared by the verbs that can continue an interrupted job (`train`, `tune`)."""

from __future__ import annotations

import sys


def config_or_resume_error(verb: str, thing: str, args) -> int | None:
    """Exit code 2 (after a one-line message) unless exactly one of --config / --resume is given and
    --resume comes without overrides; None when the arguments are fine."""
    if bool(args.config) == bool(args.resume):
        problem = f"give either --config FILE (a new {thing}) or --resume FOLDER (continue one)"
    elif args.resume and args.overrides:
        problem = f"--resume continues a {thing} with its saved config; overrides are not allowed"
    else:
        return None
    print(f"llmrec-dist {verb}: {problem}", file=sys.stderr)
    return 2
