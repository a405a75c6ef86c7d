"""Int8 implicit-GEMM conv with the fused requantize epilogue, and per-tensor (de)quantize, in Triton.

    x:          (N, C, H, W)    int8, any strides (NHWC reads are the fast ones)
    weight:     (K, C, R, S)    int8 in [-127, 127], any strides
    multiplier: (K,)            int32      offset: (K,) int64
    residual:   (N, K, OH, OW)  int8, any strides, optional
    out:        (N, K, OH, OW)  int8, written once

The integer math is the contract in tlcore/ops/int8.py: tl.dot multiplies int8 tiles into
an exact int32 accumulator (tensor-core IMMA on GPUs), positions outside the image read as
x_zero, and the epilogue is int64 fixed point, so results equal the reference bit for bit.
The GEMM view and the flat (tap, channel block) reduction loop are those of kernels/conv.py.
"""
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4})]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); int8 MMA needs BLOCK_K >= 32
        (128, 128, 64, 3, 8),
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 128, 3, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp)
        for bm, bn, bk, st, wp in shapes
    ]


@triton.autotune(configs=_configs(), key=["M", "C", "K", "R", "S", "stride_h", "stride_w"])
@triton.jit
def _int8_conv2d_fwd_kernel(
    x_ptr, w_ptr, mult_ptr, offset_ptr, res_ptr, out_ptr,
    M, C, H, W, K, OH, OW,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    srn, src, srh, srw,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_zero, shift, res_multiplier, out_zero, out_min, out_max,
    R: tl.constexpr, S: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < K

    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    n = offs_m // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + n.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    x_chan = offs_k.to(tl.int64) * sxc
    w_cols = w_ptr + offs_n.to(tl.int64) * swk
    w_chan = offs_k.to(tl.int64) * swc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    c_blocks = tl.cdiv(C, BLOCK_K)
    for step in range(0, R * S * c_blocks):
        tap = step // c_blocks
        c0 = (step % c_blocks) * BLOCK_K
        r = tap // S
        s = tap % S
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        chan_ok = (c0 + offs_k) < C
        tap_offset = (r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw + c0.to(tl.int64) * sxc
        in_image = row_ok[:, None] & chan_ok[None, :]
        a = tl.load(x_rows[:, None] + tap_offset + x_chan[None, :], mask=in_image, other=0)
        # Outside the image x reads as its zero point (real zero); past C the weights are zero.
        a = tl.where(in_image, a, x_zero).to(tl.int8)
        w_offset = r.to(tl.int64) * swr + s.to(tl.int64) * sws + c0.to(tl.int64) * swc
        b = tl.load(w_cols[None, :] + w_offset + w_chan[:, None], mask=chan_ok[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc)

    multiplier = tl.load(mult_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    offset = tl.load(offset_ptr + offs_n, mask=mask_n, other=0)
    total = acc.to(tl.int64) * multiplier[None, :] + offset[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    n64 = n.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    k64 = offs_n.to(tl.int64)
    if HAS_RESIDUAL:
        res_offs = (n64 * srn + oh64 * srh + ow64 * srw)[:, None] + (k64 * src)[None, :]
        res = tl.load(res_ptr + res_offs, mask=out_mask, other=0).to(tl.int64)
        total += res * res_multiplier
    q = (total >> shift) + out_zero  # arithmetic shift: floor division by 2**shift
    q = tl.minimum(tl.maximum(q, out_min), out_max)
    out_offs = (n64 * son + oh64 * soh + ow64 * sow)[:, None] + (k64 * soc)[None, :]
    tl.store(out_ptr + out_offs, q.to(tl.int8), mask=out_mask)


def int8_conv2d(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero, relu,
                stride, padding, dilation, out_max, out):
    """Launch the int8 conv kernel, writing `out` (shapes in the module docstring)."""
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    _, _, oh, ow = out.shape
    m = n * oh * ow
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is False
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(_int8_conv2d_fwd_kernel)[grid](
        x, weight, multiplier, offset, res, out,
        m, c, h, w, k, oh, ow,
        *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        x_zero, shift, res_multiplier, out_zero, max(out_zero, -128) if relu else -128, out_max,
        R=r, S=s, HAS_RESIDUAL=residual is not None,
    )


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
