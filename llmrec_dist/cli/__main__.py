import sys

from llmrec_dist.cli import main

sys.exit(main())
