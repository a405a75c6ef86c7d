"""Fused conv2d + folded BatchNorm + residual add + ReLU as a Triton implicit GEMM.

    x:        (N, C, H, W)    fp16 / bf16 / fp32, any strides (NHWC reads are the fast ones)
    weight:   (K, C, R, S)    x's dtype, any strides (channels_last: C is contiguous)
    scale:    (K,)            fp32, BN weight / sqrt(running_var + eps)
    shift:    (K,)            fp32, BN bias + (conv bias - running_mean) * scale
    residual: (N, K, OH, OW)  x's dtype, any strides, optional
    out:      (N, K, OH, OW)  x's dtype, written once: act(conv(x, weight) * scale + shift + residual)

The GEMM view: rows m = (n, oh, ow) of the output (M = N*OH*OW), columns are the K
output channels, and the reduction runs over (r, s, c). The reduction is one flat loop
over (r, s, channel block) so that Triton software-pipelines all of it, not only the
innermost channel loop (a 3x3 conv with C=64 has a single channel block per tap); with
fewer than FLAT_K_BELOW channels it runs over (r, s, c) flattened instead.
Accumulation is fp32; the epilogue runs on the fp32 accumulator before one rounding.
"""
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


FLAT_K_BELOW = 16  # channel counts below this reduce over (r, s, c) flattened


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter runs numpy per program: few large tiles are fastest, and
        # autotuning would only multiply the (slow) runs.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4})]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
        (128, 128, 64, 3, 8),
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 4),
        (128, 64, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp)
        for bm, bn, bk, st, wp in shapes
    ]


@triton.autotune(configs=_configs(), key=["M", "C", "K", "R", "S", "stride_h", "stride_w"])
@triton.jit
def _conv2d_bn_act_fwd_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    M, C, H, W, K, OH, OW,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    srn, src, srh, srw,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, FLAT_K: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2.
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
    # int64: a batch of activations can pass 2**31 elements.
    x_rows = x_ptr + n.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    x_chan = offs_k.to(tl.int64) * sxc
    w_cols = w_ptr + offs_n.to(tl.int64) * swk
    w_chan = offs_k.to(tl.int64) * swc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(C, BLOCK_K)
    steps = tl.cdiv(R * S * C, BLOCK_K) if FLAT_K else R * S * c_blocks
    for step in range(0, steps):
        if FLAT_K:
            # Few channels (the RGB stem): reduce over (r, s, c) flattened, so a block of
            # BLOCK_K is not mostly padding (C=3 fills 3 of 16+ lanes per tap otherwise).
            kk = step * BLOCK_K + offs_k
            k_ok = kk < R * S * C
            c = kk % C
            r = (kk // C) // S
            s = (kk // C) % S
            ih = ih0[:, None] + (r * dil_h)[None, :]
            iw = iw0[:, None] + (s * dil_w)[None, :]
            a_ok = mask_m[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_offset = (r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw + c.to(tl.int64) * sxc
            a = tl.load(x_rows[:, None] + x_offset[None, :], mask=a_ok, other=0.0)
            w_offset = r.to(tl.int64) * swr + s.to(tl.int64) * sws + c.to(tl.int64) * swc
            b = tl.load(w_cols[None, :] + w_offset[:, None], mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        else:
            tap = step // c_blocks
            c0 = (step % c_blocks) * BLOCK_K
            r = tap // S
            s = tap % S
            ih = ih0 + r * dil_h
            iw = iw0 + s * dil_w
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            chan_ok = (c0 + offs_k) < C
            tap_offset = (r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw + c0.to(tl.int64) * sxc
            a = tl.load(x_rows[:, None] + tap_offset + x_chan[None, :],
                        mask=row_ok[:, None] & chan_ok[None, :], other=0.0)
            w_offset = r.to(tl.int64) * swr + s.to(tl.int64) * sws + c0.to(tl.int64) * swc
            b = tl.load(w_cols[None, :] + w_offset + w_chan[:, None],
                        mask=chan_ok[:, None] & mask_n[None, :], other=0.0)
        if BF16_INTERPRETER:
            # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton#11584);
            # bf16 -> fp32 is exact and so are the products, so the result is unchanged.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc * scale[None, :] + shift[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    n64 = n.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    k64 = offs_n.to(tl.int64)
    if HAS_RESIDUAL:
        res_offs = (n64 * srn + oh64 * srh + ow64 * srw)[:, None] + (k64 * src)[None, :]
        y += tl.load(res_ptr + res_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, like torch.relu
    if BF16_INTERPRETER:
        y = _round_to_bf16_grid(y)
    out_offs = (n64 * son + oh64 * soh + ow64 * sow)[:, None] + (k64 * soc)[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _round_to_bf16_grid(y):
    """fp32 -> nearest bf16 value (ties to even), still held in fp32.

    The interpreter's fp32 -> bf16 cast truncates toward zero, a bias that grows over a
    deep network; after this rounding its truncation is exact. NaN passes unchanged.
    """
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(y != y, y, bits.to(tl.float32, bitcast=True))


def conv2d_bn_act(x, weight, scale, shift, residual, out, stride, padding, dilation, relu, allow_tf32):
    """Launch the fused kernel, writing `out` (shapes in the module docstring).

    stride, padding, dilation: (h, w) pairs. allow_tf32 only matters for fp32 inputs.
    """
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    _, _, oh, ow = out.shape
    m = n * oh * ow
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is False
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(_conv2d_bn_act_fwd_kernel)[grid](
        x, weight, scale, shift, res, out,
        m, c, h, w, k, oh, ow,
        *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=r, S=s, FLAT_K=c < FLAT_K_BELOW, HAS_RESIDUAL=residual is not None, RELU=relu,
        DOT_PRECISION="tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee",
        BF16_INTERPRETER=x.dtype == torch.bfloat16 and x.device.type == "cpu",
    )
