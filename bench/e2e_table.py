"""The end-to-end table; same as ``python -m fastattn bench --e2e [options]``.

Usage: python bench/e2e_table.py [--quick] [--rounds N] [--threads N]
"""

import sys

from fastattn.bench import cli

if __name__ == "__main__":
    sys.exit(cli.main(["--e2e", *sys.argv[1:]]))
