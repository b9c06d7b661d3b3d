"""BYOL photometric augmentations of one uint8 image on the CPU, with OpenCV.

The same operations, order and parameters (``sample_photometric``) as the batched torch
implementation in pretrain/data/photometric.py, which runs on the GPU; tests check that the two
agree to float precision. Why a second implementation: on the CPU, torch spends ~15 ms per
224 px image on these ops (many small un-fused kernels, fresh 600 kB buffers each), OpenCV's
SIMD kernels working in place ~1 ms (bench/loader.md). Every call releases the GIL, so a thread
pool scales over cores (the FFCV path) and so do DataLoader worker processes (the PIL path).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from .photometric import IMAGENET_MEAN, IMAGENET_STD

# normalisation per channel plane: y = x / std - mean / std
_SCALE = [1.0 / s for s in IMAGENET_STD]
_SHIFT = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]


def params_numpy(p: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``sample_photometric``'s tensors as numpy arrays (read per sample without torch overhead)."""
    return {k: v.numpy() for k, v in p.items()}


def _clip01(x: np.ndarray) -> None:
    cv2.threshold(x, 1.0, 1.0, cv2.THRESH_TRUNC, dst=x)
    cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO, dst=x)


def _gray3(x: np.ndarray) -> np.ndarray:
    # OpenCV's RGB2GRAY weights are the ITU-R 601 ones torchvision uses (0.299, 0.587, 0.114)
    return cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _color_op(x: np.ndarray, op: int, f: float) -> np.ndarray:
    if op == 0:  # brightness
        np.multiply(x, np.float32(f), out=x)
    elif op == 1:  # contrast: blend with the mean grey level
        m = cv2.mean(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY))[0]
        cv2.addWeighted(x, f, x, 0.0, (1.0 - f) * m, dst=x)
    elif op == 2:  # saturation: blend with the grey image
        cv2.addWeighted(x, f, _gray3(x), 1.0 - f, 0.0, dst=x)
    else:  # hue: OpenCV's float HSV has H in degrees; its HSV2RGB wraps H >= 360 but not H < 0
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        cv2.add(hsv, ((f % 1.0) * 360.0, 0.0, 0.0, 0.0), dst=hsv)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=x)
    _clip01(x)
    return x


def _blur_kernel(side: int, sigma: float) -> np.ndarray:
    """photometric._gaussian_blur's kernel (10% of the side, odd), without its taps below 1e-12 of
    the centre: at small sigma they are float32 denormals, which made OpenCV's blur 3x slower, and
    dropping them changes no output by more than 1e-11."""
    k = max(3, int(0.1 * side) // 2 * 2 + 1)
    r = np.arange(k) - k // 2
    ker = np.exp(-(r ** 2) / (2.0 * sigma ** 2))
    ker = ker / ker.sum()
    return ker[ker >= 1e-12 * ker.max()].astype(np.float32)  # symmetric, so still centred


def augment_image(img: np.ndarray, p: dict[str, np.ndarray], i: int, out: np.ndarray | None = None) -> np.ndarray:
    """Augment and normalise one image with the ``i``-th sample's parameters of ``p``
    (``params_numpy(sample_photometric(...))``).

    ``img``: uint8 ``(S, S, 3)`` RGB; ``out``: optional C-contiguous float32 ``(3, S, S)``
    destination (e.g. one sample of a batch). Returns the normalised float32 ``(3, S, S)`` image.
    """
    x = np.multiply(img, np.float32(1.0 / 255.0), dtype=np.float32)
    if p["jitter"][i]:
        for op in p["order"][i]:
            x = _color_op(x, int(op), float(p["factors"][i, op]))
    if p["gray"][i]:
        x = _gray3(x)
    if p["blur"][i]:
        ker = _blur_kernel(x.shape[1], float(p["sigma"][i]))
        # BORDER_REFLECT_101 is torch's "reflect" padding
        x = cv2.sepFilter2D(x, -1, ker, ker, borderType=cv2.BORDER_REFLECT_101)
    if p["solarize"][i]:
        flat = x.reshape(x.shape[0], -1)
        mask = cv2.compare(flat, 128.0 / 255.0, cv2.CMP_GE)
        cv2.copyTo(cv2.subtract(1.0, flat), mask, flat)
    if out is None:
        out = np.empty((3,) + x.shape[:2], np.float32)
    planes = [out[c] for c in range(3)]
    cv2.split(x, planes)  # writes into the planes: each is a contiguous float32 (S, S) like the source's
    for c in range(3):
        cv2.addWeighted(planes[c], _SCALE[c], planes[c], 0.0, _SHIFT[c], dst=planes[c])
    return out
