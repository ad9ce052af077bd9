"""Entry point for `ray job submit -- python jobs/train.py --config configs/X.yaml [section.key=value ...]`.

Same as `llmrec-dist train`; inside a Ray job RAY_ADDRESS is set, so training joins the cluster.
"""

import sys

from llmrec_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
