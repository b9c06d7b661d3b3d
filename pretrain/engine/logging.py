"""Run logging: plain-text log file, TensorBoard scalars/images and a tqdm bar (rank 0 only)."""
from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("pretrain")


class _TqdmStream(logging.StreamHandler):
    """Writes through ``tqdm.write`` so log lines do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_text_log(run_dir: Path | None, is_main: bool) -> None:
    """``pretrain`` logger to stderr and ``run_dir/log.txt`` (rank 0; other ranks: warnings only)."""
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = _TqdmStream(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if is_main and run_dir is not None:
        fh = logging.FileHandler(run_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA max allocated on GPU, max RSS of this process on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class TBWriter:
    """Thin TensorBoard wrapper that is a no-op where disabled (non-zero ranks, ``log.tensorboard=false``)."""

    def __init__(self, logdir: Path | None) -> None:
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "train/") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(prefix + k, v, step)

    def images(self, tag: str, images: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_images(tag, images.float().cpu(), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def slot_picture(method: torch.nn.Module, batch: dict, n: int) -> Tensor:
    """Both views of ``n`` samples side by side with the teacher's slot assignment overlaid.

    Runs ``method.assign`` in eval mode so the picture has no side effect on BN statistics.
    Returns ``(2n, 3, S, S)`` in ``[0,1]``: view1 rows then view2 rows.
    """
    from pretrain.eval.visualize import overlay_assignments

    was_training = method.training
    method.eval()
    try:
        out = []
        with torch.no_grad():
            for key in ("view1", "view2"):
                images = batch[key][:n]
                out.append(overlay_assignments(images, method.assign(images)))
    finally:
        method.train(was_training)
    return torch.cat(out)


__all__ = ["setup_text_log", "memory_mb", "TBWriter", "slot_picture"]
