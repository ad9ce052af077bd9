"""Benchmark: the item-tower x freezing-strategy matrix (`llmrec-dist bench towers`).

    python jobs/bench_item_towers.py --config configs/mlsmall_towers.yaml data.path=data/ml-small-cold
"""

import sys

from llmrec_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "towers", *sys.argv[1:]]))
