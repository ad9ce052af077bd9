"""Entry point for `ray job submit -- python jobs/tune.py --config configs/X.yaml [section.key=value ...]`
(or `--resume FOLDER`). Same as `llmrec-dist tune`; inside a Ray job RAY_ADDRESS is set, so the trials
run on the cluster."""

import sys

from llmrec_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
