"""The FFCV GPU photometric path without host synchronisations, equal to the previous one.

``apply_photometric`` used to read the device back about 40 times a batch (``int(mask.sum())``,
boolean indexing, constants built from Python lists). Now the selections are made on the host and
uploaded once. Checks:

- bit-exact equality with the previous implementation (kept below verbatim as ``old_*``) for the
  same images and parameters, batches with all, some and no samples selected per op, and the PIL
  path's batches of one;
- the whole path runs on the ``meta`` device, whose tensors hold no data: any read of a device
  value on the host (``.item()``, ``bool()``, boolean-mask indexing, ``nonzero``) raises there, so
  this is the CPU's stand-in for ``torch.cuda.set_sync_debug_mode("error")`` (which the GPU check,
  ``tools/gpu_check.py``, runs on a GPU). The previous implementation fails it.
"""
from __future__ import annotations

import pytest
import torch

from pretrain.data.photometric import (IMAGENET_MEAN, IMAGENET_STD, _color_op, _gaussian_blur, _gray, apply_photometric,
                                      normalize, sample_photometric)

KW = dict(color_jitter=[0.4, 0.4, 0.2, 0.1], color_jitter_p=0.8, grayscale_p=0.2)


# ---- the previous implementation's selection and application, verbatim (names prefixed old_); ------
# the per-op kernels are unchanged and taken from the module.
def old_where_apply(x: torch.Tensor, sel: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """``fn`` on the selected samples only; no gather/scatter when all or none are selected
    (always the case for the PIL path's batches of one)."""
    n = int(sel.sum())
    if n == 0:
        return x
    if n == x.shape[0]:
        return fn(x, *args)
    x = x.clone()
    x[sel] = fn(x[sel], *(a[sel] for a in args))
    return x


def old_apply_photometric(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the sampled augmentations to ``x`` (float ``(B,3,S,S)`` in [0, 1]); returns [0, 1]."""
    p = {k: v.to(x.device, non_blocking=True) for k, v in p.items()}
    jit = p["jitter"]
    if bool(jit.any()):
        for step in range(4):
            for op in range(4):
                sel = jit & (p["order"][:, step] == op)
                x = old_where_apply(x, sel, lambda t, f, op=op: _color_op(t, op, f), p["factors"][:, op])
    x = old_where_apply(x, p["gray"], lambda t: _gray(t).expand(-1, 3, -1, -1).contiguous())
    x = old_where_apply(x, p["blur"], _gaussian_blur, p["sigma"])
    if bool(p["solarize"].any()):
        sel = p["solarize"].view(-1, 1, 1, 1)
        x = torch.where(sel & (x >= 128 / 255), 1.0 - x, x)
    return x


def old_normalize(x: torch.Tensor) -> torch.Tensor:
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---- tests ------------------------------------------------------------------------------------------
def _images(b: int, s: int, seed: int) -> torch.Tensor:
    x = torch.randint(0, 256, (b, 3, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return x.float().div_(255.0)  # as two_view.finish_views prepares FFCV's uint8 crops


CASES = [  # (batch, side, view, blur_p, solarize_p, jitter_p, gray_p, seed)
    (16, 32, 0, 1.0, 0.0, 0.8, 0.2, 0),  # view 1: blur everywhere (the "all selected" path)
    (16, 32, 1, 0.1, 0.2, 0.8, 0.2, 1),  # view 2: few blurred, some solarised
    (9, 40, 1, 0.5, 1.0, 1.0, 0.0, 2),  # jitter and solarisation everywhere, no grey
    (7, 24, 0, 0.0, 0.0, 0.0, 0.0, 3),  # nothing at all: the input comes back
    (1, 32, 0, 1.0, 0.0, 0.8, 0.2, 4),  # the PIL path's batches of one
    (1, 32, 1, 0.1, 0.2, 0.8, 0.2, 5),
    (64, 24, 1, 0.5, 0.5, 0.8, 0.5, 6),
]


@pytest.mark.parametrize(("b", "s", "view", "blur_p", "sol_p", "jit_p", "gray_p", "seed"), CASES)
def test_equal_to_the_previous_implementation(b, s, view, blur_p, sol_p, jit_p, gray_p, seed) -> None:
    for epoch in range(3):
        p = sample_photometric(seed, epoch, range(100 * seed, 100 * seed + b), view, color_jitter=KW["color_jitter"],
                               color_jitter_p=jit_p, grayscale_p=gray_p, blur_p=blur_p, solarize_p=sol_p)
        x = _images(b, s, seed * 10 + epoch)
        want = old_normalize(old_apply_photometric(x.clone(), p))
        got = normalize(apply_photometric(x.clone(), p))
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), (epoch, (got - want).abs().max())


def test_some_selected_cases_really_occur() -> None:
    """The premise of the equality test: across its cases, every op is applied to some but not all
    samples of a batch at least once (the gather/scatter path)."""
    partial = set()
    for b, _s, view, blur_p, sol_p, jit_p, gray_p, seed in CASES:
        for epoch in range(3):
            p = sample_photometric(seed, epoch, range(100 * seed, 100 * seed + b), view,
                                   color_jitter=KW["color_jitter"], color_jitter_p=jit_p, grayscale_p=gray_p,
                                   blur_p=blur_p, solarize_p=sol_p)
            partial |= {key for key in ("jitter", "gray", "blur", "solarize") if 0 < int(p[key].sum()) < b}
    assert partial == {"jitter", "gray", "blur", "solarize"}


def test_runs_on_a_device_whose_values_the_host_cannot_read() -> None:
    p = sample_photometric(0, 0, range(16), 1, blur_p=0.5, solarize_p=0.5, **KW)
    x = torch.empty(16, 3, 32, 32, device="meta")
    out = normalize(apply_photometric(x, p))
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.float32
    with pytest.raises((NotImplementedError, RuntimeError)):  # the old path reads the device back
        old_normalize(old_apply_photometric(x, p))
