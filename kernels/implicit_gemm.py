"""Index math shared by the implicit-GEMM conv kernels (kernels/conv.py, kernels/int8_conv.py).

The GEMM view of a conv: rows m = (n, oh, ow) of the output (M = N*OH*OW), columns are
the K output channels, and the reduction runs over (r, s, c). Tensors are addressed
through their strides (any memory format), with 64-bit offsets: a batch of activations
can pass 2**31 elements. These helpers return pointers and masks; each kernel loads
with the fill value its arithmetic needs.
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FLAT_K_BELOW = 16  # convs with fewer input channels (the RGB stem) reduce over (r, s, c) flattened


def autotune_configs(shapes):
    """triton.Configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) tuples (tuned_configs)."""
    return tuned_configs([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st,
                                        num_warps=wp) for bm, bn, bk, st, wp in shapes],
                         interpreted={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4})


def tuned_configs(configs, interpreted):
    """The triton.Configs a kernel autotunes over.

    Under TRITON_INTERPRET=1 one config of the `interpreted` meta-parameters (with the configs'
    pre-hook, which they share): the interpreter runs numpy per program, so a few large tiles are
    fastest, and autotuning would only multiply the (slow) runs. With TLCORE_AUTOTUNE=0 only the first
    config: each new specialization then compiles once instead of once per config (GPU test runs on a
    fresh machine; not for timing).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config(interpreted, pre_hook=configs[0].pre_hook)]
    return configs[:1] if os.environ.get("TLCORE_AUTOTUNE") == "0" else configs


def flat_operands(x, weight, padding, fill):
    """x (N, C, H, W) and weight (K, C, R, S) for the flat reduction of a conv with few channels (the RGB
    stem), both NHWC: x padded with `fill` (the kernel then has no bounds to check) and both with
    channels rounded up to a multiple of 4 (zero weights), so that the reduction's runs of whole
    pixels load as words (flat_strides). The copy costs a pass over the small input."""
    c = x.shape[1]
    channels = -(-c // 4) * 4
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0], 0, channels - c), value=fill)
    weight = F.pad(weight, (0, 0, 0, 0, 0, channels - c))
    nhwc = torch.channels_last
    return x.contiguous(memory_format=nhwc), weight.contiguous(memory_format=nhwc)


@triton.jit
def flat_strides(sxn, sxh, sxw, swk, swr, sws, FLAT_C: tl.constexpr):
    """The strides of flat_operands' x and weight (NHWC with FLAT_C channels: multiples of FLAT_C),
    rounded down to FLAT_C. That changes no value but shows the compiler the alignment (a launch marks
    only 16-divisible integers, and tl.multiple_of does nothing to a scalar argument), so runs of
    FLAT_C channels load as words into the cp.async pipeline instead of element by element."""
    return ((sxn // FLAT_C) * FLAT_C, (sxh // FLAT_C) * FLAT_C, (sxw // FLAT_C) * FLAT_C,
            (swk // FLAT_C) * FLAT_C, (swr // FLAT_C) * FLAT_C, (sws // FLAT_C) * FLAT_C)


@triton.jit
def grouped_tile(M, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row offsets (BLOCK_M,) and column offsets (BLOCK_N,) of this program's output tile.

    Grouped order (the L2 trick of Triton's matmul tutorial): GROUP_M row tiles in a row
    share each weight column tile while it is in L2.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(K, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def output_pixels(offs_m, OH, OW):
    """(n, oh, ow) of output rows offs_m."""
    return offs_m // (OW * OH), (offs_m // OW) % OH, offs_m % OW


@triton.jit
def conv_tile(x_ptr, w_ptr, M, K, OH, OW, sxn, sxh, sxw, swk, stride_h, stride_w, pad_h, pad_w,
              X_PIXEL_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile and where its reduction starts.

    Returns offs_m (BM,), offs_n (BN,) and their masks; the output pixels (n, oh, ow) and
    the top-left input corners (ih0, iw0) of the rows; x_rows (BM,) pointers to
    x[n, 0, ih0, iw0] and w_cols (BN,) pointers to weight[k, 0, 0, 0]. X_PIXEL_ROWS (a 1x1,
    stride-1, unpadded conv on an x whose pixels are in row order, `pixel_rows`): row m reads x's
    pixel m, so x_rows needs no (n, oh, ow), whose integer divisions the compiler then drops
    unless the caller uses them.
    """
    offs_m, offs_n = grouped_tile(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    n, oh, ow = output_pixels(offs_m, OH, OW)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + row_offsets(offs_m, n, ih0, iw0, sxn, sxh, sxw, X_PIXEL_ROWS)
    w_cols = w_ptr + offs_n.to(tl.int64) * swk
    return offs_m, offs_n, offs_m < M, offs_n < K, n, oh, ow, ih0, iw0, x_rows, w_cols


@triton.jit
def tap_block_pointers(step, c_blocks, x_rows, ih0, iw0, row_mask, w_cols, col_mask, offs_k,
                       C, H, W, R: tl.constexpr, S: tl.constexpr, PADDED: tl.constexpr,
                       sxc, sxh, sxw, swc, swr, sws, dil_h, dil_w):
    """Pointers and masks of reduction step `step` = (tap (r, s), channel block).

    x_rows: (BM,) pointers to x[n, 0, ih0, iw0] of each output row; w_cols: (BN,) pointers
    to weight[k, 0, 0, 0]. Returns A (BM, BK) pointers with an in-image mask and B (BK, BN)
    pointers with its mask; A's mask is False at padding and past C. Without padding
    (PADDED False) every tap of a row in the output lies in the image: no bounds checks.
    """
    if R * S == 1:  # a 1x1 conv steps through channel blocks only: no integer division
        tap = 0
        c0 = step * offs_k.shape[0]
    else:
        tap = step // c_blocks
        c0 = (step % c_blocks) * offs_k.shape[0]
    r = tap // S
    s = tap % S
    row_ok = row_mask
    if PADDED:
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        row_ok = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    chan = c0 + offs_k
    chan_ok = chan < C
    x_offset = (r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw
    a_ptrs = x_rows[:, None] + x_offset + (chan.to(tl.int64) * sxc)[None, :]
    w_offset = r.to(tl.int64) * swr + s.to(tl.int64) * sws
    b_ptrs = w_cols[None, :] + w_offset + (chan.to(tl.int64) * swc)[:, None]
    return a_ptrs, row_ok[:, None] & chan_ok[None, :], b_ptrs, chan_ok[:, None] & col_mask[None, :]


@triton.jit
def flat_block_pointers(step, x_rows, row_mask, w_cols, col_mask, offs_k,
                        C, R: tl.constexpr, S: tl.constexpr, sxc, sxh, sxw, swc, swr, sws, dil_h, dil_w):
    """Like tap_block_pointers, with the reduction over (r, s, c) flattened into blocks.

    For few channels (the RGB stem) a per-tap channel block would be mostly padding. The
    operands are flat_operands': x's padding is written out, so no tap leaves the image.
    """
    kk = step * offs_k.shape[0] + offs_k
    k_ok = kk < R * S * C
    c = kk % C
    r = (kk // C) // S
    s = (kk // C) % S
    x_offset = (r * dil_h).to(tl.int64) * sxh + (s * dil_w).to(tl.int64) * sxw + c.to(tl.int64) * sxc
    w_offset = r.to(tl.int64) * swr + s.to(tl.int64) * sws + c.to(tl.int64) * swc
    return (x_rows[:, None] + x_offset[None, :], row_mask[:, None] & k_ok[None, :],
            w_cols[None, :] + w_offset[:, None], k_ok[:, None] & col_mask[None, :])


@triton.jit
def reduction_steps(C, R: tl.constexpr, S: tl.constexpr, c_blocks, BLOCK_K: tl.constexpr, FLAT_K: tl.constexpr):
    """How many steps the reduction takes: (r, s, c) flattened into BLOCK_K blocks, or c_blocks a tap."""
    return tl.cdiv(R * S * C, BLOCK_K) if FLAT_K else R * S * c_blocks


@triton.jit
def step_block_pointers(step, c_blocks, x_rows, ih0, iw0, row_mask, w_cols, col_mask, offs_k, C,
                        H, W, R: tl.constexpr, S: tl.constexpr, FLAT_K: tl.constexpr, PADDED: tl.constexpr,
                        sxc, sxh, sxw, swc, swr, sws, dil_h, dil_w):
    """flat_block_pointers if FLAT_K, else tap_block_pointers; C: the channels from x_rows on;
    PADDED: whether the conv has padding (else no tap leaves the image)."""
    if FLAT_K:
        return flat_block_pointers(step, x_rows, row_mask, w_cols, col_mask, offs_k,
                                   C, R, S, sxc, sxh, sxw, swc, swr, sws, dil_h, dil_w)
    return tap_block_pointers(step, c_blocks, x_rows, ih0, iw0, row_mask, w_cols, col_mask, offs_k,
                              C, H, W, R, S, PADDED, sxc, sxh, sxw, swc, swr, sws, dil_h, dil_w)


@triton.jit
def row_offsets(offs_m, n, h, w, s_n, s_h, s_w, PIXEL_ROWS: tl.constexpr):
    """(BM,) int64 element offsets of pixels [n, :, h, w], the pixels of rows offs_m; with PIXEL_ROWS
    (the tensor's pixels in row order, `pixel_rows`) that is pixel offs_m, at offs_m * s_w."""
    if PIXEL_ROWS:
        return offs_m.to(tl.int64) * s_w
    return n.to(tl.int64) * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w


@triton.jit
def nhwc_offsets(offs_m, n, oh, ow, offs_n, s_n, s_c, s_h, s_w, PIXEL_ROWS: tl.constexpr):
    """(BM, BN) int64 element offsets of output-shaped tensor entries [n, k, oh, ow] of rows offs_m
    and columns offs_n; PIXEL_ROWS as in row_offsets (then the epilogue needs no (n, oh, ow))."""
    rows = row_offsets(offs_m, n, oh, ow, s_n, s_h, s_w, PIXEL_ROWS)
    return rows[:, None] + (offs_n.to(tl.int64) * s_c)[None, :]


def pixel_rows(t: torch.Tensor) -> bool:
    """Whether the pixels of t (N, C, H, W) lie in row order, evenly spaced: pixel (n, h, w) at
    ((n * H + h) * W + w) * t.stride(3), as in a channels_last-contiguous tensor (the kernels'
    row_offsets then skip the (n, h, w) index math). Strides of size-1 dimensions do not matter."""
    n, _, h, w = t.shape
    s_n, _, s_h, s_w = t.stride()
    return (h == 1 or s_h == w * s_w) and (n == 1 or s_n == h * w * s_w)


def pixel_row_flags(x, residual, out, kernel_size, stride, padding) -> dict:
    """The conv kernels' X_PIXEL_ROWS (a 1x1, stride-1, unpadded conv on an x with pixel_rows) and
    OUT_PIXEL_ROWS (out, and the residual if any, with pixel_rows) for this launch."""
    pointwise = tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
    return {"X_PIXEL_ROWS": pointwise and pixel_rows(x),
            "OUT_PIXEL_ROWS": pixel_rows(out) and (residual is None or pixel_rows(residual))}
