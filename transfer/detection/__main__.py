"""``python -m transfer.detection``: see transfer/detection/train.py."""
import sys

from transfer.detection.train import main

if __name__ == "__main__":
    sys.exit(main())
