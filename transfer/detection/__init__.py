"""Detectron2 transfer: converter (convert.py), COCO registration (datasets.py), train/eval entry (train.py).

Importing the package applies the Detectron2 compatibility workarounds first (compat.py): Detectron2 v0.6
evaluates ``PIL.Image.LINEAR`` in default arguments at import time, so the alias must exist before any
``detectron2.data`` import.
"""
from transfer.detection import compat  # noqa: F401
