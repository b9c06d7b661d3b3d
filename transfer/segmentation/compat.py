"""MMSegmentation 1.2 / mmengine 0.10 / mmcv-lite 2.1 on today's torch. Importing this applies every workaround.

Only the segmentation transfer code imports it (``transfer.segmentation`` does on import); the
pretraining library never does. Each workaround says why it is needed and is a no-op where the
problem is absent (a full mmcv build with compiled ops, an older torch).
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import torch

_MISSING_OP_REASON = (
    "is a compiled mmcv op, and this mmcv (mmcv-lite) has no compiled ops (mmcv._ext). FCN with "
    "type='ResNet' never calls one; models that do need a full mmcv build (pip install mmcv==2.1.0 "
    "from source, or OpenMMLab's CUDA wheels)."
)


def _missing_op(name: str):
    """A stand-in for compiled op ``name`` that imports fine and fails with a clear message on use."""

    def _raise(*args, **kwargs):
        raise RuntimeError(f"mmcv.ops.{name} {_MISSING_OP_REASON}")

    _raise.__name__ = name
    return _raise


def _install_mmcv_ops_placeholder() -> None:
    # mmseg imports mmcv.ops unconditionally (focal_loss: sigmoid_focal_loss; utils: point_sample),
    # and mmcv.ops' own __init__ loads mmcv._ext, which mmcv-lite lacks: without this, `import mmseg.models`
    # fails. point_sample is pure Python in mmcv, so the real one is served; anything else is a stub
    # that raises on use (losses and mIoU are identical to a full mmcv build, see docs DESIGN.md).
    if "mmcv.ops" in sys.modules or importlib.util.find_spec("mmcv._ext") is not None:
        return
    import mmcv

    ops_dir = Path(mmcv.__file__).parent / "ops"
    placeholder = types.ModuleType("mmcv.ops", "Placeholder for mmcv.ops without compiled ops (transfer.segmentation.compat).")
    placeholder.__path__ = [str(ops_dir)]  # lets `import mmcv.ops.point_sample` load the pure-Python file
    placeholder.__file__ = str(ops_dir / "__init__.py")
    sys.modules["mmcv.ops"] = placeholder
    mmcv.ops = placeholder  # type: ignore[attr-defined]
    from mmcv.ops.point_sample import point_sample  # pure Python: F.grid_sample

    placeholder.point_sample = point_sample  # type: ignore[attr-defined]

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing_op(name)

    placeholder.__getattr__ = __getattr__  # type: ignore[attr-defined]


def _allow_mmengine_checkpoints_under_weights_only() -> None:
    # torch >= 2.6 loads with weights_only=True by default, and mmengine's own checkpoints (resume,
    # load_from, --eval-only) hold its MessageHub's HistoryBuffers, numpy arrays/scalars and the
    # scheduler's Counter. Allow-listing exactly those types keeps weights_only's safety instead of
    # turning it off for every file.
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # older torch: weights_only was not the default, nothing to do
        return
    import collections

    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    safe: list = [HistoryBuffer, collections.Counter, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    add(safe)

    # HistoryBuffer.__getstate__ also pickles its statistics functions (min/max/mean/current), as
    # getattr(HistoryBuffer, name): allowing builtins.getattr would void weights_only. Those functions
    # live in a class-level registry that is rebuilt on import (__setstate__ re-adds the defaults),
    # so checkpoints are written without them.
    if not getattr(HistoryBuffer, "_objcentric_weights_only_state", False):
        def __getstate__(self) -> dict:
            return {k: v for k, v in self.__dict__.items() if k != "statistics_methods"}

        HistoryBuffer.__getstate__ = __getstate__
        HistoryBuffer._objcentric_weights_only_state = True


def _load_local_checkpoints_weights_only() -> None:
    # mmengine 0.10's local loader (the Pretrained init, load_from, resume) calls torch.load without
    # weights_only, i.e. plain unpickling under torch < 2.6, so a crafted file would run code. Its
    # replacement reads through the project's one safe reader (weights_only plus the types allowed above).
    from mmengine.runner.checkpoint import CheckpointLoader

    from transfer.checkpoint_io import read_checkpoint

    def load_from_local_weights_only(filename, map_location):  # "load_from_" prefix: mmengine logs the rest
        return read_checkpoint(Path(filename).expanduser(), map_location)

    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local_weights_only, force=True)


def _cpu_process_groups() -> None:
    # mmengine's torchrun path calls torch.cuda.set_device(LOCAL_RANK) unconditionally, which fails on a
    # machine without GPUs; multi-process CPU runs (gloo: CI, laptops) then only need the process group.
    import mmengine.dist.utils as dist_utils

    original = dist_utils._init_dist_pytorch
    if getattr(original, "_objcentric_cpu", False):
        return

    def _init_dist_pytorch(backend, init_backend="torch", **kwargs):
        if torch.cuda.is_available() or init_backend != "torch":
            return original(backend, init_backend=init_backend, **kwargs)
        torch.distributed.init_process_group(backend=backend, **kwargs)

    _init_dist_pytorch._objcentric_cpu = True  # type: ignore[attr-defined]
    dist_utils._init_dist_pytorch = _init_dist_pytorch


def _quiet_expected_mmcv_lite_warning() -> None:
    # mmcv.cnn's transformer bricks warn on import that MultiScaleDeformableAttention (a compiled op)
    # is unavailable: expected with mmcv-lite and irrelevant to FCN; the op still fails loudly on use.
    warnings.filterwarnings("ignore", message="Fail to import ``MultiScaleDeformableAttention``")


def apply() -> None:
    """Apply every workaround (idempotent)."""
    _quiet_expected_mmcv_lite_warning()
    _install_mmcv_ops_placeholder()
    _allow_mmengine_checkpoints_under_weights_only()
    _load_local_checkpoints_weights_only()
    _cpu_process_groups()


apply()
