"""The int8 model's ops around its convs (tlcore/ops/int8_layers.py): quantize and dequantize bit-exact
across backends, the max-pool exact against PyTorch's, the average pool and the fc against float64."""
import pytest
import torch
import torch.nn.functional as F

from markers import needs_extension
from numerics import opcheck_utils, rel_error
from tlcore import _extension
from tlcore.backend import use_backend
from tlcore.ops import int8_layers
from tlcore.ops.int8_cpu import CPU_ISA_ENV


@pytest.mark.parametrize("backend_name", ["cpu", "torch", "triton"])
def test_opcheck_quantize_dequantize(backend_name, device):
    if backend_name == "cpu":
        if not _extension.loaded():
            pytest.skip("tlcore._C is not built")
        device = torch.device("cpu")
    x = torch.randn(2, 3, 4, 5, device=device)
    q = int8_layers.quantize_per_tensor(x, 0.02, 3)
    with use_backend(backend_name):
        torch.library.opcheck(torch.ops.tlcore.quantize_per_tensor.default, (x, 50.0, 3),
                              test_utils=opcheck_utils(backend_name, device))
        torch.library.opcheck(torch.ops.tlcore.dequantize_per_tensor.default, (q, 0.02, 3),
                              test_utils=opcheck_utils(backend_name, device))


# ---- quantize / dequantize ------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_quantize_triton_matches_torch(device, layout, dtype):
    x = torch.randn(3, 5, 7, 9, device=device) * 4
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = (torch.randn(3, 10, 7, 18, device=device) * 4)[:, ::2, :, ::2]
    x = x.to(dtype)
    with use_backend("torch"):
        ref = int8_layers.quantize_per_tensor(x, 0.05, -3)
    with use_backend("triton"):
        out = int8_layers.quantize_per_tensor(x, 0.05, -3)
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)
    if _extension.loaded():  # the C++ CPU kernel (fp32; other dtypes take the PyTorch path)
        with use_backend("cpu"):
            out = int8_layers.quantize_per_tensor(x.cpu(), 0.05, -3)
        assert torch.equal(out, ref.cpu()) and out.is_contiguous(memory_format=torch.channels_last)
    # Round half up, saturated, and within half a step of x inside the range.
    real = (ref.float() + 3) * 0.05
    inside = (x.float() > -125 * 0.05) & (x.float() < 130 * 0.05)
    assert (real - x.float())[inside].abs().max() <= 0.025 + 1e-6
    assert ref.min() == -128 and ref.max() == 127
    with use_backend("torch"):
        back_ref = int8_layers.dequantize_per_tensor(ref, 0.05, -3)
    with use_backend("triton"):
        back = int8_layers.dequantize_per_tensor(ref, 0.05, -3)
    assert torch.equal(back, back_ref) and back.is_contiguous() and torch.equal(back, real)


def test_quantize_nan_and_ties(device):
    values = [float("nan"), 0.025, -0.025, 0.075, 1e9, -1e9, float("inf"), float("-inf")]
    expected = [2, 3, 2, 4, 127, -128, 127, -128]  # NaN -> zero point; ties round up; saturation
    # 8 values fill the C++ kernel's AVX2 body, the 9th and 10th its scalar tail.
    x = torch.tensor(values + values[:2], device=device).view(1, 10, 1, 1)
    for name in ("torch", "triton") + (("cpu",) if _extension.loaded() else ()):
        with use_backend(name):
            q = int8_layers.quantize_per_tensor(x if name != "cpu" else x.cpu(), 0.05, 2).flatten().tolist()
        assert q == expected + expected[:2], name


@needs_extension
@pytest.mark.parametrize("shape", [(2, 3, 37, 41), (1, 3, 4, 4), (1, 3, 5, 3), (1, 4, 23, 29)])
def test_quantize_cpu_from_nchw_matches_torch(shape):
    """The C++ kernel's NCHW -> NHWC path: RGB inputs by byte shuffles (16 pixels a step, a short
    tail, blocks of 512 pixels), other channel counts byte by byte."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[3])) * 4
    with use_backend("torch"):
        ref = int8_layers.quantize_per_tensor(x, 0.05, -3)
    with use_backend("cpu"):
        out = int8_layers.quantize_per_tensor(x, 0.05, -3)
    assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_quantize_input_rejects_non_finite_values(backend_name, layout):
    """quantize_input raises on a NaN or an infinity anywhere (the C++ kernel's vector body or scalar
    tail, any block, either layout), and quantizes finite values past the codes' range (whose sum
    overflows float32 too) like quantize_per_tensor."""
    x = torch.randn(2, 3, 13, 11, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    x[0, 0, 0, 0], x[0, 0, 0, 1], x[1, 2, 12, 10] = 3e38, 3e38, -3e38
    with use_backend(backend_name):
        assert torch.equal(int8_layers.quantize_input(x, 0.05, -3), int8_layers.quantize_per_tensor(x, 0.05, -3))
        for value in ("nan", "inf", "-inf"):
            for position in [(0, 0, 0, 0), (0, 1, 5, 7), (1, 2, 12, 10), (1, 2, 12, 3)]:
                bad = x.clone()
                bad[position] = float(value)
                with pytest.raises(ValueError, match="contains NaN or inf"):
                    int8_layers.quantize_input(bad, 0.05, -3)
                # unchecked: quantize_per_tensor's codes (NaN -> the zero point, infinities saturated)
                assert torch.equal(int8_layers.quantize_input(bad, 0.05, -3, check_finite=False),
                                   int8_layers.quantize_per_tensor(bad, 0.05, -3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_quantize_input_in_a_captured_cuda_graph():
    """Unchecked, quantize_input is captured and replays the eager codes; checked, it refuses the
    capture with a message naming the way out, and the GPU stays usable."""
    x = torch.randn(2, 3, 13, 11, device="cuda")
    int8_layers.quantize_input(x, 0.05, -3, check_finite=False)  # (the kernel compiles outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = int8_layers.quantize_input(x, 0.05, -3, check_finite=False)
    x.copy_(torch.randn(2, 3, 13, 11, device="cuda"))
    expected = int8_layers.quantize_input(x, 0.05, -3)
    graph.replay()
    assert torch.equal(captured, expected)
    with pytest.raises(RuntimeError, match="check_finite=False"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        int8_layers.quantize_input(x, 0.05, -3)
    assert torch.equal(int8_layers.quantize_input(x, 0.05, -3), expected)


# 3.5e38 and 1e39 overflow float32 (dequantizing gave NaN), 3e38 times a code does (inf); 1e-39 is
# subnormal there (its inverse overflows), 1e38's inverse is.
@pytest.mark.parametrize("scale, zero", [(0.0, 0), (float("nan"), 0), (-1.0, 0), (0.1, 128), (3.5e38, 0),
                                         (1e39, 0), (3e38, 0), (1e38, 0), (1e-39, 0)])
def test_quantize_bad_qparams(scale, zero):
    with pytest.raises(ValueError):
        int8_layers.quantize_per_tensor(torch.randn(1, 2, 3, 3), scale, zero)
    for name in ("cpu", "torch"):
        with use_backend(name), pytest.raises(ValueError, match="scale|zero_point"):
            int8_layers.quantize_input(torch.randn(1, 2, 3, 3), scale, zero)
    with pytest.raises(ValueError):
        int8_layers.dequantize_per_tensor(torch.zeros(1, 2, 3, 3, dtype=torch.int8), scale, zero)


# ---- max-pool -------------------------------------------------------------------------------

POOL_CASES = [  # shape, kernel, stride, padding, dilation, ceil_mode
    ((2, 64, 17, 15), (3, 3), (2, 2), (1, 1), (1, 1), False),  # the ResNet stem's pool, odd sizes
    ((1, 37, 13, 11), (3, 3), (2, 2), (1, 1), (1, 1), True),
    ((3, 5, 9, 8), (2, 3), (1, 2), (1, 0), (2, 1), True),
    ((1, 70, 6, 6), (2, 2), (2, 2), (0, 0), (1, 1), False),
    ((1, 3, 6, 6), (1, 3), (1, 2), (0, 0), (1, 3), True),  # ceil_mode: the one window runs past the image
    ((2, 4, 2, 2), (3, 3), (2, 2), (0, 0), (1, 1), True),
]


def _pool_device(backend_name, device):
    return device if backend_name == "triton" else torch.device("cpu")


@pytest.mark.parametrize("backend_name", ["triton", pytest.param("cpu", marks=needs_extension), "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "sliced"])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_int8_max_pool_matches_float_pool(case, layout, backend_name, device):
    shape, kernel, stride, padding, dilation, ceil_mode = case
    g = torch.Generator().manual_seed(0)
    if layout == "sliced":  # every other channel and column of a wider tensor: no stride is the packed one
        wide = torch.randint(-128, 128, (shape[0], 2 * shape[1], shape[2], 2 * shape[3]), generator=g, dtype=torch.int8)
        q = wide.contiguous(memory_format=torch.channels_last)[:, ::2, :, ::2]
    else:
        q = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        q = q.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else q
    ref = F.max_pool2d(q.double(), kernel, stride, padding, dilation, ceil_mode).to(torch.int8)
    with use_backend(backend_name):
        out = int8_layers.int8_max_pool2d(q.to(_pool_device(backend_name, device)), kernel, stride, padding,
                                          dilation, ceil_mode)
    assert torch.equal(out.cpu(), ref) and out.is_contiguous(memory_format=torch.channels_last)


def test_triton_max_pool_writes_every_output_code(device):
    """The launcher on a poisoned output: every code is written (no tile or channel block left out), on
    more channels than one block holds and more pixels than one program's tile."""
    from tlcore.kernels.int8_pool import int8_max_pool2d as triton_max_pool

    q = torch.randint(-128, 128, (2, 130, 19, 21), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    ref = F.max_pool2d(q.double(), 3, 2, 1).to(torch.int8)
    for poison in (-128, 127):
        out = torch.full(ref.shape, poison, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
        out = out.to(device)
        triton_max_pool(q.to(device), (3, 3), (2, 2), (1, 1), (1, 1), out)
        assert torch.equal(out.cpu(), ref), poison


@pytest.mark.parametrize("backend_name", ["triton", pytest.param("cpu", marks=needs_extension), "torch"])
def test_int8_max_pool_window_of_padding_only(backend_name, device):
    """A dilated window that lands on padding only (PyTorch's -inf) gives the lowest code, -128, on
    every backend; a non-int8 input or padding past half the kernel is refused (uint8 200 would
    wrap to -56)."""
    q = torch.tensor([[[[5], [-7]]]], dtype=torch.int8, device=_pool_device(backend_name, device))  # (1, 1, 2, 1)
    with use_backend(backend_name):
        out = int8_layers.int8_max_pool2d(q, (2, 1), (4, 1), (1, 0), (3, 1))
        assert out.flatten().tolist() == [-128]
        with pytest.raises(TypeError, match="int8"):
            int8_layers.int8_max_pool2d(q.to(torch.uint8), 2, 2, 0, 1)
        with pytest.raises(ValueError, match="padding <= kernel_size / 2"):
            int8_layers.int8_max_pool2d(q, 2, 1, (0, 2), 1)
        with pytest.raises(ValueError, match="int8_max_pool2d: stride must be an int or a pair of ints"):
            int8_layers.int8_max_pool2d(q, 2, 1.5, 0, 1)
        with pytest.raises(ValueError, match="int8_max_pool2d: padding='same' is not supported"):
            int8_layers.int8_max_pool2d(q, 2, 1, "same", 1)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_opcheck_int8_max_pool(backend_name, device):
    dev = _pool_device(backend_name, device)
    q = torch.randint(-128, 128, (2, 5, 7, 6), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    with use_backend(backend_name):
        torch.library.opcheck(torch.ops.tlcore.int8_max_pool2d.default, (q.to(dev), [3, 3], [2, 2], [1, 1], [1, 1], True),
                              test_utils=opcheck_utils(backend_name, dev))


@needs_extension
def test_int8_max_pool_op_checks():
    q = torch.randint(-128, 128, (2, 5, 7, 6), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    torch.library.opcheck(torch.ops.tlcore._int8_max_pool_cpu.default, (q, [3, 3], [2, 2], [1, 1], [1, 1], True))
    with pytest.raises(RuntimeError, match="padding <= kernel / 2"):
        torch.ops.tlcore._int8_max_pool_cpu(q, [3, 3], [2, 2], [2, 2], [1, 1], False)
    small = q[:, :, :2, :2]  # a 3x3 window does not fit: PyTorch refuses (without ceil_mode), so do the op and fake
    with pytest.raises(RuntimeError, match="smaller than the"):
        torch.ops.tlcore._int8_max_pool_cpu(small, [3, 3], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="smaller than the"):
        int8_layers._pool_output_size(2, 3, 2, 0, 1, False)
    with pytest.raises(ValueError, match="smaller than the"):
        int8_layers._pool_output_size(2, 5, 2, 0, 1, True)  # with ceil_mode too, past a window's reach
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.tlcore._int8_max_pool_cpu(q.float(), [3, 3], [2, 2], [1, 1], [1, 1], False)


# ---- global average pool and fc ---------------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (3, 300, 5, 9), (2, 8, 1, 1)])
def test_int8_global_avg_pool_against_float64(shape, backend_name):
    """Exact int32 sums scaled once: against the float64 mean of the dequantized codes, the same
    bits on every backend and layout; a chunk of 256 channels and a short one (300)."""
    q = torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(shape[1]), dtype=torch.int8)
    q = q.contiguous(memory_format=torch.channels_last)
    ref = ((q.double() + 93) * 0.0371).mean(dim=(2, 3), keepdim=True)
    with use_backend(backend_name):
        out = int8_layers.int8_global_avg_pool(q, 0.0371, -93)
        assert torch.equal(int8_layers.int8_global_avg_pool(q.contiguous(), 0.0371, -93), out)
        assert torch.equal(int8_layers.int8_global_avg_pool(q.transpose(2, 3), 0.0371, -93), out)
    with use_backend("torch"):
        assert torch.equal(int8_layers.int8_global_avg_pool(q, 0.0371, -93), out)
    assert out.dtype == torch.float32 and out.shape == (*shape[:2], 1, 1)
    assert rel_error(out, ref) < 1e-6


@pytest.mark.parametrize("backend_name", [pytest.param("cpu", marks=needs_extension), "torch"])
def test_int8_global_avg_pool_sums_past_int32(backend_name):
    """4200 x 4200 codes of -128 less a zero point of 127: sums past int32 (17.6 M pixels), still exact."""
    q = torch.full((1, 1, 4200, 4200), -128, dtype=torch.int8)
    with use_backend(backend_name):
        out = int8_layers.int8_global_avg_pool(q, 0.5, 127)
    assert out.flatten().tolist() == [-127.5]


def test_int8_global_avg_pool_bad_input():
    q = torch.randint(-128, 128, (1, 4, 3, 3), dtype=torch.int8)
    for bad in (q.float(), q[0], q[:, :, :0]):
        with pytest.raises(ValueError, match="int8 \\(N, C, H, W\\)|empty"):
            int8_layers.int8_global_avg_pool(bad, 0.1, 0)
    with pytest.raises(ValueError, match="scale"):
        int8_layers.int8_global_avg_pool(q, 0.0, 0)


LINEAR_CASES = [(1, 2048, 1000), (8, 512, 10), (3, 37, 11), (2, 7, 1), (5, 64, 6)]  # N, C, K


def linear_case(n: int, c: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + n * c + k)
    x = torch.randn(n, c, generator=g)
    weight = torch.randint(-127, 128, (k, c), generator=g, dtype=torch.int8)
    return x, weight, torch.rand(k, generator=g) * 0.01 + 1e-3, torch.randn(k, generator=g)


@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
@pytest.mark.parametrize("n, c, k", LINEAR_CASES, ids=lambda v: str(v))
def test_int8_weight_linear_against_float64(n, c, k, backend_name, isa, monkeypatch):
    """Random sizes (channels not a multiple of 8, weight rows not a multiple of 4, odd batches),
    a transposed x; as accurate as stock fp32 F.linear on the dequantized weight (2x its error)."""
    monkeypatch.setenv(CPU_ISA_ENV, isa)
    x, weight, w_scale, bias = linear_case(n, c, k)
    dequantized = weight.double() * w_scale.double()[:, None]
    ref = x.double() @ dequantized.T + bias.double()
    stock = F.linear(x, dequantized.float(), bias)
    with use_backend(backend_name):
        out = int8_layers.int8_weight_linear(x, weight, w_scale, bias)
        strided = int8_layers.int8_weight_linear(x.T.contiguous().T, weight, w_scale, bias)
    assert out.dtype == torch.float32 and out.shape == (n, k)
    assert torch.equal(strided, out) or backend_name == "torch"  # the C++ kernel reads a contiguous copy
    for result in (out, strided):
        assert rel_error(result, ref) <= 2 * rel_error(stock, ref) + 1e-7


def test_int8_weight_linear_bad_input():
    x, weight, w_scale, bias = linear_case(2, 16, 3)
    for args in [(x.double(), weight), (x, weight.float()), (x[0], weight), (x, weight[:, :15])]:
        with pytest.raises(ValueError, match="int8 linear"):
            int8_layers.int8_weight_linear(*args, w_scale, bias)


@needs_extension
def test_tail_op_checks():
    q = torch.randint(-128, 128, (2, 5, 7, 6), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    torch.library.opcheck(torch.ops.tlcore._int8_global_avg_pool_cpu.default, (q, 0.1, -5))
    x, weight, w_scale, bias = linear_case(3, 37, 11)
    torch.library.opcheck(torch.ops.tlcore._int8_weight_linear_cpu.default, (x, weight, w_scale, bias, False))
    torch.library.opcheck(torch.ops.tlcore._quantize_cpu.default, (torch.randn(2, 3, 5, 4), 20.0, -3, True))
    with pytest.raises(RuntimeError, match="w_scale and bias"):
        torch.ops.tlcore._int8_weight_linear_cpu(x, weight, w_scale[:5], bias)
