"""Crop-pair sampling for two-view augmentation, shared by the PIL and FFCV paths.

The sampler is a numba function so that the FFCV decoder can call it inside its jitted,
multi-threaded decode loop, and the PIL path calls the very same function: both paths draw the
same crops and flips for the same ``(seed, epoch, index)`` and image size.

Overlap rule (DESIGN.md, SlotCon recipe): view 2 must overlap view 1 on at least
``min_overlap`` of view 2's area. The published code re-draws 10 times and then falls back to an
unconstrained crop, which may not overlap at all. Here, after 10 free draws, view 2's centre is
drawn inside view 1 (which guarantees a non-empty intersection, and at least a quarter of view 2
whenever view 1 is not smaller than half of view 2 in each side), and if even that fails 10
times, view 2 is view 1's box. So the returned pair always satisfies the rule and always has a
non-empty intersection.

Flips are stored as a code per view: bit 0 a horizontal flip, bit 1 a vertical one (``vflip_p``,
0 by default: natural images have an up; the toy scenes do not, and there a fixed up lets vertical
position survive every augmentation). With ``vflip_p = 0`` the draws are exactly those of a
horizontal-flip-only sampler.
"""
from __future__ import annotations

import numpy as np
from numba import njit

N_PAIR = 10  # i1, j1, h1, w1, flip1, i2, j2, h2, w2, flip2 (flip: bit 0 horizontal, bit 1 vertical)
HFLIP, VFLIP = 1, 2
_TRIES = 10


@njit(cache=True)
def _splitmix64(x: np.uint64) -> np.uint64:
    x = (x + np.uint64(0x9E3779B97F4A7C15))
    z = x
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def sample_key(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 32-bit seed for numba's per-thread generator, a hash of ``(seed, epoch, index, stream)``."""
    h = _splitmix64(np.uint64(seed))
    h = _splitmix64(h ^ np.uint64(epoch))
    h = _splitmix64(h ^ np.uint64(index))
    h = _splitmix64(h ^ np.uint64(stream))
    return np.int64(h & np.uint64(0x7FFFFFFF))


@njit(cache=True)
def _random_resized_crop(height, width, s0, s1, logr0, logr1):
    """torchvision's RandomResizedCrop.get_params (same draws, same centre-crop fallback)."""
    area = height * width
    for _ in range(_TRIES):
        target_area = area * np.random.uniform(s0, s1)
        aspect = np.exp(np.random.uniform(logr0, logr1))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = np.random.randint(0, height - h + 1)
            j = np.random.randint(0, width - w + 1)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < np.exp(logr0):
        w = width
        h = min(height, max(1, int(round(w / np.exp(logr0)))))
    elif in_ratio > np.exp(logr1):
        h = height
        w = min(width, max(1, int(round(h * np.exp(logr1)))))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True)
def _intersection(i1, j1, h1, w1, i2, j2, h2, w2):
    ih = min(i1 + h1, i2 + h2) - max(i1, i2)
    iw = min(j1 + w1, j2 + w2) - max(j1, j2)
    if ih <= 0 or iw <= 0:
        return 0
    return ih * iw


@njit(cache=True)
def _ok(i1, j1, h1, w1, i2, j2, h2, w2, min_overlap):
    inter = _intersection(i1, j1, h1, w1, i2, j2, h2, w2)
    return inter > 0 and inter >= min_overlap * h2 * w2


@njit(cache=True)
def sample_crop_pair(key, height, width, s0, s1, r0, r1, min_overlap, flip_p, vflip_p, out):
    """Draw two crops and flips into ``out`` (int64, length 10) from the generator seeded by ``key``.

    ``out = [i1, j1, h1, w1, flip1, i2, j2, h2, w2, flip2]`` in source pixels (row, column,
    height, width), with view 2 overlapping view 1 on at least ``min_overlap`` of its area; each
    flip is a code (``HFLIP`` with probability ``flip_p``, plus ``VFLIP`` with ``vflip_p``).
    """
    np.random.seed(key)
    logr0, logr1 = np.log(r0), np.log(r1)
    i1, j1, h1, w1 = _random_resized_crop(height, width, s0, s1, logr0, logr1)
    found = False
    i2, j2, h2, w2 = i1, j1, h1, w1
    for _ in range(_TRIES):
        i2, j2, h2, w2 = _random_resized_crop(height, width, s0, s1, logr0, logr1)
        if _ok(i1, j1, h1, w1, i2, j2, h2, w2, min_overlap):
            found = True
            break
    if not found:
        # Constrained draw: keep the sampled size, put the centre inside view 1. Clamping into
        # the image only moves view 2 towards view 1 (which lies inside the image), so the
        # intersection stays non-empty.
        for _ in range(_TRIES):
            _, _, h2, w2 = _random_resized_crop(height, width, s0, s1, logr0, logr1)
            cy = i1 + np.random.uniform(0.0, h1)
            cx = j1 + np.random.uniform(0.0, w1)
            i2 = min(max(int(round(cy - h2 / 2.0)), 0), height - h2)
            j2 = min(max(int(round(cx - w2 / 2.0)), 0), width - w2)
            if _ok(i1, j1, h1, w1, i2, j2, h2, w2, min_overlap):
                found = True
                break
    if not found:
        i2, j2, h2, w2 = i1, j1, h1, w1
    out[0], out[1], out[2], out[3] = i1, j1, h1, w1
    out[4] = 1 if np.random.random() < flip_p else 0
    out[5], out[6], out[7], out[8] = i2, j2, h2, w2
    out[9] = 1 if np.random.random() < flip_p else 0
    if vflip_p > 0.0:  # drawn last, so that vflip_p = 0 leaves every other draw unchanged
        if np.random.random() < vflip_p:
            out[4] += 2
        if np.random.random() < vflip_p:
            out[9] += 2


def intersection_boxes(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ``(x1, y1, x2, y2)`` boxes of the views' intersection in each view's own
    coordinates, after its flips (docs/contracts.md: a horizontal flip mirrors x, a vertical one
    y). Works on one pair ``(10,)`` or a batch
    ``(B, 10)``. Pixel-edge convention: a view of crop ``[j, j + w)`` maps image x to
    ``(x - j) / w``, which is what bicubic/area resizing of that crop and
    ``roi_align(aligned=True)`` both use.
    """
    p = np.asarray(pair, dtype=np.float64)
    i1, j1, h1, w1, f1, i2, j2, h2, w2, f2 = (p[..., k] for k in range(10))
    y1, y2 = np.maximum(i1, i2), np.minimum(i1 + h1, i2 + h2)
    x1, x2 = np.maximum(j1, j2), np.minimum(j1 + w1, j2 + w2)

    def to_view(i, j, h, w, f):
        bx1, bx2 = (x1 - j) / w, (x2 - j) / w
        by1, by2 = (y1 - i) / h, (y2 - i) / h
        code = f.astype(np.int64)
        h_flip, v_flip = (code & HFLIP) > 0, (code & VFLIP) > 0
        bx1, bx2 = np.where(h_flip, 1.0 - bx2, bx1), np.where(h_flip, 1.0 - bx1, bx2)
        by1, by2 = np.where(v_flip, 1.0 - by2, by1), np.where(v_flip, 1.0 - by1, by2)
        return np.stack([bx1, by1, bx2, by2], axis=-1).astype(np.float32)

    return to_view(i1, j1, h1, w1, f1), to_view(i2, j2, h2, w2, f2)
