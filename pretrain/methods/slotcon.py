"""SlotCon (Wen et al., NeurIPS 2022): semantic grouping + slot contrast, Eq. 1-8.

Student: encoder f_θ, projector g_θ, prototypes S_θ, predictor q_θ. Teacher: EMA copies
f_ξ, g_ξ, S_ξ (no predictor). Published-recipe details (DESIGN.md) are noted where they apply.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses.gather import concat_all_gather
from ..losses.grouping import assignment_entropy, inverse_augment, self_distillation_loss, updated_center
from ..losses.slot_contrast import active_mask, slot_contrastive_loss
from ..models.grouping import as_slotcon_grouping, resample_shared_noise
from ..models.heads import Predictor
from .base import TeacherStudentMethod, slot_diagnostics
from .config import ModelConfig
from .registry import build_grouping, register_method


def _swap_views(x: Tensor, b: int) -> Tensor:
    """``[view1; view2] -> [view2; view1]`` along dim 0 (pairs each view with the other one)."""
    return torch.cat([x[b:], x[:b]], dim=0)


class SlotCon(TeacherStudentMethod):
    """SlotCon method module; see docs/contracts.md (Method API).

    ``prototypes`` is the grouping module registered as ``model.grouping``: SlotCon's own
    prototypes, or any ``GroupingModule`` behind the ``SlotConGrouping`` adapter. The teacher
    copies encoder, projector and prototypes (not the predictor).
    """

    batch_keys = ("view1", "view2", "box1", "box2", "flip1", "flip2")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.prototypes = as_slotcon_grouping(build_grouping(cfg, cfg.dim_out))
        self.predictor = Predictor(cfg.dim_out, cfg.dim_hidden, cfg.dim_out)
        self.add_teachers("encoder", "projector", "prototypes")
        # Mean teacher logit c of Eq. 3; a buffer so it is checkpointed and moves with .to().
        self.register_buffer("center", torch.zeros(cfg.num_prototypes))

    @torch.no_grad()
    def assign(self, images: Tensor) -> Tensor:
        """Teacher soft assignment ``softmax(z̄_ξ · S̄_ξᵀ / τt)`` over K, ``(B, K, h, w)`` float32 (Eq. 4's A_ξ)."""
        _, logits = self.teacher_prototypes(self.teacher_dense(images))
        return torch.softmax(logits.float() / self.cfg.tau_t, dim=1)

    # ---- training step -------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Overall loss of Eq. 8 plus its terms and diagnostics for one two-view batch."""
        v1, v2 = self.views(batch)
        cfg = self.cfg
        b = v1.shape[0]
        dev = v1.device
        boxes = torch.cat([batch["box1"], batch["box2"]]).to(dev, non_blocking=True)
        flips = torch.cat([batch["flip1"], batch["flip2"]]).to(dev, non_blocking=True)

        if self.training:  # a stochastic grouping module (Slot Attention) draws one init per step
            resample_shared_noise(self.prototypes, self.teacher_prototypes)
        # One pass per view through each network: BN statistics are per view (recipe). Grouping,
        # alignment and losses have no BN, so both views are concatenated from there on.
        z = torch.cat([self.student_dense(v1), self.student_dense(v2)])
        with torch.no_grad():
            zt = torch.cat([self.teacher_dense(v1), self.teacher_dense(v2)])
            slots_t, logits_t = self.teacher_prototypes(zt)
        slots_s, logits_s = self.prototypes(z)

        # Semantic grouping, Eq. 1-2: student view l against teacher view l', both directions.
        # The recipe aligns the similarity maps (logits) and applies the softmaxes afterwards.
        center = self.center.detach().clone()  # the centre from before this step (recipe)
        aligned_s = inverse_augment(logits_s, boxes, flips)
        with torch.no_grad():
            aligned_t = _swap_views(inverse_augment(logits_t, boxes, flips), b)
        # Eq. 2 sums the two directions; each is a mean over B*h*w pixels of equal count.
        loss_group = 2.0 * self_distillation_loss(aligned_s, aligned_t, center, cfg.tau_s, cfg.tau_t)
        if self.training:
            # Eq. 3, after the grouping loss: both views, all (unaligned) pixels, all ranks.
            self.center.copy_(updated_center(center, logits_t, cfg.center_momentum))

        # Slot contrast, Eq. 5-7.
        mask_s, mask_t = active_mask(logits_s), active_mask(logits_t)
        k, d = slots_t.shape[1:]
        # One gather for both views: (world, 2, B, K, D), rank-major.
        t_all = concat_all_gather(slots_t).view(-1, 2, b, k, d)
        m_all = concat_all_gather(mask_t).view(-1, 2, b, k)
        loss_slot = slot_contrastive_loss(
            slots_s[:b], slots_t[b:], mask_s[:b], mask_t[b:], self.predictor, cfg.tau_c,
            gathered=(t_all[:, 1].reshape(-1, d), m_all[:, 1].reshape(-1)),
        ) + slot_contrastive_loss(
            slots_s[b:], slots_t[:b], mask_s[b:], mask_t[:b], self.predictor, cfg.tau_c,
            gathered=(t_all[:, 0].reshape(-1, d), m_all[:, 0].reshape(-1)),
        )

        loss = cfg.lambda_g * loss_group + (1.0 - cfg.lambda_g) * loss_slot  # Eq. 8
        return {
            "loss": loss,
            "loss_group": loss_group.detach(),
            "loss_slot": loss_slot.detach(),
            **slot_diagnostics(mask_t, b),
            "entropy": assignment_entropy(logits_t, cfg.tau_t, center),
        }


@register_method("slotcon")
def build_slotcon(cfg: ModelConfig) -> SlotCon:
    """Factory registered as ``model.method: slotcon``."""
    return SlotCon(cfg)


__all__ = ["SlotCon", "build_slotcon"]
