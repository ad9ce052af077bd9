"""Benchmark: the item-tower x freezing-strategy matrix (see llmrec_dist/benchmarks.py).

    python jobs/bench_item_towers.py --config configs/mlsmall_towers.yaml data.path=data/ml-small-cold
"""

import sys

from llmrec_dist.benchmarks import main

if __name__ == "__main__":
    sys.exit(main())
