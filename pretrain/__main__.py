"""``python -m pretrain CONFIG.yaml [key=value ...]``; see :mod:`pretrain.train` for exit codes."""
import sys

from pretrain.train import main

if __name__ == "__main__":
    sys.exit(main())
