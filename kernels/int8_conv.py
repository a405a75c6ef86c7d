"""Int8 implicit-GEMM conv with the fused requantize epilogue, and per-tensor (de)quantize, in Triton.

    x:          (N, C, H, W)    int8, any strides (NHWC reads are the fast ones)
    weight:     (K, C / G, R, S) int8 in [-127, 127], channels_last (G: conv groups)
    multiplier: (K,)            int32      offset: (K,) int64
    residual:   (N, K, OH, OW)  int8, any strides, optional
    out:        (N, K, OH, OW)  int8, written once

The integer math is the contract in tlcore/ops/int8.py: tl.dot multiplies int8 tiles into
an exact int32 accumulator (tensor-core IMMA on GPUs), positions outside the image count as
x_zero (read as 0, with the accumulator starting at the difference: kernels/int8_border.py), and
the epilogue is int64 fixed point (floored and clamped in 32-bit words where that is exact:
_shifted_to_int32), so results equal the reference bit for bit.
The GEMM view and its index math are shared with kernels/conv.py (kernels/implicit_gemm.py):
one reduction loop over (tap, channel block), or over (r, s, c) flattened for fewer than
FLAT_K_BELOW channels (the RGB stem), on a copy of x whose padding the launcher writes out and
whose channels it rounds up to a multiple of 4 (flat_operands).

Pointwise convs (1x1, stride 1, unpadded) of up to POINTWISE_MAX_CHANNELS input channels on tensors
whose pixels lie in row order (NHWC; pixel_rows) run their own kernel, _int8_pointwise_kernel: a GEMM
over pixel rows whose programs loop over several row tiles, so that one tile's loads overlap the
previous tiles' dots and epilogues.

Grouped convs (ResNeXt): a tile of BLOCK_N output channels reduces over the input channels of
the groups it covers (a span as wide for every tile: the widest any tile needs), with zero
weights where a column's group does not reach. With groups
narrower than BLOCK_N (ResNeXt-50's first stage: 4 channels) that multiplies zeros, on layers
that hold a few percent of the model's products.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from tlcore.kernels.implicit_gemm import (FLAT_K_BELOW, autotune_configs, conv_tile, flat_operands, flat_strides,
                                          nhwc_offsets, pixel_row_flags, reduction_steps, step_block_pointers,
                                          tuned_configs)
from tlcore.kernels.int8_border import border_class, border_corrections
from tlcore.kernels.launch import TunedLaunch


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); int8 MMA needs BLOCK_K >= 32. Checked to
    # compile without register spills on sm_90 (tests/test_kernel_compile.py): 128x256 tiles spill.
    shapes = [
        (128, 128, 64, 3, 8),
        (128, 128, 128, 4, 8),
        (64, 256, 128, 3, 8),
        (256, 64, 128, 3, 8),
        (128, 128, 128, 3, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 4),
    ]
    return autotune_configs(shapes)


@triton.autotune(configs=_configs(), key=["M", "C", "K", "R", "S", "stride_h", "stride_w", "C_GROUP", "K_GROUP",
                                         "PADDED", "HAS_RESIDUAL", "SHIFT_ROUTE", "X_PIXEL_ROWS", "OUT_PIXEL_ROWS"])
@triton.jit
def _int8_conv2d_fwd_kernel(
    x_ptr, w_ptr, mult_ptr, offset_ptr, corr_ptr, res_ptr, out_ptr,
    M, C, H, W, K, OH, OW,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    srn, src, srh, srw,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    shift, res_multiplier, out_zero, out_min, out_max, C_GROUP, K_GROUP,
    top_h, bottom_h, top_w, bottom_w,
    R: tl.constexpr, S: tl.constexpr, FLAT_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GROUPED: tl.constexpr,
    GROUP_ALIGN: tl.constexpr, SHIFT_ROUTE: tl.constexpr, PADDED: tl.constexpr,
    X_PIXEL_ROWS: tl.constexpr, OUT_PIXEL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The weights are channels_last, so their strides are multiples of C_GROUP. Rounding them down
    # to GROUP_ALIGN changes no value but shows the compiler the alignment (tl.multiple_of has no
    # effect on a scalar argument, and a launch marks only 16-divisible ones): without it the weight
    # loads of 4- and 8-channel groups go byte by byte, unpipelined, and most tiles spill.
    swk = (swk // GROUP_ALIGN) * GROUP_ALIGN
    swr = (swr // GROUP_ALIGN) * GROUP_ALIGN
    sws = (sws // GROUP_ALIGN) * GROUP_ALIGN
    FLAT_K: tl.constexpr = FLAT_C > 0
    if FLAT_K:  # the launcher's flat_operands: FLAT_C channels (a multiple of 4), padding written out
        sxn, sxh, sxw, swk, swr, sws = flat_strides(sxn, sxh, sxw, swk, swr, sws, FLAT_C)
        C = FLAT_C
    offs_m, offs_n, mask_m, mask_n, n, oh, ow, ih0, iw0, x_rows, w_cols = conv_tile(
        x_ptr, w_ptr, M, K, OH, OW, sxn, sxh, sxw, swk, stride_h, stride_w, pad_h, pad_w, X_PIXEL_ROWS,
        BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Grouped: this tile's groups' input channels start at c_first. x_rows start there, and each
    # column's weights start where its group does, group_start channels in (negative pointer
    # offsets for a later group's columns: masked off below, never read). Both are multiples of
    # C_GROUP, which GROUP_ALIGN (a power of two dividing it) tells the compiler, and so is the
    # group's end: without the hints the loads are not vectorized, 128x128 tiles spill, and the
    # weight loads, whose mask then looks per byte, are not pipelined (tests/test_kernel_compile.py).
    # The reduction runs over c_span channels, the widest any BLOCK_N tile's groups span, the same
    # for every tile: a trip count or mask bound computed from the tile's own columns kept the
    # compiler from pipelining the loads (cp.async). Channels past a tile's groups get zero weights.
    c_first, c_span = 0, C  # (group_start, group_end: set and read under GROUPED only)
    if GROUPED:
        c_first = tl.multiple_of((tl.min(offs_n, axis=0) // K_GROUP) * C_GROUP, GROUP_ALIGN)
        group_start = tl.multiple_of((offs_n // K_GROUP) * C_GROUP - c_first, GROUP_ALIGN)
        group_end = tl.multiple_of(group_start + C_GROUP, GROUP_ALIGN)
        x_rows += c_first.to(tl.int64) * sxc
        w_cols -= group_start.to(tl.int64) * swc
        # Groups a tile of BLOCK_N columns can touch: tiles start at multiples of BLOCK_N, so a start
        # lies at most K_GROUP - g columns into its group, g = gcd(BLOCK_N, K_GROUP), which for a
        # power-of-two BLOCK_N is the lowest set bit of K_GROUP, at most BLOCK_N.
        tl.static_assert(BLOCK_N & (BLOCK_N - 1) == 0)
        g = tl.minimum(K_GROUP & -K_GROUP, BLOCK_N)
        spanned = (K_GROUP - g + BLOCK_N - 1) // K_GROUP + 1
        c_span = tl.minimum(spanned * C_GROUP, C)

    if PADDED:
        # The accumulator starts at what x's zero point outside the image (read as 0 below) adds to
        # pixels near the image's edges (kernels/int8_border.py); 0 elsewhere. Loaded before the
        # loop, the corrections take no registers beyond the accumulator's own.
        cls = border_class(oh, OH, top_h, bottom_h) * (1 + top_w + bottom_w) + border_class(ow, OW, top_w, bottom_w)
        border = (cls > 0) & mask_m
        acc = tl.load(corr_ptr + cls[:, None] * K + offs_n[None, :], mask=border[:, None] & mask_n[None, :], other=0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    c_blocks = tl.cdiv(c_span, BLOCK_K)
    # The RGB stem (FLAT_K): per-tap blocks of BLOCK_K >= 32 channels would be 3 / 32 or less useful.
    tl.static_assert(not (FLAT_K and GROUPED))
    for step in range(0, reduction_steps(C, R, S, c_blocks, BLOCK_K, FLAT_K)):
        a_ptrs, in_image, b_ptrs, b_mask = step_block_pointers(
            step, c_blocks, x_rows, ih0, iw0, mask_m, w_cols, mask_n, offs_k, C - c_first,
            H, W, R, S, FLAT_K, PADDED, sxc, sxh, sxw, swc, swr, sws, dil_h, dil_w)
        # Outside the image x reads as 0, not as its zero point: the accumulator started with the
        # difference. (A select filling in the zero point took most of the loop's instructions and
        # kept Hopper's tensor cores from reading A from shared memory: tests/test_kernel_compile.py.)
        # Elsewhere the mask only drops channels past the reduction, whose weights are zero, and
        # rows past M, which are not stored.
        a = tl.load(a_ptrs, mask=in_image, other=0)
        if GROUPED:
            chan = (step % c_blocks) * BLOCK_K + offs_k
            b_mask &= (chan[:, None] >= group_start[None, :]) & (chan[:, None] < group_end[None, :])
        b = tl.load(b_ptrs, mask=b_mask, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # Triton <= 3.6 defaults out_dtype to float32

    out_mask = mask_m[:, None] & mask_n[None, :]
    multiplier = tl.load(mult_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    offset = tl.load(offset_ptr + offs_n, mask=mask_n, other=0)
    res = 0
    if HAS_RESIDUAL:
        res_offs = nhwc_offsets(offs_m, n, oh, ow, offs_n, srn, src, srh, srw, OUT_PIXEL_ROWS)
        res = tl.load(res_ptr + res_offs, mask=out_mask, other=0)
    q = requantized(acc, multiplier, offset, res, res_multiplier, shift, out_zero, out_min, out_max, HAS_RESIDUAL,
                     SHIFT_ROUTE)
    out_offs = nhwc_offsets(offs_m, n, oh, ow, offs_n, son, soc, soh, sow, OUT_PIXEL_ROWS)
    tl.store(out_ptr + out_offs, q, mask=out_mask)


def _pointwise_configs():
    # (BLOCK_M, BLOCK_N, TILES, num_stages, num_warps). TILES = 1 is the general kernel's program
    # shape, kept so that the autotuner can prefer it where looping does not pay.
    shapes = [
        (128, 64, 4, 3, 4),
        (128, 128, 4, 3, 8),
        (64, 128, 8, 4, 4),
        (64, 64, 8, 4, 4),
        (256, 64, 2, 3, 8),
        (128, 64, 1, 2, 4),
        (128, 128, 1, 2, 8),
    ]
    return tuned_configs([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TILES": tiles}, num_stages=st, num_warps=wp)
                          for bm, bn, tiles, st, wp in shapes],
                         interpreted={"BLOCK_M": 32, "BLOCK_N": 64, "TILES": 3})


@triton.autotune(configs=_pointwise_configs(), key=["M", "C", "K", "HAS_RESIDUAL", "SHIFT_ROUTE"])
@triton.jit
def _int8_pointwise_kernel(
    x_ptr, w_ptr, mult_ptr, offset_ptr, res_ptr, out_ptr, M, C, K,
    sxm, sxc, swk, swc, srm, src, som, soc,
    shift, res_multiplier, out_zero, out_min, out_max,
    C_PAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SHIFT_ROUTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
):
    """The int8 conv of a pointwise conv on pixel rows (pointwise_rows): out rows = requantized
    (x rows (M, C) @ weight^T (C, K)); s*m: the tensors' pixel (row) strides, s*c / swk: channel ones.

    The reduction is short (in the general kernel one or a few tensor-core steps), so a program of the
    general kernel is mostly a chain of latencies -- rows loaded, the dots, the epilogue, the store --
    with little to overlap them: the first H100 run's 64-channel 1x1 convs reached 3-7% of the int8
    peak, and session 17's register model put 1-2 programs on each SM (bench/NOTES.md). Here a program
    loads one column tile's weights once, then runs TILES row tiles in a loop, whose row loads the
    pipeliner issues stages ahead (cp.async) while earlier tiles compute. (The columns' multipliers
    and offsets load per tile: held across the loop, their int64 registers made four configs spill.)
    """
    # Column tiles vary fastest: the programs that read the same rows run side by side (L2).
    num_n = tl.cdiv(K, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    first_m = tl.program_id(0) // num_n * (TILES * BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, C_PAD)
    mask_n, mask_c = offs_n < K, offs_c < C
    # 64-bit offsets throughout: a single NCHW image (pixel rows too) has channel strides of H * W.
    cols, chans = offs_n.to(tl.int64), offs_c.to(tl.int64)
    w = tl.load(w_ptr + cols[None, :] * swk + chans[:, None] * swc, mask=mask_c[:, None] & mask_n[None, :], other=0)
    for tile in range(TILES):
        multiplier = tl.load(mult_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        offset = tl.load(offset_ptr + offs_n, mask=mask_n, other=0)
        offs_m = first_m + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = offs_m.to(tl.int64)
        # Channels past C read 0 against zero weights; rows past M are not stored.
        x = tl.load(x_ptr + rows[:, None] * sxm + chans[None, :] * sxc, mask=mask_m[:, None] & mask_c[None, :],
                    other=0)
        acc = tl.dot(x, w, out_dtype=tl.int32)
        out_mask = mask_m[:, None] & mask_n[None, :]
        res = 0
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * srm + (cols * src)[None, :], mask=out_mask, other=0)
        q = requantized(acc, multiplier, offset, res, res_multiplier, shift, out_zero, out_min, out_max,
                         HAS_RESIDUAL, SHIFT_ROUTE)
        tl.store(out_ptr + rows[:, None] * som + (cols * soc)[None, :], q, mask=out_mask)


@triton.jit
def requantized(acc, multiplier, offset, res, res_multiplier, shift, out_zero, out_min, out_max,
                 HAS_RESIDUAL: tl.constexpr, SHIFT_ROUTE: tl.constexpr):
    """The epilogue's integer math (tlcore/ops/int8.py) on a (BM, BN) int32 accumulator tile with its
    columns' (BN,) int64 multiplier and offset; res: the (BM, BN) int8 residual (read with HAS_RESIDUAL).
    Returns the int8 codes."""
    total = acc.to(tl.int64) * multiplier[None, :] + offset[None, :]
    if HAS_RESIDUAL:
        total += res.to(tl.int64) * res_multiplier
    if SHIFT_ROUTE == "int64":
        q = (total >> shift) + out_zero  # arithmetic shift: floor division by 2**shift
    else:  # the same in 32-bit words (the int64 shift and clamp take ~12 instructions an output)
        q = _shifted_to_int32(total, shift, SHIFT_ROUTE) + out_zero
    return tl.minimum(tl.maximum(q, out_min), out_max).to(tl.int8)


@triton.jit
def _shifted_to_int32(total, shift, SHIFT_ROUTE: tl.constexpr):
    """floor(total / 2**shift) for int64 |total| < 2**62, as an int32 of magnitude at most 2**30: exact
    where the quotient lies in [-2**30, 2**30), else of its sign and at least 2**29 in magnitude
    (beyond every output code, so the clamp that follows gives the same code).

    SHIFT_ROUTE "high" (shift >= 32): the high word shifted, always exact. "split" (3 <= shift < 32):
    the high word clamped to [-2**(shift-2), 2**(shift-2)), which keeps total wherever the quotient is
    in range and moves it no closer than 2**(29+shift) to zero otherwise; the quotient is then the low
    word of the 64-bit shift, assembled from the two words.
    """
    hi = (total >> 32).to(tl.int32)
    if SHIFT_ROUTE == "high":
        q = hi >> (shift - 32)
    else:
        bound = 1 << (shift - 2)
        hi = tl.minimum(tl.maximum(hi, -bound), bound - 1)
        q = (total.to(tl.uint32) >> shift.to(tl.uint32)).to(tl.int32) | (hi << (32 - shift))
    return q


def shift_route(shift: int) -> str:
    """How the kernel's epilogue floors total / 2**shift (_shifted_to_int32, or in int64 for shifts < 3)."""
    return "high" if shift >= 32 else "split" if shift >= 3 else "int64"


POINTWISE_MAX_CHANNELS = 256  # _int8_pointwise_kernel's whole reduction is one tile of C_PAD channels


def pointwise_rows(x, weight, residual, out, stride, padding, groups) -> bool:
    """Whether _int8_pointwise_kernel runs this conv: 1x1, stride 1, unpadded, ungrouped, at most
    POINTWISE_MAX_CHANNELS input channels, every tensor's pixels in row order (pixel_rows)."""
    _, c, r, s = weight.shape
    flags = pixel_row_flags(x, residual, out, (r, s), stride, padding)
    return groups == 1 and c <= POINTWISE_MAX_CHANNELS and flags["X_PIXEL_ROWS"] and flags["OUT_PIXEL_ROWS"]


def int8_conv2d(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero, relu,
                stride, padding, dilation, out_max, out, groups=1, corrections=None):
    """Launch the int8 conv kernel, writing `out` (shapes in the module docstring): Int8ConvLaunch's one call."""
    launch = Int8ConvLaunch(x_zero, shift, res_multiplier, out_zero, relu, stride, padding, dilation, out_max, groups,
                            corrections)
    launch(x, weight, multiplier, offset, residual, out)


class PlannedConvLaunch:
    """What a Triton int8 conv launcher keeps: the constants of its calls, given here, and what its
    first call plans (the kernel, set last; the padding corrections; the other arguments).

    corrections: a function with border_corrections' arguments and result (one that caches them),
    or None for border_corrections itself.
    """

    def __init__(self, x_zero, shift, res_multiplier, out_zero, relu, stride, padding, dilation, out_max, groups=1,
                 corrections=None):
        self._x_zero, self._stride, self._padding, self._dilation, self._groups = x_zero, stride, padding, dilation, groups
        self._epilogue = (shift, res_multiplier, out_zero, max(out_zero, -128) if relu else -128, out_max)
        self._corrections = corrections or border_corrections
        self._kernel: TunedLaunch | None = None  # (a plan that raises leaves it None)
        self._corr: torch.Tensor | None = None  # the padding corrections (padded convs)
        self._scalars: tuple = ()
        self._constexprs: dict = {}


class Int8ConvLaunch(PlannedConvLaunch):
    """The int8 conv kernels' launches, writing `out` (shapes in the module docstring), for calls with
    the constants given here. The first call picks the kernel (pointwise_rows or the general one) and
    works out its grid and its other arguments, the padding corrections from its weight among them.
    Later calls, which must bring tensors of the first one's sizes and strides and its weight (a launch
    plan's: tlcore/ops/int8.py), only launch. Constants: PlannedConvLaunch's.
    """

    def __init__(self, *constants, **kwargs):
        super().__init__(*constants, **kwargs)
        self._pointwise = self._flat = False

    def __call__(self, x, weight, multiplier, offset, residual, out) -> None:
        weight = weight.contiguous(memory_format=torch.channels_last)  # (a no-op for tlcore's prepared weights)
        if self._kernel is None:
            self._pointwise = pointwise_rows(x, weight, residual, out, self._stride, self._padding, self._groups)
            self._flat = not self._pointwise and self._groups == 1 and x.shape[1] < FLAT_K_BELOW
        if self._flat:
            x, weight = flat_operands(x, weight, self._padding, fill=self._x_zero)
        res = residual if residual is not None else out  # never read when HAS_RESIDUAL is False
        if self._kernel is None:
            (self._plan_pointwise if self._pointwise else self._plan_general)(x, weight, residual, res, out)
        if self._pointwise:
            self._kernel(x, weight, multiplier, offset, res, out, *self._scalars, **self._constexprs)
        else:  # (corr is never read unpadded)
            corr = multiplier if self._corr is None else self._corr
            self._kernel(x, weight, multiplier, offset, corr, res, out, *self._scalars, **self._constexprs)

    def _plan_general(self, x, weight, residual, res, out) -> None:
        n, c, h, w = x.shape
        k, c_group, r, s = weight.shape
        _, _, oh, ow = out.shape
        m = n * oh * ow
        stride, dilation, groups = self._stride, self._dilation, self._groups
        padding = (0, 0) if self._flat else self._padding  # (flat_operands wrote the padding out)
        padded = padding[0] > 0 or padding[1] > 0
        border = (0, 0, 0, 0)
        if padded:
            self._corr, border = self._corrections(weight, self._x_zero, (h, w), (oh, ow), stride, padding, dilation)
        self._scalars = (m, c, h, w, k, oh, ow, *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
                         stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                         *self._epilogue, c_group, k // groups, *border)
        self._constexprs = dict(
            R=r, S=s, FLAT_C=c if self._flat else 0, HAS_RESIDUAL=residual is not None, GROUPED=groups > 1,
            GROUP_ALIGN=math.gcd(c_group, 16), SHIFT_ROUTE=shift_route(self._epilogue[0]), PADDED=padded,
            **pixel_row_flags(x, residual, out, (r, s), stride, padding))
        self._kernel = TunedLaunch(_int8_conv2d_fwd_kernel,
                                   lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),))

    def _plan_pointwise(self, x, weight, residual, res, out) -> None:
        n, c, h, w = x.shape
        k = weight.shape[0]
        m = n * h * w
        rows_per_program = lambda meta: meta["TILES"] * meta["BLOCK_M"]  # noqa: E731
        self._scalars = (m, c, k, x.stride(3), x.stride(1), weight.stride(0), weight.stride(1), res.stride(3),
                         res.stride(1), out.stride(3), out.stride(1), *self._epilogue)
        self._constexprs = dict(C_PAD=max(32, triton.next_power_of_2(c)), HAS_RESIDUAL=residual is not None,
                                SHIFT_ROUTE=shift_route(self._epilogue[0]))
        self._kernel = TunedLaunch(_int8_pointwise_kernel, lambda meta: (
            triton.cdiv(k, meta["BLOCK_N"]) * triton.cdiv(m, rows_per_program(meta)),))


_ELEMENTWISE_BLOCK = 1024


@triton.jit
def _quantize_kernel(x_ptr, out_ptr, total, C, H, W, sxn, sxc, sxh, sxw, inv_scale, zero_point,
                     BLOCK: tl.constexpr):
    # out is NHWC-contiguous: walk it in memory order and gather x through its strides.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = offs % C
    w = (offs // C) % W
    h = (offs // (C * W)) % H
    n = offs // (C * W * H)
    x = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(tl.float32)
    t = tl.floor(x * inv_scale + 0.5)
    t = tl.where(t != t, 0.0, t)  # NaN -> the zero point
    t = tl.minimum(tl.maximum(t, -128.0 - zero_point), 127.0 - zero_point)
    tl.store(out_ptr + offs, (t.to(tl.int32) + zero_point).to(tl.int8), mask=mask)


def quantize_per_tensor(x, inv_scale, zero_point, out):
    """x: (N, C, H, W) float, any strides -> out: (N, C, H, W) int8 channels_last."""
    n, c, h, w = x.shape
    total = x.numel()
    grid = (triton.cdiv(total, _ELEMENTWISE_BLOCK),)
    # No FMA contraction: floor(x * inv + 0.5) must round the product first, like the reference.
    # (Inductor drops this launch option when it compiles a graph holding the op, so there a value
    # a hair from a rounding tie may land one code away; tlcore's models quantize through the
    # opaque quantize_input op instead.)
    wrap_triton(_quantize_kernel)[grid](x, out, total, c, h, w, *x.stride(), inv_scale, zero_point,
                                        BLOCK=_ELEMENTWISE_BLOCK, **_no_fp_fusion(x))


@triton.jit
def _dequantize_kernel(q_ptr, out_ptr, total, C, H, W, sqn, sqc, sqh, sqw, scale, zero_point,
                       BLOCK: tl.constexpr):
    # out is NCHW-contiguous: walk it in memory order and gather q through its strides.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    w = offs % W
    h = (offs // W) % H
    c = (offs // (W * H)) % C
    n = offs // (W * H * C)
    q = tl.load(q_ptr + n * sqn + c * sqc + h * sqh + w * sqw, mask=mask, other=0)
    tl.store(out_ptr + offs, (q.to(tl.int32) - zero_point).to(tl.float32) * scale, mask=mask)


def dequantize_per_tensor(q, scale, zero_point, out):
    """q: (N, C, H, W) int8, any strides -> out: (N, C, H, W) fp32 contiguous."""
    n, c, h, w = q.shape
    total = q.numel()
    grid = (triton.cdiv(total, _ELEMENTWISE_BLOCK),)
    wrap_triton(_dequantize_kernel)[grid](q, out, total, c, h, w, *q.stride(), scale, zero_point,
                                          BLOCK=_ELEMENTWISE_BLOCK)


def _no_fp_fusion(x: torch.Tensor) -> dict:
    """The compile option that turns off FMA contraction (the interpreter has no such option)."""
    return {} if x.device.type == "cpu" else {"enable_fp_fusion": False}
