"""``python -m transfer.segmentation``: see ``transfer.segmentation.train``."""
import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
