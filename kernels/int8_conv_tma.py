"""Int8 conv fed by the Tensor Memory Accelerator (TMA): stride-1 and -2 convs on NHWC tensors, for Hopper GPUs.

    x:          (N, C, H, W)     int8 NHWC (channel stride 1), C a multiple of 16 (the stem: any layout)
    weight:     (K, C, R, S)     int8 channels_last, in [-127, 127]
    multiplier: (K,) int32       offset: (K,) int64      corrections: (classes, K) int32 (padded convs)
    residual:   (N, K, OH, OW)   int8 NHWC, optional
    out:        (N, K, OH, OW)   int8 NHWC, K a multiple of 16

The same integer math as kernels/int8_conv.py, bit for bit (its epilogue, `requantized`, and its
padding started in the accumulator, kernels/int8_border.py). What differs is how tiles reach the
tensor cores. The general kernel computes a pointer and a mask per loaded element (index math that
held ~130 instructions per warp and reduction step on sm_90: bench/NOTES.md, sessions 16-17) and
copies tiles asynchronously a thread at a time. Here one thread asks the TMA unit for a whole box of
x: TILE_N images x TILE_H rows x TILE_W columns x BLOCK_K channels at (n, oh + r - pad, ow + s - pad, c),
shifted by each tap; the unit zero-fills positions outside the tensor, which is exactly the padding
the accumulator's start corrects for. Output tiles are such pixel boxes too, so no pixel needs a
division, and the output and residual move as boxes (TMA clips the store at the tensor's edges).

Orientation: the accumulator is (output channels, pixels), weights x pixels^T. Triton keeps a
tensor-core operand in shared memory through a reshape of the loaded box only on the B side
(memdesc_reshape; on the A side the box goes through registers), so the pixel box is B (the wgmma's
N: any multiple of 8 pixels) and the weights (A) come as a plain 2-D box of the (K, R*S*C) matrix.

Pointwise convs (1x1, stride 1, unpadded) on tensors whose pixels lie in row order see x and out as
one image of one row of M pixels: their tiles are runs of BLOCK_M rows, with no waste at image edges.

Stride 2 (ResNets' downsampling 3x3 and 1x1 convs; even H and W, dense pixels): a TMA box steps
through memory one element at a time, so x is seen as (N, H/2, 2, W/2, 2C): input row 2i + p is
(i, p), and pixel 2j + q's channels start at q*C of column j. A tap at row offset d from 2*oh then
reads rows (oh + floor(d/2), d mod 2) of every output row oh, one box again, zero-filled where
oh + floor(d/2) leaves the image exactly where 2*oh + d does. A box of channels must then stay
within one pixel's C (C a multiple of every BLOCK_K, STRIDED_CHANNELS).

The RGB stem (stride 2, at most STEM_CHANNELS channels: too few for a box) runs as a stride-1 conv on
a copy of x: padded (with x's zero point) and rearranged space-to-depth, each 2x2 block of pixels
one pixel of 4 * STEM_CHANNELS channels, with the weight rearranged alike (space_to_depth_operands).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tlcore.kernels.implicit_gemm import pixel_rows, tuned_configs
from tlcore.kernels.int8_border import border_class
from tlcore.kernels.int8_conv import PlannedConvLaunch, requantized, shift_route
from tlcore.kernels.launch import TunedLaunch

try:  # Triton >= 3.4 (torch >= 2.8); older ones run the general kernel
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

_ALIGN = 16  # bytes: TMA wants 16-byte aligned bases and strides
STRIDED_CHANNELS = 128  # stride-2 convs need C a multiple of this: the largest BLOCK_K of _configs
USEFUL_SHARE_KEPT = 0.8  # the autotuner times the configs within this share of the least wasteful's
STEM_CHANNELS = 8  # stride-2 convs with at most this many channels run space-to-depth: 4 * 8 = 32 channels


def _configs(pointwise: bool):
    # (BLOCK_N, TILE_N, TILE_H, TILE_W, BLOCK_K, num_stages, num_warps). Spatial tiles: 8x8 divides
    # 56x56 exactly, 4x32 and 8x16 suit 28 and 14-wide maps (2 of 32 or 16 columns idle), 2x8x8 puts
    # two 7x7 images in a tile, 64x8x8 fits 64-channel convs on 56x56 maps. Pointwise tiles are rows
    # (TILE_N = TILE_H = 1); runs of 256 spill with a residual. Each compiles without spills on sm_90
    # (tests/test_kernel_compile.py). Triton waits for each wgmma with an int32 accumulator before the
    # next (no fp32 accumulator, no overlap: its WGMMAPipeline's rule), so BLOCK_K 128 halves those
    # waits where C allows.
    shapes = [(128, 1, 1, 128, 64, 4, 8), (64, 1, 1, 128, 64, 4, 4), (128, 1, 1, 128, 128, 3, 8),
              (64, 1, 1, 128, 128, 3, 4), (128, 1, 1, 64, 64, 4, 4), (64, 1, 1, 64, 64, 6, 4)] if pointwise else \
             [(128, 1, 8, 16, 64, 4, 8), (64, 1, 8, 16, 64, 4, 4), (128, 1, 8, 8, 64, 4, 4), (128, 1, 4, 32, 64, 4, 8),
              (128, 2, 8, 8, 64, 4, 8), (128, 1, 8, 16, 128, 3, 8), (128, 1, 8, 8, 128, 3, 4),
              (128, 2, 8, 8, 128, 3, 8), (64, 1, 8, 8, 64, 4, 4)]
    return tuned_configs([triton.Config({"BLOCK_N": bn, "TILE_N": tn, "TILE_H": th, "TILE_W": tw, "BLOCK_K": bk},
                                        num_stages=st, num_warps=wp, pre_hook=_set_box_shapes)
                          for bn, tn, th, tw, bk, st, wp in shapes],
                         interpreted={"BLOCK_N": 64, "TILE_N": 1, "TILE_H": 1 if pointwise else 4,
                                      "TILE_W": 64 if pointwise else 8, "BLOCK_K": 64})


def useful_share(config: triton.Config, named_args: dict) -> float:
    """The share of a config's tensor-core work that lands on real outputs and inputs for a launch with
    these arguments (N, OH, OW: the output's pixel grid as the descriptors see it; K, C): tiles past K
    output channels, reduction blocks past C channels (zero-filled) and boxes past the pixel grid
    compute what nothing reads."""
    meta, args = config.kwargs, named_args

    def covered(size: int, tile: int) -> float:
        return size / (-(-size // tile) * tile)

    return covered(args["K"], meta["BLOCK_N"]) * covered(args["C"], meta["BLOCK_K"]) * covered(
        args["N"], meta["TILE_N"]) * covered(args["OH"], meta["TILE_H"]) * covered(args["OW"], meta["TILE_W"])


def _prune_wasteful(configs: list, named_args: dict, **kwargs) -> list:
    """The autotuner's early prune: the configs whose useful_share is within USEFUL_SHARE_KEPT of the best
    one's. A 64-channel conv (ResNet-50's first stage) computes half zeros in 128-channel tiles, a 7x7
    map 4x32 boxes 81% waste: timing those would only add compiles to a model's first forward."""
    shares = [useful_share(config, named_args) for config in configs]
    return [config for config, share in zip(configs, shares) if share >= USEFUL_SHARE_KEPT * max(shares)]


def _set_box_shapes(nargs: dict) -> None:
    """The autotuner's pre-hook: each descriptor's box for this config (they are made before one is chosen)."""
    pixels = [nargs["TILE_N"], nargs["TILE_H"], nargs["TILE_W"]]
    strided = len(nargs["x_desc"].shape) == 5  # (N, H/2, 2, W/2, 2C): one row of each pair a box
    if strided and nargs["C"] % nargs["BLOCK_K"]:  # (a box would reach into the next pixel's channels)
        raise RuntimeError(f"BLOCK_K {nargs['BLOCK_K']} does not divide STRIDED_CHANNELS {STRIDED_CHANNELS}")
    nargs["x_desc"].block_shape = (pixels[:2] + [1] + pixels[2:] if strided else pixels) + [nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["res_desc"].block_shape = pixels + [nargs["BLOCK_N"]]
    nargs["out_desc"].block_shape = pixels + [nargs["BLOCK_N"]]


_KEY = ["N", "OH", "OW", "K", "C", "R", "S", "STRIDE", "PADDED", "HAS_RESIDUAL", "SHIFT_ROUTE"]


@triton.jit
def _int8_conv_tma_body(
    x_desc, w_desc, res_desc, out_desc, mult_ptr, offset_ptr, corr_ptr,
    N, OH, OW, K, C, pad_h, pad_w, dil_h, dil_w,
    shift, res_multiplier, out_zero, out_min, out_max, top_h, bottom_h, top_w, bottom_w,
    R: tl.constexpr, S: tl.constexpr, STRIDE: tl.constexpr, PADDED: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SHIFT_ROUTE: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_N output channels of a TILE_N x TILE_H x TILE_W box of output pixels.
    (N, OH, OW): the output's pixel grid as the descriptors see it."""
    BLOCK_M: tl.constexpr = TILE_N * TILE_H * TILE_W
    # Channel tiles vary fastest: the programs that read the same pixels run side by side (L2).
    num_k = tl.cdiv(K, BLOCK_N)
    pid_k = tl.program_id(0) % num_k
    box = tl.program_id(0) // num_k
    boxes_w = tl.cdiv(OW, TILE_W)
    boxes_h = tl.cdiv(OH, TILE_H)
    ow0 = (box % boxes_w) * TILE_W
    oh0 = (box // boxes_w % boxes_h) * TILE_H
    n0 = box // (boxes_w * boxes_h) * TILE_N
    k0 = pid_k * BLOCK_N
    offs_k = k0 + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K

    if PADDED:  # the accumulator starts at the padding's correction (kernels/int8_border.py)
        pix = tl.arange(0, BLOCK_M)
        oh = oh0 + pix // TILE_W % TILE_H
        ow = ow0 + pix % TILE_W
        inside = (n0 + pix // (TILE_W * TILE_H) < N) & (oh < OH) & (ow < OW)  # (the table has no row past OH)
        cls = border_class(oh, OH, top_h, bottom_h) * (1 + top_w + bottom_w) + border_class(ow, OW, top_w, bottom_w)
        table_mask = ((cls > 0) & inside)[None, :] & mask_k[:, None]
        acc = tl.load(corr_ptr + cls[None, :] * K + offs_k[:, None], mask=table_mask, other=0)
    else:
        # A zero the compiler cannot see (K > 0): from a constant zero, Triton (3.6 to 3.9) compiles the
        # loop for sm_90 with twice the registers (94 -> 199 a thread for 128x128 tiles, in the cubin).
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32) + (K < 0).to(tl.int32)

    # Reduction steps over (tap, channel block). Channels past C load as 0 on the pixel side (outside
    # x's box), so the weights they meet (the next tap's, or past the matrix: 0) add nothing.
    c_blocks = tl.cdiv(C, BLOCK_K)
    for step in range(R * S * c_blocks):
        if R * S == 1:
            tap = 0
            c0 = step * BLOCK_K
        else:
            tap = step // c_blocks
            c0 = (step - tap * c_blocks) * BLOCK_K
        r = tap // S
        s = tap - r * S
        w = w_desc.load([k0, tap * C + c0])
        dh = r * dil_h - pad_h  # the tap's offset from the output pixel's row (times STRIDE), and column
        dw = s * dil_w - pad_w
        if STRIDE == 1:
            px = x_desc.load([n0, oh0 + dh, ow0 + dw, c0])
        else:  # x as (N, H/2, 2, W/2, 2C); the offsets made non-negative first, so that // and % floor
            dh += 2 * pad_h
            dw += 2 * pad_w
            px = x_desc.load([n0, oh0 + dh // 2 - pad_h, dh % 2, ow0 + dw // 2 - pad_w, dw % 2 * C + c0])
        acc = tl.dot(w, tl.reshape(px, (BLOCK_M, BLOCK_K)).T, acc, out_dtype=tl.int32)

    multiplier = tl.load(mult_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
    offset = tl.load(offset_ptr + offs_k, mask=mask_k, other=0)
    res = 0
    if HAS_RESIDUAL:
        res = tl.reshape(res_desc.load([n0, oh0, ow0, k0]), (BLOCK_M, BLOCK_N))
    # (pixels, channels) again: a transposed view of the registers
    q = requantized(acc.T, multiplier, offset, res, res_multiplier, shift, out_zero, out_min, out_max, HAS_RESIDUAL,
                     SHIFT_ROUTE)
    out_desc.store([n0, oh0, ow0, k0], tl.reshape(q, (TILE_N, TILE_H, TILE_W, BLOCK_N)))


# Two autotuned kernels of one body: their config lists differ (pixel boxes or row runs).
_PRUNE = {"early_config_prune": _prune_wasteful}
_int8_conv_tma_kernel = triton.autotune(configs=_configs(pointwise=False), key=_KEY, prune_configs_by=_PRUNE)(
    _int8_conv_tma_body)
_int8_pointwise_tma_kernel = triton.autotune(configs=_configs(pointwise=True), key=_KEY, prune_configs_by=_PRUNE)(
    _int8_conv_tma_body)


def _pixel_strides(t) -> tuple[int, int, int]:
    """t's (N, C, H, W) image, row and pixel strides, those of size-1 dimensions (which torch leaves
    arbitrary and nothing reads through) replaced by a dense tensor's."""
    n, c, h, w = t.shape
    s_w = t.stride(3) if w > 1 else c
    s_h = t.stride(2) if h > 1 else w * s_w
    return (t.stride(0) if n > 1 else h * s_h), s_h, s_w


def _nhwc_box_ready(t) -> bool:
    """Whether TMA can read or write t (N, C, H, W) int8 as a 4-D (N, H, W, C) tensor: unit channel
    stride, 16-byte aligned base and strides, none 0 (an expanded tensor)."""
    strides = _pixel_strides(t)
    return t.stride(1) == 1 and min(strides) > 0 and all(v % _ALIGN == 0 for v in (t.data_ptr(), t.shape[1], *strides))


def tma_applies(x, weight, residual, out, stride, dilation, groups) -> bool:
    """Whether int8_conv2d_tma runs this conv: Triton with tensor descriptors; a CUDA device of compute
    capability 9+ (or the interpreter); ungrouped; the weight, out and the residual NHWC (channels_last)
    with 16-byte aligned strides (K a multiple of 16); and x likewise (C a multiple of 16) at stride 1,
    or at stride 2 on even H and W with x's pixels C apart and C a multiple of STRIDED_CHANNELS; or x
    of at most STEM_CHANNELS channels, any layout, at stride 2 without dilation (space_to_depth_operands)."""
    if TensorDescriptor is None or groups != 1:
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if not all(_nhwc_box_ready(t) for t in (out,) + (() if residual is None else (residual,))):
        return False
    if _space_to_depth_applies(x, stride, dilation):
        return True
    n, c, h, w = x.shape
    if tuple(stride) not in ((1, 1), (2, 2)):
        return False
    if tuple(stride) == (2, 2) and (h % 2 or w % 2 or c % STRIDED_CHANNELS or _pixel_strides(x)[2] != c):
        return False
    weight_rows_ready = weight.is_contiguous(memory_format=torch.channels_last) and \
        weight.data_ptr() % _ALIGN == 0 and weight.shape[1] % _ALIGN == 0  # (K, R*S*C) rows, 16-byte aligned
    return weight_rows_ready and _nhwc_box_ready(x)


def _space_to_depth_applies(x, stride, dilation) -> bool:
    return x.shape[1] <= STEM_CHANNELS and tuple(stride) == (2, 2) and tuple(dilation) == (1, 1)


def space_to_depth_operands(x, weight, x_zero, padding):
    """A stride-2 conv of x (N, C, H, W) with weight (K, C, R, S), C <= STEM_CHANNELS, as the stride-1,
    unpadded conv of x2 (N, 4 * STEM_CHANNELS, ceil(H' / 2), ceil(W' / 2)) with w2 (K, 4 * STEM_CHANNELS,
    ceil(R / 2), ceil(S / 2)), both channels_last; H', W': x's padded sizes.

    x padded with x_zero (the padding written out, rounded up to even sizes; channels to STEM_CHANNELS),
    then x2[n, (p, q, c), i, j] = x[n, c, 2i + p, 2j + q]. Likewise w2[k, (p, q, c), a, b] =
    weight[k, c, 2a + p, 2b + q], zero past R, S and C, so that sum over (r, s, c) of
    x[n, c, 2 oh + r, 2 ow + s] weight[k, c, r, s] is sum over (a, b, (p, q, c)) of
    x2[n, (p, q, c), oh + a, ow + b] w2[k, (p, q, c), a, b]: the same products, exact.
    """
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    (ph, pw), more = padding, STEM_CHANNELS - c
    x = F.pad(x, (pw, pw + (w + 2 * pw) % 2, ph, ph + (h + 2 * ph) % 2, 0, more), value=x_zero)
    _, _, hp, wp = x.shape
    blocks = x.permute(0, 2, 3, 1).reshape(n, hp // 2, 2, wp // 2, 2, STEM_CHANNELS)  # (n, i, p, j, q, c)
    x2 = blocks.permute(0, 1, 3, 2, 4, 5).reshape(n, hp // 2, wp // 2, 4 * STEM_CHANNELS).permute(0, 3, 1, 2)
    r2, s2 = -(-r // 2), -(-s // 2)
    weight = F.pad(weight, (0, 2 * s2 - s, 0, 2 * r2 - r, 0, more))  # (k, c, (a, p), (b, q))
    w2 = weight.reshape(k, STEM_CHANNELS, r2, 2, s2, 2).permute(0, 3, 5, 1, 2, 4).reshape(k, -1, r2, s2)
    return x2, w2.contiguous(memory_format=torch.channels_last)


def _pixel_grid(t, pointwise: bool = False, strided: bool = False) -> tuple[list[int], list[int]]:
    """t (N, C, H, W) as the descriptors' (N, H, W, C) shape and strides; for a pointwise conv one image
    of one row of N*H*W pixels (t's pixels in row order); for a stride-2 conv's x, (N, H/2, 2, W/2, 2C)
    (even H and W, pixels C apart)."""
    n, c, h, w = t.shape
    s_n, s_h, s_w = _pixel_strides(t)
    if pointwise:
        return [1, 1, n * h * w, c], [n * h * w * s_w, n * h * w * s_w, s_w, 1]
    if strided:
        return [n, h // 2, 2, w // 2, 2 * c], [s_n, 2 * s_h, s_h, 2 * s_w, 1]
    return [n, h, w, c], [s_n, s_h, s_w, 1]


def int8_conv2d_tma(x, x_zero, weight, multiplier, offset, shift, residual, res_multiplier, out_zero, relu,
                    stride, padding, dilation, out_max, out, groups=1, corrections=None):
    """Launch the TMA conv, writing `out`: kernels/int8_conv.py's int8_conv2d, for the convs tma_applies
    to (weight channels_last); Int8ConvTmaLaunch's one call."""
    launch = Int8ConvTmaLaunch(x_zero, shift, res_multiplier, out_zero, relu, stride, padding, dilation, out_max,
                               groups, corrections)
    launch(x, weight, multiplier, offset, residual, out)


class Int8ConvTmaLaunch(PlannedConvLaunch):
    """The TMA conv's launches, writing `out`, for calls with the constants given here (as
    kernels/int8_conv.py's Int8ConvLaunch). The first call checks tma_applies, picks the kernel (row runs
    or pixel boxes) and works out the descriptors' shapes, the grid and the other arguments, the
    padding corrections from its weight among them. Later calls, which must bring tensors of the first
    one's sizes and strides (x and the residual 16-byte aligned too) and its weight (a launch plan's:
    tlcore/ops/int8.py), make the descriptors and launch. Constants: PlannedConvLaunch's.
    """

    def __init__(self, *constants, **kwargs):
        super().__init__(*constants, **kwargs)
        self._space_to_depth = False
        self._grids: tuple = ()  # the (shape, strides) of x, the residual and out as descriptors see them

    def __call__(self, x, weight, multiplier, offset, residual, out) -> None:
        if self._kernel is None:
            if not tma_applies(x, weight, residual, out, self._stride, self._dilation, self._groups):
                raise ValueError("int8_conv2d_tma: the TMA kernel does not take this conv (tma_applies)")
            self._space_to_depth = _space_to_depth_applies(x, self._stride, self._dilation)
        if self._space_to_depth:
            x, weight = space_to_depth_operands(x, weight, self._x_zero, self._padding)
        if self._kernel is None:
            self._plan(x, weight, residual, out)
        (x_shape, x_strides), (res_shape, res_strides), (out_shape, out_strides) = self._grids
        placeholder = [1, 1, 1, _ALIGN]  # every box is set per config (_set_box_shapes)
        x_desc = TensorDescriptor(x, x_shape, x_strides, [1] * (len(x_shape) - 4) + placeholder)
        out_desc = TensorDescriptor(out, out_shape, out_strides, placeholder)
        res_desc = out_desc if residual is None else TensorDescriptor(residual, res_shape, res_strides, placeholder)
        k, c, r, s = weight.shape
        w_desc = TensorDescriptor(weight, [k, r * s * c], [r * s * c, 1], [1, _ALIGN])
        corr = multiplier if self._corr is None else self._corr  # (corr is never read unpadded)
        self._kernel(x_desc, w_desc, res_desc, out_desc, multiplier, offset, corr, *self._scalars, **self._constexprs)

    def _plan(self, x, weight, residual, out) -> None:
        stride, padding, dilation = self._stride, self._padding, self._dilation
        if self._space_to_depth:
            stride, padding = (1, 1), (0, 0)
        k, c, r, s = weight.shape
        _, _, oh, ow = out.shape
        strided = tuple(stride) == (2, 2)
        pointwise = (r, s) == (1, 1) and tuple(padding) == (0, 0) and not strided \
            and all(pixel_rows(t) for t in (x, out) + (() if residual is None else (residual,)))
        padded = padding[0] > 0 or padding[1] > 0
        border = (0, 0, 0, 0)
        if padded:
            self._corr, border = self._corrections(weight, self._x_zero, x.shape[2:], (oh, ow), stride, padding,
                                                   dilation)
        out_grid = _pixel_grid(out, pointwise)
        self._grids = (_pixel_grid(x, pointwise, strided),
                       out_grid if residual is None else _pixel_grid(residual, pointwise), out_grid)
        grid_n, grid_h, grid_w = out_grid[0][:3]

        def grid(meta):
            boxes = triton.cdiv(grid_n, meta["TILE_N"]) * triton.cdiv(grid_h, meta["TILE_H"]) * \
                triton.cdiv(grid_w, meta["TILE_W"])
            return (boxes * triton.cdiv(k, meta["BLOCK_N"]),)

        self._scalars = (grid_n, grid_h, grid_w, k, c, padding[0], padding[1], dilation[0], dilation[1],
                         *self._epilogue, *border)
        self._constexprs = dict(R=r, S=s, STRIDE=stride[0], PADDED=padded, HAS_RESIDUAL=residual is not None,
                                SHIFT_ROUTE=shift_route(self._epilogue[0]))
        self._kernel = TunedLaunch(_int8_pointwise_tma_kernel if pointwise else _int8_conv_tma_kernel, grid)
