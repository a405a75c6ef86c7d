"""Fused conv2d + folded BatchNorm + residual add + ReLU as a Triton implicit GEMM.

    x:        (N, C, H, W)    fp16 / bf16 / fp32, any strides (NHWC reads are the fast ones)
    weight:   (K, C, R, S)    x's dtype, any strides (channels_last: C is contiguous)
    scale:    (K,)            fp32, BN weight / sqrt(running_var + eps)
    shift:    (K,)            fp32, BN bias + (conv bias - running_mean) * scale
    residual: (N, K, OH, OW)  x's dtype, any strides, optional
    out:      (N, K, OH, OW)  x's dtype, written once: act(conv(x, weight) * scale + shift + residual)

The GEMM view and its index math are in kernels/implicit_gemm.py. The reduction is one loop
over (r, s, channel block) so that Triton software-pipelines all of it, not only the
innermost channel loop (a 3x3 conv with C=64 has a single channel block per tap); with
fewer than FLAT_K_BELOW channels it runs over (r, s, c) flattened instead, on a copy of x with its
zero padding written out and its channels rounded up to a multiple of 4 (flat_operands).
Accumulation is fp32; the epilogue runs on the fp32 accumulator before one rounding.
"""
import torch
import triton
import triton.language as tl

from tlcore.kernels.implicit_gemm import (FLAT_K_BELOW, autotune_configs, conv_tile, flat_operands, flat_strides,
                                          nhwc_offsets, pixel_row_flags, reduction_steps, step_block_pointers)
from tlcore.kernels.launch import launch_tuned


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Checked to compile without register
    # spills on sm_90 (tests/test_kernel_compile.py): 128x256 tiles spill with a residual.
    shapes = [
        (128, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (64, 256, 64, 3, 8),
        (256, 64, 64, 3, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 8),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 4),
        (128, 64, 32, 4, 4),
    ]
    return autotune_configs(shapes)


@triton.autotune(configs=_configs(), key=["M", "C", "K", "R", "S", "stride_h", "stride_w", "PADDED", "HAS_RESIDUAL",
                                         "X_PIXEL_ROWS", "OUT_PIXEL_ROWS"])
@triton.jit
def _conv2d_bn_act_fwd_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    M, C, H, W, K, OH, OW,
    sxn, sxc, sxh, sxw,
    swk, swc, swr, sws,
    srn, src, srh, srw,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, FLAT_C: tl.constexpr, PADDED: tl.constexpr,
    X_PIXEL_ROWS: tl.constexpr, OUT_PIXEL_ROWS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    FLAT_K: tl.constexpr = FLAT_C > 0
    if FLAT_K:  # the launcher's flat_operands: FLAT_C channels (a multiple of 4), zero padding written out
        sxn, sxh, sxw, swk, swr, sws = flat_strides(sxn, sxh, sxw, swk, swr, sws, FLAT_C)
        C = FLAT_C
    offs_m, offs_n, mask_m, mask_n, n, oh, ow, ih0, iw0, x_rows, w_cols = conv_tile(
        x_ptr, w_ptr, M, K, OH, OW, sxn, sxh, sxw, swk, stride_h, stride_w, pad_h, pad_w, X_PIXEL_ROWS,
        BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_blocks = tl.cdiv(C, BLOCK_K)
    for step in range(0, reduction_steps(C, R, S, c_blocks, BLOCK_K, FLAT_K)):
        a_ptrs, a_mask, b_ptrs, b_mask = step_block_pointers(
            step, c_blocks, x_rows, ih0, iw0, mask_m, w_cols, mask_n, offs_k, C,
            H, W, R, S, FLAT_K, PADDED, sxc, sxh, sxw, swc, swr, sws, dil_h, dil_w)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)  # zero padding
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
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
    if HAS_RESIDUAL:
        res_offs = nhwc_offsets(offs_m, n, oh, ow, offs_n, srn, src, srh, srw, OUT_PIXEL_ROWS)
        y += tl.load(res_ptr + res_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, like torch.relu
    if BF16_INTERPRETER:
        y = _round_to_bf16_grid(y)
    out_offs = nhwc_offsets(offs_m, n, oh, ow, offs_n, son, soc, soh, sow, OUT_PIXEL_ROWS)
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
    flat = x.shape[1] < FLAT_K_BELOW
    if flat:
        x, weight = flat_operands(x, weight, padding, fill=0.0)
        padding = (0, 0)
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    _, _, oh, ow = out.shape
    m = n * oh * ow
    res = residual if residual is not None else out  # never read when HAS_RESIDUAL is False
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)  # noqa: E731
    launch_tuned(_conv2d_bn_act_fwd_kernel, grid,
        x, weight, scale, shift, res, out,
        m, c, h, w, k, oh, ow,
        *x.stride(), *weight.stride(), *res.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=r, S=s, FLAT_C=c if flat else 0, PADDED=padding[0] > 0 or padding[1] > 0,
        **pixel_row_flags(x, residual, out, (r, s), stride, padding),
        HAS_RESIDUAL=residual is not None, RELU=relu,
        DOT_PRECISION="tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee",
        BF16_INTERPRETER=x.dtype == torch.bfloat16 and x.device.type == "cpu",
    )
