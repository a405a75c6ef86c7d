"""`torch.ops.tlcore.conv2d_bn_relu`: conv2d + folded BatchNorm (+ residual) (+ ReLU) in one kernel."""
from typing import Optional, Sequence  # typing forms: torch.library's schema inference reads them on torch 2.6

import torch
import torch.nn.functional as F
from torch.library import triton_op

from tlcore import backend
from tlcore.ops.eager import skips_dispatcher

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OP = "conv2d_bn_relu"


def int_pair(value, name: str, op: str) -> list[int]:
    """An (h, w) conv or pool argument as a list of two ints (an int applies to both); op names the op
    in the error."""
    if isinstance(value, str):
        raise ValueError(f"tlcore.ops.{op}: {name}={value!r} is not supported; pass explicit integers")
    pair = (value, value) if isinstance(value, int) else value
    if not isinstance(pair, Sequence) or len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"tlcore.ops.{op}: {name} must be an int or a pair of ints, got {value!r}")
    return list(pair)


def conv_unsupported_reason(*, groups: int, padding_mode: str, dtype: torch.dtype, transposed: bool = False) -> str:
    """Why a conv of this configuration cannot run as conv2d_bn_relu ('' if it can)."""
    if transposed:
        return "transposed convolution is not supported"
    if groups != 1:
        return f"groups={groups}: only groups=1 is fused"
    if padding_mode != "zeros":
        return f"padding_mode={padding_mode!r}: only zero padding is fused"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported (fp16, bf16, fp32 are)"
    return ""


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Length of a conv's output along one spatial dimension (as torch.nn.Conv2d computes it)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_same_device(where: str, x: torch.Tensor, others: dict) -> None:
    """ValueError unless every tensor of `others` ({name: tensor or None}) is on x's device."""
    elsewhere = [f"{name} on {t.device}" for name, t in others.items() if t is not None and t.device != x.device]
    if elsewhere:
        raise ValueError(f"{where}: x is on {x.device} but {', '.join(elsewhere)}: put them on one device "
                         "(a model's input on the model's device)")


def _check_args(x, weight, scale, shift, residual, stride, padding, dilation) -> tuple[int, int]:
    """Validate the op's arguments with clear errors; return the output (OH, OW)."""
    where = "tlcore.ops.conv2d_bn_relu"
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{where}: x must be (N, C, H, W) and weight (K, C, R, S); "
                         f"got x of rank {x.dim()} and weight of rank {weight.dim()}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: x has dtype {x.dtype}; supported are fp16, bf16, fp32")
    if weight.dtype != x.dtype:
        raise TypeError(f"{where}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    k, c, r, s = weight.shape
    if x.shape[1] != c:
        raise ValueError(f"{where}: x has {x.shape[1]} channels but weight expects {c} "
                         "(grouped convolutions are not supported)")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (k,) or t.dtype != torch.float32:
            raise ValueError(f"{where}: {name} must be fp32 of shape ({k},), got {t.dtype} {tuple(t.shape)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{where}: need stride >= 1, dilation >= 1, padding >= 0; "
                         f"got stride={stride}, padding={padding}, dilation={dilation}")
    oh = output_size(x.shape[2], r, stride[0], padding[0], dilation[0])
    ow = output_size(x.shape[3], s, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"{where}: input {tuple(x.shape[2:])} is smaller than the (dilated) kernel "
                         f"{(r, s)} with padding {tuple(padding)}")
    check_same_device(where, x, {"weight": weight, "scale": scale, "shift": shift, "residual": residual})
    if residual is not None:
        expected = (x.shape[0], k, oh, ow)
        if tuple(residual.shape) != expected or residual.dtype != x.dtype:
            raise ValueError(f"{where}: residual must be {x.dtype} of shape {expected}, "
                             f"got {residual.dtype} {tuple(residual.shape)}")
    return oh, ow


def _torch_path_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the PyTorch-op paths (forward and backward) compute in: x's on GPU, fp32 on CPU."""
    return x.dtype if x.device.type == "cuda" else torch.float32


def _conv2d_bn_act_torch(x, weight, scale, shift, residual, stride, padding, dilation, relu, out):
    """Reference path in PyTorch ops; returns `out` or a tensor of the same strides.

    The BN scale is folded into the weight in fp32 (so the conv's bias add carries the
    shift): fewer passes than an fp32 epilogue. Computes in _torch_path_dtype.
    """
    compute = _torch_path_dtype(x)
    folded = (weight.float() * scale.view(-1, 1, 1, 1)).to(compute)
    y = F.conv2d(x.to(compute), folded, shift.to(compute), stride, padding, dilation)
    if residual is not None:
        y += residual
    if relu:
        y.relu_()
    if y.dtype == out.dtype and y.stride() == out.stride():
        return y
    return out.copy_(y)


def _conv2d_bn_relu_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> torch.Tensor:
    out = _conv2d_bn_relu_fake(x, weight, scale, shift, residual, stride, padding, dilation, relu)
    if out.numel() == 0:
        return out
    if backend.select(_OP, x.device, ("triton", "torch")) == "triton":
        from tlcore.kernels.conv import conv2d_bn_act

        # The kernel reads scale and shift as dense vectors; (K,) views of other tensors may not be.
        conv2d_bn_act(x, weight, scale.contiguous(), shift.contiguous(), residual, out, stride, padding, dilation,
                      relu, allow_tf32=torch.backends.cudnn.allow_tf32)
        return out
    return _conv2d_bn_act_torch(x, weight, scale, shift, residual, stride, padding, dilation, relu, out)


_conv2d_bn_relu_op = triton_op("tlcore::conv2d_bn_relu", mutates_args=())(_conv2d_bn_relu_impl)


@_conv2d_bn_relu_op.register_fake
def _conv2d_bn_relu_fake(x, weight, scale, shift, residual, stride, padding, dilation, relu):
    """Validates and allocates the (N, K, OH, OW) channels_last output; launches nothing.

    triton_op would trace the body instead, but under TRITON_INTERPRET=1 wrap_triton
    hands back the interpreted kernel, which then runs on fake tensors.
    """
    oh, ow = _check_args(x, weight, scale, shift, residual, stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _setup_backward(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, relu = inputs
    ctx.save_for_backward(x, weight, scale, output if relu else None)
    ctx.conv_args = (stride, padding, dilation)


def _backward(ctx, grad):
    """Gradients of act(conv2d(x, weight) * scale + shift + residual) in PyTorch ops (not fused
    kernels: the layers are built for inference; this lets gradients reach the layers around them).
    Computed in _torch_path_dtype, as the torch path's forward."""
    x, weight, scale, output = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    if output is not None:
        grad = grad.masked_fill(output <= 0, 0)  # (torch.relu's rule: none where the output is 0, NaN's passes)
    compute = _torch_path_dtype(x)
    grad_conv = (grad.float() * scale.view(1, -1, 1, 1)).to(compute)  # the gradient of conv2d(x, weight)
    grad_x = grad_weight = grad_scale = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight.to(compute), grad_conv, stride, padding,
                                            dilation).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_weight = torch.nn.grad.conv2d_weight(x.to(compute), weight.shape, grad_conv, stride, padding,
                                                  dilation).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        conv = F.conv2d(x.to(compute), weight.to(compute), None, stride, padding, dilation)
        grad_scale = (grad.float() * conv.float()).sum((0, 2, 3))
    grad_shift = grad.float().sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
    grad_residual = grad if ctx.needs_input_grad[4] else None
    return grad_x, grad_weight, grad_scale, grad_shift, grad_residual, None, None, None, None


_conv2d_bn_relu_op.register_autograd(_backward, setup_context=_setup_backward)


def _autocast_kernel(device_type: str):
    """conv2d_bn_relu inside `torch.autocast(device_type)`: x, weight and residual in the region's dtype,
    as stock autocast runs conv2d (fp64 stays fp64 there, and is refused here); scale and shift stay
    fp32, the epilogue's precision. A model's stock layers (grouped convs) under autocast then hand the
    fused ones matching dtypes, and on a GPU the fused convs run their fp16/bf16 kernels, not fp32 ones."""

    def in_autocast_dtype(x, weight, scale, shift, residual, stride, padding, dilation, relu):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

        with torch.autocast(device_type, enabled=False):
            return torch.ops.tlcore.conv2d_bn_relu(cast(x), cast(weight), scale, shift, cast(residual), stride,
                                                   padding, dilation, relu)

    return in_autocast_dtype


# Not torch.library.register_autocast: it casts every floating input (scale and shift too) to one fixed
# dtype, where stock autocast follows the region's dtype.
_autocast_library = torch.library.Library("tlcore", "FRAGMENT")  # keeps the autocast kernels registered
for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _autocast_library.impl(_OP, _autocast_kernel(_device_type), _key)


def conv2d_bn_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """y = act(conv2d(x, weight) * scale[k] + shift[k] + residual), in one pass.

    Args:
        x: (N, C, H, W) fp16/bf16/fp32, any memory format (channels_last is fastest).
        weight: (K, C, R, S), x's dtype; groups must be 1.
        scale, shift: (K,) fp32, the folded BatchNorm (eval statistics).
        stride, padding, dilation: int or (h, w) pair; zero padding.
        residual: optional (N, K, OH, OW) in x's dtype, added before the activation.
        relu: apply ReLU (NaN stays NaN, as in torch.relu).

    Returns:
        (N, K, OH, OW) in x's dtype, channels_last. Inside torch.autocast, x, weight and residual are
        first cast to the region's dtype (_autocast_kernel). Differentiable in every tensor (_backward).
    """
    args = (x, weight, scale, shift, residual, int_pair(stride, "stride", _OP), int_pair(padding, "padding", _OP),
            int_pair(dilation, "dilation", _OP), relu)
    # inside an autocast region the dispatcher runs the op's autocast kernel, which casts the inputs
    if skips_dispatcher(x, weight, scale, shift, residual) and not torch.is_autocast_enabled(x.device.type):
        return _conv2d_bn_relu_impl(*args)
    return torch.ops.tlcore.conv2d_bn_relu(*args)
