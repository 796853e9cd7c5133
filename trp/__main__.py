"""``python -m trp``: the same command as ``trp`` (and what ``torchrun -m trp`` starts)."""

import sys

from trp.cli import main

if __name__ == "__main__":
    sys.exit(main())
