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


def _patch_placeholder_c() -> None:
    """Give an older placeholder ``detectron2/_C`` the three informational functions it lacked.

    ``default_setup`` -> ``collect_env_info`` calls them; an official build has them compiled, and
    a placeholder written by the current scripts/setup.sh defines them (transfer/detection/placeholder_c.py).
    """
    try:
        import detectron2._C as c_ext
    except ImportError:  # Detectron2 not installed: the converter still works without it
        return
    doc = getattr(c_ext, "__doc__", "") or ""
    if getattr(c_ext, "__file__", "").endswith(".py") and doc.startswith("Placeholder for Detectron2"):
        info = "none (pure-Python Detectron2, placeholder _C)"
        for name, fn in (("get_compiler_version", lambda: info), ("get_cuda_version", lambda: info),
                         ("has_cuda", lambda: False)):
            if name not in vars(c_ext):
                setattr(c_ext, name, fn)


_patch_placeholder_c()
