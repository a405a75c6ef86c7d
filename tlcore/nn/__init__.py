"""nn.Modules that hold parameters and call tlcore.ops."""
from tlcore.nn.blocks import FusedResidualBlock
from tlcore.nn.conv import FusedConv2dBNReLU, StockConv2d
from tlcore.nn.int8 import (DequantizeOutput, FloatFallback, Int8Conv2d, Int8GlobalAvgPool, Int8Linear,
                            Int8MaxPool2d, Int8ResidualBlock, QuantizeInput)

__all__ = ["DequantizeOutput", "FloatFallback", "FusedConv2dBNReLU", "FusedResidualBlock", "Int8Conv2d",
           "Int8GlobalAvgPool", "Int8Linear", "Int8MaxPool2d", "Int8ResidualBlock", "QuantizeInput", "StockConv2d"]
