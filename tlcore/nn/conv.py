"""Modules that run conv + BatchNorm (+ residual) (+ ReLU) through `tlcore.ops.conv2d_bn_relu`."""
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from tlcore.ops import conv2d_bn_relu, conv_unsupported_reason
from tlcore.ops.conv import output_size


TRAIN_MODE_ERROR = ("tlcore fused modules are inference-only (BatchNorm is folded with its running statistics); "
                    "call .eval() on the model, or train the stock model and fuse again")


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (its detection backbones' BN): fixed running statistics,
    weight and bias as buffers, the eval-mode BatchNorm2d formula."""
    kind = type(module)
    return kind.__name__ == "FrozenBatchNorm2d" and kind.__module__ == "torchvision.ops.misc"


def _foldable_batchnorm(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm) or is_frozen_batchnorm(module)


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """conv's padding as an (h, w) pair, or None when it cannot be one ('same' with an even kernel)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        spans = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(span % 2 for span in spans):
            return None  # needs asymmetric padding
        return (spans[0] // 2, spans[1] // 2)
    return tuple(conv.padding)


def folding_unsupported_reason(conv: nn.Module, bn: nn.Module) -> str:
    """Why bn cannot be folded into conv, whatever kernel then runs the conv ('' if it can)."""
    # Subclasses may override forward; StockConv2d (a conv fuse left stock) only adds a repr.
    if type(conv) not in (nn.Conv2d, StockConv2d):
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if not _foldable_batchnorm(bn):
        folded_already = " (folded into the conv already, as torch.ao's fuse_modules does?)" if isinstance(
            bn, nn.Identity) else ""
        return f"{type(bn).__name__} is not a BatchNorm2d (nor torchvision's FrozenBatchNorm2d){folded_already}"
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm without running statistics (track_running_stats=False) cannot be folded"
    if bn.running_mean.numel() != conv.out_channels:
        return f"BatchNorm has {bn.running_mean.numel()} features for {conv.out_channels} conv channels"
    if explicit_padding(conv) is None:
        return "padding='same' with an even kernel needs asymmetric padding"
    return ""


def fusion_unsupported_reason(conv: nn.Module, bn: nn.Module) -> str:
    """Why conv followed by bn cannot become a FusedConv2dBNReLU ('' if it can)."""
    return folding_unsupported_reason(conv, bn) or conv_unsupported_reason(
        groups=conv.groups, padding_mode=conv.padding_mode, dtype=conv.weight.dtype, transposed=conv.transposed)


class FusedConv2dBNReLU(nn.Module):
    """conv2d → BatchNorm2d (eval statistics, folded) → [+ residual] → [ReLU] as one kernel.

    forward(x: (N, C, H, W), residual: (N, K, OH, OW) or None) -> (N, K, OH, OW), channels_last.

    The conv weight keeps the model's dtype and is stored channels_last; the BN is
    folded in fp32 into a per-channel `scale` and `shift` applied to the fp32
    accumulator, so folding adds no rounding to the low-precision weights.
    Inference only: the module raises in train mode. Casting the module (model.half()
    after fusing) casts `scale` and `shift` too, rounding the folded BN: cast, then fuse.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, relu: bool,
                 residual: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.relu, self.residual = relu, residual
        weight = torch.empty(out_channels, in_channels, *self.kernel_size, device=device, dtype=dtype)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.register_buffer("scale", torch.ones(out_channels, device=device, dtype=torch.float32))
        self.register_buffer("shift", torch.zeros(out_channels, device=device, dtype=torch.float32))

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool, residual: bool = False):
        """Fold `bn`'s running statistics (in fp32) into a fused copy of `conv`."""
        reason = fusion_unsupported_reason(conv, bn)
        if reason:
            raise ValueError(f"cannot fuse {conv} with {bn}: {reason}")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv),
                    conv.dilation, relu, residual, device=conv.weight.device, dtype=conv.weight.dtype)
        k = conv.out_channels
        with torch.no_grad():
            # Folding a unit (K,1,1,1) weight yields the per-channel scale and the shift.
            unit = torch.ones(k, 1, 1, 1, device=conv.weight.device, dtype=torch.float32)
            bias = conv.bias.float() if conv.bias is not None else None
            scale, shift = fuse_conv_bn_weights(unit, bias, bn.running_mean.float(), bn.running_var.float(),
                                                bn.eps, _float_or_none(bn.weight), _float_or_none(bn.bias))
            fused.scale.copy_(scale.view(k))
            fused.shift.copy_(shift)
            fused.weight.copy_(conv.weight)
        return fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            raise RuntimeError(TRAIN_MODE_ERROR)
        if residual is not None and not self._fits(x, residual):
            # A generic graph may add something broadcastable instead of a same-shape residual.
            y = self._conv(x, None, relu=False) + residual
            return torch.relu(y) if self.relu else y
        return self._conv(x, residual, self.relu)

    def _conv(self, x, residual, relu):
        # .float() is free when the buffers are fp32; model.half() after fusing would have cast them.
        return conv2d_bn_relu(x, self.weight, self.scale.float(), self.shift.float(), stride=self.stride,
                              padding=self.padding, dilation=self.dilation, residual=residual, relu=relu)

    def _fits(self, x, residual) -> bool:
        """Whether residual is the (N, K, OH, OW) tensor of x's dtype the fused epilogue adds."""
        out_hw = [output_size(size, k, st, p, d) for size, k, st, p, d in
                  zip(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)]
        return residual.dtype == x.dtype and tuple(residual.shape) == (x.shape[0], self.out_channels, *out_hw)

    def extra_repr(self) -> str:
        epilogue = "bn" + (" + residual" if self.residual else "") + (" + relu" if self.relu else "")
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, fused: conv + {epilogue}")


def _float_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class StockConv2d(nn.Conv2d):
    """An nn.Conv2d that `tlcore.fuse` left stock; it only adds the reason to the module's repr."""

    tlcore_reason = ""

    def extra_repr(self) -> str:
        return super().extra_repr() + f", left stock: {self.tlcore_reason}"


def mark_stock(conv: nn.Module, reason: str) -> None:
    """Record on a plain nn.Conv2d (in place) why it was not fused, so print(model) shows it."""
    if type(conv) is nn.Conv2d:
        conv.__class__ = StockConv2d  # same parameters, forward and state_dict keys
    if isinstance(conv, StockConv2d):
        conv.tlcore_reason = reason
