"""Benchmark: time lost to one injected worker failure, and checkpoint size/time per epoch
(see llmrec_dist/faults.py).

    python jobs/bench_fault_recovery.py --config configs/ml1m_sasrec.yaml data.path=data/ml-1m train.epochs=3
"""

import sys

from llmrec_dist.faults import main

if __name__ == "__main__":
    sys.exit(main())
