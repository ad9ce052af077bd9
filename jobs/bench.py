"""Benchmarks as a Ray job: `ray job submit -- python jobs/bench.py speed --config ... data.path=...`
(the same arguments as `llmrec-dist bench`)."""

import sys

from llmrec_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
