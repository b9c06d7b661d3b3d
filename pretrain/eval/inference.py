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

from transfer.checkpoint_io import (CheckpointError, check_finite, describe_key_shape_diff, infer_arch,
                                   read_checkpoint, verify_resnet_state)
from transfer.official_slotcon import (is_official_checkpoint, official_args, official_method_state,
                                       official_model_config, official_summary, official_teacher_encoder)

from .datasets import collate


def default_device() -> torch.device:
    """CUDA when present, else CPU (one code path, chosen by device)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CheckpointRefused(CheckpointError, KeyError):
    """A checkpoint the evaluation cannot use; the message names the file and the reason.

    Also a ``KeyError``, which is what the loader raised for a file that is no full training checkpoint.
    """

    __str__ = BaseException.__str__  # KeyError's would quote the message


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
    model_cfg = ModelConfig(**section)
    # The rules load_config applies: a value of the wrong type or range is named, not met deep in a constructor.
    from ..methods.config import model_problems

    broken = next(iter(model_problems(model_cfg)), None)
    if broken is not None:
        raise KeyError(f"checkpoint {broken.message()}")
    return model_cfg


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
        raise CheckpointRefused(f"no loadable checkpoint in {path} or {path / 'checkpoints'}")
    raise CheckpointRefused(f"checkpoint {path} not found")


def _own_checkpoint(ckpt: object, path: Path) -> tuple[object, dict, dict]:
    """``(ModelConfig, state dict, config dict)`` of this project's full training checkpoint."""
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointRefused(f"{path} is not a full training checkpoint: needs 'model' and 'config' "
                                f"(an exported backbone has no prototypes to evaluate)")
    cfg = ckpt["config"]
    if not isinstance(cfg, dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointRefused(f"{path}: 'config' and 'model' must be dicts")
    try:
        model_cfg = model_config_from_dict(cfg)
    except (KeyError, TypeError) as e:
        raise CheckpointRefused(f"{path}: {e.args[0] if e.args else e}") from None
    return model_cfg, ckpt["model"], cfg


def _official_checkpoint(ckpt: dict, path: Path) -> tuple[object, dict, dict]:
    """``(ModelConfig, state dict, config dict)`` of an official SlotCon release checkpoint.

    The teacher encoder is verified against torchvision's layout before anything is built, so a
    partial or wrong-depth file is refused with the key that is wrong rather than a load error.
    """
    args = official_args(ckpt)
    if args is None:
        raise CheckpointRefused(f"{path}: official SlotCon checkpoint without 'args' (argparse.Namespace): "
                                f"the network it trained cannot be rebuilt")
    teacher, declared = official_teacher_encoder(ckpt, str(path))
    found = infer_arch(teacher)
    if declared is not None and declared != found:
        raise CheckpointRefused(f"{path}: args.arch is {declared!r} but the teacher encoder's tensors are a {found}")
    verify_resnet_state(teacher, found, str(path))
    model_cfg = official_model_config(args, str(path))
    return model_cfg, official_method_state(ckpt, str(path)), official_summary(ckpt, model_cfg)


def _load_complete(method: nn.Module, state: dict, path: Path, fill_counters: bool) -> None:
    """Load ``state`` strictly, refusing (with the keys named) anything that would stay random or not fit.

    ``fill_counters`` adds BN ``num_batches_tracked`` counters a foreign file may lack: bookkeeping
    that eval-mode BN never reads.
    """
    expected = method.state_dict()
    state = dict(state)
    if fill_counters:
        for k, v in expected.items():
            if k.endswith("num_batches_tracked") and k not in state:
                state[k] = torch.zeros_like(v)
    problems = describe_key_shape_diff(state, {k: tuple(v.shape) for k, v in expected.items()})
    if problems:
        raise CheckpointRefused(f"{path}: weights do not fit the network of its own config: {problems}")
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointRefused(f"{path}: {len(not_tensors)} entries of 'model' are not tensors, e.g. {not_tensors[:5]}")
    try:
        check_finite(state, str(path), "weights")
    except CheckpointError as e:
        raise CheckpointRefused(str(e)) from None
    method.load_state_dict(state, strict=True)


def load_method(checkpoint: str | Path, device: torch.device | None = None, random_init: bool = False,
                seed: int | None = None) -> tuple[nn.Module, dict]:
    """Build the method a checkpoint trained and load its weights.

    ``checkpoint`` may be this project's full training checkpoint, a run directory (newest
    checkpoint), or an official SlotCon release checkpoint (``args`` + ``module.encoder_k.*`` ...,
    see ``transfer/official_slotcon.py``), which becomes this project's SlotCon with the official
    teacher (and student) weights. ``random_init=True`` builds the *same* network from the
    checkpoint's config but keeps its random initialisation: the untrained baseline of the demo,
    whose ``assign`` uses random prototypes. Its seed defaults to the run's ``train.seed`` (an
    official run's ``args.seed``), which (as the trainer seeds before building) reproduces the
    weights the run started from. Returns ``(method in eval mode, config dict)``.

    Raises CheckpointRefused (a ``CheckpointError`` and ``KeyError``) naming the file and the reason:
    unreadable (truncated, or a pickle naming a global beyond ``read_checkpoint``'s allowlist: refused
    before it runs), no prototypes to evaluate, a config the rules refuse, weights that do not fill the
    network exactly, or non-finite weights (named, with their count).
    """
    from ..methods import build_method

    path = resolve_checkpoint(checkpoint)
    try:
        ckpt = read_checkpoint(path)
        official = is_official_checkpoint(ckpt)
        model_cfg, state, cfg = (_official_checkpoint if official else _own_checkpoint)(ckpt, path)
    except CheckpointRefused:
        raise
    except CheckpointError as e:
        raise CheckpointRefused(str(e)) from None
    if seed is None:
        train = cfg.get("train")
        seed = train.get("seed", 0) if isinstance(train, dict) else 0
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise CheckpointRefused(f"{path}: config train.seed is {seed!r}, not an integer")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        method = build_method(model_cfg)
    except (ValueError, TypeError, KeyError) as e:  # a config with a wrong value or type for a field
        raise CheckpointRefused(f"{path}: cannot build the network of its config: {e}") from None
    if not random_init:
        _load_complete(method, state, path, fill_counters=official)
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
    """``method.assign`` on a batch moved to ``device``; returns float32 ``(B,K,h,w)``.

    Raises CheckpointRefused when the assignments hold NaN or Inf (finite weights can compute them).
    """
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_for(device, amp):
        a = method.assign(images)
    if a.dim() != 4 or a.shape[0] != images.shape[0]:
        raise ValueError(f"method.assign returned shape {tuple(a.shape)}; expected (B,K,h,w) with B={images.shape[0]}")
    bad = int((~torch.isfinite(a)).sum())
    if bad:
        # argmax over NaN picks an arbitrary group, so every score computed from it would look plausible.
        raise CheckpointRefused(f"the network's assignments hold {bad} non-finite values (NaN/Inf) of {a.numel()} "
                                f"on a batch of {a.shape[0]} images: its weights do not give a usable network "
                                "(e.g. a negative BN running_var)")
    return a.float()


def iterate_batches(loader: DataLoader, desc: str, progress: bool = True) -> Iterator[dict]:
    """Batches with a tqdm bar (a person watches long evaluations)."""
    from tqdm import tqdm

    yield from tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True)
