"""The padding of a Triton int8 conv, started in its accumulator instead of filled into every input tile.

An int8 conv's padding is x's zero point (real zero), not 0. Loading the input tile with the
zero point at positions outside the image takes a select on every loaded byte (and on Hopper
keeps the tensor cores' A operand out of shared memory); the asynchronous copies fill them with
0 for free. So the conv kernel loads 0 there, and its accumulator starts at what the zero point
would have contributed: x_zero times the sum of weight[k, :, r, s] over the taps (r, s) that fall
outside the image, exact in int32 (at most 128 * 128 * C * R * S in magnitude, and the corrected
sum is the true accumulator: tlcore.ops.int8.MAX_REDUCTION). Which taps fall outside depends
only on how near the image's edges the output pixel lies: the first `top` and last `bottom`
output rows have window taps above or below the image, likewise for columns, and every other
row and column has none. Each border row (column) is a class of its own (1 + its index among
them), interior ones are class 0, and a pixel's class is row_class * column_classes +
column_class; this module's kernel tabulates the correction per class and output channel,
before the conv runs.

    weight: (K, C / G, R, S) int8   ->  corr: (classes, K) int32
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from tlcore.backend import interpreting

# (output channels per program, input channels summed per step). The interpreter's cost is per
# program and per step, hardly per element: it runs larger blocks (multi-block loops stay covered
# by the models' 256- and 512-channel convs).
_BLOCKS, _INTERPRETED_BLOCKS = (64, 64), (128, 128)


def border_lines(size: int, out_size: int, taps: int, stride: int, pad: int, dilation: int) -> tuple[int, int]:
    """(top, bottom): how many of the out_size output rows (or columns) at the start, and at the
    end, have a window tap before or past the image's `size` rows (columns)."""
    top = min(out_size, -(-pad // stride))  # rows i with i * stride - pad < 0
    first_bottom = -(-(size + pad - (taps - 1) * dilation) // stride)  # rows whose last tap is >= size
    return top, out_size - min(out_size, max(0, first_bottom))


@triton.jit
def border_class(i, n_out, top, bottom):
    """The border class of output rows (or columns) i: 0 inside, else 1 + their index among the
    first `top` and then the last `bottom` of the n_out (a row that is both counts as a top one)."""
    return tl.where(i < top, 1 + i, tl.where(i >= n_out - bottom, 1 + top + i - (n_out - bottom), 0))


@triton.jit
def _border_line(cls, n_out, top, bottom):
    """The output row (column) of border class cls >= 1 (border_class's inverse)."""
    return tl.where(cls <= top, cls - 1, n_out - bottom + cls - 1 - top)


@triton.jit
def _border_correction_kernel(
    w_ptr, corr_ptr,
    K, C_GROUP, H, W, OH, OW,
    swk, swc, swr, sws,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    x_zero, top_h, bottom_h, top_w, bottom_w,
    R: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # program (class, column block): the class's row and column classes, and one of its pixels
    cls = tl.program_id(0)
    col_classes = 1 + top_w + bottom_w
    row_class = cls // col_classes
    col_class = cls % col_classes
    oh = _border_line(row_class, OH, top_h, bottom_h)
    ow = _border_line(col_class, OW, top_w, bottom_w)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < K
    offs_c = tl.arange(0, BLOCK_C)
    outside = tl.zeros((BLOCK_N,), dtype=tl.int32)  # sum of the weights of taps outside the image
    for r in tl.static_range(R):
        ih = oh * stride_h - pad_h + r * dil_h
        row_out = (row_class > 0) & ((ih < 0) | (ih >= H))
        for s in tl.static_range(S):
            iw = ow * stride_w - pad_w + s * dil_w
            if row_out | ((col_class > 0) & ((iw < 0) | (iw >= W))):
                for c0 in range(0, C_GROUP, BLOCK_C):
                    chan = c0 + offs_c
                    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * swk + chan[None, :] * swc + r * swr + s * sws,
                                mask=mask_n[:, None] & (chan < C_GROUP)[None, :], other=0)
                    outside += tl.sum(w.to(tl.int32), axis=1)
    tl.store(corr_ptr + cls * K + offs_n, outside * x_zero, mask=mask_n)


def border_corrections(weight, x_zero, in_size, out_size, stride, padding, dilation):
    """The accumulator's padding corrections (module docstring) for a conv of x (.., in_size) into
    (.., out_size): returns corr (classes, K) int32 and (top_h, bottom_h, top_w, bottom_w)."""
    k, c_group, r, s = weight.shape
    top_h, bottom_h = border_lines(in_size[0], out_size[0], r, stride[0], padding[0], dilation[0])
    top_w, bottom_w = border_lines(in_size[1], out_size[1], s, stride[1], padding[1], dilation[1])
    classes = (1 + top_h + bottom_h) * (1 + top_w + bottom_w)
    corr = torch.empty((classes, k), dtype=torch.int32, device=weight.device)
    block_n, block_c = _INTERPRETED_BLOCKS if interpreting() else _BLOCKS
    grid = (classes, triton.cdiv(k, block_n))  # (classes first: a grid's second axis stops at 65535)
    wrap_triton(_border_correction_kernel)[grid](
        weight, corr, k, c_group, *in_size, *out_size, *weight.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        x_zero, top_h, bottom_h, top_w, bottom_w, R=r, S=s, BLOCK_N=block_n, BLOCK_C=block_c)
    return corr, (top_h, bottom_h, top_w, bottom_w)
