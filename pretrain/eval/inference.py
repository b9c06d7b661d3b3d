"""Shared plumbing of the evaluations: load a method from a checkpoint, batch a dataset, and run
the teacher's ``assign`` (docs/contracts.md, Method API) on the right device."""
from __future__ import annotations

import dataclasses
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .datasets import collate


def default_device() -> torch.device:
    """CUDA when present, else CPU (one code path, chosen by device)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_config_from_dict(cfg: dict):
    """``ModelConfig`` from a checkpoint's ``config["model"]``; unknown keys are an error naming them."""
    from ..methods import ModelConfig

    if "model" not in cfg:
        raise KeyError("checkpoint config has no 'model' section (docs/contracts.md, Checkpoints)")
    section = dict(cfg["model"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise KeyError(f"checkpoint config keys model.{unknown} are unknown to ModelConfig "
                       f"(valid: {sorted(known)})")
    return ModelConfig(**section)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest good one in a run directory / its ``checkpoints/`` folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        from ..engine.checkpoint import find_latest

        for d in (path / "checkpoints", path):
            found = find_latest(d)
            if found is not None:
                return found[0]
        raise FileNotFoundError(f"no loadable checkpoint in {path} or {path / 'checkpoints'}")
    raise FileNotFoundError(f"checkpoint {path} not found")


def load_method(checkpoint: str | Path, device: torch.device | None = None, random_init: bool = False,
                seed: int | None = None) -> tuple[nn.Module, dict]:
    """Build the method named in a full training checkpoint and load its weights.

    ``checkpoint`` may be a file or a run directory (newest checkpoint). ``random_init=True``
    builds the *same* network from the checkpoint's config but keeps its random initialisation:
    the untrained baseline of the demo, whose ``assign`` uses random prototypes. Its seed defaults
    to the run's ``train.seed``, which (as the trainer seeds before building) reproduces the
    weights the run started from. Returns ``(method in eval mode, config dict)``.
    """
    from ..methods import build_method

    path = resolve_checkpoint(checkpoint)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise KeyError(f"{path} is not a full training checkpoint: needs 'model' and 'config' "
                       f"(an exported backbone has no prototypes to evaluate)")
    cfg = ckpt["config"]
    if seed is None:
        seed = int(cfg.get("train", {}).get("seed", 0))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    method = build_method(model_config_from_dict(cfg))
    if not random_init:
        try:
            method.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"{path}: weights do not fit the network of its own config: {e}") from None
    device = device or default_device()
    method = method.to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    method.eval()
    return method, cfg


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, device: torch.device | None = None
                ) -> DataLoader:
    """Ordered loader (evaluation order is the dataset order) with pinned memory on CUDA."""
    pin = device is not None and device.type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin, persistent_workers=False)


def autocast_for(device: torch.device, amp: bool):
    """fp16 autocast on CUDA when ``amp``; a no-op context on CPU (where float32 is faster)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def assign_batch(method: nn.Module, images: Tensor, device: torch.device, amp: bool = True) -> Tensor:
    """``method.assign`` on a batch moved to ``device``; returns float32 ``(B,K,h,w)``."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_for(device, amp):
        a = method.assign(images)
    if a.dim() != 4 or a.shape[0] != images.shape[0]:
        raise ValueError(f"method.assign returned shape {tuple(a.shape)}; expected (B,K,h,w) with B={images.shape[0]}")
    return a.float()


def iterate_batches(loader: DataLoader, desc: str, progress: bool = True) -> Iterator[dict]:
    """Batches with a tqdm bar (a person watches long evaluations)."""
    from tqdm import tqdm

    yield from tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True)
