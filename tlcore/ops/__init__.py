"""tlcore's kernels as PyTorch custom ops (`torch.ops.tlcore.*`).

Each op chooses its backend (tlcore.backend) and has a fake implementation, so
torch.compile and torch.export trace through it.
"""
from tlcore.ops.conv import conv2d_bn_relu, conv_unsupported_reason
from tlcore.ops.int8 import int8_conv2d, pack_weight_cpu, requantization
from tlcore.ops.int8_layers import dequantize_per_tensor, int8_max_pool2d, quantize_input, quantize_per_tensor
from tlcore.ops.optim import sr_adamw_, sr_sgd_

__all__ = ["conv2d_bn_relu", "conv_unsupported_reason", "dequantize_per_tensor", "int8_conv2d", "int8_max_pool2d",
           "pack_weight_cpu", "quantize_input", "quantize_per_tensor", "requantization", "sr_adamw_", "sr_sgd_"]
