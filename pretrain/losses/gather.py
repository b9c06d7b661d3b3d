"""Cross-rank collectives used by the losses; no-ops in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """Whether a default process group with more than zero ranks is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


@torch.no_grad()
def concat_all_gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order, without gradient.

    Used for teacher tensors only (they carry no gradient). Every rank must pass the same shape.
    Bool tensors travel as uint8 (gloo has no bool all_gather).
    """
    if get_world_size() == 1:
        return t
    is_bool = t.dtype == torch.bool
    src = t.to(torch.uint8) if is_bool else t
    src = src.contiguous()
    out = [torch.empty_like(src) for _ in range(get_world_size())]
    dist.all_gather(out, src)
    res = torch.cat(out, dim=0)
    return res.bool() if is_bool else res


@torch.no_grad()
def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` is unchanged)."""
    out = t.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out)
    return out


__all__ = ["is_dist", "get_rank", "get_world_size", "concat_all_gather", "all_reduce_sum"]
