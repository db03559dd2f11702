"""The side-by-side benchmark table; same as ``python -m fastattn bench [options]``.

Usage: python bench/run_table.py [--quick] [--cases a,b] [--rounds N] [--threads N]
                                 [--json FILE] [--plot FILE.png] [--markdown]
"""

import sys

from fastattn.bench import cli

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
