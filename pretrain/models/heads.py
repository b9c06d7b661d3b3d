"""MLP heads of SlotCon: projector g (dense, 1x1 convs) and predictor q (on slots).

Architecture as in DINO's head used by SlotCon (Sec. 4.1, "Network architecture"):
in -> hidden, BN, GELU, hidden -> hidden, BN, GELU, hidden -> out. Weights truncated-normal
(std 0.02), biases zero, no normalisation of the last layer.
"""
from __future__ import annotations

from torch import Tensor, nn


def _init_(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _MLP(nn.Module):
    """Three-layer MLP; ``dense=True`` uses 1x1 convolutions and BatchNorm2d on (B,C,H,W) maps."""

    def __init__(self, dim_in: int, dim_hidden: int = 4096, dim_out: int = 256, *, dense: bool) -> None:
        super().__init__()
        if dense:
            lin = lambda i, o: nn.Conv2d(i, o, kernel_size=1)  # noqa: E731
            bn = nn.BatchNorm2d
        else:
            lin, bn = nn.Linear, nn.BatchNorm1d
        self.mlp = nn.Sequential(
            lin(dim_in, dim_hidden), bn(dim_hidden), nn.GELU(),
            lin(dim_hidden, dim_hidden), bn(dim_hidden), nn.GELU(),
            lin(dim_hidden, dim_out),
        )
        self.dim_in, self.dim_hidden, self.dim_out = dim_in, dim_hidden, dim_out
        self.apply(_init_)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.mlp(x)


class Projector(_MLP):
    """Dense projector g (SlotCon Sec. 3.1): ``(B, C, H, W) -> (B, dim_out, H, W)``."""

    def __init__(self, dim_in: int, dim_hidden: int = 4096, dim_out: int = 256) -> None:
        super().__init__(dim_in, dim_hidden, dim_out, dense=True)


class Predictor(_MLP):
    """Slot predictor q (SlotCon Eq. 6): ``(N, dim_in) -> (N, dim_out)``."""

    def __init__(self, dim_in: int, dim_hidden: int = 4096, dim_out: int = 256) -> None:
        super().__init__(dim_in, dim_hidden, dim_out, dense=False)


__all__ = ["Projector", "Predictor"]
