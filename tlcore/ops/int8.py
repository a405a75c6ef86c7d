"""INT8 inference ops: the integer math of tlcore's quantized convolution, defined once.

Representation
    activation  x = x_scale * (x_q - x_zero)   x_q int8 (N, C, H, W) channels_last; one scale and
                                               zero point per tensor (asymmetric)
    weight      w = w_scale[k] * w_q[k]        w_q int8 in [-127, 127]; symmetric, per output channel

Activations are asymmetric: after a ReLU the zero point is -128, so all 256 codes cover
[0, max] instead of the 128 a symmetric int8 would leave (tests/test_int8_quantize.py
measures the SQNR gained). Weights are symmetric so the conv needs no weight zero point.

`int8_conv2d`, the contract every backend (torch, cpu, triton, cuda) meets bit for bit:

    acc[m, k]   = sum_{r,s,c} x_q[n, oh*sh + r*dh - ph, ow*sw + s*dw - pw, g*C/G + c] * w_q[k, c, r, s]
                  (x_q reads as x_zero outside the image; c < C/G, and g = k // (K/G) is k's
                  conv group: groups=G as in torch's conv2d)                           int32, exact
    total[m, k] = acc * multiplier[k] + offset[k] (+ residual_q[m, k] * res_multiplier)     int64
    out[m, k]   = clamp(floor(total / 2**shift) + out_zero, relu ? max(out_zero, -128) : -128, out_max)

out_max is 127, or -1 for 7-bit activations (tlcore.quantize(reduce_range=True)): then the
next layer's C++ kernel can use AVX2's vpmaddubsw exactly (csrc/cpu/int8_conv.cpp).

`requantization` turns the float scales into that fixed point: multiplier[k] ~
x_scale * w_scale[k] / out_scale * 2**shift, and offset folds in the bias, the
x_zero * sum(w_q[k]) correction, the residual's zero point and the rounding half. Fixed
point instead of an fp32 multiply because GPU compilers contract multiply-adds into FMAs,
which would make Triton, CUDA and C++ results differ in the last code.
"""
import functools
import math
import os
import weakref
from typing import Callable, NamedTuple, Optional, Sequence, TypeVar  # typing forms: torch.library's schema inference reads them on torch 2.6

import torch
import torch.nn.functional as F
from torch.library import triton_op
from torch.multiprocessing.reductions import StorageWeakRef

from tlcore import _extension, backend
from tlcore.ops.conv import check_same_device, output_size
from tlcore.ops.eager import skips_dispatcher, traced

T = TypeVar("T")

QMIN, QMAX = -128, 127
WEIGHT_QMAX = 127  # symmetric weights: -128 is never used, so -w_q always fits
# |acc| <= 128 * 128 * (R * S * C) must fit int32 (and float64 sums stay exact far beyond);
# 128 * 128, not 128 * 127: the op accepts any int8 weight, -128 included.
MAX_REDUCTION = (2**31 - 1) // (128 * 128)
MAX_SHIFT = 46
_INT64_HEADROOM = 0.99 * 2**62  # the bound on epilogue totals; the C++ kernel's int8_requantization_in_range

CONV_OP = "int8_conv2d"
_CPU_ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avxvnni": 3, "avx512vnni": 4, "avx2u7": 5, "amx": 6}
CPU_ISA_ENV = "TLCORE_INT8_CPU_ISA"  # force the C++ kernel's instruction set (tests, benchmarks)
ALGORITHM_ENV = "TLCORE_INT8_CPU_ALGORITHM"  # "direct": no Winograd, rows or split in the C++ kernel (tests, benchmarks)
CPU_ALGORITHMS = {"direct": 0, "winograd": 1, "rows": 2, "winograd_stride2": 3, "split": 4}  # csrc/int8_conv.h's Int8Algorithm
# Winograd tiles: F(4x4, 3x3) while 576 * acc stays int32-recoverable (|acc| < 2**25), F(2x4, 3x3) while
# 48 * acc does (|acc| < 2**27), else F(2x2, 3x3) (csrc/cpu/int8_winograd.cpp).
WINOGRAD_4X4_MAX_CHANNELS = (2**25 - 1) // (128 * 128 * 9)
WINOGRAD_2X4_MAX_CHANNELS = (2**27 - 1) // (128 * 128 * 9)
# "dp4a" or "mma" forces the CUDA kernel (tests, benchmarks); auto/unset: mma (tensor cores) on
# compute capability >= 8.0, dp4a below. Read by the C++ launcher on every call (csrc/int8_conv.h).
CUDA_KERNEL_ENV = "TLCORE_INT8_CUDA_KERNEL"
# The Triton backend's two int8 conv kernels: "pointers" (kernels/int8_conv.py: any conv) and "tma"
# (kernels/int8_conv_tma.py: ungrouped NHWC convs of stride 1 or 2, and the stem, on sm_90+). Unforced,
# a GPU times both on a call configuration's first call where both apply; elsewhere "pointers" runs.
TRITON_KERNEL_ENV = "TLCORE_INT8_TRITON_KERNEL"
TRITON_CONV_KERNEL = "int8_conv2d (Triton kernel)"  # backend.fastest_of's op name for that choice
# Launch plans kept per weight (_launch_plans); past this many they start over, so that a workload of
# ever-new sizes (variable batch or image sizes) does not grow them without bound.
MAX_LAUNCH_PLANS = 32


# ---- float scales -> fixed point --------------------------------------------------------------

def requantization(x_scale: float, x_zero: int, weight_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_scale: float, out_zero: int,
                   res_scale: float | None = None, res_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The fixed-point (multiplier, offset, shift, res_multiplier) of one quantized conv.

    Args:
        x_scale, x_zero: the input's per-tensor quantization.
        weight_q: (K, C, R, S) int8 in [-127, 127]; w_scale: (K,) float, its per-channel scales.
        bias: (K,) float or None, in real units.
        out_scale, out_zero: the output's quantization.
        res_scale, res_zero: the int8 residual's quantization, or None without residual.

    Returns:
        multiplier (K,) int32, offset (K,) int64 (on weight_q's device), shift, res_multiplier.
        The largest multiplier gets 30 significant bits, unless int64 headroom needs fewer.
    """
    k = weight_q.shape[0]
    device = weight_q.device
    real = x_scale * w_scale.detach().double().to(device) / out_scale
    res_real = 0.0 if res_scale is None else res_scale / out_scale
    largest = max(real.abs().max().item() if k else 0.0, abs(res_real), 2.0**-MAX_SHIFT)
    if not math.isfinite(largest) or largest >= 2**29:
        raise ValueError(f"tlcore int8: requantization factor {largest:g} is out of range "
                         f"(scales x={x_scale:g}, out={out_scale:g}); calibrate with non-degenerate data")
    wsum = weight_q.detach().to(torch.int64).flatten(1).sum(1)
    bias_real = torch.zeros(k, dtype=torch.float64, device=device) if bias is None else \
        bias.detach().double().to(device) / out_scale
    if not bool(torch.isfinite(bias_real).all()):
        raise ValueError("tlcore int8: the bias (over out_scale) must be finite")
    reduction = weight_q[0].numel() if k else 1
    for shift in range(min(MAX_SHIFT, 29 - math.floor(math.log2(largest))), 0, -1):
        multiplier = torch.round(real * 2.0**shift).to(torch.int64)
        res_multiplier = round(res_real * 2**shift)
        # Worst case of acc * multiplier + offset + residual * res_multiplier must stay in int64;
        # bounded in float64 first, as the int64 offset itself could wrap for a huge bias.
        offset_real = bias_real * 2.0**shift - (x_zero * wsum * multiplier).double() \
            - res_zero * res_multiplier + 2.0 ** (shift - 1)
        largest = _largest_total(reduction, multiplier.abs().max().item() if k else 0,
                                 offset_real.abs().max().item() if k else 0.0, res_multiplier)
        if largest < _INT64_HEADROOM:
            offset = torch.round(bias_real * 2.0**shift).to(torch.int64) - x_zero * wsum * multiplier \
                - res_zero * res_multiplier + 2 ** (shift - 1)
            return multiplier.to(torch.int32), offset, shift, res_multiplier
    raise ValueError(f"tlcore int8: the bias is too large for the output scale {out_scale:g} "
                     f"(max |bias| / out_scale = {bias_real.abs().max().item():g})")


# ---- the convolution ------------------------------------------------------------------------

def _check_conv_args(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero,
                     stride, padding, dilation, out_max, x_max, groups=1) -> tuple[int, int]:
    """Validate int8_conv2d's arguments with clear errors; return the output (OH, OW)."""
    where = "tlcore.ops.int8_conv2d"
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{where}: x must be (N, C, H, W) and weight (K, C, R, S); "
                         f"got ranks {x.dim()} and {weight.dim()}")
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise TypeError(f"{where}: x and weight must be int8, got {x.dtype} and {weight.dtype} "
                        "(quantize floats with tlcore.ops.quantize_per_tensor)")
    k, c, r, s = weight.shape
    if groups < 1 or k % groups != 0:
        raise ValueError(f"{where}: groups must be a positive divisor of the {k} output channels, got {groups}")
    if x.shape[1] != c * groups:
        raise ValueError(f"{where}: x has {x.shape[1]} channels but weight expects {c} per group x {groups} groups")
    if c * r * s > MAX_REDUCTION:
        raise ValueError(f"{where}: C*R*S = {c * r * s} exceeds {MAX_REDUCTION}, where int32 accumulation "
                         "could overflow")
    if multiplier.shape != (k,) or multiplier.dtype != torch.int32:
        raise ValueError(f"{where}: multiplier must be int32 of shape ({k},), got {multiplier.dtype} "
                         f"{tuple(multiplier.shape)}")
    if offset.shape != (k,) or offset.dtype != torch.int64:
        raise ValueError(f"{where}: offset must be int64 of shape ({k},), got {offset.dtype} {tuple(offset.shape)}")
    if not 0 <= shift <= 62:
        raise ValueError(f"{where}: shift must be in [0, 62], got {shift}")
    for name, zero in (("x_zero", x_zero), ("out_zero", out_zero)):
        if not QMIN <= zero <= QMAX:
            raise ValueError(f"{where}: {name} must be in [{QMIN}, {QMAX}], got {zero}")
    if not out_zero <= out_max <= QMAX or not x_zero <= x_max <= QMAX:
        raise ValueError(f"{where}: need out_zero <= out_max <= {QMAX} and x_zero <= x_max <= {QMAX}; got "
                         f"out_zero={out_zero}, out_max={out_max}, x_zero={x_zero}, x_max={x_max}")
    if abs(res_multiplier) >= 2**31:
        raise ValueError(f"{where}: |res_multiplier| must be below 2**31, got {res_multiplier}")
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2 or \
            min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{where}: need (h, w) pairs with stride >= 1, dilation >= 1, padding >= 0; "
                         f"got stride={stride}, padding={padding}, dilation={dilation}")
    oh = output_size(x.shape[2], r, stride[0], padding[0], dilation[0])
    ow = output_size(x.shape[3], s, stride[1], padding[1], dilation[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"{where}: input {tuple(x.shape[2:])} is smaller than the (dilated) kernel {(r, s)} "
                         f"with padding {tuple(padding)}")
    check_same_device(where, x, {"weight": weight, "multiplier": multiplier, "offset": offset, "residual": residual})
    if residual is not None and (residual.dtype != torch.int8 or tuple(residual.shape) != (x.shape[0], k, oh, ow)):
        raise ValueError(f"{where}: residual must be int8 of shape {(x.shape[0], k, oh, ow)}, "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    return oh, ow


def _largest_total(reduction: int, multiplier: float, offset: float, res_multiplier: int) -> float:
    """A bound on |acc * multiplier + offset + residual * res_multiplier| over any int8 codes (|acc| <=
    128 * 128 * reduction), from the largest |multiplier| and |offset|, as the C++ kernel bounds it."""
    return 128.0 * 128.0 * reduction * multiplier + offset + 128.0 * abs(res_multiplier)


def _check_headroom(weight, multiplier, offset, res_multiplier) -> None:
    """Refuse constants whose epilogue totals could reach the int64 headroom every backend's epilogue
    assumes (`requantization` never makes such constants; hand-made ones could wrap silently). The
    C++ CPU kernel checks this itself; `int8_conv2d` checks it for the other backends on CPU tensors,
    where reading the constants costs no device sync."""
    if multiplier.device.type != "cpu" or weight.dim() != 4 or 0 in (multiplier.numel(), offset.numel()):
        return  # not CPU, or shapes the op itself refuses with a clear error
    largest = _largest_total(weight[0].numel(), multiplier.abs().max().item(), offset.double().abs().max().item(),
                             res_multiplier)
    if largest >= _INT64_HEADROOM:
        raise ValueError("tlcore.ops.int8_conv2d: |acc * multiplier + offset (+ residual * res_multiplier)| can "
                         "reach 2**62, beyond the int64 headroom of the epilogue; build the constants with "
                         "tlcore.ops.requantization")


def _int8_conv2d_torch(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero, relu,
                       stride, padding, dilation, out_max=QMAX, groups=1):
    """The reference: exact accumulation, then the int64 epilogue.

    The conv runs in float64: every product and partial sum is an integer below 2**31
    (MAX_REDUCTION), far inside float64's 2**53 exact range, so the result is exact in
    any summation order (tests check it against an int64 unfold + einsum).
    """
    ph, pw = padding
    xp = F.pad(x.double(), (pw, pw, ph, ph), value=float(x_zero))
    if weight.shape[1] == 0:  # an empty sum; F.conv2d would return no output channels at all
        oh, ow = (output_size(xp.shape[2 + i], weight.shape[2 + i], stride[i], 0, dilation[i]) for i in (0, 1))
        acc = torch.zeros(x.shape[0], weight.shape[0], oh, ow, dtype=torch.int64, device=x.device)
    else:
        acc = F.conv2d(xp, weight.double(), stride=stride, dilation=dilation, groups=groups).to(torch.int64)
    return requantize_reference(acc, multiplier, offset, shift, residual, res_multiplier, out_zero, relu, out_max)


def requantize_reference(acc, multiplier, offset, shift, residual, res_multiplier, out_zero, relu, out_max=QMAX):
    """int64 epilogue: acc (N, K, OH, OW) int64 -> int8 (N, K, OH, OW) channels_last."""
    total = acc * multiplier.to(torch.int64).view(1, -1, 1, 1) + offset.view(1, -1, 1, 1)
    if residual is not None:
        total = total + residual.to(torch.int64) * res_multiplier
    q = torch.div(total, 2**shift, rounding_mode="floor") + out_zero
    q = q.clamp(max(out_zero, QMIN) if relu else QMIN, out_max)
    return q.to(torch.int8).contiguous(memory_format=torch.channels_last)


def selected_cpu_isa() -> int:
    """The C++ kernel's instruction set selected now (TLCORE_INT8_CPU_ISA, default auto); packed weights depend on it."""
    name = os.environ.get(CPU_ISA_ENV) or "auto"
    if name not in _CPU_ISAS:
        raise ValueError(f"{CPU_ISA_ENV}={name!r}; choose one of {', '.join(_CPU_ISAS)}")
    if not _isa_runs_here(name):
        here = [isa for isa in _CPU_ISAS if _isa_runs_here(isa)]
        raise ValueError(f"{CPU_ISA_ENV}={name!r}: this CPU has no {name}; it can run {', '.join(here)}")
    return _CPU_ISAS[name]


@functools.cache
@torch.compiler.assume_constant_result  # (traced calls, e.g. torch.compile's, take its value as it is)
def _isa_runs_here(name: str) -> bool:
    """Whether the C++ kernel can run instruction set `name` on this CPU (True without the
    extension: then no C++ kernel runs, whatever is selected)."""
    return name == "auto" or not _extension.loaded() or cpu_isa_supported(name)


def cpu_isa_for(x_zero: int, x_max: int) -> int:
    """The C++ kernel's instruction set for an input whose codes lie in [-128, x_max].

    Where the kernel would run AVX2 without VNNI (chosen automatically or by
    TLCORE_INT8_CPU_ISA=avx2), 7-bit inputs (x_max <= -1) take vpmaddubsw, exact for them;
    otherwise the selected set (VNNI is faster than either). An input that may hold 8-bit codes
    runs AVX2's exact kernels even where avx2u7 is selected: a reduce_range model's stem takes
    the 8-bit input quantization, and vpmaddubsw could saturate on it.
    """
    isa = selected_cpu_isa()
    if not _extension.loaded():
        return isa  # no C++ kernel to choose for
    if isa == _CPU_ISAS["avx2u7"] and x_max > -1:
        return _CPU_ISAS["avx2"]
    avx2 = (_auto_isa() if isa == _CPU_ISAS["auto"] else isa) == _CPU_ISAS["avx2"]
    if avx2 and x_max <= -1 and x_zero <= -1:
        return _CPU_ISAS["avx2u7"]
    return isa


@functools.cache
def _auto_isa() -> int:
    return torch.ops.tlcore._int8_cpu_resolve_isa(_CPU_ISAS["auto"])


def cpu_algorithm(weight_shape: Sequence[int], stride: Sequence[int], dilation: Sequence[int], isa: int,
                  groups: int = 1) -> int:
    """How the C++ kernel runs this conv with `isa` (CPU_ALGORITHMS; the results are the same bits).

    The fastest it supports: exact integer Winograd for 3x3 stride-1 convs on instruction sets
    without VNNI (F(4x4, 3x3) tiles up to 227 channels, F(2x4, 3x3) up to 910: 2.25 or 3 products per
    output instead of 9; 1.5-2x faster there),
    and for 3x3 stride-2 convs with C * K <= 256 * 256 on 8-bit codes (25 products per 2x2 tile
    instead of 36; 7-bit codes run them on vpmaddubsw, split or direct: as fast or faster),
    the split algorithm for 1x1 convs on AVX2 (vpmaddubsw, two quads per int16 lane, plus the
    listed top bits of lanes past its bound: ResNet-50's 1x1 convs up to 1.35x faster than on the
    int16 pairs, and 7-bit ones up to 1.27x faster than on the 7-bit quads) and for the other convs
    with C a multiple of 32 on the rows of their taps' codes (ResNet-50's 512-channel stride-2 3x3
    conv 1.37x faster than direct, 7-bit stride-2 ones 1.2-1.25x) and for grouped convs whose groups
    hold a multiple of 32 input channels, or of 16 on 7-bit codes, and of 16 output channels
    (ResNeXt's grouped 3x3 convs of 32-64 channels a group: 0.47-0.88x direct's time), the rows layout
    for odd channel counts (the RGB stem), else direct.
    TLCORE_INT8_CPU_ALGORITHM=direct keeps every conv direct.
    """
    setting = os.environ.get(ALGORITHM_ENV) or "auto"
    if setting not in ("auto", "direct"):
        raise ValueError(f"{ALGORITHM_ENV}={setting!r}; choose auto or direct")
    if setting == "direct" or not _extension.loaded():
        return CPU_ALGORITHMS["direct"]
    k, c, r, s = (int(size) for size in weight_shape)  # weight sizes: static even under dynamic-shape tracing
    return _best_algorithm(k, c * groups, r, s, tuple(stride), tuple(dilation), isa, groups)


@functools.cache
def _best_algorithm(k: int, c: int, r: int, s: int, stride: tuple, dilation: tuple, isa: int, groups: int) -> int:
    return torch.ops.tlcore._int8_cpu_best_algorithm(k, c, r, s, list(stride), list(dilation), isa, groups)


def resolved_cpu_isa_name() -> str:
    """The instruction set the C++ kernel runs here for 8-bit inputs ("no C++ extension" without it)."""
    if not _extension.loaded():
        return "no C++ extension"
    isa = selected_cpu_isa()
    resolved = _auto_isa() if isa == _CPU_ISAS["auto"] else isa
    return next(name for name, value in _CPU_ISAS.items() if value == resolved)


def cpu_isa_supported(name: str) -> bool:
    """Whether the C++ int8 kernel can run with instruction set `name` here (see _CPU_ISAS)."""
    return _extension.loaded() and torch.ops.tlcore._int8_cpu_isa_supported(_CPU_ISAS[name])


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _int8_conv2d_impl(
    x: torch.Tensor,
    x_zero: int,
    weight: torch.Tensor,
    multiplier: torch.Tensor,
    offset: torch.Tensor,
    shift: int,
    residual: Optional[torch.Tensor],
    res_multiplier: int,
    out_zero: int,
    relu: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out_max: int,
    x_max: int,
    packed_weight: Optional[torch.Tensor],
    groups: int = 1,
) -> torch.Tensor:
    constants = (x_zero, shift, res_multiplier, out_zero, relu, tuple(stride), tuple(padding), tuple(dilation),
                 out_max)
    plans = _launch_plans(x, weight)
    if plans is not None:
        plan_key = _plan_key(x, weight, multiplier, offset, residual, (*constants, x_max, groups))
        plan = plans.get(plan_key)
        if plan is not None:  # every eager GPU call but a configuration's first ends here
            return plan(x, weight, multiplier, offset, residual)
    out_like = _int8_conv2d_fake(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero,
                                 relu, stride, padding, dilation, out_max, x_max, packed_weight, groups)  # (checks)
    if out_like.numel() == 0:
        return out_like
    made = {}  # the GPU backends' launch plans made for this call (the timing runs each)
    unmeasured = backend.unmeasured_choices()

    def launch(chosen: str) -> torch.Tensor:
        if chosen in ("triton", "cuda") and chosen not in made:
            made[chosen] = _triton_plan((x, weight, multiplier, offset, residual), constants, out_like, groups, key) \
                if chosen == "triton" else functools.partial(_int8_conv_cuda, constants=constants)
        if chosen in made:
            return made[chosen](x, weight, multiplier, offset, residual)
        if chosen == "cpu" and packed_weight is None:
            return torch.ops.tlcore._int8_conv_cpu_cached(x, weight, multiplier, offset, residual, x_zero, shift,
                                                          res_multiplier, out_zero, relu, list(stride), list(padding),
                                                          list(dilation), out_max, x_max, groups)
        args = (x_zero, _nhwc(weight), multiplier.contiguous(), offset.contiguous(), shift,
                None if residual is None else _nhwc(residual), res_multiplier, out_zero, relu,
                list(stride), list(padding), list(dilation), out_max)
        if chosen == "cpu":
            isa = cpu_isa_for(x_zero, x_max)
            return torch.ops.tlcore._int8_conv_cpu(_nhwc(x), *args, packed_weight, isa,
                                                   cpu_algorithm(weight.shape, stride, dilation, isa, groups), groups)
        return _int8_conv2d_torch(x, *args, groups)

    # Only GPUs have a choice to time. torch.compile runs this body on functional tensors: they reuse
    # a measured choice but time nothing.
    key = _timing_key(x, weight, residual, shift, relu, stride, padding, dilation, out_max, groups) \
        if x.device.type == "cuda" else None
    real = type(x) is torch.Tensor
    chosen = backend.select_fastest(CONV_OP, x.device, conv_backends(groups), key, launch if real else None)
    out = launch(chosen)
    # A choice made where a timing measured nothing is a default: not kept, so the next call times again.
    if plans is not None and chosen in made and backend.unmeasured_choices() == unmeasured:
        if len(plans) >= MAX_LAUNCH_PLANS:
            plans.clear()
        plans[plan_key] = made[chosen]
    return out


def _launch_plans(x: torch.Tensor, weight: torch.Tensor) -> dict | None:
    """The launch plans of int8_conv2d calls with this weight (_plan_key -> plan), where this call may use
    one: an untraced call on a GPU (or in Triton's interpreter); else None.

    A plan is a function plan(x, weight, multiplier, offset, residual) -> out: the GPU kernel a
    configuration's first call chose (backend, Triton kernel and tile config), with the grid and the
    other arguments it worked out, so that later calls skip the checks and choices (host time: in eager
    mode ResNet-50's convs are host-bound at batch 256; bench/NOTES.md, session 42). They are kept per
    weight version (derived_from_weight): some arguments derive from the weight (padding corrections).
    None while a CUDA graph is captured: a plan made before would bring its corrections (of the weight's
    values then, outside the graph's pool) into the graph; one made then, the graph pool's tensors out.
    """
    if not (x.is_cuda or backend.interpreting()) or traced(x) or capturing_graph(x):
        return None
    return derived_from_weight(weight, "launch plans", (), dict)


def capturing_graph(t: torch.Tensor) -> bool:
    """Whether t is a GPU tensor and a CUDA graph is being captured on the current stream."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _plan_key(x, weight, multiplier, offset, residual, constants: tuple) -> tuple:
    """What an int8_conv2d call's launch plan depends on besides the weight's values: the tensors' sizes,
    strides, dtypes and devices, x's and the residual's 16-byte alignment (the TMA kernel's), the
    constants, and the backend and kernels forced (environment variables, use_backend)."""
    tensors = tuple((t.shape, t.stride(), t.dtype, t.device) for t in (x, weight, multiplier, offset))
    res = None if residual is None else \
        (residual.shape, residual.stride(), residual.dtype, residual.device, residual.data_ptr() % 16)
    return (tensors, x.data_ptr() % 16, res, constants, backend.forced(), os.environ.get(backend.TIMING_ENV),
            os.environ.get(CUDA_KERNEL_ENV), forced_triton_kernel())


def _int8_output(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.int8, device=device, memory_format=torch.channels_last)


def _int8_conv_cuda(x, weight, multiplier, offset, residual, constants: tuple) -> torch.Tensor:
    """The CUDA C++ conv: a launch plan (constants: x_zero, shift, res_multiplier, out_zero, relu, stride,
    padding, dilation, out_max)."""
    x_zero, shift, res_multiplier, out_zero, relu, stride, padding, dilation, out_max = constants
    return torch.ops.tlcore._int8_conv_cuda(_nhwc(x), x_zero, _nhwc(weight), multiplier.contiguous(),
                                            offset.contiguous(), shift, None if residual is None else _nhwc(residual),
                                            res_multiplier, out_zero, relu, stride, padding, dilation, out_max)


def _triton_plan(tensors: tuple, constants: tuple, out_like: torch.Tensor, groups: int,
                 key: tuple | None) -> Callable:
    """A launch plan on the Triton int8 conv for calls like this one (tensors: its x, weight, multiplier,
    offset and residual; constants as _int8_conv_cuda's; out_like: an output as the plan allocates
    them, which it does not keep): on the kernel TRITON_KERNEL_ENV forces where
    it applies; else, where both apply on a GPU, on the one measured faster for this call's key
    (backend.fastest_of, on this call's tensors); else on the pointer kernels.

    Before the TMA kernel is timed for a key, its codes must equal the pointer kernels' on the call's
    tensors: where they differ it raises, which makes it no candidate (with a warning)."""
    from tlcore.kernels.int8_conv import Int8ConvLaunch
    from tlcore.kernels.int8_conv_tma import Int8ConvTmaLaunch, tma_applies

    x, weight, _, _, residual = tensors
    out_shape = out_like.shape
    # (traced, the corrections are part of the graph: computed where it runs)
    launch_args = (*constants, groups, None if traced(x) else cached_border_corrections)
    launchers = {"pointers": Int8ConvLaunch(*launch_args)}
    stride, dilation = constants[5], constants[7]
    if not traced(x) and tma_applies(x, _nhwc(weight), None if residual is None else _nhwc(residual), out_like,
                                     stride, dilation, groups):
        launchers["tma"] = Int8ConvTmaLaunch(*launch_args)

    def plan(x, weight, multiplier, offset, residual, kernel=None):
        out = _int8_output(out_shape, x.device)
        launchers[kernel or chosen](x, _nhwc(weight), multiplier.contiguous(), offset.contiguous(),
                                    None if residual is None else _nhwc(residual), out)
        return out

    def tma_checked_once() -> None:  # (do_bench's first, untimed call does the check)
        if not checked:
            if not torch.equal(plan(*tensors, kernel="tma"), plan(*tensors, kernel="pointers")):
                raise RuntimeError("its codes differ from the pointer kernels' on this call")
            checked.append(True)
        plan(*tensors, kernel="tma")

    checked: list[bool] = []
    chosen = forced_triton_kernel()
    if chosen not in launchers:  # nothing forced, or a kernel that cannot run this call
        chosen = "pointers"
        if len(launchers) > 1 and key is not None and x.is_cuda and os.environ.get(backend.TIMING_ENV) != "0":
            candidates = {"pointers": lambda: plan(*tensors, kernel="pointers"), "tma": tma_checked_once}
            chosen = backend.fastest_of((TRITON_CONV_KERNEL, x.device, key), candidates, x.device) or chosen
    return plan


def forced_triton_kernel() -> str | None:
    """The Triton int8 conv kernel TRITON_KERNEL_ENV forces (None: unset), checked."""
    kernel = os.environ.get(TRITON_KERNEL_ENV) or None
    if kernel not in (None, "pointers", "tma"):
        raise ValueError(f"{TRITON_KERNEL_ENV}={kernel!r}; choose pointers or tma")
    return kernel


_int8_conv2d_op = triton_op("tlcore::int8_conv2d", mutates_args=())(_int8_conv2d_impl)


def _timing_key(x, weight, residual, shift, relu, stride, padding, dilation, out_max, groups) -> tuple | None:
    """What the GPU kernels' speed depends on in one int8_conv2d call (backend.select_fastest's key):
    what Triton's autotuner keys on, and the CUDA and Triton kernels forced, if any; None where a size is
    symbolic (torch.compile's dynamic shapes). Not the pointers' alignment, which traced calls do
    not know (torch's allocations are 512-byte aligned; views may not be)."""
    key = (tuple(x.shape), tuple(x.stride()), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
           groups, shift, relu, out_max, None if residual is None else tuple(residual.stride()),
           os.environ.get(CUDA_KERNEL_ENV), forced_triton_kernel())
    try:
        hash(key)  # symbolic sizes are unhashable
    except TypeError:
        return None
    return key


def conv_backends(groups: int) -> tuple[str, ...]:
    """The backends with an int8 conv kernel for this many groups: the CUDA C++ kernel has none for
    grouped convs (ResNeXt's), which run on Triton there."""
    return ("triton", "cuda", "cpu", "torch") if groups == 1 else ("triton", "cpu", "torch")


@_int8_conv2d_op.register_fake
def _int8_conv2d_fake(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero, relu,
                      stride, padding, dilation, out_max=QMAX, x_max=QMAX, packed_weight=None, groups=1):
    """Validates and allocates the (N, K, OH, OW) int8 channels_last output; launches nothing."""
    oh, ow = _check_conv_args(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero,
                              stride, padding, dilation, out_max, x_max, groups)
    return _int8_output((x.shape[0], weight.shape[0], oh, ow), x.device)


class _Derived(NamedTuple):
    """A value derived from a weight tensor, as kept by derived_from_weight."""
    weight: weakref.ref  # the tensor
    key: tuple | None  # what it was derived for (None: stale)
    value: object
    storage: StorageWeakRef  # the storage it was derived from


# Values derived from a weight tensor (the C++ kernel's packing, the Triton kernel's padding
# corrections) by (id(weight), what). Entries leave with their weight. (A WeakKeyDictionary would
# compare tensors with ==.)
_derived: dict[tuple[int, str], _Derived] = {}


def derived_from_weight(weight: torch.Tensor, what: str, key: tuple, derive: Callable[[], T]) -> T:
    """derive(), computed once per weight tensor and `what`, and again when `key`, the weight's storage
    (`w.data = ...`) or its version (an in-place change) changes. Inference tensors (made under
    torch.inference_mode) have no version and count as unchanging unless forget_derived_values says
    otherwise (Int8Conv2d's load_state_dict does)."""
    # The storage by identity, not only by address: `w.data = new` keeps w's version, and the new storage
    # may lie where the old one did. The entry's weak reference keeps the old StorageImpl's identity from
    # being reused while the entry holds it.
    storage = weight.untyped_storage()
    key = (storage._cdata, weight.data_ptr(), None if weight.is_inference() else weight._version, *key)
    entry_key = (id(weight), what)
    cached = _derived.get(entry_key)
    new_entry = cached is None or cached.weight() is not weight
    if new_entry or cached.key != key:
        cached = _Derived(weakref.ref(weight), key, derive(), StorageWeakRef(storage))
        _derived[entry_key] = cached
        if new_entry:
            weakref.finalize(weight, _derived.pop, entry_key, None)
    return cached.value


def forget_derived_values(weight: torch.Tensor) -> None:
    """Make every value derived from weight's storage stale, also through other tensor objects over it (a
    traced module's parameters may be such): it changed in a way its version does not show. (The entries
    stay, so their finalizers are not registered again: the next call derives under the same entry.)"""
    storage = weight.untyped_storage()._cdata  # (an entry's weak reference keeps its storage's identity unique)
    # (over a copy: another thread's first call, or a weight's finalizer, may change the dict meanwhile)
    for entry_key, cached in list(_derived.items()):
        if cached.storage.cdata == storage:
            _derived[entry_key] = cached._replace(key=None)


def cached_packed_weight_cpu(weight: torch.Tensor, stride: Sequence[int], dilation: Sequence[int],
                             x_zero: int = QMIN, x_max: int = QMAX,
                             groups: int = 1) -> tuple[int | None, int | None, torch.Tensor | None]:
    """(isa, algorithm, pack_weight_cpu(weight, ...)) for a conv on inputs with codes up to x_max,
    packed once per weight tensor (derived_from_weight) and again when the kernel's choice
    (TLCORE_INT8_CPU_ISA, _ALGORITHM) changes. (None, None, None) without the extension or off the CPU.
    """
    if not _extension.loaded() or weight.device.type != "cpu":
        return None, None, None
    isa = cpu_isa_for(x_zero, x_max)
    algorithm = cpu_algorithm(weight.shape, stride, dilation, isa, groups)
    packed = derived_from_weight(weight, "cpu packing", (isa, algorithm, groups),
                                 lambda: pack_weight_cpu(weight, stride, dilation, x_zero, x_max, groups))
    return isa, algorithm, packed


def cached_border_corrections(weight: torch.Tensor, x_zero: int, in_size: Sequence[int], out_size: Sequence[int],
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    """The Triton conv's padding corrections (kernels/int8_border.py's border_corrections, same
    arguments and result) computed once per weight and geometry: one launch less per padded conv
    and call in eager mode. Inside a CUDA graph being captured they are computed without caching
    (the graph's tensors belong to its memory pool)."""
    from tlcore.kernels.int8_border import border_corrections

    def derive():
        return border_corrections(weight, x_zero, in_size, out_size, stride, padding, dilation)

    if capturing_graph(weight):
        return derive()
    key = (x_zero, *in_size, *out_size, *stride, *padding, *dilation)
    return derived_from_weight(weight, "border corrections", key, derive)


@torch.library.custom_op("tlcore::_int8_conv_cpu_cached", mutates_args=())
def _int8_conv_cpu_cached(x: torch.Tensor, weight: torch.Tensor, multiplier: torch.Tensor, offset: torch.Tensor,
                          residual: Optional[torch.Tensor], x_zero: int, shift: int, res_multiplier: int,
                          out_zero: int, relu: bool, stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], out_max: int, x_max: int, groups: int = 1) -> torch.Tensor:
    """The C++ CPU conv on cached_packed_weight_cpu(weight): what int8_conv2d runs without a
    packed_weight, e.g. inside a torch.compile'd or exported model. Opaque to tracing, so the
    instruction set is chosen where the graph runs and the packed tensor never leaves it.
    """
    isa, algorithm, packed = cached_packed_weight_cpu(weight, stride, dilation, x_zero, x_max, groups)
    return torch.ops.tlcore._int8_conv_cpu(_nhwc(x), x_zero, _nhwc(weight), multiplier.contiguous(),
                                           offset.contiguous(), shift, None if residual is None else _nhwc(residual),
                                           res_multiplier, out_zero, relu, list(stride), list(padding),
                                           list(dilation), out_max, packed, isa, algorithm, groups)


@_int8_conv_cpu_cached.register_fake
def _(x, weight, multiplier, offset, residual, x_zero, shift, res_multiplier, out_zero, relu, stride, padding,
      dilation, out_max, x_max, groups=1):
    return _int8_conv2d_fake(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero,
                             relu, stride, padding, dilation, out_max, x_max, groups=groups)


def _register_compiled_fakes() -> None:
    if not _extension.loaded():
        return

    @torch.library.register_fake("tlcore::_int8_conv_cpu")
    def _(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero, relu,
          stride, padding, dilation, out_max, packed_weight, isa, algorithm, groups=1):
        return _int8_conv2d_fake(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier,
                                 out_zero, relu, stride, padding, dilation, out_max, groups=groups)

    @torch.library.register_fake("tlcore::_int8_pack_weight_cpu")
    def _(weight, isa, algorithm, groups=1):
        k, c, r, s = weight.shape
        words = torch.ops.tlcore._int8_cpu_packed_words(k, c * groups, r, s, isa, algorithm, groups)
        return weight.new_empty((words,), dtype=torch.int32)

    torch.library.register_fake("tlcore::_int8_conv_cuda")(_int8_conv2d_fake)

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


def _pair(value, name: str, op: str = "int8_conv2d") -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"tlcore.ops.{op}: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def int8_conv2d(
    x: torch.Tensor,
    x_zero: int,
    weight: torch.Tensor,
    multiplier: torch.Tensor,
    offset: torch.Tensor,
    shift: int,
    *,
    residual: torch.Tensor | None = None,
    res_multiplier: int = 0,
    out_zero: int = QMIN,
    relu: bool = False,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    out_max: int = QMAX,
    x_max: int = QMAX,
    packed_weight: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Quantized conv2d with the fused requantize (+ residual) (+ ReLU) epilogue (module docstring).

    Args:
        x: (N, C, H, W) int8, any strides (channels_last avoids a copy); x_zero its zero point.
        weight: (K, C / groups, R, S) int8 in [-127, 127], with C / groups * R * S <= MAX_REDUCTION.
        multiplier: (K,) int32; offset: (K,) int64; shift: 0..62 (from `requantization`). Hand-made
            constants must keep |acc * multiplier + offset| below 2**62: refused on CPU when called
            eagerly, unchecked on GPUs (reading them there would sync the device on every call) and
            in torch.compile'd or exported graphs.
        residual: optional (N, K, OH, OW) int8, added as residual * res_multiplier.
        out_zero: the output's zero point; relu: clamp at it. out_max: the largest output code.
        x_max: the largest code x holds (-1 for 7-bit inputs: the C++ kernel may then use vpmaddubsw).
        stride, padding (zeros in real terms), dilation: int or (h, w) pair.
        packed_weight: `pack_weight_cpu(weight, stride, dilation, x_zero, x_max, groups)`, so the C++
            CPU kernel skips packing it on every call; other backends ignore it.
        groups: as torch's conv2d groups (ResNeXt's grouped 3x3 convs); the CUDA C++ kernel has
            none, so on GPUs grouped convs run on Triton.

    Returns:
        (N, K, OH, OW) int8, channels_last.
    """
    if not torch.compiler.is_compiling() and x.device.type == "cpu" and \
            backend.select(CONV_OP, x.device, conv_backends(groups)) != "cpu":  # (the C++ kernel checks itself)
        _check_headroom(weight, multiplier, offset, res_multiplier)
    args = (x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero, relu,
            _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"), out_max, x_max,
            packed_weight, groups)
    if skips_dispatcher(x, weight, multiplier, offset, residual):
        return _int8_conv2d_impl(*args)
    return torch.ops.tlcore.int8_conv2d(*args)


def pack_weight_cpu(weight: torch.Tensor, stride: Sequence[int], dilation: Sequence[int], x_zero: int = QMIN,
                    x_max: int = QMAX, groups: int = 1) -> torch.Tensor | None:
    """weight (K, C / groups, R, S) int8 in the layout the C++ kernel will use for a conv with this stride
    and dilation on inputs with codes up to x_max (its instruction set and algorithm), as 1-d
    int32; None without the extension or off the CPU."""
    if not _extension.loaded() or weight.device.type != "cpu":
        return None
    isa = cpu_isa_for(x_zero, x_max)
    return torch.ops.tlcore._int8_pack_weight_cpu(_nhwc(weight), isa,
                                                  cpu_algorithm(weight.shape, stride, dilation, isa, groups), groups)


def runs_cpu_kernel(op: str, t: torch.Tensor, implemented: Sequence[str] = ("cpu", "torch")) -> bool:
    """Whether `op` (with kernels for the `implemented` backends) runs its C++ CPU kernel on tensor t."""
    return t.device.type == "cpu" and backend.select(op, t.device, implemented) == "cpu"


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
    kernel_size, stride, padding, dilation = (_pair(value, name, "int8_max_pool2d") for value, name in (
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
        plain = selected_cpu_isa() == _CPU_ISAS["scalar"]
        return torch.ops.tlcore._int8_weight_linear_cpu(x, weight, w_scale, bias, plain)
    return torch.addmm(bias, x, (weight.float() * w_scale[:, None]).T)
