"""nn.Modules that hold parameters and call tlcore.ops."""
from tlcore.nn.blocks import FusedResidualBlock
from tlcore.nn.conv import FusedConv2dBNReLU, StockConv2d

__all__ = ["FusedConv2dBNReLU", "FusedResidualBlock", "StockConv2d"]
