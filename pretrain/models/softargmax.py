"""Soft-argmax attention pooling (Sauvalle & de La Fortelle; paper 002, Sec. 4, Eq. 11-16).

Each slot k owns a scalar attention-logit map ``A_k`` (a 1x1 convolution of the features). A
softmax over *pixels* makes it a spatial distribution (Eq. 11); its centre of mass on the grid
normalised to ``[-1, 1]`` (Eq. 12-13) is the slot's position (soft-argmax, Eq. 14-15); the same
weights pool the feature map into the slot vector (Eq. 16).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grouping import GroupingModule, GroupingOutput, pixel_slot_cosine
from .registry import register_grouping

if TYPE_CHECKING:
    from ..methods.config import ModelConfig


def spatial_softmax(logits: Tensor) -> Tensor:
    """Eq. 11: softmax of ``(B, K, h, w)`` logits over the ``h * w`` pixels of each map (float32)."""
    return logits.float().flatten(2).softmax(dim=-1).view(logits.shape)


def pixel_grid(h: int, w: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Eq. 12-13: ``x`` of each column and ``y`` of each row in ``[-1, 1]`` (0 for a size-1 axis)."""
    xs = torch.linspace(-1.0, 1.0, w, device=device) if w > 1 else torch.zeros(1, device=device)
    ys = torch.linspace(-1.0, 1.0, h, device=device) if h > 1 else torch.zeros(1, device=device)
    return xs, ys


def expected_coordinates(maps: Tensor) -> Tensor:
    """Eq. 14-15: centre of mass ``(x, y)`` of normalised maps ``(B, K, h, w) -> (B, K, 2)``.

    ``x`` runs along the width (columns), ``y`` along the height (rows), both in ``[-1, 1]``.
    """
    h, w = maps.shape[-2:]
    xs, ys = pixel_grid(h, w, maps.device)
    x = (maps.sum(dim=-2) * xs).sum(dim=-1)  # marginal over rows, weighted by column position
    y = (maps.sum(dim=-1) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


def soft_argmax(logits: Tensor) -> Tensor:
    """Eq. 10/14-15: differentiable argmax coordinates ``(B, K, 2)`` of ``(B, K, h, w)`` logit maps."""
    return expected_coordinates(spatial_softmax(logits))


class SoftArgmaxPooling(GroupingModule):
    """K spatial attention maps -> K slots (Eq. 16) and their coordinates (Eq. 14-15).

    ``dim_slot`` defaults to ``dim_in``, pooling the feature map Φ itself as in Eq. 16; a different
    size adds a 1x1 value projection. The per-pixel assignment over slots (the common interface)
    is the softmax over K of the same logits ``A_k``.
    """

    def __init__(self, dim_in: int, num_slots: int, dim_slot: int | None = None) -> None:
        super().__init__()
        self.num_slots, self.dim_in = num_slots, dim_in
        self.dim_slot = dim_slot or dim_in
        self.attn = nn.Conv2d(dim_in, num_slots, kernel_size=1)
        self.value = nn.Identity() if self.dim_slot == dim_in else nn.Conv2d(dim_in, self.dim_slot, kernel_size=1)

    def forward(self, feats: Tensor, noise: Tensor | None = None) -> GroupingOutput:
        """``feats (B, D, h, w)`` -> slots ``(B, K, D')`` with coordinates ``(B, K, 2)``."""
        self.check_input(feats)
        values = self.value(feats)
        # float32 logits, pooling and coordinates: the logits are per-pixel similarities to K
        # learnt vectors (a 1x1 convolution, like SlotCon's prototype similarity) that a softmax
        # over pixels sharpens; autocast would compute both products in half precision.
        with torch.autocast(feats.device.type, enabled=False):
            logits = F.conv2d(feats.float(), self.attn.weight.float(), self.attn.bias.float())
            maps = spatial_softmax(logits)  # Eq. 11
            values = values.float()
            slots = torch.einsum("bkhw,bdhw->bkd", maps, values)  # Eq. 16
        hw = tuple(feats.shape[-2:])
        return GroupingOutput(
            slots=slots,
            assign=logits.softmax(dim=1),
            logits=logits,
            similarity=pixel_slot_cosine(values.flatten(2).transpose(1, 2), slots, hw),
            coords=expected_coordinates(maps),  # Eq. 14-15
        )


@register_grouping("softargmax")
def build_softargmax(cfg: ModelConfig, dim: int) -> SoftArgmaxPooling:
    """``model.grouping: softargmax`` (paper 002): ``model.num_prototypes`` attention maps pooling the
    ``dim``-channel features (Eq. 16)."""
    return SoftArgmaxPooling(dim, cfg.num_prototypes)


__all__ = ["SoftArgmaxPooling", "spatial_softmax", "expected_coordinates", "soft_argmax", "pixel_grid",
           "build_softargmax"]
