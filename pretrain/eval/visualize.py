"""Pictures of slot/prototype assignments: colour overlays for TensorBoard and PNG files.

Used by the engine's TensorBoard image logging during training, by ``tools/visualize_slots.py``
and by the prototype-retrieval grids (SlotCon Sec. 4.6, Fig. 3).
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# ImageNet normalisation (DESIGN.md, SlotCon recipe): images arrive normalised and are undone here.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(images: Tensor) -> Tensor:
    """Undo ImageNet normalisation: ``(B,3,H,W)`` normalised -> ``(B,3,H,W)`` in ``[0,1]``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0.0, 1.0)


def palette(k: int, device: torch.device | None = None) -> Tensor:
    """``k`` distinct colours ``(k,3)`` in ``[0,1]``.

    Hues advance by the golden ratio so that neighbouring indices (which say nothing about
    similarity) get clearly different colours for any ``k``, including K=256/2048 prototypes.
    """
    golden = 0.618033988749895
    cols = []
    for i in range(k):
        h = (i * golden) % 1.0
        s = 0.65 + 0.35 * ((i // 7) % 2)  # alternate saturation/value so equal hues still differ
        v = 0.95 - 0.25 * ((i // 3) % 2)
        cols.append(colorsys.hsv_to_rgb(h, s, v))
    return torch.tensor(cols, dtype=torch.float32, device=device)


def hard_labels(assign: Tensor, size: tuple[int, int] | None = None, chunk: int = 64) -> Tensor:
    """Per-pixel argmax over the K groups of a soft assignment ``(B,K,h,w)`` -> ``(B,H,W)`` int64.

    The soft map is bilinearly upsampled *before* the argmax (as in SlotCon's unsupervised
    segmentation at 320 px), which gives smoother boundaries than nearest-upsampling labels.
    Groups are upsampled ``chunk`` at a time with a running maximum, so K=2048 prototypes at
    320 px never materialise a ``(B,K,320,320)`` tensor.
    """
    if assign.dim() != 4:
        raise ValueError(f"expected an assignment of shape (B,K,h,w), got {tuple(assign.shape)}")
    a = assign.float()
    if size is None or tuple(a.shape[-2:]) == tuple(size):
        return a.argmax(dim=1)
    best_val = best_idx = None
    for start in range(0, a.shape[1], chunk):
        up = F.interpolate(a[:, start:start + chunk], size=size, mode="bilinear", align_corners=False)
        val, idx = up.max(dim=1)
        idx = idx + start
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val  # strict: ties keep the lower index, as argmax does
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    return best_idx


def colorize(labels: Tensor, k: int) -> Tensor:
    """Label map ``(B,H,W)`` with values in ``[0,k)`` -> colour image ``(B,3,H,W)`` in ``[0,1]``."""
    pal = palette(k, labels.device)
    return pal[labels.long()].permute(0, 3, 1, 2).contiguous()


def overlay_assignments(images: Tensor, assign: Tensor, alpha: float = 0.5,
                        boundaries: bool = True) -> Tensor:
    """Blend each pixel's argmax group colour over the image.

    Args:
        images: ``(B,3,H,W)`` ImageNet-normalised images (the method's input).
        assign: ``(B,K,h,w)`` soft assignment from ``method.assign(images)`` (any ``h,w``).
        alpha: weight of the group colour.
        boundaries: draw group boundaries in white, so adjacent groups with similar colours
            can still be told apart.

    Returns:
        ``(B,3,H,W)`` float tensor in ``[0,1]`` on the images' device (ready for
        ``SummaryWriter.add_images`` or ``torchvision.utils.save_image``).
    """
    if images.shape[0] != assign.shape[0]:
        raise ValueError(f"batch sizes differ: images {images.shape[0]} vs assign {assign.shape[0]}")
    with torch.no_grad():
        img = denormalize(images.detach())
        H, W = img.shape[-2:]
        labels = hard_labels(assign.detach().to(img.device), (H, W))
        col = colorize(labels, assign.shape[1])
        out = (1.0 - alpha) * img + alpha * col
        if boundaries:
            edge = torch.zeros_like(labels, dtype=torch.bool)
            edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
            edge[:, 1:, :] |= labels[:, 1:, :] != labels[:, :-1, :]
            out = torch.where(edge.unsqueeze(1), torch.ones_like(out), out)
        return out.clamp(0.0, 1.0)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write one ``(3,H,W)`` image in ``[0,1]`` (or a batch, as a grid) to ``path`` as PNG."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image.detach().float().cpu(), str(path))
    return path
