"""Host-to-device copies that neither stall the host nor race the buffer they read from."""
from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``; on CUDA without a host synchronisation.

    On CUDA ``t`` is first copied into pinned memory from PyTorch's caching host allocator and sent
    from there with a non-blocking copy: the host never waits, and ``t``'s own memory is not read
    after this returns, so its owner may overwrite it at once (FFCV's ring of batch buffers). The
    allocator keeps the pinned block until the copy has completed. On the CPU ``t`` itself comes
    back (no copy).
    """
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


__all__ = ["upload"]
