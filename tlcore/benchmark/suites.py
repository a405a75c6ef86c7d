"""The benchmark modes: which variants run, on what inputs, checked against what.

A Suite holds the variants of one mode for one model: each is checked against the
suite's reference output first (a variant that disagrees is reported failed, not
timed), then timed on rotating inputs (on a CPU all in turns, round by round).
Speedups are over the suite's baseline variant.
"""
import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import tlcore
from tlcore.benchmark.timing import graph_median_ms, memory_peak_gbs, matmul_peak_tflops, median_ms, time_in_turns

ROTATING_INPUTS = 3  # batches cycled through while timing
CALIBRATION_BATCHES = 4
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2, "int8": 0.25}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """TOLERANCE[dtype]; fp32 convs on a GPU run in TF32 when torch allows it (its default for convs),
    which keeps fp16's 10-bit mantissa, so they get fp16's tolerance."""
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return TOLERANCE[torch.float16 if tf32 else dtype]


@dataclass
class Variant:
    name: str
    fn: Callable[[object], object]  # one call on one input: a forward, or an optimizer step
    inputs: list
    tolerance: float  # largest relative error against the suite's reference that is timed
    output: Callable[[], torch.Tensor] | None = None  # the result to check; default fn(inputs[0])
    work: float | None = None  # FLOPs or bytes of one call, when not the suite's


@dataclass
class Suite:
    mode: str
    model: str
    batch: int
    device: torch.device
    baseline: str  # variant name speedups are measured against
    reference: torch.Tensor
    work: float  # FLOPs of one call (or bytes, when rate_unit is GB/s)
    rate_unit: str  # "TFLOP/s" or "GB/s"
    peak: float  # measured ceiling in rate_unit
    variants: list[Variant] = field(default_factory=list)


@dataclass
class Result:
    mode: str
    model: str
    batch: int
    variant: str
    status: str = "ok"  # "ok", "failed: <why>" or "skipped: <why>"
    median_ms: float | None = None
    graph_ms: float | None = None  # GPU models: the median replayed as a CUDA graph (None: not capturable)
    images_per_s: float | None = None
    speedup: float | None = None
    rate: float | None = None
    rate_unit: str = ""
    peak_share: float | None = None
    rel_error: float | None = None


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run(suite: Suite, min_run_time_s: float, progress=None) -> list[Result]:
    """Check every variant of `suite`, then time those that agree: one after the other on a GPU
    (do_bench), in turns on a CPU (time_in_turns: a drifting machine would favour some)."""
    results, checked = [], []
    for variant in suite.variants:
        result = Result(suite.mode, suite.model, suite.batch, variant.name, rate_unit=suite.rate_unit)
        timed_later = False
        try:
            with torch.no_grad():
                out = variant.output() if variant.output else variant.fn(variant.inputs[0])
                result.rel_error = rel_error(out, suite.reference)
                if not result.rel_error <= variant.tolerance:  # NaN fails too
                    result.status = f"failed: error {result.rel_error:.3g} > {variant.tolerance:g}"
                elif suite.device.type == "cuda":
                    result.median_ms = median_ms(variant.fn, variant.inputs, suite.device, min_run_time_s)
                    if suite.mode != "optim":  # (an optimizer's step count lives on the host)
                        result.graph_ms = graph_median_ms(variant.fn, variant.inputs)
                else:
                    checked.append((variant, result))
                    timed_later = True
        except Exception as error:  # noqa: BLE001 - one broken variant must not end the run
            result.status = f"failed: {type(error).__name__}: {error}"[:200]
        results.append(result)
        if progress is not None and not timed_later:
            progress.update(1)
    if checked:
        with torch.no_grad():
            turns = time_in_turns([v.fn for v, _ in checked], [v.inputs for v, _ in checked], min_run_time_s)
        for (_, result), ms, error in zip(checked, turns.medians_ms(), turns.errors):
            result.median_ms = ms
            if error is not None:
                result.status = f"failed while timed: {type(error).__name__}: {error}"[:200]
        if progress is not None:
            progress.update(len(checked))
    for variant, result in zip(suite.variants, results):
        if result.median_ms:
            seconds = result.median_ms * 1e-3
            result.images_per_s = suite.batch / seconds if suite.mode != "optim" else None
            scale = 1e9 if suite.rate_unit == "GB/s" else 1e12
            result.rate = (variant.work or suite.work) / seconds / scale
            result.peak_share = result.rate / suite.peak if suite.peak == suite.peak else None
    base = next((r for r in results if r.variant == suite.baseline and r.median_ms), None)
    for r in results:
        if base and r.median_ms:
            r.speedup = base.median_ms / r.median_ms
    return results


# ---- building the suites ------------------------------------------------------------------------

def _model(name: str, device: torch.device) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)  # random weights: there are no downloads; speed does not depend on them
    return getattr(torchvision.models, name)().eval().to(device)


def _images(batch: int, device: torch.device, count: int, size: int) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, size, size, device=device) for _ in range(count)]


@contextlib.contextmanager
def ieee_fp32():
    """fp32 convs and matmuls in IEEE precision inside the block: TF32 off for cuDNN and cuBLAS
    (and for tlcore's fp32 conv, which follows torch.backends.cudnn.allow_tf32)."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _fp32_reference(model, x) -> torch.Tensor:
    """The fp32 model's output with TF32 off, the reference every variant is checked against."""
    with ieee_fp32(), torch.no_grad():
        return model(x)


def _forward_flops(model, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def _channels_last(xs, dtype):
    return [x.to(dtype).contiguous(memory_format=torch.channels_last) for x in xs]


def fuse_suite(name: str, batch: int, device: torch.device, dtype: torch.dtype, compile_: bool,
               compile_mode: str = "default", size: int = 224) -> Suite:
    """Forward latency: stock eager (and torch.compile) against tlcore.fuse."""
    model = _model(name, device)
    inputs = _images(batch, device, ROTATING_INPUTS, size)
    reference = _fp32_reference(model, inputs[0])
    dtype = dtype if device.type == "cuda" else torch.float32  # CPU: fp32 is what people run
    dt = DTYPE_NAMES[dtype]
    low = copy.deepcopy(model).to(dtype).to(memory_format=torch.channels_last)
    low_inputs = _channels_last(inputs, dtype)
    baseline = f"eager {dt} channels_last" if device.type == "cuda" else "eager fp32"
    suite = Suite("fuse", name, batch, device, baseline, reference, _forward_flops(model, inputs[0][:1]) * batch,
                  "TFLOP/s", matmul_peak_tflops(device, dtype))
    tolerance = _tolerance(dtype, device)
    suite.variants.append(Variant("eager fp32", model, inputs, _tolerance(torch.float32, device)))
    suite.variants.append(Variant(f"eager {dt} channels_last", low, low_inputs, tolerance))
    if compile_:
        suite.variants.append(Variant(f"torch.compile {dt}", torch.compile(low, mode=compile_mode), low_inputs,
                                      tolerance))
    fused = tlcore.fuse(low)
    suite.variants.append(Variant(f"tlcore.fuse {dt}", fused, low_inputs, tolerance))
    if compile_:
        suite.variants.append(Variant(f"tlcore.fuse + torch.compile {dt}", torch.compile(fused, mode=compile_mode), low_inputs,
                                      tolerance))
    return suite


def int8_suite(name: str, batch: int, device: torch.device, dtype: torch.dtype, size: int = 224) -> Suite:
    """Forward latency of INT8 models: tlcore.quantize against torch.ao (CPU) and float eager."""
    model = _model(name, device)
    inputs = _images(batch, device, ROTATING_INPUTS, size)
    calibration = _images(batch, device, CALIBRATION_BATCHES, size)
    reference = _fp32_reference(model, inputs[0])
    suite = Suite("int8", name, batch, device, "eager fp32", reference,
                  _forward_flops(model, inputs[0][:1]) * batch, "TOP/s", 0.0)
    if device.type == "cuda":
        low = copy.deepcopy(model).to(dtype).to(memory_format=torch.channels_last)
        dt = DTYPE_NAMES[dtype]
        suite.baseline = f"eager {dt} channels_last"
        suite.peak = matmul_peak_tflops(device, torch.int8)
        suite.variants.append(Variant(suite.baseline, low, _channels_last(inputs, dtype), _tolerance(dtype, device)))
    else:
        suite.peak = float("nan")  # no int8 matmul ceiling to measure on CPU: no "% of peak"
        suite.variants.append(Variant("eager fp32", model, inputs, _tolerance(torch.float32, device)))
        suite.variants.append(Variant("torch.ao int8 (x86)", _torch_ao_int8(model, calibration), inputs,
                                      TOLERANCE["int8"]))
    quantized = tlcore.quantize(model, calibration)
    suite.variants.append(Variant("tlcore.quantize int8", quantized, inputs, TOLERANCE["int8"]))
    if device.type == "cuda":  # each conv on the GPU backend measured fastest for it, against each backend alone
        for backend, label in (("triton", "Triton"), ("cuda", "CUDA C++")):
            only = tlcore.quantize(model, calibration, backend=backend, progress=False)
            suite.variants.append(Variant(f"tlcore.quantize int8, {label} convs only", only, inputs, TOLERANCE["int8"]))
        # without the input check's wait for the GPU: the int8 model a CUDA graph can capture ("graph ms")
        unchecked = tlcore.quantize(model, calibration, check_finite=False, progress=False)
        suite.variants.append(Variant("tlcore.quantize int8, check_finite=False", unchecked, inputs, TOLERANCE["int8"]))
    if device.type == "cpu":  # 7-bit activations, torch.ao's x86 precision: vpmaddubsw on AVX2 without VNNI
        seven_bit = tlcore.quantize(model, calibration, reduce_range=True)
        suite.variants.append(Variant("tlcore.quantize int8 7-bit", seven_bit, inputs, TOLERANCE["int8"]))
    return suite


def _torch_ao_int8(model, calibration):
    """torch.ao's x86 post-training quantization: HistogramObserver activations, per-channel weights."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (calibration[0],))
    with torch.no_grad():
        for x in calibration:
            prepared(x)
    return convert_fx(prepared)


def optim_suite(name: str, device: torch.device, dtype: torch.dtype) -> Suite:
    """Optimizer step time over a model's parameters: tlcore 16-bit + SR against torch AdamW on fp32."""
    shapes = [p.shape for p in _model(name, "meta").parameters()]
    numel = sum(s.numel() for s in shapes)
    low_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    torch.manual_seed(0)
    start = [torch.randn(s, device=device) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]

    def torch_adamw(**kw):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return params, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **kw)

    def tlcore_adamw():
        params = [torch.nn.Parameter(p.to(low_dtype)) for p in start]
        for p, g in zip(params, grads):
            p.grad = g.to(low_dtype)
        return params, tlcore.optim.AdamW(params, lr=1e-3, weight_decay=0.05, seed=0)

    reference_params, reference_opt = torch_adamw(foreach=True)
    reference_opt.step()
    reference = torch.cat([p.detach().flatten() for p in reference_params])
    # Bytes each step must move: read param, grad, two states; write param and two states.
    fp32_bytes, low_bytes = numel * 4 * 7, numel * (2 + 2 + 2 + 2 * 2 * 2)
    suite = Suite("optim", name, 1, device, "torch AdamW foreach fp32", reference, fp32_bytes, "GB/s",
                  memory_peak_gbs(device))
    candidates = [("torch AdamW foreach fp32", lambda: torch_adamw(foreach=True), fp32_bytes),
                  ("torch AdamW fused fp32", lambda: torch_adamw(fused=True), fp32_bytes),
                  (f"tlcore AdamW {DTYPE_NAMES[low_dtype]} + SR", tlcore_adamw, low_bytes)]
    suite.variants = [_optimizer_variant(label, build, nbytes) for label, build, nbytes in candidates]
    return suite


def _optimizer_variant(label, build, nbytes):
    state = {}

    def step(_):
        state["opt"].step()

    def first_step():
        state["params"], state["opt"] = build()
        state["opt"].step()
        return torch.cat([p.detach().float().flatten() for p in state["params"]])

    return Variant(label, step, [None], TOLERANCE[torch.bfloat16], output=first_step, work=nbytes)
