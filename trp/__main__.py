"""``python -m trp``: the same command as ``trp`` (and what ``torchrun -m trp`` starts)."""

import sys

from trp.cli import main

sys.exit(main())
