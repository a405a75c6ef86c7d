"""Residual blocks whose last conv + BN absorbs the residual add and the final ReLU."""
import torch
from torch import nn

from tlcore.nn.conv import FusedConv2dBNReLU


class FusedResidualBlock(nn.Module):
    """A ResNet BasicBlock/Bottleneck as `last(body(x), residual=downsample(x) or x)`.

    body: the stages before the last conv (fused modules, or stock conv/BN/ReLU where
    a conv could not be fused, e.g. ResNeXt's grouped 3x3); last: the block's final
    conv + BN + residual add + ReLU in one kernel; downsample: None or a module.
    forward(x: (N, C, H, W)) -> (N, K, OH, OW).
    """

    def __init__(self, body: nn.Sequential, last: FusedConv2dBNReLU, downsample: nn.Module | None):
        super().__init__()
        self.body, self.last, self.downsample = body, last, downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.last(self.body(x), identity)
