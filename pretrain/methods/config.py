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
    pool_eps: float = 1e-6  # added to the assignment softmax before pooling (Eq. 4, recipe)
