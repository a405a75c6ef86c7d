"""Max-pool on int8 codes in Triton (the ResNet stem's 3x3 / 2 pool on GPUs).

    q:   (N, C, H, W)   int8, any strides (NHWC reads are the fast ones)
    out: (N, C, OH, OW) int8 channels_last, written once

Exact: a max of codes is the code of the max, so the output keeps q's scale and zero point.
Positions outside the image are PyTorch's implicit -inf padding: the lowest code, -128, which
loses to every code inside the window (a window of padding only gives -128, as the C++ kernel).
Memory-bound: each program takes a tile of output pixels by channels and reads the window's taps
one after another; neighbouring windows overlap, so most of the re-reads hit the cache.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

_LOWEST_CODE = -128


@triton.jit
def _int8_max_pool_kernel(
    q_ptr, out_ptr, P, C, H, W, OH, OW,
    sqn, sqc, sqh, sqw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Output pixels in (n, oh, ow) row order, P = N * OH * OW of them; int64 offsets, as a batch of
    # large feature maps passes 2**31 bytes.
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ow = pixels % OW
    oh = (pixels // OW) % OH
    n = pixels // (OW * OH)
    in_range = pixels < P
    channel_mask = (channels < C)[None, :]
    channel_offsets = channels.to(tl.int64)[None, :] * sqc
    best = tl.full((BLOCK_P, BLOCK_C), _LOWEST_CODE, tl.int8)
    for r in tl.static_range(KH):
        h = oh * stride_h - pad_h + r * dil_h
        row_inside = in_range & (h >= 0) & (h < H)
        for s in tl.static_range(KW):
            w = ow * stride_w - pad_w + s * dil_w
            inside = row_inside & (w >= 0) & (w < W)
            tap = tl.load(q_ptr + (n * sqn + h * sqh + w * sqw)[:, None] + channel_offsets,
                          mask=inside[:, None] & channel_mask, other=_LOWEST_CODE)
            best = tl.maximum(best, tap)
    tl.store(out_ptr + pixels[:, None] * C + channels[None, :], best, mask=in_range[:, None] & channel_mask)


def int8_max_pool2d(q: torch.Tensor, kernel_size, stride, padding, dilation, out: torch.Tensor) -> None:
    """Write the max-pool of q into out.

    q: (N, C, H, W) int8, any strides; kernel_size, stride, padding, dilation: (h, w) pairs
    (PyTorch's rules: padding <= kernel / 2); out: (N, C, OH, OW) int8 channels_last, its size
    from PyTorch's formula (tlcore.ops.int8_layers._pool_output_size).
    """
    n, c, h, w = q.shape
    oh, ow = out.shape[2:]
    pixels = n * oh * ow
    # A tile of 4096 codes: whole 64-byte channel rows of ResNet's 64-channel stem output.
    block_c = min(triton.next_power_of_2(c), 64)
    block_p = 4096 // block_c
    grid = (triton.cdiv(pixels, block_p), triton.cdiv(c, block_c))
    wrap_triton(_int8_max_pool_kernel)[grid](
        q, out, pixels, c, h, w, oh, ow, *q.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kernel_size[0], KW=kernel_size[1], BLOCK_P=block_p, BLOCK_C=block_c,
    )
