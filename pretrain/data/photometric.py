"""BYOL photometric augmentations (SlotCon Sec. 4.1), batched over per-sample parameters.

One implementation for both loader paths: the PIL path calls it on each sample in its worker
(batch of one), the FFCV path on whole uint8 batches on the GPU. Parameters are drawn per sample
from ``(seed, epoch, index, view)`` only, so a batch is reproducible without replaying others.

Recipe (BYOL, Grill et al. 2020, Table 6): colour jitter (brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1) in random order with p 0.8; grayscale p 0.2; Gaussian blur with
sigma in [0.1, 2.0] and a kernel of 10% of the image side, p 1.0 / 0.1 for views 1 / 2;
solarisation at 128/255 with p 0.0 / 0.2; then ImageNet normalisation.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)


def sample_photometric(seed: int, epoch: int, indices: Sequence[int], view: int, *,
                       color_jitter: Sequence[float], color_jitter_p: float, grayscale_p: float,
                       blur_p: float, solarize_p: float) -> dict[str, torch.Tensor]:
    """Per-sample photometric parameters for ``view`` (0 or 1) of the samples ``indices``."""
    b, c, s, h = color_jitter
    rows = []
    for idx in indices:
        rng = np.random.default_rng([int(seed), int(epoch), int(idx), 1000 + int(view)])
        u = rng.random(4)
        rows.append(np.concatenate([
            [u[0] < color_jitter_p],
            [rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
             rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h)],
            rng.permutation(4),
            [u[1] < grayscale_p, u[2] < blur_p, rng.uniform(0.1, 2.0), u[3] < solarize_p],
        ]))
    p = torch.as_tensor(np.asarray(rows, dtype=np.float64).reshape(len(rows), 13), dtype=torch.float32)
    return {
        "jitter": p[:, 0] > 0.5, "factors": p[:, 1:5], "order": p[:, 5:9].long(),
        "gray": p[:, 9] > 0.5, "blur": p[:, 10] > 0.5, "sigma": p[:, 11], "solarize": p[:, 12] > 0.5,
    }


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample) via RGB -> HSV -> RGB."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dd = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / dd, (maxc - g) / dd, (maxc - b) / dd
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB without branches: channel n = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    h6 = (hue * 6.0).unsqueeze(1)
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (n + h6) % 6.0
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _color_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    fv = f.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * fv).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level
        m = _gray(x).mean((1, 2, 3), keepdim=True)
        return (fv * x + (1 - fv) * m).clamp(0, 1)
    if op == 2:  # saturation: blend with the grey image
        return (fv * x + (1 - fv) * _gray(x)).clamp(0, 1)
    return _adjust_hue(x, f)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (grouped convolution, reflect padding)."""
    size = x.shape[-1]
    k = max(3, int(0.1 * size) // 2 * 2 + 1)  # 10% of the side, odd (23 at 224)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    ker = torch.exp(-(r[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # (B, k)
    bsz, ch, h, w = x.shape
    wk = ker.repeat_interleave(ch, 0)  # (B*C, k)
    y = x.reshape(1, bsz * ch, h, w)
    pad = k // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), wk[:, None, None, :], groups=bsz * ch)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), wk[:, None, :, None], groups=bsz * ch)
    return y.reshape(bsz, ch, h, w)


def _where_apply(x: torch.Tensor, sel: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
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


def apply_photometric(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the sampled augmentations to ``x`` (float ``(B,3,S,S)`` in [0, 1]); returns [0, 1]."""
    p = {k: v.to(x.device, non_blocking=True) for k, v in p.items()}
    jit = p["jitter"]
    if bool(jit.any()):
        for step in range(4):
            for op in range(4):
                sel = jit & (p["order"][:, step] == op)
                x = _where_apply(x, sel, lambda t, f, op=op: _color_op(t, op, f), p["factors"][:, op])
    x = _where_apply(x, p["gray"], lambda t: _gray(t).expand(-1, 3, -1, -1).contiguous())
    x = _where_apply(x, p["blur"], _gaussian_blur, p["sigma"])
    if bool(p["solarize"].any()):
        sel = p["solarize"].view(-1, 1, 1, 1)
        x = torch.where(sel & (x >= 128 / 255), 1.0 - x, x)
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a [0, 1] batch."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
