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

from .device_copy import upload

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)
_HSV_N = (5.0, 3.0, 1.0)


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


def _const(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor of ``like``'s dtype and device without a host-to-device copy.

    ``like.new_tensor(values)`` is a blocking copy (a host synchronisation) on an accelerator;
    ``torch.full`` writes each value with a kernel instead, rounded exactly as ``new_tensor`` does.
    """
    if like.device.type == "cpu":
        return like.new_tensor(values)
    return torch.stack([torch.full((), float(v), dtype=like.dtype, device=like.device) for v in values])


def _gray(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Luma ``(B,1,H,W)``; ``w`` the three weights on ``x``'s device (made here when omitted)."""
    w = _const(_GRAY, x) if w is None else w
    return (x * w.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample) via RGB -> HSV -> RGB.

    ``n``: the constants ``(5, 3, 1)`` of the HSV -> RGB formula on ``x``'s device (made here when omitted).
    """
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
    n = (_const(_HSV_N, x) if n is None else n).view(1, 3, 1, 1)
    k = (n + h6) % 6.0
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _color_op(x: torch.Tensor, op: int, f: torch.Tensor, consts: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Colour-jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factors ``f``.

    ``consts``: ``{"gray": (3,), "hsv_n": (3,)}`` on ``x``'s device (made per call when omitted).
    """
    consts = consts or {}
    fv = f.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * fv).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level
        m = _gray(x, consts.get("gray")).mean((1, 2, 3), keepdim=True)
        return (fv * x + (1 - fv) * m).clamp(0, 1)
    if op == 2:  # saturation: blend with the grey image
        return (fv * x + (1 - fv) * _gray(x, consts.get("gray"))).clamp(0, 1)
    return _adjust_hue(x, f, consts.get("hsv_n"))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (grouped convolution, reflect padding)."""
    size = x.shape[-1]
    k = max(3, int(0.1 * size) // 2 * 2 + 1)  # 10% of the side, odd (23 at 224)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    ker = torch.exp(-(r[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # (B, k)
    bsz, ch, h, w = x.shape
    # each sample's kernel once per channel; repeat_interleave may read its output size back to the host
    wk = ker[:, None, :].expand(bsz, ch, k).reshape(bsz * ch, k)  # (B*C, k)
    y = x.reshape(1, bsz * ch, h, w)
    pad = k // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), wk[:, None, None, :], groups=bsz * ch)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), wk[:, None, :, None], groups=bsz * ch)
    return y.reshape(bsz, ch, h, w)


def _solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 128 / 255, 1.0 - x, x)


def _plan(p: dict[str, torch.Tensor], bsz: int) -> tuple[list[tuple], torch.Tensor, torch.Tensor]:
    """The augmentation stages of a batch, decided on the host from the host parameters ``p``.

    Returns ``(stages, indices, args)``: each stage is ``(kind, op, (i0, i1) | None, (a0, a1) | None)``,
    the slices of the flat int64 ``indices`` (the selected samples; None: all of them) and of the
    flat float ``args`` (their factors or sigmas) it uses; stages that select no sample are left out.
    """
    jit, order, factors = p["jitter"].bool(), p["order"].long(), p["factors"]
    selections: list[tuple[str, int, torch.Tensor, torch.Tensor | None]] = []
    if bool(jit.any()):
        for step in range(4):
            for op in range(4):
                selections.append(("color", op, jit & (order[:, step] == op), factors[:, op]))
    selections.append(("gray", 0, p["gray"].bool(), None))
    selections.append(("blur", 0, p["blur"].bool(), p["sigma"]))
    selections.append(("solarize", 0, p["solarize"].bool(), None))
    stages, idx_parts, arg_parts = [], [], []
    n_idx = n_arg = 0
    for kind, op, sel, arg in selections:
        n = int(sel.sum())
        if n == 0:
            continue
        idx_span = arg_span = None
        if n < bsz:
            idx = sel.nonzero().squeeze(1)
            idx_parts.append(idx)
            idx_span = (n_idx, n_idx + n)
            n_idx += n
            if arg is not None:
                arg = arg[idx]
        if arg is not None:
            arg_parts.append(arg)
            arg_span = (n_arg, n_arg + arg.numel())
            n_arg += arg.numel()
        stages.append((kind, op, idx_span, arg_span))
    indices = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long)
    args = torch.cat(arg_parts) if arg_parts else factors.new_zeros(0)
    return stages, indices, args


def apply_photometric(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply the sampled augmentations to ``x`` (float ``(B,3,S,S)`` in [0, 1]); returns [0, 1].

    ``p``: the host tensors of :func:`sample_photometric` (tensors on the device are read back
    first, one synchronisation). Which samples each op touches is decided on the host; the selected
    indices and their factors reach ``x``'s device in one non-blocking upload each, and the constants
    are written there by kernels, so on a GPU the whole call never waits for the device. Each op
    runs on the selected samples only (gathered and scattered back by index), or on the whole
    batch when all are selected (always the case for the PIL path's batches of one).
    """
    host = {k: v.detach().cpu() for k, v in p.items()}
    stages, indices, args = _plan(host, x.shape[0])
    if not stages:
        return x
    dev = x.device
    indices, args = upload(indices, dev), upload(args, dev)
    consts = {"gray": _const(_GRAY, x), "hsv_n": _const(_HSV_N, x)}
    for kind, op, idx_span, arg_span in stages:
        arg = None if arg_span is None else args[arg_span[0]:arg_span[1]]
        if kind == "color":
            fn = lambda t, a=arg, op=op: _color_op(t, op, a, consts)  # noqa: E731
        elif kind == "gray":
            fn = lambda t: _gray(t, consts["gray"]).expand(-1, 3, -1, -1).contiguous()  # noqa: E731
        elif kind == "blur":
            fn = lambda t, a=arg: _gaussian_blur(t, a)  # noqa: E731
        else:
            fn = _solarize
        if idx_span is None:
            x = fn(x)
        else:
            idx = indices[idx_span[0]:idx_span[1]]
            x = x.index_copy(0, idx, fn(x.index_select(0, idx)))
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a [0, 1] batch (no host synchronisation on an accelerator)."""
    mean = _const(IMAGENET_MEAN, x).view(1, 3, 1, 1)
    std = _const(IMAGENET_STD, x).view(1, 3, 1, 1)
    return (x - mean) / std
