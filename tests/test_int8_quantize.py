"""tlcore.quantize end to end: a trained ResNet-18 on digits against FP32 and torch.ao, the API's errors."""
import copy
import io
import re
import warnings
from typing import NamedTuple

import pytest
import torch
import torchvision
from torch import nn
from torch.ao.quantization import MinMaxObserver, fuse_modules
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import tlcore
from digits import digits_loaders, digits_tensors
from markers import needs_extension
from numerics import rel_error
from tlcore import _extension
from tlcore.nn import DequantizeOutput, FloatFallback, Int8Conv2d, Int8GlobalAvgPool, Int8Linear, Int8ResidualBlock
from tlcore.nn.int8 import QParams, QuantizeInput
from tlcore.quantize import METHODS
from tlcore.ops import int8 as q8, int8_cpu
from tlcore.ops.int8_cpu import CPU_ALGORITHMS, CPU_ISA_ENV, CPU_ISAS, cpu_isa_supported

EPOCHS = 5


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """20 log10(|ref| / |ref - out|) in dB (torchao's compute_error)."""
    ref, out = ref.double(), out.double()
    return (20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-300))).item()


@pytest.fixture(scope="session")
def digits():
    return digits_loaders(size=32, batch=64, seed=0)


@pytest.fixture(scope="session")
def digits_resnet18(pytestconfig, digits):
    """A torchvision ResNet-18 trained on digits with fixed seeds (cached in pytest's cache)."""
    cache = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider: train every session
    path = cache.mkdir("tlcore-int8") / f"resnet18-digits-e{EPOCHS}-1thread-torch{torch.__version__}.pt" if cache else None
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train, _ = digits
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=EPOCHS * len(train))
    model.train()
    threads = torch.get_num_threads()
    # One thread: these small batches gain nothing from two, and a busy machine makes two threads
    # wait on each other (measured 3 s vs 19 s an epoch); it also fixes the summation order.
    torch.set_num_threads(1)
    try:
        for _ in range(EPOCHS):
            for x, y in train:
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    if path is not None:
        torch.save(model.state_dict(), path)
    return model.eval()


class DigitsEval(NamedTuple):
    x_test: torch.Tensor        # (450, 3, 32, 32) held-out images: accuracy and logits SQNR
    y_test: torch.Tensor
    x_all: torch.Tensor         # all 1797 images: top-1 agreement with fp32 needs no labels
    logits_test: torch.Tensor   # the fp32 model's logits
    logits_all: torch.Tensor
    calibration: list           # four batches of 64 training images


@pytest.fixture(scope="session")
def digits_eval(digits_resnet18):
    """The evaluation data and fp32 logits, fixed whatever the training loader has consumed."""
    (x_train, _), (x_test, y_test) = digits_tensors(size=32, seed=0)
    x_all = torch.cat([x_train, x_test])
    with torch.no_grad():
        logits_test, logits_all = digits_resnet18(x_test), digits_resnet18(x_all)
    return DigitsEval(x_test, y_test, x_all, logits_test, logits_all, list(x_train[:256].split(64)))


def task_metrics(model, data: DigitsEval) -> tuple[float, float, float]:
    """(test accuracy %, top-1 agreement with fp32 over all images %, test logits SQNR dB).

    Agreement counts all 1797 images: on the 450 test images alone one near-tie (fp32's top
    two logits 0.06-0.09 apart, the median gap is 8.5) decides a comparison.
    """
    with torch.no_grad():
        out_test, out_all = model(data.x_test), model(data.x_all)
    accuracy = (out_test.argmax(1) == data.y_test).double().mean().item() * 100
    agreement = (out_all.argmax(1) == data.logits_all.argmax(1)).double().mean().item() * 100
    return accuracy, agreement, sqnr(data.logits_test, out_test)


@pytest.fixture(scope="session")
def torch_ao_metrics(digits_resnet18, digits_eval):
    """torch.ao's x86 post-training quantization (HistogramObserver, per-channel weights) on the same data."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    calibration = digits_eval.calibration
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        prepared = prepare_fx(copy.deepcopy(digits_resnet18), get_default_qconfig_mapping("x86"),
                              example_inputs=(calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return task_metrics(convert_fx(prepared), digits_eval)
    finally:
        torch.backends.quantized.engine = engine


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("method,reduce_range", [("minmax", False), ("mse", False), ("percentile", False),
                                                 ("entropy", False), ("minmax", True)])
def test_trained_resnet18_matches_fp32_and_beats_torch_ao(method, reduce_range, digits_resnet18, digits_eval,
                                                         torch_ao_metrics):
    """INT8 keeps FP32's accuracy and predictions, at least as faithfully as torch.ao's x86 PTQ.

    "As good as torch.ao" on accuracy means changing FP32's test accuracy by no more than
    torch.ao does: a quantizer should reproduce the float model, and on 450 test images one
    near-tie flipped by quantization noise moves accuracy by 0.22 points either way.
    reduce_range=True (7-bit activations: torch.ao's own choice on x86, and the faster one on AVX2
    CPUs without VNNI) must hold the same bar.
    """
    qmodel = tlcore.quantize(digits_resnet18, digits_eval.calibration, method=method, reduce_range=reduce_range,
                             progress=False)
    fp32_accuracy = (digits_eval.logits_test.argmax(1) == digits_eval.y_test).double().mean().item() * 100
    accuracy, agreement, logits_sqnr = task_metrics(qmodel, digits_eval)
    ao_accuracy, ao_agreement, ao_sqnr = torch_ao_metrics
    print(f"\n{method}{', 7-bit activations' if reduce_range else ''}: fp32 {fp32_accuracy:.2f}% | tlcore int8 "
          f"{accuracy:.2f}%, agreement {agreement:.2f}%, SQNR {logits_sqnr:.1f} dB | torch.ao x86 {ao_accuracy:.2f}%, "
          f"{ao_agreement:.2f}%, {ao_sqnr:.1f} dB")
    assert fp32_accuracy > 90, "the fixture model did not train"
    assert accuracy >= fp32_accuracy - 0.5
    assert agreement >= 99.0
    assert abs(accuracy - fp32_accuracy) <= abs(ao_accuracy - fp32_accuracy)
    assert agreement >= ao_agreement and logits_sqnr >= ao_sqnr


def test_per_layer_sqnr(digits_resnet18, digits_eval):
    """tlcore.sqnr_report on the trained model: every stage's dequantized int8 output against the
    float model's (errors accumulate with depth), the logits' value as the test's own SQNR gives it."""
    xs = digits_eval.x_test[:128]
    qmodel = tlcore.quantize(digits_resnet18, digits_eval.calibration, progress=False)
    report = tlcore.sqnr_report(digits_resnet18, qmodel, xs, progress=False)
    print("\nper-block SQNR (dB): " + ", ".join(f"{name} {value:.1f}" for name, value in report.items()))
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert list(report) == ["conv1", *blocks, "fc"]
    assert all(value > 25 for value in report.values()), report
    with torch.no_grad():
        assert report["fc"] == pytest.approx(sqnr(digits_resnet18(xs), qmodel(xs)), abs=1e-6)


def test_sqnr_report_points_at_a_broken_block():
    """A block whose requantization is wrong shows in the report from that block on, not before;
    float blocks and a float stem report too; energies add up over batches."""
    model = small_resnet()
    qmodel = tlcore.quantize(model, batches(), skip=("conv1", "layer2.0"), progress=False)
    data = batches(2, seed=5)
    report = tlcore.sqnr_report(model, qmodel, data, progress=False)
    assert all(20 < value < float("inf") for value in report.values()), report
    assert tlcore.sqnr_report(model, qmodel, torch.cat(data), progress=False) == pytest.approx(report, abs=0.01)
    with torch.no_grad():
        qmodel.layer3[0].last.multiplier.neg_()  # the ReLU then clamps the block's output to zero
    broken = tlcore.sqnr_report(model, qmodel, data, progress=False)
    healthy = ["conv1", "layer1.0", "layer2.0"]
    assert [broken[name] for name in healthy] == [report[name] for name in healthy]
    assert broken["layer3.0"] < 1 and broken["fc"] < report["fc"] - 10, broken


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sqnr_report_low_precision_float_stem(dtype):
    """Both models get the float model's dtype: a float fp16/bf16 stem takes no fp32 input."""
    model = small_resnet().to(dtype)
    qmodel = tlcore.quantize(model, batches(), skip=("conv1",), progress=False)
    report = tlcore.sqnr_report(model, qmodel, batches(1, seed=5), progress=False)
    assert all(20 < value < float("inf") for value in report.values()), report


def test_sqnr_report_bad_input():
    model = small_resnet()
    qmodel = tlcore.quantize(model, batches(), progress=False)
    with pytest.raises(ValueError, match="eval"):
        tlcore.sqnr_report(small_resnet().train(), qmodel, batches(), progress=False)
    with pytest.raises(TypeError, match="the stem of qmodel is a Conv2d, not int8"):
        tlcore.sqnr_report(model, small_resnet(), batches(), progress=False)
    with pytest.raises(ValueError, match="no non-empty batch"):
        tlcore.sqnr_report(model, qmodel, [torch.empty(0, 3, 32, 32)], progress=False)
    deeper = ResNet(BasicBlock, [2, 1, 1, 1], num_classes=7).eval()
    with pytest.raises(ValueError, match="pass the model qmodel was quantized from"):
        tlcore.sqnr_report(deeper, qmodel, batches(), progress=False)
    with pytest.raises(ValueError, match="must be the float model"):
        tlcore.sqnr_report(qmodel, qmodel, batches(), progress=False)
    torch.manual_seed(1)
    retrained = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=7).eval()  # the same architecture, other weights
    for fc_skipped in (False, True):
        source = tlcore.quantize(model, batches(), skip=("fc",), progress=False) if fc_skipped else qmodel
        with pytest.raises(ValueError, match="fc weights are not those qmodel holds"):
            tlcore.sqnr_report(retrained, source, batches(), progress=False)
    with pytest.raises(TypeError, match="model must be a torchvision ResNet .* got Sequential"):
        tlcore.sqnr_report(nn.Sequential(nn.Identity(), model).eval(), qmodel, batches(), progress=False)
    with pytest.raises(TypeError, match="qmodel must be a torchvision ResNet .* got NoneType"):
        tlcore.sqnr_report(model, None, batches(), progress=False)
    with pytest.raises(TypeError, match="data must be a DataLoader, an iterable of batches or one batch tensor, got "
                                        "NoneType"):
        tlcore.sqnr_report(model, qmodel, None, progress=False)


def test_asymmetric_activations_gain_a_bit(digits_resnet18, digits_eval):
    """Why activations are asymmetric int8: post-ReLU tensors are non-negative, and a zero point
    of -128 spends all 256 codes on them, where symmetric int8 wastes the negative half (~6 dB)."""
    xs = digits_eval.x_test
    captured = []
    handle = digits_resnet18.layer2.register_forward_hook(lambda m, _, y: captured.append(y))
    with torch.no_grad():
        digits_resnet18(xs[:128])
    handle.remove()
    x = captured[0]
    gains = {}
    for name, qscheme in (("asymmetric", torch.per_tensor_affine), ("symmetric", torch.per_tensor_symmetric)):
        observer = MinMaxObserver(dtype=torch.qint8, qscheme=qscheme)
        observer(x)
        scale, zero = observer.calculate_qparams()
        gains[name] = sqnr(x, torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zero), -128, 127))
    print(f"\nlayer2 output SQNR: asymmetric {gains['asymmetric']:.1f} dB, symmetric {gains['symmetric']:.1f} dB")
    assert gains["asymmetric"] > gains["symmetric"] + 4


# ---- a small random ResNet for the API ------------------------------------------------------

def small_resnet(block=BasicBlock, **kwargs) -> ResNet:
    torch.manual_seed(0)
    model = ResNet(block, [1, 1, 1, 1], num_classes=7, **kwargs)
    with torch.no_grad():  # BatchNorm statistics far from identity, so folding matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def batches(n=3, size=32, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def test_small_models_quantize_closely():
    for block in (BasicBlock, Bottleneck):
        model = small_resnet(block)
        x = batches(1, seed=5)[0]
        qmodel = tlcore.quantize(model, batches(), progress=False)
        with torch.no_grad():
            assert sqnr(model(x), qmodel(x)) > 25
        convs = 1 + 4 * 2 + 3 if block is BasicBlock else 1 + 4 * 3 + 4  # stem, blocks, downsamples
        assert sum(isinstance(m, Int8Conv2d) for m in qmodel.modules()) == convs


@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (3, 37, 5, 9), (2, 8, 1, 1)])
def test_global_avg_pool_from_int8_codes(shape):
    """Int8GlobalAvgPool (exact int32 sums, one scaling) against the mean in float64 of the dequantized
    codes, and against the dequantize + fp32 pool it replaces; a non-contiguous input and bad input too."""
    g = torch.Generator().manual_seed(shape[1])
    q = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    qparams = QParams(0.0371, -93)
    pool = Int8GlobalAvgPool(qparams)
    ref = ((q.double() - qparams.zero_point) * qparams.scale).mean(dim=(2, 3), keepdim=True)
    out = pool(q)
    assert out.dtype == torch.float32 and out.shape == (*shape[:2], 1, 1)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
    stock = nn.AdaptiveAvgPool2d(1)(DequantizeOutput(qparams)(q))
    assert torch.allclose(out, stock, rtol=1e-5, atol=1e-6)
    assert torch.equal(pool(q.contiguous()), out) and torch.equal(pool(q.transpose(2, 3)), out)
    with pytest.raises(ValueError, match="int8"):
        pool(q.float())


def test_quantized_resnet_pools_int8_codes_into_an_int8_weight_fc():
    model = small_resnet()
    qmodel = tlcore.quantize(model, batches(), progress=False)
    assert isinstance(qmodel.avgpool, Int8GlobalAvgPool) and isinstance(qmodel.fc, Int8Linear)
    dequantized = qmodel.fc.weight.float() * qmodel.fc.w_scale[:, None]  # within half a step per row
    assert ((dequantized - model.fc.weight).abs() <= qmodel.fc.w_scale[:, None] / 2 + 1e-7).all()
    assert qmodel.fc.weight.abs().amax(dim=1).eq(127).all()
    assert torch.equal(qmodel.fc.bias, model.fc.bias)


def features_and_logits(qmodel: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 model's pooled features (the end of its integer path) and its logits."""
    features = []
    hook = qmodel.avgpool.register_forward_hook(lambda module, inputs, output: features.append(output))
    try:
        with torch.no_grad():
            logits = qmodel(x)
    finally:
        hook.remove()
    return features[0], logits


def assert_same_model_outputs(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor],
                              name: str = "") -> None:
    """Pooled features bit for bit; the logits within fp32 rounding (each backend's fc sums in its own order)."""
    assert torch.equal(got[0], expected[0]), name
    assert rel_error(got[1], expected[1]) < 1e-6, name


@needs_extension
def test_backends_are_bit_identical_through_the_model(monkeypatch):
    model = small_resnet()
    x = batches(1, size=16, batch=2, seed=7)[0]
    outputs, qmodels = {}, {}
    for name in ("torch", "cpu", "triton"):
        qmodels[name] = tlcore.quantize(model, batches(size=16), backend=name, progress=False)
        outputs[name] = features_and_logits(qmodels[name], x)
    monkeypatch.setenv(CPU_ISA_ENV, "scalar")
    outputs["cpu-scalar"] = features_and_logits(
        tlcore.quantize(model, batches(size=16), backend="cpu", progress=False), x)
    # the Triton backend's TMA kernel on every conv it takes (the stride-1 ones past the stem)
    from tlcore.kernels import int8_conv_tma

    if int8_conv_tma.TensorDescriptor is not None and not torch.cuda.is_available():
        launches = []
        launch = int8_conv_tma.Int8ConvTmaLaunch.__call__
        monkeypatch.setattr(int8_conv_tma.Int8ConvTmaLaunch, "__call__", lambda *a: launches.append(1) or launch(*a))
        monkeypatch.setenv(q8.TRITON_KERNEL_ENV, "tma")
        outputs["triton-tma"] = features_and_logits(qmodels["triton"], x)
        assert launches
    for name, out in outputs.items():
        assert_same_model_outputs(out, outputs["torch"], name)


@pytest.mark.skipif(not _extension.loaded() or not cpu_isa_supported("avx2"), reason="needs tlcore._C and AVX2")
@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_resnext_grouped_convs_bit_identical_on_avx2(reduce_range, monkeypatch):
    """A ResNeXt (32 groups of 4 channels in layer1 up to 32 in layer4) on AVX2: its grouped convs run direct
    or on the split codes (int8_best_algorithm), and the model's outputs equal the torch backend's."""
    monkeypatch.setenv(CPU_ISA_ENV, "avx2")
    model = small_resnet(Bottleneck, groups=32, width_per_group=4)
    x = batches(1, size=32, batch=2, seed=7)[0]
    expected = features_and_logits(
        tlcore.quantize(model, batches(size=32), reduce_range=reduce_range, backend="torch", progress=False), x)
    qmodel = tlcore.quantize(model, batches(size=32), reduce_range=reduce_range, backend="cpu", progress=False)
    grouped = [m for m in qmodel.modules() if isinstance(m, Int8Conv2d) and m.state["groups"] > 1]
    assert {m._packed_weight()[1] for m in grouped} == {CPU_ALGORITHMS["direct"], CPU_ALGORITHMS["split"]}
    assert_same_model_outputs(features_and_logits(qmodel, x), expected)


@pytest.mark.skipif(not _extension.loaded() or not cpu_isa_supported("avx2u7"), reason="needs tlcore._C and AVX2")
def test_seven_bit_model_runs_vpmaddubsw_bit_identically(monkeypatch):
    """reduce_range on an AVX2 CPU without VNNI: 7-bit layers take vpmaddubsw, the 8-bit stem does not."""
    model = small_resnet(Bottleneck)
    x = batches(1, seed=7)[0]
    reference = tlcore.quantize(model, batches(), reduce_range=True, backend="torch", progress=False)
    qmodel = tlcore.quantize(model, batches(), reduce_range=True, backend="cpu", progress=False)
    convs = [m for m in qmodel.modules() if isinstance(m, Int8Conv2d)]
    assert convs[0].state["x_max"] == 127 and all(m.state["x_max"] == -1 for m in convs[1:])
    assert all(m.state["out_max"] == -1 for m in convs)
    monkeypatch.setattr(int8_cpu, "_auto_isa", lambda: CPU_ISAS["avx2"])  # as on an AVX2 CPU without VNNI
    expected = features_and_logits(reference, x)
    assert_same_model_outputs(features_and_logits(qmodel, x), expected)
    with torch.no_grad():
        assert sqnr(model(x), expected[1]) > 20
    # Selected by hand, avx2u7 leaves the 8-bit stem to AVX2's exact kernel: inputs bright enough for
    # codes >= 0 there (which vpmaddubsw could saturate on) run, and give the reference's outputs.
    monkeypatch.setenv(CPU_ISA_ENV, "avx2u7")
    bright = x + 4 * x.abs().amax()
    assert_same_model_outputs(features_and_logits(qmodel, bright), features_and_logits(reference, bright))


def test_state_dict_round_trip_weights_only():
    model = small_resnet(Bottleneck)
    x = batches(1, seed=9)[0]
    qmodel = tlcore.quantize(model, batches(), progress=False)
    buffer = io.BytesIO()
    torch.save(qmodel.state_dict(), buffer)
    rebuilt = tlcore.quantize(model, batches(n=1, seed=3), method="percentile", progress=False)
    with torch.no_grad():
        expected, before = qmodel(x), rebuilt(x)
        assert not torch.equal(before, expected)  # other calibration, other scales
        buffer.seek(0)
        rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(rebuilt(x), expected)


@needs_extension
def test_state_dict_loads_into_a_used_model_under_inference_mode():
    """Inference tensors have no version counter: loading new weights into a model that has run
    (its C++ packings cached) must still give the loaded model's codes."""
    model = small_resnet(Bottleneck)
    x = batches(1, seed=9)[0]
    with torch.inference_mode():
        saved = tlcore.quantize(model, batches(), progress=False)
        expected = saved(x)
        other = small_resnet(Bottleneck)
        for p in other.parameters():
            p.mul_(-1.5)
        rebuilt = tlcore.quantize(other, batches(n=1, seed=3), progress=False)
        assert not torch.equal(rebuilt(x), expected)
        rebuilt.load_state_dict(saved.state_dict())
        assert torch.equal(rebuilt(x), expected)


def test_module_pickled_before_grouped_convs_loads():
    """A whole pickled Int8Conv2d from before "groups" (torch.save(module)) still runs."""
    conv = tlcore.quantize(small_resnet(), batches(), progress=False).layer1[0].last
    x = torch.randint(-128, 128, (1, 64, 8, 8), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    res = torch.randint(-128, 128, (1, 64, 8, 8), dtype=torch.int8).contiguous(memory_format=torch.channels_last)
    expected = conv(x, res)
    del conv.state["groups"]
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x, res), expected)


def test_state_dict_saved_before_grouped_convs_loads():
    """Int8Conv2d's extra state gained "groups"; a state_dict saved without it loads as groups=1."""
    model = small_resnet(Bottleneck)
    x = batches(1, seed=9)[0]
    state = tlcore.quantize(model, batches(), progress=False).state_dict()
    old = {key: {k: v for k, v in value.items() if k != "groups"} if key.endswith("_extra_state") else value
           for key, value in state.items()}
    assert sum("groups" in value for key, value in state.items() if key.endswith("_extra_state")) == 17
    rebuilt = tlcore.quantize(model, batches(n=1, seed=3), method="percentile", progress=False)
    rebuilt.load_state_dict(old)
    expected = tlcore.quantize(model, batches(), progress=False)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected(x))


def test_float_fc_state_dict_loads_into_the_int8_fc():
    """A state_dict whose fc is float (skip=("fc",), or saved before the fc was int8) loads into
    Int8Linear, quantized exactly as tlcore.quantize quantizes it."""
    model = small_resnet(Bottleneck)
    x = batches(1, seed=4)[0]
    expected = tlcore.quantize(model, batches(), progress=False)
    buffer = io.BytesIO()
    torch.save(tlcore.quantize(model, batches(), skip=("fc",), progress=False).state_dict(), buffer)
    buffer.seek(0)
    rebuilt = tlcore.quantize(model, batches(n=1, seed=3), method="percentile", progress=False)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected(x))


def test_skip_keeps_blocks_float():
    """...and says nothing about it: the user asked for it."""
    model = small_resnet()
    x = batches(1, seed=5)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qmodel = tlcore.quantize(model, batches(), skip=("conv1", "layer2.0", "fc"), progress=False)
    assert isinstance(qmodel.layer2[0], FloatFallback) and "skipped on request" in repr(qmodel.layer2[0])
    assert not isinstance(qmodel.conv1, nn.Sequential)  # the stem stayed float
    assert type(qmodel.fc) is nn.Linear and torch.equal(qmodel.fc.weight, model.fc.weight)
    assert isinstance(qmodel.layer1[0], Int8ResidualBlock)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 25


def test_grouped_convs_run_in_int8():
    """ResNeXt's grouped 3x3 convs, which tlcore.fuse leaves stock, fold and run in int8 like the
    others, on every backend with the same bits."""
    model = small_resnet(Bottleneck, groups=4, width_per_group=8)
    x = batches(1, size=16, batch=2, seed=5)[0]
    outputs = {}
    for name in ("torch", "cpu", "triton") if _extension.loaded() else ("torch", "triton"):
        qmodel = tlcore.quantize(model, batches(size=16), backend=name, progress=False)
        grouped = [m for m in qmodel.modules() if isinstance(m, Int8Conv2d) and m.state["groups"] == 4]
        assert len(grouped) == 4 and "groups=4" in repr(grouped[0])
        assert not any(isinstance(m, FloatFallback) for m in qmodel.modules())
        outputs[name] = features_and_logits(qmodel, x)
        with torch.no_grad():
            assert sqnr(model(x), outputs[name][1]) > 25, name
    for name, got in outputs.items():
        assert_same_model_outputs(got, outputs["torch"], name)


class StandardizedConv2d(nn.Conv2d):
    """Weight standardization (BiT ResNets): a Conv2d subclass whose forward is not a plain conv."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


@pytest.mark.parametrize("change, reason", [("reflect", "padding_mode"), ("subclass", "not conv + BatchNorm")])
def test_uncovered_conv_falls_back_to_float(change, reason):
    """A conv the int8 scheme does not cover keeps its block float, and says why."""
    model = small_resnet(Bottleneck)
    conv = model.layer2[0].conv2
    if change == "reflect":
        conv.padding_mode = "reflect"
    else:
        conv.__class__ = StandardizedConv2d
    x = batches(1, seed=5)[0]
    with pytest.warns(UserWarning, match=rf"layer2\.0 stays float \(.*{re.escape(reason)}"):
        qmodel = tlcore.quantize(model, batches(), progress=False)
    fallbacks = [m for m in qmodel.modules() if isinstance(m, FloatFallback)]
    assert len(fallbacks) == 1 and reason in fallbacks[0].reason
    assert qmodel.layer2[0] is fallbacks[0] and isinstance(qmodel.layer3[0], Int8ResidualBlock)
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 25


def test_blocks_with_batchnorm_folded_beforehand_stay_float_and_warn():
    """BatchNorm folded into the body's convs before quantize (torch.ao's fuse_modules): those blocks
    have no BatchNorm to fold and stay float, correct, and quantize names them rather than return a
    mostly float model in silence."""
    model = small_resnet()
    for layer in (model.layer1, model.layer3):
        for block in layer:
            fuse_modules(block, [["conv1", "bn1"], ["conv2", "bn2"]], inplace=True)
    with pytest.warns(UserWarning, match=r"layer1\.0, layer3\.0 stay float \(.*Identity is not a BatchNorm2d"):
        qmodel = tlcore.quantize(model, batches(), progress=False)
    assert isinstance(qmodel.layer2[0], Int8ResidualBlock) and isinstance(qmodel.layer1[0], FloatFallback)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 25


@pytest.mark.parametrize("stem, reason", [
    ("conv, BN and ReLU fused by torch.ao", "the stem conv1 is a ConvReLU2d"),
    ("conv and BN fused by torch.ao", "the stem: Identity is not a BatchNorm2d (nor torchvision's "
                                      "FrozenBatchNorm2d) (folded into the conv already, as torch.ao's fuse_modules"),
    ("deep", "the stem conv1 is a Sequential"),
    ("average pool", "the stem's pool is AvgPool2d"),
])
def test_a_stem_that_is_not_conv_bn_stays_float_and_warns(stem, reason):
    """A stem whose BatchNorm torch.ao's fuse_modules folded, a deep stem (a module chain) or a stem with
    another pool runs in float with a warning that says why; the blocks still run in int8."""
    model = small_resnet()
    if stem == "deep":
        model.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 64, 3, 1, 1)).eval()
    elif stem == "average pool":
        model.maxpool = nn.AvgPool2d(3, 2, 1).eval()
    else:
        model = fuse_modules(model, [["conv1", "bn1", "relu"] if "ReLU" in stem else ["conv1", "bn1"]]).eval()
    with pytest.warns(UserWarning, match=rf"conv1 stays float \({re.escape(reason)}"):
        qmodel = tlcore.quantize(model, batches(), progress=False)
    assert sum(isinstance(m, Int8ResidualBlock) for m in qmodel.modules()) == 4
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 25
    with pytest.raises(ValueError, match="batch has 1 channels, the model's stem takes 3"):
        tlcore.quantize(model, [x[:, :1]], progress=False)


def test_a_stage_that_is_not_a_sequence_of_blocks_raises():
    model = small_resnet()
    model.layer4, model.fc = nn.Identity(), nn.Linear(256, 7)
    with pytest.raises(TypeError, match="layer4 must be an nn.Sequential of torchvision BasicBlocks"):
        tlcore.quantize(model.eval(), batches(), progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_models(dtype):
    """Calibration observes the model's own activations (hooks must not replace them); logits come out fp32."""
    x = batches(1, seed=5)[0]
    qmodel = tlcore.quantize(small_resnet().to(dtype), batches(), skip=("layer2.0",), progress=False)
    with torch.no_grad():
        out = qmodel(x.to(dtype))
        assert out.dtype == torch.float32 and sqnr(small_resnet()(x), out) > 25


def test_progress_bar(capsys):
    tlcore.quantize(small_resnet(), batches(n=2), progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_accepts_one_batch_and_one_skip_name():
    """A tensor is one batch (not a sequence of images), a string one name (not its letters)."""
    x = batches(1, seed=5)[0]
    data = batches(n=1)
    with torch.no_grad():
        assert torch.equal(tlcore.quantize(small_resnet(), data[0], skip="fc", progress=False)(x),
                           tlcore.quantize(small_resnet(), data, skip=("fc",), progress=False)(x))


def test_accepts_input_label_pairs():
    data = [(x, torch.zeros(len(x), dtype=torch.int64)) for x in batches()]
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert torch.equal(tlcore.quantize(small_resnet(), data, progress=False)(x),
                           tlcore.quantize(small_resnet(), batches(), progress=False)(x))


# ---- bad input ------------------------------------------------------------------------------

def test_train_mode_raises():
    with pytest.raises(ValueError, match="^tlcore.quantize .*model.eval"):
        tlcore.quantize(small_resnet().train(), batches(), progress=False)


def test_float64_model_raises():
    with pytest.raises(TypeError, match="fp32, fp16 or bf16 models, got parameters of torch.float64"):
        tlcore.quantize(small_resnet().double(), [x.double() for x in batches()], progress=False)


def test_a_fused_model_points_to_the_float_one():
    with pytest.raises(TypeError, match="not one from tlcore.fuse .* quantize the model you passed to tlcore.fuse"):
        tlcore.quantize(tlcore.fuse(small_resnet()), batches(), progress=False)


def test_wrapped_resnet_points_inside():
    """A wrapper (here in its default train mode) around an eval'd ResNet: the error is the wrapper."""
    with pytest.raises(TypeError, match="got Sequential: quantize the ResNet inside a wrapper"):
        tlcore.quantize(nn.Sequential(nn.Identity(), small_resnet()), batches(), progress=False)


@pytest.mark.parametrize("data", [[], [torch.empty(0, 3, 32, 32)]], ids=["no batches", "empty batch"])
def test_empty_calibration_raises(data):
    with pytest.raises(ValueError, match="no non-empty batch"):
        tlcore.quantize(small_resnet(), data, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_nan_calibration_raises(method):
    data = batches()
    data[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        tlcore.quantize(small_resnet(), data, method=method, progress=False)


def test_constant_calibration_input_raises():
    """All-zero batches (a data bug) would calibrate an input scale of ~1e-7: every real input saturates."""
    with pytest.raises(ValueError, match="every calibration input value is 0.0"):
        tlcore.quantize(small_resnet(), [torch.zeros(2, 3, 32, 32)] * 2, progress=False)


def test_constant_activations_warn():
    model = small_resnet()
    with torch.no_grad():
        model.bn1.weight.zero_()
        model.bn1.bias.fill_(0.5)  # the stem gives 0.5 everywhere
    with pytest.warns(UserWarning, match=r"activations of \['conv1', 'maxpool'.*held one value"):
        tlcore.quantize(model, batches(), progress=False)


@pytest.mark.parametrize("data, error, match", [
    ([(torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)], TypeError, "float .* got a torch.uint8 tensor"),
    ([torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64)], TypeError, r"torch.int64 tensor of shape \(2,\)"),
    ([torch.randn(3, 32, 32)], ValueError, r"\(N, C, H, W\).*shape \(3, 32, 32\)"),
    ([torch.randn(2, 1, 32, 32)], ValueError, "batch has 1 channels, the model's stem takes 3"),
], ids=["uint8 images", "one (inputs, labels) pair as the data", "one image", "grayscale"])
def test_malformed_calibration_batches_raise(data, error, match):
    with pytest.raises(error, match=match):
        tlcore.quantize(small_resnet(), data, progress=False)


def test_hooks_are_left_on_the_float_model_with_a_warning():
    """Hooks see float tensors; in the int8 model the same places hold int8 codes, so it runs none of
    them (not even while calibrating), says so, and leaves the user's model and its hooks as they were."""
    model = small_resnet()
    calls = []
    model.layer4.register_forward_hook(lambda module, args, out: calls.append(out.dtype))
    model.avgpool.register_forward_pre_hook(lambda module, args: calls.append(args[0].dtype))
    with pytest.warns(UserWarning, match=r"does not keep the hooks on \['layer4', 'avgpool'\]"):
        qmodel = tlcore.quantize(model, batches(), progress=False)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        qmodel(x)
        assert calls == []
        model(x)
    assert calls == [torch.float32, torch.float32]


def test_module_added_after_eval_names_the_cause():
    model = small_resnet()
    model.fc = nn.Identity()
    with pytest.raises(ValueError, match="^tlcore.quantize .*'fc' is in train mode.*assigned after eval"):
        tlcore.quantize(model, batches(), progress=False)


@pytest.mark.parametrize("skip", [(), ("conv1",)])
def test_non_finite_input_raises(skip):
    """A NaN or an infinity in the input raises (saturated, an inf would give plausible logits where the
    float model's are NaN), also where the stem stays float and the int8 part gets its output."""
    qmodel = tlcore.quantize(small_resnet(), batches(), skip=skip, progress=False)
    for value in ("nan", "inf", "-inf"):
        x = batches(1)[0]
        x[0, 1, 2, 3] = float(value)
        with pytest.raises(ValueError, match="contains NaN or inf"):
            qmodel(x)


def test_unchecked_model_quantizes_non_finite_inputs_without_raising():
    """check_finite=False: no error; NaN reads as the zero point (real 0) and infinities saturate, so
    the logits equal those of the input with these values put in (and stay finite)."""
    model, data = small_resnet(), batches()
    qmodel = tlcore.quantize(model, data, progress=False, check_finite=False)
    assert all(m.check_finite is False for m in qmodel.modules() if isinstance(m, QuantizeInput))
    x = batches(1)[0]
    scale = qmodel.conv1[0].state["scale"]
    bad, stand_in = x.clone(), x.clone()
    for position, value, replacement in (((0, 1, 2, 3), "nan", 0.0), ((0, 0, 5, 5), "inf", 1e4 * scale),
                                         ((1, 2, 7, 1), "-inf", -1e4 * scale)):
        bad[position], stand_in[position] = float(value), replacement
    with torch.no_grad():
        logits = qmodel(bad)
        assert torch.isfinite(logits).all() and torch.equal(logits, qmodel(stand_in))
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        tlcore.quantize(model, data, progress=False, check_finite=None)


def test_wrong_channel_count_names_it():
    qmodel = tlcore.quantize(small_resnet(), batches(), progress=False)
    with pytest.raises((ValueError, RuntimeError), match="x has 1 channels but weight expects 3"):
        qmodel(torch.randn(1, 1, 32, 32))


def test_cifar_style_stem_runs_in_int8():
    """A 3x3 stride-1 stem with the max-pool replaced by nn.Identity (CIFAR ResNets) is quantized too."""
    model = small_resnet()
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.eval()
    qmodel = tlcore.quantize(model, batches(), progress=False)
    assert isinstance(qmodel.conv1[1], Int8Conv2d) and type(qmodel.maxpool) is nn.Identity
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 25


@pytest.mark.parametrize("skip", ["conv1", "fc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float_stem_or_fc_take_any_input_dtype_and_casts(skip, dtype):
    """A stem or fc left float runs in its own dtype, also after qmodel.to(dtype): the logits stay fp32
    and close to the fp32 model's."""
    model = small_resnet()
    qmodel = tlcore.quantize(model, batches(), skip=skip, progress=False)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        reference = model(x)
        for _ in range(2):  # as built, then cast to dtype
            out = qmodel(x.to(dtype))
            assert out.dtype == torch.float32 and sqnr(reference, out) > 20
            qmodel.to(dtype)


def test_float_stem_refuses_fp64_clearly():
    qmodel = tlcore.quantize(small_resnet(), batches(), skip="conv1", progress=False).double()
    with pytest.raises(TypeError, match="x has dtype torch.float64; supported are fp16, bf16, fp32"):
        qmodel(batches(1)[0])


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_dtype_casts_keep_the_int8_arithmetic(cast):
    """model.half() and the like leave the int8 model's fp32 scales (the kernels take fp32) alone:
    the same logits as before, fp32, from an fp32 input or one in the new dtype."""
    qmodel = tlcore.quantize(small_resnet(Bottleneck), batches(), progress=False)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        expected = qmodel(x)
        getattr(qmodel, cast)()
        assert qmodel.fc.w_scale.dtype == torch.float32 and qmodel.layer1[0].last.w_scale.dtype == torch.float32
        assert torch.equal(qmodel(x), expected)
        out = qmodel(getattr(x, cast)())
        assert out.dtype == torch.float32 and sqnr(expected, out) > 20


# ---- compilation and export ---------------------------------------------------------------------

def count_packs(monkeypatch) -> list:
    """Counts the packings of the public op's cache (patching torch.ops itself breaks inductor's imports)."""
    packs = []
    pack = q8.pack_weight_cpu
    monkeypatch.setattr(q8, "pack_weight_cpu", lambda *args: packs.append(args) or pack(*args))
    return packs


def assert_traced_model_matches(traced, qmodel, x, monkeypatch):
    """The same codes as eager over three calls, each CPU weight packed once (eager and traced share
    the packing), NaN still refused."""
    packs = count_packs(monkeypatch)
    with torch.no_grad():
        expected = qmodel(x)
        for _ in range(3):
            assert torch.equal(traced(x), expected)
        assert len(packs) == sum(isinstance(m, Int8Conv2d) for m in qmodel.modules())
        x = x.clone()
        x[0, 0, 1, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            traced(x)


@needs_extension
def test_quantized_model_exports(monkeypatch):
    """torch.export keeps tlcore's ops (the instruction set is chosen where the program runs), gives
    the same codes, packs each CPU weight once, and keeps the NaN check."""
    qmodel = tlcore.quantize(small_resnet(Bottleneck), batches(), progress=False)
    x = batches(1, seed=11)[0]
    exported = torch.export.export(qmodel, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"tlcore.int8_conv2d.default", "tlcore.quantize_input.default"} <= ops
    assert_traced_model_matches(exported.module(), qmodel, x, monkeypatch)


@needs_extension
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("compiler, dynamic", [("aot_eager", None), ("inductor", None), ("aot_eager", True)])
def test_quantized_model_compiles_fullgraph(compiler, dynamic, monkeypatch):
    qmodel = tlcore.quantize(small_resnet(), batches(), progress=False)
    x = batches(1, seed=12)[0]
    compiled = torch.compile(qmodel, backend=compiler, fullgraph=True, dynamic=dynamic)
    assert_traced_model_matches(compiled, qmodel, x, monkeypatch)


@needs_extension
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantized_model_compiles_fullgraph_with_an_isa_set(monkeypatch):
    """With TLCORE_INT8_CPU_ISA set, whether this CPU runs that instruction set is a constant to the
    tracer (the check calls a C++ op that returns a bool, which fullgraph could not trace)."""
    # The fc reads the variable when traced (int8_weight_linear): a graph compiled by an earlier test
    # for the same model structure would be reused with that test's setting.
    torch.compiler.reset()
    monkeypatch.setenv(CPU_ISA_ENV, "scalar")
    qmodel = tlcore.quantize(small_resnet(), batches(), progress=False)
    x = batches(1, seed=12)[0]
    compiled = torch.compile(qmodel, backend="aot_eager", fullgraph=True)
    assert_traced_model_matches(compiled, qmodel, x, monkeypatch)


@needs_extension
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("trace", ["compile", "export"])
def test_forced_module_backend_compiles_and_exports(trace, monkeypatch):
    """A module's own backend applies in eager mode only (a context manager does not trace); traced,
    the default applies, with the same codes (a float fc: each backend's int8 fc sums in its own order)."""
    qmodel = tlcore.quantize(small_resnet(), batches(), backend="torch", skip="fc", progress=False)
    x = batches(1, seed=12)[0]
    traced = (torch.compile(qmodel, backend="aot_eager", fullgraph=True) if trace == "compile"
              else torch.export.export(qmodel, (x,)).module())
    assert_traced_model_matches(traced, qmodel, x, monkeypatch)


def test_use_backend_reaches_the_quantized_modules(monkeypatch):
    """`with tlcore.use_backend(...)` around a quantized model forces the backend of modules that
    have none of their own (a float fc, as above)."""
    qmodel = tlcore.quantize(small_resnet(), batches(), skip="fc", progress=False)
    calls = []
    reference = q8._int8_conv2d_torch
    monkeypatch.setattr(q8, "_int8_conv2d_torch", lambda *args: calls.append(1) or reference(*args))
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        expected = qmodel(x)
        with tlcore.use_backend("torch"):
            assert torch.equal(qmodel(x), expected)
    assert len(calls) == sum(isinstance(m, Int8Conv2d) for m in qmodel.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile over Triton ops needs a GPU")
def test_quantized_model_compiles_with_inductor_on_gpu():
    model = small_resnet(Bottleneck).cuda()
    qmodel = tlcore.quantize(model, [b.cuda() for b in batches()], progress=False)
    x = batches(1, seed=13)[0].cuda()
    compiled = torch.compile(qmodel, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), qmodel(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_model_calibrates_like_the_cpu_one(method):
    """A CUDA model's observers keep their histograms on the GPU (percentile and entropy once mixed
    them with CPU tensors): every method calibrates there, to the CPU model's answers."""
    model = small_resnet(Bottleneck)
    on_cpu = tlcore.quantize(model, batches(), method=method, progress=False)
    on_gpu = tlcore.quantize(copy.deepcopy(model).cuda(), [b.cuda() for b in batches()], method=method,
                             progress=False)
    x = batches(1, seed=13)[0]
    with torch.no_grad():
        assert sqnr(on_cpu(x), on_gpu(x.cuda()).cpu()) > 30  # the same scales up to rounding


def test_frozen_batchnorm_model_quantizes():
    """torchvision's FrozenBatchNorm2d (detection backbones' BN) folds: every conv runs in int8."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = small_resnet(norm_layer=FrozenBatchNorm2d)
    qmodel = tlcore.quantize(model, batches(), progress=False)
    assert not any(isinstance(m, FloatFallback) for m in qmodel.modules())
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 25


def test_a_model_with_no_coverable_conv_warns():
    """GroupNorm cannot be folded: every block stays float, which quantize says instead of
    returning a float model in silence; skip=None is no skip."""
    model = small_resnet(norm_layer=lambda channels: nn.GroupNorm(4, channels))
    with pytest.warns(UserWarning, match="no conv could run in int8"):
        qmodel = tlcore.quantize(model, batches(), skip=None, progress=False)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        assert sqnr(model(x), qmodel(x)) > 25


def test_uncovered_model_raises():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with pytest.raises(TypeError, match="supports torchvision ResNet"):
        tlcore.quantize(model, batches(), progress=False)


class NamedResNet(ResNet):
    def describe(self) -> str:
        return "a ResNet with a method of its own"


class ScaledResNet(NamedResNet):
    def forward(self, x):
        return super().forward(2 * x)


class HeadlessResNet(NamedResNet):
    def _forward_impl(self, x):
        return x.mean()


def test_resnet_subclass_quantizes_unless_its_forward_differs():
    model = small_resnet()
    x = batches(1, seed=5)[0]
    named, scaled = copy.deepcopy(model), copy.deepcopy(model)
    named.__class__, scaled.__class__ = NamedResNet, ScaledResNet
    with torch.no_grad():
        assert torch.equal(tlcore.quantize(named, batches(), progress=False)(x),
                           tlcore.quantize(model, batches(), progress=False)(x))
    for subclass in (ScaledResNet, HeadlessResNet):
        scaled.__class__ = subclass
        with pytest.raises(TypeError, match=f"own forward, got {subclass.__name__}"):
            tlcore.quantize(scaled, batches(), progress=False)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="kl"), ValueError, "unknown method"),
    (dict(backend="gpu"), ValueError, "unknown backend"),
    (dict(method="percentile", percentile=20.0), ValueError, "percentile must be"),
    (dict(method="percentile", percentile="99.9"), TypeError, "percentile must be a number"),
    (dict(method="percentile", percentile=True), TypeError, "percentile must be a number"),
    (dict(percentile=99.9), ValueError, "percentile= applies to method='percentile' only"),
    (dict(skip=("avgpool",)), ValueError, "cannot skip"),
    (dict(skip=("layer9.0",)), ValueError, "cannot skip"),
    (dict(skip=1), TypeError, "skip must be a name"),
    (dict(skip=0), TypeError, "skip must be a name"),
    (dict(skip=("fc", 2)), TypeError, "skip must be a name"),
    (dict(reduce_range="yes"), TypeError, "reduce_range must be True or False"),
])
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        tlcore.quantize(small_resnet(), batches(), progress=False, **kwargs)
