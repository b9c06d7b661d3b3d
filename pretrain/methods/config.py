"""Typed configuration of a pretraining method (the ``model:`` section of a pretrain YAML).

:data:`MODEL_RULES` and :func:`model_problems` are every rule of the section; ``load_config``
checks them before anything is built (``python -m pretrain`` exits 64 on the first broken one).

The choices of this section (``method``, ``grouping``, ``arch``, ``object_loss``) are plain strings
checked against the tables of the code that builds them (the method and grouping registries, the
encoder's architectures, the object losses), not enums: a ``ModelConfig`` is rebuilt from checkpoint
dicts and written back into checkpoints (``dataclasses.asdict``, the exported backbone's ``arch``),
which must load with ``torch.load(weights_only=True)`` and so may hold no enum members.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pretrain.config_rules import (NON_NEGATIVE, POSITIVE, PROBABILITY, Problem, Rule, at_least, check_fields,
                                   one_of)


@dataclass
class ModelConfig:
    """Encoder, heads, grouping module and losses of a method (SlotCon Sec. 3-4; the object-centric family)."""

    method: str = "slotcon"  # a registered method: slotcon | objglobal
    arch: str = "resnet50"  # resnet18 | resnet34 | resnet50
    grouping: str = "prototypes"  # a registered grouping: prototypes | slot_attention | qsa | softargmax
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
    # Object-centric family: grouping modules and the object/global method (paper 000).
    # The number of slots is num_prototypes (SlotCon's K) for every grouping module.
    slot_iters: int = 3  # Slot Attention iterations T (paper 003); BO-QSA: T detached + 1 (paper 001)
    slot_eps: float = 1e-8  # attention offset before the weighted mean (paper 003, Table 10a)
    slot_pos_embed: bool = True  # soft position embedding of the feature grid (paper 003, Sec. 5.2)
    object_loss: str = "ctr_img"  # ctr_all | ctr_img | cossim (paper 000, Eq. 2-3)
    tau_obj: float = 0.1  # temperature of the object loss (Eq. 2)
    tau_global: float = 0.1  # temperature of the global loss (Eq. 1)
    lambda_obj: float = 1.0  # weight of the object loss
    lambda_global: float = 1.0  # weight of the global loss


# The tables are read when a rule is checked, not at import: the registries fill up as the method
# modules are imported, and those import this module.
def _methods() -> list[str]:
    from pretrain.methods.registry import METHODS  # importing the package registers every method

    return list(METHODS)


def _groupings() -> list[str]:
    from pretrain.methods.registry import GROUPINGS

    return list(GROUPINGS)


def _archs() -> list[str]:
    from pretrain.models.encoder import _ARCHS

    return list(_ARCHS)


def _object_losses() -> list[str]:
    from pretrain.losses.object_losses import OBJECT_LOSSES

    return list(OBJECT_LOSSES)


MODEL_RULES: dict[str, Rule] = {
    "method": one_of(_methods, "the registered methods"),
    "arch": one_of(_archs),
    "grouping": one_of(_groupings, "the registered groupings"),
    "num_prototypes": at_least(1),
    "dim_hidden": at_least(1),
    "dim_out": at_least(1),
    "teacher_momentum": PROBABILITY,
    "tau_s": POSITIVE,
    "tau_t": POSITIVE,
    "center_momentum": PROBABILITY,
    "tau_c": POSITIVE,
    # Eq. 8 mixes the two losses as lambda_g * L_group + (1 - lambda_g) * L_slot: outside [0, 1]
    # one of them gets a negative weight and is maximised.
    "lambda_g": PROBABILITY,
    "last_stride": one_of([1, 2]),
    "pool_eps": POSITIVE,
    "slot_iters": at_least(1),
    "slot_eps": POSITIVE,
    "object_loss": one_of(_object_losses),
    "tau_obj": POSITIVE,
    "tau_global": POSITIVE,
    "lambda_obj": NON_NEGATIVE,
    "lambda_global": NON_NEGATIVE,
}


def model_problems(cfg: ModelConfig) -> Iterator[Problem]:
    """Every broken rule of the ``model`` section: :data:`MODEL_RULES`, then those across fields."""
    yield from check_fields(cfg, "model", MODEL_RULES)
    if cfg.method == "objglobal" and cfg.lambda_obj == 0 and cfg.lambda_global == 0:
        yield Problem("model.lambda_obj", cfg.lambda_obj, "> 0 when model.lambda_global is 0 (nothing would be learnt)")


__all__ = ["ModelConfig", "MODEL_RULES", "model_problems"]
