"""Detectron2 v0.6 on today's Pillow / numpy / torch. Importing this module applies every workaround.

Only the transfer code imports it; the pretraining library never does.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# Detectron2 v0.6's transforms use PIL.Image.LINEAR, removed in Pillow 10 (it was an alias of BILINEAR).
if not hasattr(Image, "LINEAR"):
    Image.LINEAR = Image.BILINEAR  # type: ignore[attr-defined]

# SemSegEvaluator and a few data utilities use np.int / np.float / np.bool, removed in numpy 1.24.
for _name, _type in (("int", int), ("float", float), ("bool", bool)):
    if _name not in np.__dict__:
        setattr(np, _name, _type)
