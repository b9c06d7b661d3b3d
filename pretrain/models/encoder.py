"""ResNet encoder f (SlotCon Sec. 3.1): torchvision ResNet without avgpool/fc.

The state-dict keys are exactly torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``), so a
pretrained teacher converts to Detectron2/MMSegmentation by renaming only.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetEncoder(ResNet):
    """torchvision ResNet returning the last feature map ``(B, num_features, H/32, W/32)``."""

    def __init__(self, arch: str = "resnet50", zero_init_residual: bool = False, stem_pool: bool = True,
                 last_stride: int = 2) -> None:
        if arch not in _ARCHS:
            raise ValueError(f"model.arch: unknown architecture {arch!r}; expected one of {sorted(_ARCHS)}")
        block, layers = _ARCHS[arch]
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        self.arch = arch
        self.num_features: int = 512 * block.expansion
        # No classifier: dropping the modules keeps them out of the state dict and the optimiser.
        del self.avgpool
        del self.fc
        if not stem_pool:
            # Output stride 16 instead of 32 for small (toy) images: the max-pool has no parameters, so the
            # state dict and its conversion are unchanged.
            self.maxpool = torch.nn.Identity()
        if last_stride not in (1, 2):
            raise ValueError(f"model.last_stride must be 1 or 2, got {last_stride}")
        if last_stride == 1:
            # Halve the output stride again (the re-identification "last stride" trick): layer4's first
            # block keeps the resolution. Strides carry no parameters, so the keys stay torchvision's.
            for m in self.layer4[0].modules():
                if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2):
                    m.stride = (1, 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build_encoder(arch: str, zero_init_residual: bool = False, stem_pool: bool = True,
                  last_stride: int = 2) -> ResNetEncoder:
    """Build a randomly initialised ResNet-18/34/50 encoder (torchvision initialisation).

    ``stem_pool=False`` drops the stem's max-pool and ``last_stride=1`` keeps layer4 at layer3's
    resolution (each halves the output stride: 8 with both), for the small images of the CPU demo.
    """
    return ResNetEncoder(arch, zero_init_residual=zero_init_residual, stem_pool=stem_pool, last_stride=last_stride)


__all__ = ["ResNetEncoder", "build_encoder"]

if __name__ == "__main__":  # pragma: no cover - quick shape check
    print(build_encoder("resnet18")(torch.zeros(1, 3, 64, 64)).shape)
