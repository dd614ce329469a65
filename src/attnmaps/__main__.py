"""``python -m attnmaps``, e.g. ``torchrun --nproc_per_node=8 -m attnmaps train ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
