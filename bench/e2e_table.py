"""The end-to-end table; same as ``python -m fastattn bench --e2e [options]``.

Usage: python bench/e2e_table.py [--quick] [--rounds N] [--threads N]
"""

import sys

from fastattn import _bench

if __name__ == "__main__":
    sys.exit(_bench.main(["--e2e", *sys.argv[1:]]))
