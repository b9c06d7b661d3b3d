"""Global and object-centric self-supervision (Baldassarre & Azizpour; paper 000) on a ResNet.

Architecture (Sec. 2.1) on the shared SlotCon parts: encoder f (ResNet), dense projector g, then a
grouping module (``model.grouping``: Slot Attention, BO-QSA or soft-argmax pooling) turning the
projected feature map into object tokens ``S = {s_i}``. An object head maps each token to ``p_i``;
the global branch pools the tokens, ``r = avg(S)``, and a global head maps it to ``p^G``.

Losses (Sec. 2.2): the global contrastive loss (Eq. 1) on ``p^G`` and the Hungarian-matched object
loss (Eq. 2 with CTR-ALL / CTR-IMG negatives, or COSSIM, Eq. 3), ``model.object_loss``. As in
SlotCon, the other side of every loss is an EMA teacher (encoder, projector, grouping and heads;
the student adds predictors): the paper's siamese stop-gradient form of Eq. 3 is the teacher
momentum 0 case. The matching ``σ`` pairs the student's tokens of view a with the teacher's tokens
of view ā by the cosine similarity of the tokens ``s`` (Eq. 2), one Hungarian problem per image and
direction. Crop scales (Sec. 2.3) are the data section's ``min_scale`` / ``max_scale``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses.global_contrast import global_contrastive_loss, pool_slots
from ..losses.grouping import assignment_entropy
from ..losses.object_losses import OBJECT_LOSSES, match_slots, object_loss
from ..losses.slot_contrast import active_mask
from ..models.grouping import GroupingOutput
from ..models.heads import Predictor
from .base import TeacherStudentMethod, slot_diagnostics
from .config import ModelConfig
from .registry import build_grouping_output_module, register_method


def _tokens(head: nn.Module, slots: Tensor) -> Tensor:
    """Apply a per-token MLP head to ``(B, S, D)`` slots (BN statistics over the view's B*S tokens)."""
    b, s, _ = slots.shape
    return head(slots.flatten(0, 1)).view(b, s, -1)


class ObjGlobal(TeacherStudentMethod):
    """The object/global method; see docs/contracts.md (Method API).

    ``grouping`` is the module registered as ``model.grouping``; it must return a
    ``GroupingOutput`` (SlotCon's prototypes do not, and are refused). The teacher copies encoder,
    projector, grouping and the two heads (not the predictors).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.object_loss not in OBJECT_LOSSES:
            raise ValueError(f"model.object_loss: unknown object loss {cfg.object_loss!r}; expected one of {OBJECT_LOSSES}")
        super().__init__(cfg)
        d, h = cfg.dim_out, cfg.dim_hidden
        self.grouping = build_grouping_output_module(cfg, d, "objglobal")
        self.object_head = Predictor(d, h, d)  # s_i -> p_i (Sec. 2.1, "Projection heads")
        self.global_head = Predictor(d, h, d)  # r = avg(S) -> p^G
        self.object_predictor = Predictor(d, h, d)
        self.global_predictor = Predictor(d, h, d)
        self.add_teachers("encoder", "projector", "grouping", "object_head", "global_head")

    def _noise(self, b: int, device: torch.device) -> Tensor | None:
        noise = self.grouping.sample_noise(1, device)
        return None if noise is None else noise.expand(b, -1, -1)

    @torch.no_grad()
    def assign(self, images: Tensor) -> Tensor:
        """Teacher per-pixel assignment over slots ``(B, S, h, w)`` float32 (sums to 1 over S).

        A Gaussian-initialised Slot Attention uses a fixed draw (seed 0) so that pictures of the
        same images are reproducible (the mean alone would give identical, inseparable slots).
        """
        noise = self._noise(images.shape[0], images.device)
        if noise is not None:
            g = torch.Generator().manual_seed(0)
            draw = torch.randn(noise.shape[1:], generator=g).to(device=noise.device, dtype=noise.dtype)
            noise = draw.expand_as(noise)
        return self.teacher_grouping(self.teacher_dense(images), noise).assign.float()

    # ---- training step -------------------------------------------------------------------
    def _student(self, view: Tensor, noise: Tensor | None) -> GroupingOutput:
        return self.grouping(self.student_dense(view), noise)

    @torch.no_grad()
    def _teacher(self, view: Tensor, noise: Tensor | None) -> GroupingOutput:
        return self.teacher_grouping(self.teacher_dense(view), noise)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``λ_obj · L^obj + λ_G · L^G`` for one two-view batch, with terms and diagnostics."""
        v1, v2 = self.views(batch)
        cfg = self.cfg
        b = v1.shape[0]
        # One initialisation draw for all four passes: slot k is the same draw everywhere.
        noise = self._noise(b, v1.device)
        # One pass per view and network: BN statistics per view, as in SlotCon.
        s1, s2 = self._student(v1, noise), self._student(v2, noise)
        t1, t2 = self._teacher(v1, noise), self._teacher(v2, noise)

        # Object loss (Eq. 2-3): σ matches student view a to teacher view ā; one CPU trip for all.
        perm = match_slots(torch.cat([s1.slots, s2.slots]).detach(), torch.cat([t2.slots, t1.slots]))
        perm12, perm21 = perm[:b], perm[b:]
        q1 = _tokens(self.object_predictor, _tokens(self.object_head, s1.slots))
        q2 = _tokens(self.object_predictor, _tokens(self.object_head, s2.slots))
        with torch.no_grad():
            k1, k2 = _tokens(self.teacher_object_head, t1.slots), _tokens(self.teacher_object_head, t2.slots)
        loss_obj = object_loss(cfg.object_loss, q1, q2, k1, k2, perm12, perm21, cfg.tau_obj)

        # Global loss (Eq. 1) on the pooled tokens r = avg(S).
        g1 = self.global_predictor(self.global_head(pool_slots(s1.slots)))
        g2 = self.global_predictor(self.global_head(pool_slots(s2.slots)))
        with torch.no_grad():
            kg1 = self.teacher_global_head(pool_slots(t1.slots))
            kg2 = self.teacher_global_head(pool_slots(t2.slots))
        loss_global = global_contrastive_loss(g1, g2, kg1, kg2, cfg.tau_global)

        loss = cfg.lambda_obj * loss_obj + cfg.lambda_global * loss_global
        with torch.no_grad():
            # SlotCon's diagnostics on the teacher's assignment over slots (assign = softmax of logits):
            # active slots (Eq. 5) and the per-pixel entropy.
            assign_t = torch.cat([t1.assign, t2.assign])
            logits_t = torch.cat([t1.logits, t2.logits])
            same_index = (perm == torch.arange(perm.shape[1], device=perm.device)).float().mean()
        return {
            "loss": loss,
            "loss_obj": loss_obj.detach(),
            "loss_global": loss_global.detach(),
            **slot_diagnostics(active_mask(assign_t), b),
            "entropy": assignment_entropy(logits_t, 1.0),
            "match_same_index": same_index,  # fraction of slots matched to the same index in the other view
        }


@register_method("objglobal")
def build_objglobal(cfg: ModelConfig) -> ObjGlobal:
    """Factory registered as ``model.method: objglobal``."""
    return ObjGlobal(cfg)


__all__ = ["ObjGlobal", "build_objglobal"]
