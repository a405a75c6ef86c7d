"""The int8 model's ops around its convolutions: quantizing its input, dequantizing, the max-pool,
the global average pool and the fc on int8 weights (their C++ kernels: csrc/cpu/int8_layers.cpp).

Codes and scales as in tlcore/ops/int8.py: x = scale * (q - zero_point), per tensor.
"""
import math
from typing import Sequence  # typing forms: torch.library's schema inference reads them on torch 2.6

import torch
import torch.nn.functional as F
from torch.library import triton_op

from tlcore import _extension, backend
from tlcore.ops.conv import int_pair
from tlcore.ops.int8 import QMAX, QMIN, capturing_graph
from tlcore.ops.int8_cpu import CPU_ISAS, runs_cpu_kernel, selected_cpu_isa


# ---- quantize / dequantize ------------------------------------------------------------------

# Scales are applied in float32, as 1 / scale (quantizing) and as scale times up to 255 codes
# (dequantizing): the scale and its inverse must be normal numbers there, and 255 * scale finite.
_SCALE_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max / 256)


def _check_qparams(where: str, scale: float, zero_point: int) -> None:
    if not (math.isfinite(scale) and _SCALE_RANGE[0] <= scale <= _SCALE_RANGE[1]):
        raise ValueError(f"{where}: scale must be a positive number in [{_SCALE_RANGE[0]:.3g}, "
                         f"{_SCALE_RANGE[1]:.3g}] (float32 must hold it, its inverse and 255 times it), got {scale}")
    if not QMIN <= zero_point <= QMAX:
        raise ValueError(f"{where}: zero_point must be in [{QMIN}, {QMAX}], got {zero_point}")


def _quantize_torch(x: torch.Tensor, inv_scale: float, zero_point: int) -> torch.Tensor:
    inv = torch.tensor(inv_scale, dtype=torch.float32, device=x.device)
    t = torch.floor(x.float() * inv + 0.5)  # round half up, the same expression in every backend
    t = torch.where(torch.isnan(t), 0.0, t)
    return (t.clamp(QMIN - zero_point, QMAX - zero_point) + zero_point).to(torch.int8) \
        .contiguous(memory_format=torch.channels_last)


QUANTIZE_BACKENDS = ("triton", "cpu", "torch")


@triton_op("tlcore::quantize_per_tensor", mutates_args=())
def _quantize_op(x: torch.Tensor, inv_scale: float, zero_point: int) -> torch.Tensor:
    out = _quantize_fake(x, inv_scale, zero_point)
    if out.numel() == 0:
        return out
    chosen = backend.select("quantize_per_tensor", x.device, QUANTIZE_BACKENDS)
    if chosen == "triton":
        from tlcore.kernels.int8_conv import quantize_per_tensor as triton_quantize

        triton_quantize(x, inv_scale, zero_point, out)
        return out
    if chosen == "cpu" and x.dtype == torch.float32:  # fp16/bf16 inputs take the PyTorch path
        return torch.ops.tlcore._quantize_cpu(x, inv_scale, zero_point)
    return _quantize_torch(x, inv_scale, zero_point)


@_quantize_op.register_fake
def _quantize_fake(x, inv_scale, zero_point):
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"tlcore.ops.quantize_per_tensor: x must be a floating (N, C, H, W) tensor, "
                         f"got {x.dtype} of rank {x.dim()}")
    _check_qparams("tlcore.ops.quantize_per_tensor", 1.0 / inv_scale if inv_scale else 0.0, zero_point)
    return torch.empty(x.shape, dtype=torch.int8, device=x.device, memory_format=torch.channels_last)


# (the C++ quantize op raises the same message)
NON_FINITE_INPUT = "tlcore int8 model: the input contains NaN or inf (or a stem or block left float produced one)"


CAPTURED_CHECK = ("tlcore int8 model: its input check for NaN and inf reads a value on the host, which a CUDA graph "
                  "being captured cannot do; build the model with tlcore.quantize(..., check_finite=False) to capture "
                  "it (then such inputs give finite, meaningless logits)")


@torch.library.custom_op("tlcore::quantize_input", mutates_args=())
def quantize_input(x: torch.Tensor, scale: float, zero_point: int, check_finite: bool = True) -> torch.Tensor:
    """quantize_per_tensor for an int8 model's input, which must hold no NaN or inf (ValueError) unless
    check_finite is False: saturated to the largest code, an infinity would pass for a plausible input
    where the float model gives NaN.

    One op, opaque to tracing, so the check survives torch.compile and torch.export (inductor
    on torch 2.6 drops an _assert_async from the graph), and the codes equal eager ones (quantize_per_tensor's
    note). x: (N, C, H, W) float. On GPUs the check waits for the GPU: inside a CUDA graph being
    captured it raises RuntimeError (CAPTURED_CHECK) instead of failing the capture.
    """
    _check_qparams("tlcore.ops.quantize_input", scale, zero_point)
    if x.dim() == 4 and x.dtype == torch.float32 and x.numel() > 0 \
            and runs_cpu_kernel("quantize_per_tensor", x, QUANTIZE_BACKENDS):
        return torch.ops.tlcore._quantize_cpu(x, 1.0 / scale, zero_point, check_finite)  # checks in the same pass
    if check_finite:
        if capturing_graph(x):
            raise RuntimeError(CAPTURED_CHECK)
        # One fast reduction; only a non-finite sum (NaN, inf, or an overflowing sum) pays for the exact check.
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise ValueError(NON_FINITE_INPUT)
    return quantize_per_tensor(x, scale, zero_point)


@quantize_input.register_fake
def _(x, scale, zero_point, check_finite=True):
    _check_qparams("tlcore.ops.quantize_input", scale, zero_point)
    return _quantize_fake(x, 1.0 / scale, zero_point)


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """q = clamp(floor(x * fp32(1 / scale) + 0.5) + zero_point, -128, 127); NaN -> zero_point.

    x: (N, C, H, W) fp32/fp16/bf16, any layout. Returns (N, C, H, W) int8 channels_last.
    """
    _check_qparams("tlcore.ops.quantize_per_tensor", scale, zero_point)
    return torch.ops.tlcore.quantize_per_tensor(x, 1.0 / scale, zero_point)


def _dequantize_torch(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32, device=q.device)
    return ((q.to(torch.float32) - zero_point) * s).contiguous()


@triton_op("tlcore::dequantize_per_tensor", mutates_args=())
def _dequantize_op(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    out = _dequantize_fake(q, scale, zero_point)
    if out.numel() == 0:
        return out
    if backend.select("dequantize_per_tensor", q.device, ("triton", "torch")) == "triton":
        from tlcore.kernels.int8_conv import dequantize_per_tensor as triton_dequantize

        triton_dequantize(q, scale, zero_point, out)
        return out
    return _dequantize_torch(q, scale, zero_point)


@_dequantize_op.register_fake
def _dequantize_fake(q, scale, zero_point):
    if q.dim() != 4 or q.dtype != torch.int8:
        raise ValueError(f"tlcore.ops.dequantize_per_tensor: q must be an int8 (N, C, H, W) tensor, "
                         f"got {q.dtype} of rank {q.dim()}")
    _check_qparams("tlcore.ops.dequantize_per_tensor", scale, zero_point)
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """x = (q - zero_point) * fp32(scale). q: (N, C, H, W) int8, any layout. Returns fp32 NCHW contiguous."""
    return torch.ops.tlcore.dequantize_per_tensor(q, scale, zero_point)


# ---- max-pool -------------------------------------------------------------------------------

def _pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's max-pool output size (the last window starts inside the image or its left padding;
    with ceil_mode it may run past the image)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out < 1:
        raise ValueError("tlcore int8 max-pool: the input is smaller than the (dilated) kernel with this padding")
    return out


POOL_BACKENDS = ("triton", "cpu", "torch")


def _check_pool_args(kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int]) -> None:
    for i in range(2):
        if not (kernel_size[i] > 0 and stride[i] > 0 and dilation[i] > 0 and 0 <= 2 * padding[i] <= kernel_size[i]):
            raise ValueError(f"tlcore.ops.int8_max_pool2d: need kernel_size, stride, dilation > 0 and "
                             f"0 <= padding <= kernel_size / 2 (PyTorch's rule), got kernel_size={kernel_size}, "
                             f"stride={stride}, padding={padding}, dilation={dilation}")


def int8_max_pool2d(q: torch.Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int],
                    padding: int | Sequence[int], dilation: int | Sequence[int],
                    ceil_mode: bool = False) -> torch.Tensor:
    """Max-pool on int8 codes: exact, and the output keeps the input's scale and zero point.

    q: (N, C, H, W) int8, any layout; kernel_size, stride, padding, dilation: int or (h, w) pair.
    Returns (N, C, OH, OW) int8 channels_last (PyTorch's output size and implicit -inf padding).
    """
    if q.dtype != torch.int8 or q.dim() != 4:
        raise TypeError(f"tlcore.ops.int8_max_pool2d: expected int8 (N, C, H, W) codes, got {q.dtype} of rank {q.dim()}")
    kernel_size, stride, padding, dilation = (int_pair(value, name, "int8_max_pool2d") for value, name in (
        (kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    _check_pool_args(kernel_size, stride, padding, dilation)
    if runs_cpu_kernel("int8_max_pool2d", q, POOL_BACKENDS):  # (straight to the C++ op: no Python op body on CPU)
        return torch.ops.tlcore._int8_max_pool_cpu(q, kernel_size, stride, padding, dilation, ceil_mode)
    return torch.ops.tlcore.int8_max_pool2d(q, kernel_size, stride, padding, dilation, ceil_mode)


@triton_op("tlcore::int8_max_pool2d", mutates_args=())
def _int8_max_pool_op(q: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    out = _int8_max_pool_fake(q, kernel_size, stride, padding, dilation, ceil_mode)
    if out.numel() == 0:
        return out
    chosen = backend.select("int8_max_pool2d", q.device, POOL_BACKENDS)
    if chosen == "triton":
        from tlcore.kernels.int8_pool import int8_max_pool2d as triton_max_pool

        triton_max_pool(q, kernel_size, stride, padding, dilation, out)
        return out
    if chosen == "cpu":
        return torch.ops.tlcore._int8_max_pool_cpu(q, kernel_size, stride, padding, dilation, ceil_mode)
    # CUDA has no integer max-pool, and the CPU one rejects an int8 tensor of more than 127
    # elements per image (an int8-typed size check); fp16 holds every int8 value exactly. A window
    # of padding only gives -inf: -128, the lowest code, as the kernels give.
    y = F.max_pool2d(q.half(), kernel_size, stride, padding, dilation, ceil_mode)
    return y.clamp(min=QMIN).to(torch.int8).contiguous(memory_format=torch.channels_last)


@_int8_max_pool_op.register_fake
def _int8_max_pool_fake(q, kernel_size, stride, padding, dilation, ceil_mode):
    _check_pool_args(kernel_size, stride, padding, dilation)
    oh, ow = (_pool_output_size(q.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
              for i in range(2))
    return torch.empty((q.shape[0], q.shape[1], oh, ow), dtype=torch.int8, device=q.device,
                       memory_format=torch.channels_last)


# ---- the tail: global average pool and fc -------------------------------------------------------

def int8_global_avg_pool(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """A ResNet's average pool on int8 codes: fp32 scale * (mean of the codes - zero_point).

    q: (N, C, H, W) int8, any layout. Returns fp32 (N, C, 1, 1). The codes are summed exactly
    (int64: 255 * H * W passes int32 past 8.4 M pixels) and scaled once, by fp32(scale / (H * W)),
    on every backend.
    """
    if q.dtype != torch.int8 or q.dim() != 4:
        raise ValueError(f"tlcore int8 global average pool: expected int8 (N, C, H, W) codes, got {q.dtype} "
                         f"of rank {q.dim()}")
    if not torch.compiler.is_compiling():  # traced with dynamic=True, scale is symbolic (math.isfinite fails)
        _check_qparams("tlcore int8 global average pool", scale, zero_point)
    pixels = q.shape[2] * q.shape[3]
    if pixels == 0:
        raise ValueError("tlcore int8 global average pool: the feature map is empty")
    if runs_cpu_kernel("int8_global_avg_pool", q):
        return torch.ops.tlcore._int8_global_avg_pool_cpu(q, scale, zero_point)
    sums = q.sum(dim=(2, 3), keepdim=True, dtype=torch.int64) - pixels * zero_point
    return sums.float() * (scale / pixels)


def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor) -> torch.Tensor:
    """An fc on int8 weights: x @ (w_scale[:, None] * weight).T + bias, in fp32.

    x: fp32 (N, C); weight: int8 (K, C); w_scale, bias: fp32 (K,). Returns fp32 (N, K). Only the
    weights are quantized (a quarter of fp32's memory traffic, which a batch-1 fc waits for); the
    pooled features and the sums stay fp32, so the logits keep the precision the int8 body gives them.
    """
    if x.dim() != 2 or x.dtype != torch.float32 or weight.dtype != torch.int8 or weight.dim() != 2 \
            or weight.shape[1] != x.shape[1]:
        raise ValueError(f"tlcore int8 linear: expected fp32 x (N, C) and int8 weight (K, C), got {x.dtype} "
                         f"{tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if runs_cpu_kernel("int8_weight_linear", x):
        # TLCORE_INT8_CPU_ISA=scalar: no SIMD here either (read when traced, unlike the convs' setting:
        # it only serves tests and benchmarks of the plain kernel).
        plain = selected_cpu_isa() == CPU_ISAS["scalar"]
        return torch.ops.tlcore._int8_weight_linear_cpu(x, weight, w_scale, bias, plain)
    return torch.addmm(bias, x, (weight.float() * w_scale[:, None]).T)


def _register_compiled_fakes() -> None:
    """Fakes of these ops' C++ kernels (csrc/ops.cpp), which traced calls reach directly."""
    if not _extension.loaded():
        return

    @torch.library.register_fake("tlcore::_quantize_cpu")
    def _(x, inv_scale, zero_point, reject_non_finite=False):
        return _quantize_fake(x, inv_scale, zero_point)

    @torch.library.register_fake("tlcore::_int8_global_avg_pool_cpu")
    def _(q, scale, zero_point):
        return q.new_empty((q.shape[0], q.shape[1], 1, 1), dtype=torch.float32)

    @torch.library.register_fake("tlcore::_int8_weight_linear_cpu")
    def _(x, weight, w_scale, bias, plain=False):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("tlcore::_int8_max_pool_cpu")
    def _(x, kernel, stride, padding, dilation, ceil_mode):
        return _int8_max_pool_fake(x, kernel, stride, padding, dilation, ceil_mode)


_register_compiled_fakes()
