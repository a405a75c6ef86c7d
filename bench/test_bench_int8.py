"""CPU INT8 inference at 224x224 (ResNet-18, ResNet-50, ResNeXt-50 32x4d): tlcore.quantize against fp32
eager and torch.ao's x86 int8, same run (and tlcore against torch.ao in turns, forward by forward);
and per layer, tlcore's int8 conv op against torch.ao's
quantized conv on ResNet-18's conv shapes. On a GPU, per layer: the int8 conv op on each GPU
backend over ResNet-50's conv shapes at batch 256 (its bottleneck expansions also with their
residual), in TOP/s and as a share of the measured int8 matmul peak, beside cuDNN's fp16 conv of
each shape and, for the 1x1 convs, cuBLAS's int8 GEMM (test_bench_conv.py times the fp16 fused conv
on the same shapes).

    pytest bench/test_bench_int8.py --benchmark-only --benchmark-group-by=group

Models are torchvision ResNets with their random initialisation (speed does not depend on
the weights), calibrated on the same random batches. Each case checks its answer against
the fp32 model before timing it. Uses torch's intra-op threads (all cores by default).
"tlcore int8 7-bit" is reduce_range=True (torch.ao's x86 choice too): on AVX2 CPUs without
VNNI its convs run on vpmaddubsw. To see such a CPU on a VNNI one, cap every library:
TLCORE_INT8_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2.
"""
import copy
import functools
import os
import warnings

import pytest
import torch
import torchvision

import tlcore
from conftest import DEVICE, needs_gpu, run_benchmark
from test_bench_conv import SHAPES, conv_shapes, shape_id
from tlcore.backend import use_backend
from tlcore.benchmark.provenance import LIBRARY_CAPS
from tlcore.benchmark.timing import Turns, matmul_peak_tflops
from tlcore.ops import int8 as q8
from tlcore.ops.int8_cpu import cpu_algorithm, cpu_isa_for, resolved_cpu_isa_name
from tlcore.ops.conv import output_size

CASES = [("resnet18", 1), ("resnet18", 8), ("resnet50", 1), ("resnet50", 8), ("resnext50_32x4d", 1),
         ("resnext50_32x4d", 8)]
VARIANTS = ["fp32 eager", "torch.ao int8 x86", "tlcore int8", "tlcore int8 7-bit"]
MIN_SQNR_DB = 15.0  # random-weight ResNets quantize less well than trained ones; this catches broken ones
# The caps that make a VNNI CPU behave like an AVX2-only one, recorded with every result.
ISA_CAPS = ("TLCORE_INT8_CPU_ISA", "TLCORE_INT8_CPU_ALGORITHM", *LIBRARY_CAPS)


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30))).item()


@functools.cache
def _calibration() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(4, 3, 224, 224, generator=g) for _ in range(2))


@functools.cache
def _inputs(batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(batch, 3, 224, 224, generator=g) for _ in range(2))


@functools.cache
def _variants(name: str) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    calibration = _calibration()
    variants = {"fp32 eager": model, "tlcore int8": tlcore.quantize(model, calibration, progress=False),
                "tlcore int8 7-bit": tlcore.quantize(model, calibration, reduce_range=True, progress=False)}
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                              example_inputs=(calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        variants["torch.ao int8 x86"] = convert_fx(prepared)
    return variants


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model,batch", CASES)
def test_cpu_int8_forward(benchmark, model, batch, variant):
    variants = _variants(model)
    fn, inputs = variants[variant], _inputs(batch)
    with torch.no_grad():
        sqnr = _sqnr(variants["fp32 eager"](inputs[0]), fn(inputs[0]))
    assert variant == "fp32 eager" or sqnr >= MIN_SQNR_DB, f"{variant}: logits SQNR {sqnr:.1f} dB"
    benchmark.group = f"{model} batch {batch} (CPU, {torch.get_num_threads()} threads)"
    benchmark.extra_info.update(model=model, batch=batch, threads=torch.get_num_threads(),
                                logits_sqnr_db=None if variant == "fp32 eager" else sqnr,
                                tlcore_cpu_isa=resolved_cpu_isa_name(),
                                env={name: os.environ.get(name) for name in ISA_CAPS})
    turn = iter(range(10**9))
    with torch.no_grad():
        benchmark.pedantic(lambda: fn(inputs[next(turn) % len(inputs)]), rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("model,batch", [case for case in CASES if not case[0].startswith("resnext")])
def test_cpu_int8_forward_in_turns(benchmark, model, batch):
    """tlcore int8 (8-bit, and 7-bit as torch.ao's) against torch.ao int8, one forward of each per
    round (Turns): the speedups with the machine's drift shared, which test_cpu_int8_forward's
    one-variant-at-a-time rounds are not. The benchmark's own time is a round's (all three
    forwards); extra_info has each one's median and tlcore's speedups."""
    variants, inputs = _variants(model), _inputs(batch)
    names = ("torch.ao int8 x86", "tlcore int8", "tlcore int8 7-bit")
    turns = Turns.rotating([variants[name] for name in names], [inputs] * len(names))
    with torch.no_grad():
        turns.warm_up()
        benchmark.pedantic(turns, rounds=16, iterations=1)
    assert turns.errors == [None] * len(names), turns.errors
    medians = dict(zip(names, turns.medians_ms()))
    ao_ms = medians["torch.ao int8 x86"]
    benchmark.group = f"{model} batch {batch} in turns (CPU, {torch.get_num_threads()} threads)"
    benchmark.extra_info.update(model=model, batch=batch, threads=torch.get_num_threads(), median_ms=medians,
                                speedup_over_torch_ao=ao_ms / medians["tlcore int8"],
                                seven_bit_speedup_over_torch_ao=ao_ms / medians["tlcore int8 7-bit"],
                                tlcore_cpu_isa=resolved_cpu_isa_name(),
                                env={name: os.environ.get(name) for name in ISA_CAPS})


# (C, K, H, kernel, stride): ResNet-18's distinct conv shapes at 224x224
LAYERS = [(3, 64, 224, 7, 2), (64, 64, 56, 3, 1), (64, 128, 56, 3, 2), (64, 128, 56, 1, 2), (128, 128, 28, 3, 1),
          (128, 256, 28, 3, 2), (256, 256, 14, 3, 1), (256, 512, 14, 3, 2), (512, 512, 7, 3, 1)]
LAYER_BATCH = 8


@pytest.mark.parametrize("variant", ["torch.ao", "tlcore"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda shape: "C{}-K{}-H{}-{}x{}s{}".format(*shape[:4], *shape[3:]))
def test_cpu_int8_conv_layer(benchmark, layer, variant):
    """One conv + requantize + ReLU, int8 NHWC in and out; both sides get prepacked weights."""
    c, k, h, r, stride = layer
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (LAYER_BATCH, c, h, h), generator=g, dtype=torch.int8)
    weight = torch.randint(-127, 128, (k, c, r, r), generator=g, dtype=torch.int8)
    x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    if variant == "tlcore":
        multiplier, offset, shift, _ = q8.requantization(0.02, -128, weight, torch.full((k,), 0.01), None, 0.5, -128)
        packed = q8.pack_weight_cpu(weight, [stride, stride], [1, 1])
        run = lambda: q8.int8_conv2d(x, -128, weight, multiplier, offset, shift, stride=stride,  # noqa: E731
                                     padding=r // 2, relu=True, packed_weight=packed)
        benchmark.extra_info.update(tlcore_cpu_isa=resolved_cpu_isa_name(), algorithm=cpu_algorithm(
            weight.shape, [stride, stride], [1, 1], cpu_isa_for(-128, 127)))
    else:
        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            qx = torch.quantize_per_tensor(x.float().add(128).mul(0.02), 0.02, 0, torch.quint8)
            qw = torch.quantize_per_channel(weight.float() * 0.01, torch.full((k,), 0.01), torch.zeros(k, dtype=torch.long),
                                            0, torch.qint8)
            packed = torch.ops.quantized.conv2d_prepack(qw, None, [stride, stride], [r // 2, r // 2], [1, 1], 1)
        run = lambda: torch.ops.quantized.conv2d_relu(qx, packed, 0.5, 0)  # noqa: E731
    out = run()
    assert out.shape == (LAYER_BATCH, k, (h + 2 * (r // 2) - r) // stride + 1, (h + 2 * (r // 2) - r) // stride + 1)
    macs = LAYER_BATCH * out.shape[2] * out.shape[3] * k * c * r * r
    benchmark.group = f"int8 conv C{c} K{k} H{h} {r}x{r}/{stride} batch {LAYER_BATCH} (CPU)"
    benchmark.extra_info.update(layer=list(layer), batch=LAYER_BATCH, macs=macs,
                                env={name: os.environ.get(name) for name in ISA_CAPS})
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=3)


GPU_LAYER_BATCH = 256


@functools.cache
def _int8_peak_tops() -> float:
    return matmul_peak_tflops(DEVICE, torch.int8)


def gpu_layer_operands(shape, groups=1):
    """(two random int8 (GPU_LAYER_BATCH, C, H, W) channels_last batches, a random int8 (K, C / groups,
    R, S) channels_last weight, the integer operations of one call: 2 per multiply-add the conv needs)."""
    c, k, r, s, stride, padding, h, w = shape
    g = torch.Generator(device=DEVICE).manual_seed(3)
    xs = [torch.randint(-128, 128, (GPU_LAYER_BATCH, c, h, w), generator=g, device=DEVICE, dtype=torch.int8)
          .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    weight = torch.randint(-127, 128, (k, c // groups, r, s), generator=g, device=DEVICE, dtype=torch.int8)
    ops = (2 * GPU_LAYER_BATCH * output_size(h, r, stride, padding, 1) * output_size(w, s, stride, padding, 1) * k
           * (c // groups) * r * s)
    return xs, weight.contiguous(memory_format=torch.channels_last), ops


def gpu_layer_residual(shape):
    """A random int8 (GPU_LAYER_BATCH, K, OH, OW) channels_last residual for a conv of this shape."""
    c, k, r, s, stride, padding, h, w = shape
    oh, ow = output_size(h, r, stride, padding, 1), output_size(w, s, stride, padding, 1)
    return torch.randint(-128, 128, (GPU_LAYER_BATCH, k, oh, ow), device=DEVICE, dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)


def int8_layer(weight, stride, padding, groups=1, residual=None):
    """conv(x, backend): int8 conv of x with weight + requantize (+ residual) + ReLU, int8 NHWC out, on
    that backend. residual: int8 (N, K, OH, OW) for the first N images of x (a ResNet block's last
    conv), at a scale that gives the requantization shift such convs get in tlcore's models (30)."""
    multiplier, offset, shift, res_multiplier = q8.requantization(
        0.02, -128, weight, torch.full((weight.shape[0],), 0.01), None, 0.5, -128,
        None if residual is None else 0.4, -128)

    def conv(x, backend):
        with use_backend(backend):
            return q8.int8_conv2d(x, -128, weight, multiplier, offset, shift, stride=stride, padding=padding,
                                  relu=True, groups=groups, res_multiplier=res_multiplier,
                                  residual=None if residual is None else residual[:x.shape[0]])
    return conv


# ResNet-50's bottleneck expansions (1x1, stride 1, K = 4 C) also run with their block's residual.
LAYER_CASES = [(shape, False) for shape in SHAPES] + [
    (shape, True) for shape in SHAPES if shape[2:5] == (1, 1, 1) and shape[1] == 4 * shape[0]]


def _pointwise_kernel_runs(x, weight, shape) -> bool:
    """Whether the Triton launcher runs this layer's conv of x on its pointwise kernel (pointwise_rows;
    the op's output is channels_last, as is the layer's residual)."""
    from tlcore.kernels.int8_conv import pointwise_rows

    c, k, r, s, stride, padding, h, w = shape
    oh, ow = output_size(h, r, stride, padding, 1), output_size(w, s, stride, padding, 1)
    out = torch.empty((x.shape[0], k, oh, ow), dtype=torch.int8, device=x.device).contiguous(
        memory_format=torch.channels_last)
    return pointwise_rows(x, weight, None, out, (stride, stride), (padding, padding), 1)


def _tma_kernel_runs(x, weight, shape) -> bool:
    """Whether the Triton backend's TMA kernel takes this layer's conv of x (tma_applies; channels_last
    output and residual, as the op's)."""
    from tlcore.kernels.int8_conv_tma import tma_applies

    c, k, r, s, stride, padding, h, w = shape
    oh, ow = output_size(h, r, stride, padding, 1), output_size(w, s, stride, padding, 1)
    out = torch.empty((x.shape[0], k, oh, ow), dtype=torch.int8, device=x.device).contiguous(
        memory_format=torch.channels_last)
    return tma_applies(x, weight.contiguous(memory_format=torch.channels_last), None, out, (stride, stride), (1, 1), 1)


@needs_gpu
@pytest.mark.parametrize("backend", ["triton", "triton-general", "triton-tma", "cuda"])
@pytest.mark.parametrize("shape, residual", LAYER_CASES,
                         ids=[shape_id(shape) + ("-residual" if residual else "") for shape, residual in LAYER_CASES])
def test_gpu_int8_conv_layer(benchmark, shape, residual, backend, monkeypatch):
    """One int8 conv + requantize (+ residual) + ReLU (int8 NHWC in and out) on one GPU backend, checked
    bit-exact first: against the torch reference on 16 images, and at the timed batch (whose autotuned
    tile config differs) against the other GPU backend where there is one. "triton": the Triton
    backend's pointer-fed kernels (its pointwise row-tile loop kernel where it applies, else the
    general kernel); "triton-general": the general kernel on the convs the pointwise one takes;
    "triton-tma": its TMA-fed kernel (sm_90+, kernels/int8_conv_tma.py)."""
    from tlcore import _extension
    from tlcore.backend import select
    from tlcore.kernels import int8_conv
    if backend == "cuda" and not _extension.has_cuda_kernels():
        pytest.skip(f"no CUDA C++ kernels: {_extension.missing_reason()}")
    xs, weight, ops = gpu_layer_operands(shape)
    if backend == "triton-general":
        if not _pointwise_kernel_runs(xs[0], weight, shape):
            pytest.skip("the general kernel is what Triton runs on this shape anyway")
        monkeypatch.setattr(int8_conv, "POINTWISE_MAX_CHANNELS", 0)
    if backend == "triton-tma" and not _tma_kernel_runs(xs[0], weight, shape):
        pytest.skip("the TMA kernel does not take this conv (or this GPU)")
    triton_kernel = "tma" if backend == "triton-tma" else "pointers"
    monkeypatch.setenv(q8.TRITON_KERNEL_ENV, triton_kernel)
    label, backend = backend, "cuda" if backend == "cuda" else "triton"
    with use_backend(backend):  # a fallback to another backend would time the wrong kernel
        assert select(q8.CONV_OP, DEVICE, q8.conv_backends(1)) == backend
    c, k, r, s, stride, padding, h, w = shape
    layer = int8_layer(weight, stride, padding, residual=gpu_layer_residual(shape) if residual else None)
    assert torch.equal(layer(xs[0][:16], backend), layer(xs[0][:16], "torch"))
    other = "cuda" if backend == "triton" else "triton"
    if other == "triton" or _extension.has_cuda_kernels():
        assert torch.equal(layer(xs[0], backend), layer(xs[0], other))
    benchmark.group = _layer_group(shape, residual)
    run_benchmark(benchmark, functools.partial(layer, backend=backend), xs, ops=ops, backend=label,
                  shape=list(shape), residual=residual, batch=GPU_LAYER_BATCH, int8_peak_tops=_int8_peak_tops())
    benchmark.extra_info["share_of_int8_peak"] = benchmark.extra_info["tops"] / _int8_peak_tops()
    if backend == "triton":
        kernel = "tma" if triton_kernel == "tma" else \
            "pointwise" if _pointwise_kernel_runs(xs[0], weight, shape) else "general"
        benchmark.extra_info["triton_kernel"] = kernel
        pointwise = (r, s, stride, padding) == (1, 1, 1, 0)  # (the TMA kernel's row runs)
        benchmark.extra_info["triton_config"] = _autotuned_config(kernel, pointwise=pointwise)


def _layer_group(shape, residual: bool) -> str:
    """The benchmark group of one GPU layer case: its int8 backends and its references side by side."""
    c, k, r, s, stride, padding, h, w = shape
    return (f"int8 conv c{c} k{k} {r}x{s}/{stride} h{h}{' + residual' if residual else ''} "
            f"batch {GPU_LAYER_BATCH} (GPU)")


# The references time the conv (or its GEMM) alone, so they sit beside the cases without a residual;
# only a 1x1 stride-1 unpadded conv is a GEMM over its input's pixel rows.
REFERENCE_CASES = [(shape, "cudnn fp16") for shape in SHAPES] + [
    (shape, "cublas int8 gemm") for shape in SHAPES if shape[2:6] == (1, 1, 1, 0)]


@needs_gpu
@pytest.mark.parametrize("shape, impl", REFERENCE_CASES, ids=[f"{shape_id(shape)}-{impl.replace(' ', '-')}"
                                                              for shape, impl in REFERENCE_CASES])
def test_gpu_conv_layer_reference(benchmark, shape, impl, monkeypatch):
    """What the int8 conv of a layer case is measured against, in its group: cuDNN's fp16 conv of the
    same shape (NHWC, no epilogue, its fastest algorithm: cudnn.benchmark), the per-layer form of the
    issue's "int8 >= 1.5x fp16" bar; and, for the 1x1 stride-1 convs, which are plain GEMMs over NHWC
    pixel rows, cuBLAS's int8 GEMM (torch._int_mm: int32 out, no requantization), the ceiling a fused
    kernel's main loop could reach on that shape. TOP/s counts the same operations as the int8 conv's."""
    c, k, r, s, stride, padding, h, w = shape
    xs, weight, ops = gpu_layer_operands(shape)
    if impl == "cudnn fp16":
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
        xs, weight = [x.half() for x in xs], weight.half()
        run = lambda x: torch.nn.functional.conv2d(x, weight, None, stride, padding)  # noqa: E731
    else:
        xs = [pixel_matrix(x) for x in xs]
        weight_matrix = weight.view(k, c).t()  # (C, K)
        run = lambda x: torch._int_mm(x, weight_matrix)  # noqa: E731
        # float64 products and sums are exact here (|sum| <= 128 * 128 * C < 2**53); CUDA has no int64 matmul
        rows = xs[0][:64]
        assert torch.equal(run(xs[0])[:64].double(), rows.double() @ weight_matrix.double())
    benchmark.group = _layer_group(shape, residual=False)
    run_benchmark(benchmark, run, xs, ops=ops, impl=impl, shape=list(shape), batch=GPU_LAYER_BATCH,
                  cudnn_benchmark=torch.backends.cudnn.benchmark)


def pixel_matrix(x: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) tensor as its (N * H * W, C) matrix of pixel rows (a view)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _autotuned_config(kernel: str = "general", pointwise: bool = False) -> str:
    """The tile configuration the autotuner picked for the latest launch of the Triton int8 conv's
    general, pointwise or tma kernel (pointwise: the TMA kernel's row runs of a 1x1 conv)."""
    from tlcore.kernels import int8_conv, int8_conv_tma

    tuned = {"general": int8_conv._int8_conv2d_fwd_kernel, "pointwise": int8_conv._int8_pointwise_kernel,
             "tma": int8_conv_tma._int8_pointwise_tma_kernel if pointwise else int8_conv_tma._int8_conv_tma_kernel}
    return str(tuned[kernel].best_config)


RESNEXT_GROUPS = 32


@needs_gpu
@pytest.mark.parametrize("impl", ["tlcore int8 triton", "cudnn fp16"])
@pytest.mark.parametrize("shape", conv_shapes("resnext50_32x4d", RESNEXT_GROUPS),
                         ids=shape_id)
def test_gpu_grouped_conv_layer(benchmark, shape, impl):
    """ResNeXt-50's grouped 3x3 convs (32 groups) at batch 256: the Triton int8 kernel with its
    requantize + ReLU epilogue (checked bit-exact at the timed batch, whose autotuned config it
    is, against the torch reference) against cuDNN's fp16 grouped conv, NHWC, the float path
    users otherwise have. TOP/s counts the products a grouped conv needs (the kernel also
    multiplies zero weights across groups)."""
    from tlcore.backend import select
    c, k, r, s, stride, padding, h, w = shape
    xs, weight, ops = gpu_layer_operands(shape, RESNEXT_GROUPS)
    if impl == "cudnn fp16":
        xs, weight = [x.half() for x in xs], weight.half()
        conv = lambda x: torch.nn.functional.conv2d(x, weight, None, stride, padding, 1, RESNEXT_GROUPS)  # noqa: E731
    else:
        with use_backend("triton"):  # a fallback to another backend would time the wrong kernel
            assert select(q8.CONV_OP, DEVICE, q8.conv_backends(RESNEXT_GROUPS)) == "triton"
        layer = int8_layer(weight, stride, padding, RESNEXT_GROUPS)
        assert torch.equal(layer(xs[0], "triton"), layer(xs[0], "torch"))
        conv = functools.partial(layer, backend="triton")
    benchmark.group = (f"grouped conv c{c} k{k} {r}x{s}/{stride} h{h} groups {RESNEXT_GROUPS} "
                       f"batch {GPU_LAYER_BATCH} (GPU)")
    run_benchmark(benchmark, conv, xs, ops=ops, impl=impl, shape=list(shape), batch=GPU_LAYER_BATCH)
    if impl != "cudnn fp16":
        benchmark.extra_info["triton_config"] = _autotuned_config()
