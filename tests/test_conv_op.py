"""torch.ops.tlcore.conv2d_bn_relu against a float64 reference and stock PyTorch."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tlcore
from numerics import ERROR_FLOOR, POISON, assert_close_to_stock, opcheck_utils, rel_error
from tlcore.backend import use_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(device, dtype, n, c, h, w, k, r, s, residual, layout="channels_last"):
    """Random conv inputs in `dtype` with x in the given memory layout."""
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous view: every other channel and column of a bigger tensor
        x = torch.randn(n, 2 * c, h, 2 * w, device=device).to(dtype)[:, ::2, :, ::2]
    weight = (torch.randn(k, c, r, s, device=device) / math.sqrt(c * r * s)).to(dtype)
    scale = torch.rand(k, device=device) + 0.5
    shift = torch.randn(k, device=device) * 0.5
    return x, weight, scale, shift, residual


def reference(x, weight, scale, shift, residual, relu, **conv):
    """float64 conv → scale/shift → + residual → ReLU from the same (low-precision) inputs."""
    y = F.conv2d(x.double(), weight.double(), **conv)
    y = y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def stock(x, weight, scale, shift, residual, relu, **conv):
    """What stock PyTorch computes unfused in x's dtype: conv, BN as scale/shift, add, ReLU."""
    y = F.conv2d(x, weight, **conv)
    y = y * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def run_and_compare(device, dtype, n, c, h, w, k, r, s, stride, padding, dilation, with_residual, relu,
                    layout="channels_last", backend="triton"):
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    x, weight, scale, shift, _ = make_case(device, dtype, n, c, h, w, k, r, s, None, layout)
    ref0 = F.conv2d(x.double(), weight.double(), **conv)
    residual = torch.randn(ref0.shape, device=device).to(dtype) if with_residual else None
    with use_backend(backend):
        out = tlcore.ops.conv2d_bn_relu(x, weight, scale, shift, residual=residual, relu=relu, **conv)
    assert out.shape == ref0.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = reference(x, weight, scale, shift, residual, relu, **conv)
    return assert_close_to_stock(out, stock(x, weight, scale, shift, residual, relu, **conv), ref, dtype,
                                 what=f"{dtype} n={n} c={c} hw={h}x{w} k={k} rs={r}x{s} {conv} {layout}")


CASES = [  # n, c, h, w, k, r, s, stride, padding, dilation
    (1, 3, 17, 19, 16, 7, 7, 2, 3, 1),   # ResNet stem shape family, odd spatial sizes
    (2, 16, 9, 9, 24, 3, 3, 1, 1, 1),
    (1, 33, 7, 5, 17, 1, 1, 1, 0, 1),    # 1x1, odd channel counts (partial tiles everywhere)
    (3, 8, 10, 10, 40, 1, 1, 2, 0, 1),   # strided 1x1 (ResNet downsample)
    (2, 12, 11, 13, 20, 3, 3, 2, 1, 1),  # strided 3x3
    (1, 5, 12, 12, 7, 3, 3, 1, 2, 2),    # dilation
    (2, 6, 9, 14, 10, 1, 3, (1, 2), (0, 1), 1),  # asymmetric kernel and stride
    (1, 70, 6, 6, 70, 3, 3, 1, 1, 1),    # C beyond one channel block
    (1, 70, 7, 5, 17, 1, 1, 1, 0, 1),    # 1x1 over two channel blocks, the second partial
    (2, 18, 6, 7, 12, 1, 1, 1, 1, 1),    # a padded 1x1 conv: its border outputs read only padding
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_matches_reference(device, dtype, case):
    run_and_compare(device, dtype, *case, with_residual=True, relu=True)


@pytest.mark.parametrize("with_residual,relu", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
@pytest.mark.parametrize("taps", [3, 1])
def test_epilogue_variants_and_layouts(device, with_residual, relu, layout, taps):
    """Also a 1x1 stride-1 conv, whose rows are x's pixels (X_PIXEL_ROWS) only for channels_last x; the
    residual comes NCHW, so out and it are addressed by pixel rows (OUT_PIXEL_ROWS) only without it.
    (20 channels: fewer would take the stem's flat path, which copies x to channels_last.)"""
    run_and_compare(device, torch.float16, 2, 20, 9, 7, 12, taps, taps, 1, taps // 2, 1, with_residual, relu, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_matches_reference(device, dtype):
    run_and_compare(device, dtype, 2, 16, 9, 9, 24, 3, 3, 2, 1, 1, True, True, backend="torch")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), hw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
       k=st.integers(1, 40), rs=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), with_residual=st.booleans(), relu=st.booleans(),
       layout=st.sampled_from(["channels_last", "contiguous", "strided"]))
def test_property_random_configs(n, c, hw, k, rs, stride, padding, dilation, with_residual, relu, layout):
    h, w = hw
    r, s = rs
    # only configurations with at least one output pixel
    if any((size + 2 * p - d * (kk - 1) - 1) < 0 for size, p, d, kk in zip(hw, padding, dilation, rs)):
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(n * 1000 + c)
    run_and_compare(device, torch.float16, n, c, h, w, k, r, s, stride, padding, dilation, with_residual, relu,
                    layout)


def test_strided_scale_shift_and_residual(device):
    """(K,) views with strides and a channels_last residual view: the kernel must honour them."""
    x, weight, scale, shift, _ = make_case(device, torch.float32, 2, 6, 7, 9, 5, 3, 3, None)
    scale_view = torch.stack([scale, scale + 1], dim=1)[:, 0]
    shift_view = torch.stack([shift, shift - 1], dim=1)[:, 0]
    residual = torch.randn(2, 9, 10, 5, device=device).permute(0, 3, 1, 2)[:, :, :7, :9]  # (2, 5, 7, 9) view
    with use_backend("triton"):
        out = tlcore.ops.conv2d_bn_relu(x, weight, scale_view, shift_view, padding=1, residual=residual)
    ref = reference(x, weight, scale, shift, residual, True, padding=1)
    assert rel_error(out, ref) < 1e-6


def test_launcher_writes_every_output_element(device):
    """Poison the output, launch the kernel directly, and find no poison left."""
    from tlcore.kernels.conv import conv2d_bn_act

    x, weight, scale, shift, _ = make_case(device, torch.float16, 2, 9, 11, 13, 21, 3, 3, None)
    out = torch.full((2, 21, 6, 7), POISON, dtype=torch.float16, device=device)  # plain NCHW output strides
    conv2d_bn_act(x, weight, scale, shift, None, out, (2, 2), (1, 1), (1, 1), relu=False, allow_tf32=False)
    ref = reference(x, weight, scale, shift, None, False, stride=2, padding=1)
    assert not torch.isnan(out).any()
    assert rel_error(out, ref) < 4 * ERROR_FLOOR[torch.float16]


def test_nan_input_propagates(device):
    x, weight, scale, shift, _ = make_case(device, torch.float32, 1, 4, 6, 6, 5, 3, 3, None)
    x[0, 1, 2, 3] = float("nan")
    with use_backend("triton"):
        out = tlcore.ops.conv2d_bn_relu(x, weight, scale, shift, padding=1)
    stock_out = torch.relu(F.conv2d(x, weight, padding=1) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    assert torch.equal(torch.isnan(out), torch.isnan(stock_out))  # the 3x3 neighbourhood, through the ReLU
    assert torch.isnan(out).sum() == 9 * 5


def test_empty_batch_returns_empty(device):
    x, weight, scale, shift, _ = make_case(device, torch.float16, 1, 4, 6, 6, 5, 3, 3, None)
    out = tlcore.ops.conv2d_bn_relu(x[:0], weight, scale, shift, padding=1)
    assert out.shape == (0, 5, 6, 6)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: {**a, "x": a["x"][0]}, ValueError, "rank"),
    (lambda a: {**a, "x": a["x"].double()}, TypeError, "dtype"),
    (lambda a: {**a, "weight": a["weight"].float()}, TypeError, "weight dtype"),
    (lambda a: {**a, "weight": a["weight"][:, :2]}, ValueError, "channels"),
    (lambda a: {**a, "scale": a["scale"][:3]}, ValueError, "scale"),
    (lambda a: {**a, "shift": a["shift"].half()}, ValueError, "shift"),
    (lambda a: {**a, "residual": torch.zeros(1, 5, 3, 3, dtype=torch.float16)}, ValueError, "residual"),
    (lambda a: {**a, "padding": "same"}, ValueError, "padding"),
    (lambda a: {**a, "stride": 0}, ValueError, "stride"),
    (lambda a: {**a, "stride": 1.5}, ValueError, "stride must be an int or a pair of ints"),
    (lambda a: {**a, "x": a["x"][:, :, :1, :1], "padding": 0}, ValueError, "smaller than"),
])
def test_bad_input_raises_clear_error(mutate, error, match):
    x, weight, scale, shift, _ = make_case("cpu", torch.float16, 1, 4, 6, 6, 5, 3, 3, None)
    args = dict(x=x, weight=weight, scale=scale, shift=shift, padding=1)
    args = mutate(args)
    with pytest.raises(error, match=match):
        tlcore.ops.conv2d_bn_relu(args.pop("x"), args.pop("weight"), args.pop("scale"), args.pop("shift"), **args)


def test_device_mismatch_raises():
    x, weight, scale, shift, _ = make_case("cpu", torch.float16, 1, 4, 6, 6, 5, 3, 3, None)
    with pytest.raises(ValueError, match="x is on cpu but scale on meta: put them on one device"):
        tlcore.ops.conv2d_bn_relu(x, weight, scale.to("meta"), shift, padding=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_runs_in_the_regions_dtype(device, backend, dtype):
    """Under torch.autocast the op casts x, weight and residual to the region's dtype, as stock conv2d does, and
    keeps scale and shift fp32: the result equals a call on the cast inputs, bit for bit. Mixed inputs (a stock
    layer's autocast output into a fused layer's fp32 weight) meet there too; fp64 is not cast and stays refused."""
    x, weight, scale, shift, _ = make_case(device, torch.float32, 2, 6, 7, 9, 5, 3, 3, None)
    residual = torch.randn(2, 5, 7, 9, device=device)
    with use_backend(backend):
        expected = tlcore.ops.conv2d_bn_relu(x.to(dtype), weight.to(dtype), scale, shift, padding=1,
                                             residual=residual.to(dtype))
        with torch.autocast(device.type, dtype=dtype):
            out = tlcore.ops.conv2d_bn_relu(x, weight, scale, shift, padding=1, residual=residual)
            mixed = tlcore.ops.conv2d_bn_relu(x.to(dtype), weight, scale, shift, padding=1, residual=residual)
            with pytest.raises(TypeError, match="float64"):
                tlcore.ops.conv2d_bn_relu(x.double(), weight.double(), scale, shift, padding=1)
    assert out.dtype == dtype and torch.equal(out, expected) and torch.equal(mixed, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_residual,relu", [(True, True), (False, False)])
def test_gradients_match_reference(device, backend, dtype, with_residual, relu):
    """The gradient of every tensor input, against float64 autograd through the unfused ops: within 2x of
    stock PyTorch's own error in the dtype (odd sizes, stride, padding and dilation differing by direction)."""
    conv = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    x, weight, scale, shift, _ = make_case(device, dtype, 2, 5, 9, 11, 6, 3, 3, None)
    residual = torch.randn(2, 6, 5, 11, device=device).to(dtype) if with_residual else None
    inputs = [t for t in (x, weight, scale, shift, residual) if t is not None]
    grad_out = torch.randn(2, 6, 5, 11, device=device).to(dtype)

    def grads(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in inputs]
        x, weight, scale, shift, *residual = leaves
        out = fn(x, weight, scale, shift, residual[0] if residual else None, relu, **conv)
        return torch.autograd.grad(out, leaves, cast(grad_out))

    def fused(x, weight, scale, shift, residual, relu, **conv):
        return tlcore.ops.conv2d_bn_relu(x, weight, scale, shift, residual=residual, relu=relu, **conv)

    with use_backend(backend):
        got = grads(fused, lambda t: t)
    expected = grads(reference, torch.Tensor.double)
    unfused = grads(stock, lambda t: t)
    for name, g, g_stock, g_ref in zip(("x", "weight", "scale", "shift", "residual"), got, unfused, expected):
        assert g.dtype == g_stock.dtype
        # (scale and shift are fp32: their floor is fp32's; stock's error there is its low-precision epilogue's)
        assert_close_to_stock(g, g_stock, g_ref, dtype if g.dtype == dtype else torch.float32, what=name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck(device, backend, with_residual):
    x, weight, scale, shift, _ = make_case(device, torch.float16, 2, 5, 6, 7, 6, 3, 3, None)
    residual = torch.randn(2, 6, 3, 4, device=device).to(torch.float16) if with_residual else None
    for t in (x, weight, residual):  # (the autograd checks need inputs that require gradients)
        if t is not None:
            t.requires_grad_()
    args = (x, weight, scale, shift, residual, [2, 2], [1, 1], [1, 1], True)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.tlcore.conv2d_bn_relu, args, test_utils=opcheck_utils(backend, device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31-element tensors: GPU only")
def test_int64_offsets_past_2_to_the_31():
    n, c, h, w = 9, 64, 2048, 2048  # 2.4e9 elements: 32-bit element offsets would wrap
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(8, c, 1, 1, device="cuda") / 8).half()
    scale, shift = torch.rand(8, device="cuda") + 0.5, torch.randn(8, device="cuda")
    out = tlcore.ops.conv2d_bn_relu(x, weight, scale, shift)
    last = x[-1:, :, -4:, -4:]  # the far end of the tensor, beyond 2**31 elements
    ref = reference(last, weight, scale, shift, None, True)
    assert rel_error(out[-1:, :, -4:, -4:], ref) < 4 * ERROR_FLOOR[torch.float16]
