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
from typing import Callable, Optional, Sequence  # typing forms: torch.library's schema inference reads them on torch 2.6

import torch
import torch.nn.functional as F
from torch.library import triton_op

from tlcore import _extension, backend
from tlcore.ops.conv import check_same_device, int_pair, output_size
from tlcore.ops.eager import skips_dispatcher, traced
from tlcore.ops.int8_cpu import cpu_algorithm, cpu_isa_for
from tlcore.ops.weight_derived import derived_from_weight

QMIN, QMAX = -128, 127
WEIGHT_QMAX = 127  # symmetric weights: -128 is never used, so -w_q always fits
# |acc| <= 128 * 128 * (R * S * C) must fit int32 (and float64 sums stay exact far beyond);
# 128 * 128, not 128 * 127: the op accepts any int8 weight, -128 included.
MAX_REDUCTION = (2**31 - 1) // (128 * 128)
MAX_SHIFT = 46
_INT64_HEADROOM = 0.99 * 2**62  # the bound on epilogue totals; the C++ kernel's int8_requantization_in_range

CONV_OP = "int8_conv2d"
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
    """Fakes of the conv's C++ kernels (csrc/ops.cpp), which traced calls reach directly."""
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


_register_compiled_fakes()


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
            int_pair(stride, "stride", CONV_OP), int_pair(padding, "padding", CONV_OP),
            int_pair(dilation, "dilation", CONV_OP), out_max, x_max, packed_weight, groups)
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
