"""Typed configuration of a pretraining method (the ``model:`` section of a pretrain YAML)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    method: str = "slotcon"  # slotcon | objglobal (issue 9)
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50
    grouping: str = "prototypes"  # prototypes | slot_attention | qsa | softargmax (issue 9)
    num_prototypes: int = 256  # K: 256 for COCO(+), 2048 for ImageNet (SlotCon Sec. 4.1)
    dim_hidden: int = 4096
    dim_out: int = 256
    teacher_momentum: float = 0.99  # lambda_t, cosine-scheduled to 1
    tau_s: float = 0.1  # student temperature
    tau_t: float = 0.07  # teacher temperature
    center_momentum: float = 0.9  # lambda_c
    tau_c: float = 0.2  # slot contrastive temperature
    lambda_g: float = 0.5  # weight of the grouping loss (Eq. 8)
    zero_init_residual: bool = False  # torchvision option: zero the last BN gamma of each block
    stem_pool: bool = True  # False: no stem max-pool (output stride 16) for the CPU demo's small images
    last_stride: int = 2  # 1: layer4 keeps layer3's resolution (output stride 8 with stem_pool false)
    pool_eps: float = 1e-6  # added to the assignment softmax before pooling (Eq. 4, recipe)
    # Object-centric family (issue 9): grouping modules and the object/global method (paper 000).
    # The number of slots is num_prototypes (SlotCon's K) for every grouping module.
    slot_iters: int = 3  # Slot Attention iterations T (paper 003); BO-QSA: T detached + 1 (paper 001)
    slot_eps: float = 1e-8  # attention offset before the weighted mean (paper 003, Table 10a)
    slot_pos_embed: bool = True  # soft position embedding of the feature grid (paper 003, Sec. 5.2)
    object_loss: str = "ctr_img"  # ctr_all | ctr_img | cossim (paper 000, Eq. 2-3)
    tau_obj: float = 0.1  # temperature of the object loss (Eq. 2)
    tau_global: float = 0.1  # temperature of the global loss (Eq. 1)
    lambda_obj: float = 1.0  # weight of the object loss
    lambda_global: float = 1.0  # weight of the global loss
