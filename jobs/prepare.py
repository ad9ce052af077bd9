"""Entry point for `ray job submit -- python jobs/prepare.py --source ... --output ...` (= `llmrec-dist prepare`)."""

import sys

from llmrec_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
