"""Losses: pure functions of tensors (grouping self-distillation, slot InfoNCE, gathers)."""
from .gather import all_reduce_sum, concat_all_gather, get_rank, get_world_size
from .grouping import assignment_entropy, inverse_augment, self_distillation_loss, updated_center
from .slot_contrast import active_mask, slot_contrastive_loss, slot_infonce

__all__ = [
    "all_reduce_sum",
    "concat_all_gather",
    "get_rank",
    "get_world_size",
    "assignment_entropy",
    "inverse_augment",
    "self_distillation_loss",
    "updated_center",
    "active_mask",
    "slot_contrastive_loss",
    "slot_infonce",
]
