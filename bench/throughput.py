"""`moela bench` from a checkout: python bench/throughput.py [--shape bench-1b] [--batches 1 8 32] ..."""

import sys

from moela.bench import main

if __name__ == "__main__":
    sys.exit(main())
