"""Common interface of the object-centric grouping modules (Slot Attention, BO-QSA, soft-argmax).

A grouping module turns a dense feature map ``(B, D, h, w)`` into ``S`` slots ``(B, S, D')`` and a
per-pixel assignment over those slots ``(B, S, h, w)`` (each pixel's assignment sums to 1 over S),
plus module-specific extras (object coordinates for soft-argmax pooling).

SlotCon's learnable prototypes (``pretrain/models/prototypes.py``) follow the narrower protocol
``z -> (slots, logits)``; ``GroupingOutput.similarity`` is what lets these modules stand in for the
prototypes there (adapter: :class:`SlotConGrouping`, applied by :func:`as_slotcon_grouping`).
The concrete modules import this file for the base class and register themselves by name
(``pretrain/models/registry.py``); this file imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GroupingOutput:
    """What a grouping module returns for one view.

    - ``slots``: ``(B, S, D')`` slot / object vectors.
    - ``assign``: ``(B, S, h, w)`` per-pixel assignment over slots (softmax over S; sums to 1).
    - ``logits``: ``(B, S, h, w)`` the pre-softmax scores behind ``assign``.
    - ``similarity``: ``(B, S, h, w)`` cosine similarity in ``[-1, 1]`` between each pixel and each
      final slot, in the space the module compares them in; it plays the role of SlotCon's
      prototype similarity (SlotCon Eq. 1) when a module replaces the prototypes.
    - ``coords``: ``(B, S, 2)`` object coordinates ``(x, y)`` in ``[-1, 1]`` (soft-argmax), else None.
    """

    slots: Tensor
    assign: Tensor
    logits: Tensor
    similarity: Tensor
    coords: Tensor | None = None


class GroupingModule(nn.Module):
    """Base class: ``forward(feats (B, D, h, w), noise=None) -> GroupingOutput``.

    ``noise`` is the standard-normal draw of modules with a stochastic initialisation (Slot
    Attention). Passing the same draw to the student, the EMA teacher and both views keeps slot
    ``k`` meaning the same thing in all four forward passes, which index-based losses need;
    deterministic modules ignore it.
    """

    num_slots: int
    dim_in: int
    dim_slot: int

    def sample_noise(self, batch_size: int, device: torch.device | None = None) -> Tensor | None:
        """A noise draw for :meth:`forward` (``None`` for deterministic modules)."""
        return None

    def check_input(self, feats: Tensor) -> None:
        """Raise a clear error unless ``feats`` is ``(B, dim_in, h, w)``."""
        if feats.dim() != 4 or feats.shape[1] != self.dim_in:
            raise ValueError(
                f"{type(self).__name__}: expected features (B, {self.dim_in}, h, w), got {tuple(feats.shape)}"
            )

    def forward(self, feats: Tensor, noise: Tensor | None = None) -> GroupingOutput:  # pragma: no cover
        raise NotImplementedError


def pixel_slot_cosine(pixels: Tensor, slots: Tensor, hw: tuple[int, int]) -> Tensor:
    """Cosine similarity of every pixel with every slot: ``(B, N, D), (B, S, D) -> (B, S, h, w)``.

    Computed in float32 (a later softmax at SlotCon's temperatures of 0.07-0.1 amplifies errors).
    """
    # autocast would run the einsum's bmm in half precision despite the .float() casts.
    with torch.autocast(pixels.device.type, enabled=False):
        sim = torch.einsum("bnd,bsd->bsn", F.normalize(pixels.float(), dim=-1), F.normalize(slots.float(), dim=-1))
    return sim.unflatten(2, hw)


class SlotConGrouping(nn.Module):
    """Adapter to SlotCon's grouping protocol ``z (B, D, H, W) -> (slots (B, K, D), logits (B, K, H, W))``.

    The slots of a grouping module replace SlotCon's prototypes as per-image prototypes: the logits
    are the cosine similarities of pixels and final slots (``GroupingOutput.similarity``), bounded
    like SlotCon's Eq. 1 so its temperatures and centring keep their meaning. Index-based losses
    (SlotCon Eq. 6) need slot k to mean the same thing in every pass: BO-QSA's queries give that;
    Slot Attention's Gaussian draw is shared by the student's and the teacher's adapters with
    :func:`resample_shared_noise`, called once per step by the method (until then a draw made at
    the first pass is reused).
    """

    def __init__(self, module: GroupingModule) -> None:
        super().__init__()
        self.module = module
        self.num_prototypes, self.dim = module.num_slots, module.dim_in
        self._noise: Tensor | None = None

    def set_noise(self, noise: Tensor | None) -> None:
        """Use ``noise`` (``(B, K, D)`` or ``(1, K, D)``) for the following passes."""
        self._noise = noise

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        b = z.shape[0]
        noise = self._noise
        if noise is None:
            noise = self.module.sample_noise(1, z.device)
            self._noise = noise
        if noise is not None:
            noise = noise.to(z.device).expand(b, -1, -1)
        out = self.module(z, noise)
        return out.slots.float(), out.similarity


def as_slotcon_grouping(module: nn.Module) -> nn.Module:
    """``module`` in SlotCon's protocol ``z -> (slots, logits)``: a :class:`GroupingModule` gets the
    :class:`SlotConGrouping` adapter; any other module (SlotCon's prototypes) already has it."""
    return SlotConGrouping(module) if isinstance(module, GroupingModule) else module


@torch.no_grad()
def resample_shared_noise(*groupings: nn.Module) -> None:
    """Draw one initialisation noise and give it to every :class:`SlotConGrouping` among ``groupings``
    (student and EMA teacher), so that slot k is the same draw in all passes of a step.

    A no-op for other modules (SlotCon's prototypes) and for deterministic ones (BO-QSA).
    """
    adapters = [g for g in groupings if isinstance(g, SlotConGrouping)]
    if not adapters:
        return
    ref = adapters[0].module
    param = next(ref.parameters(), None)
    noise = ref.sample_noise(1, None if param is None else param.device)
    for a in adapters:
        a.set_noise(noise)


__all__ = [
    "GroupingOutput", "GroupingModule", "pixel_slot_cosine", "SlotConGrouping", "as_slotcon_grouping",
    "resample_shared_noise",
]
