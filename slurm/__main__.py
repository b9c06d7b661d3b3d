"""``python -m slurm``: see :mod:`slurm.cli`."""
import sys

from slurm.cli import main

if __name__ == "__main__":
    sys.exit(main())
