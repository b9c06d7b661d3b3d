"""Networks: ResNet encoder, MLP heads, grouping modules, EMA teacher.

Importing the package registers every grouping module (``model.grouping``) in
:data:`pretrain.models.registry.GROUPINGS`: each file below registers its own factory.
"""
from . import prototypes, query_slot_attention, slot_attention, softargmax  # noqa: F401  (registration)
from .registry import GROUPINGS, register_grouping

__all__ = ["GROUPINGS", "register_grouping"]
