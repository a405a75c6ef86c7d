"""tlcore's kernels as PyTorch custom ops (`torch.ops.tlcore.*`).

Each op chooses its backend (tlcore.backend) and has a fake implementation, so
torch.compile and torch.export trace through it.
"""
from tlcore.ops.conv import conv2d_bn_relu, conv_unsupported_reason

__all__ = ["conv2d_bn_relu", "conv_unsupported_reason"]
