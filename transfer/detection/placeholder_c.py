"""Source of the placeholder ``detectron2/_C.py`` that scripts/setup.sh installs.

The registry sdist of Detectron2 v0.6 ships no C++ sources, so ``detectron2._C`` cannot be built.
Mask R-CNN R50-FPN needs none of it (ROIAlign/NMS come from torchvision, COCO evaluation from
pycocotools with ``use_fast_impl=False``); only rotated boxes, deformable convolution and the
fast C++ COCO evaluation do. The placeholder imports fine and raises a clear ImportError on use.

Run as ``python -m transfer.detection.placeholder_c > .../detectron2/_C.py``.
"""

PLACEHOLDER = '''"""Placeholder for Detectron2's compiled extension (written by the project's scripts/setup.sh)."""

IS_PLACEHOLDER = True


# detectron2.utils.collect_env (called by default_setup) reports these; answer instead of failing.
def get_compiler_version():
    return "none (pure-Python Detectron2, placeholder _C)"


def get_cuda_version():
    return "none (pure-Python Detectron2, placeholder _C)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"detectron2._C.{name} is unavailable: this Detectron2 is the pure-Python install made by "
        "scripts/setup.sh (no compiled ops). Rotated boxes, deformable convolution and the fast "
        "COCO evaluator need an official Detectron2 build; Mask R-CNN R50-FPN does not."
    )
'''

if __name__ == "__main__":
    print(PLACEHOLDER, end="")
