"""The eager launch path: autotuned kernels launched with the chosen config (kernels/launch.py), and
public ops skipping torch's dispatcher only where it would do nothing (tlcore/ops/eager.py)."""
import pytest
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode

from markers import triton_kernels_or_skip
from tlcore.backend import use_backend
from tlcore.kernels import launch
from tlcore.ops import conv as conv_ops
from tlcore.ops import int8 as int8_ops
from tlcore.ops.eager import plain_eager_call

with triton_kernels_or_skip():
    @triton.autotune(configs=[triton.Config({"BLOCK": 64}, num_warps=2)], key=["n"])
    @triton.jit
    def _scaled_copy_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)


def _scaled_copy(x: torch.Tensor, factor: float) -> torch.Tensor:
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    n = x.numel()
    launch.launch_tuned(_scaled_copy_kernel, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), x, out, n, factor)
    return out


def test_launch_tuned_reuses_the_chosen_config_per_key(monkeypatch, device):
    tuned_calls = []
    autotuned_run = type(_scaled_copy_kernel).run
    monkeypatch.setattr(type(_scaled_copy_kernel), "run",
                        lambda self, *a, **k: tuned_calls.append(1) or autotuned_run(self, *a, **k))
    monkeypatch.setattr(launch, "_chosen", {})
    for n, dtype in [(100, torch.float32), (100, torch.float32), (37, torch.float32), (100, torch.float64),
                     (100, torch.float64)]:
        x = torch.randn(n, dtype=dtype, device=device)
        torch.testing.assert_close(_scaled_copy(x, 1.5), x * 1.5, rtol=0, atol=0)
    # the autotuner ran for each new key (size, then dtype) only; repeats went to the JIT function
    assert len(tuned_calls) == 3
    assert len(launch._chosen) == 3


def test_tuned_launch_keeps_the_config_and_grid_of_its_first_call(monkeypatch, device):
    """TunedLaunch: the first call tunes through launch_tuned; later calls (same sizes, other data) launch
    the chosen config's JIT function without the autotuner or the grid function."""
    tuned_calls, grids = [], []
    autotuned_run = type(_scaled_copy_kernel).run
    monkeypatch.setattr(type(_scaled_copy_kernel), "run",
                        lambda self, *a, **k: tuned_calls.append(1) or autotuned_run(self, *a, **k))
    monkeypatch.setattr(launch, "_chosen", {})
    n = 100
    tuned = launch.TunedLaunch(_scaled_copy_kernel, lambda meta: grids.append(1) or (triton.cdiv(n, meta["BLOCK"]),))
    for _ in range(3):
        x = torch.randn(n, device=device)
        out = torch.full_like(x, float("nan"))
        tuned(x, out, n, 2.5)
        torch.testing.assert_close(out, x * 2.5, rtol=0, atol=0)
    assert len(tuned_calls) == 1
    assert len(grids) == 2  # the tuned launch's, then TunedLaunch's own, once


def test_launch_tuned_key_follows_the_autotuner_key():
    x, out = torch.ones(4), torch.ones(4)
    key = launch._tuning_key(_scaled_copy_kernel, (x, out, 4, 2.0), {})
    assert key == (4, torch.float32, torch.float32)
    assert launch._tuning_key(_scaled_copy_kernel, (x, out), {"n": 9, "factor": 2.0})[0] == 9


def _conv_args(device="cpu"):
    x = torch.randn(1, 8, 5, 5, device=device)
    return x, torch.randn(8, 8, 3, 3, device=device), torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)


def test_plain_eager_calls_skip_the_dispatcher_only_when_it_would_do_nothing(monkeypatch):
    x, weight, scale, shift = _conv_args()
    assert plain_eager_call(x, weight, scale, shift)
    with torch.no_grad():
        assert plain_eager_call(x, weight.requires_grad_(), scale, shift)
    assert not plain_eager_call(x, weight, scale, shift)  # the weight needs a gradient now
    weight.requires_grad_(False)
    with FakeTensorMode() as mode:
        assert not plain_eager_call(mode.from_tensor(x))
    with torch.device("cpu"):  # a function mode
        assert not plain_eager_call(x)
    with torch.profiler.profile():
        assert not plain_eager_call(x)
    assert torch.vmap(lambda t: torch.tensor(plain_eager_call(t)))(x).eq(False).all()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not plain_eager_call(x)


def test_autocast_regions_keep_the_dispatcher(monkeypatch):
    """Inside torch.autocast the fused conv goes through the dispatcher even where it would skip it (GPU
    tensors, patched in here), so that the op's autocast kernel casts its inputs."""
    monkeypatch.setattr(conv_ops, "skips_dispatcher", lambda *tensors: True)
    x, weight, scale, shift = _conv_args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_ops.conv2d_bn_relu(x, weight, scale, shift, padding=1).dtype == torch.bfloat16
    assert conv_ops.conv2d_bn_relu(x, weight, scale, shift, padding=1).dtype == torch.float32


def test_cpu_calls_keep_the_dispatcher(monkeypatch):
    """On CPU tensors the public ops call torch.ops (their C++ kernels dwarf its cost)."""
    calls = []
    monkeypatch.setattr(conv_ops, "_conv2d_bn_relu_impl", lambda *args: calls.append(args))
    x, weight, scale, shift = _conv_args()
    assert conv_ops.conv2d_bn_relu(x, weight, scale, shift, padding=1).shape == (1, 8, 5, 5)
    assert not calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: CPU calls keep the dispatcher")
def test_gpu_eager_calls_skip_the_dispatcher_with_the_same_results(monkeypatch):
    x, weight, scale, shift = _conv_args("cuda")
    x, weight = x.half(), weight.half()
    with torch.no_grad():
        through_dispatcher = torch.ops.tlcore.conv2d_bn_relu(x, weight, scale, shift, None, [1, 1], [1, 1], [1, 1],
                                                             True)
        direct = conv_ops.conv2d_bn_relu(x, weight, scale, shift, padding=1)
    torch.testing.assert_close(direct, through_dispatcher, rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cuda"):  # fp32 inputs cast back to x's and weight's fp16 values
        autocast = conv_ops.conv2d_bn_relu(x.float(), weight.float(), scale, shift, padding=1)
    torch.testing.assert_close(autocast, direct, rtol=0, atol=0)

    xq = torch.randint(-128, 128, (2, 16, 7, 7), dtype=torch.int8, device="cuda")
    wq = torch.randint(-127, 128, (24, 16, 3, 3), dtype=torch.int8, device="cuda")
    multiplier, offset, shift_bits, _ = int8_ops.requantization(0.02, 3, wq, torch.rand(24) * 0.01 + 0.001, None, 0.05,
                                                                -5)
    args = (xq, 3, wq, multiplier, offset, shift_bits)
    expected = torch.ops.tlcore.int8_conv2d(*args, None, 0, -5, True, [1, 1], [1, 1], [1, 1], 127, 127, None, 1)
    for chosen in ("triton", "cuda"):
        with torch.no_grad(), use_backend(chosen):
            got = int8_ops.int8_conv2d(*args, out_zero=-5, relu=True, padding=1)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)

    impl_calls = []
    real_impl = conv_ops._conv2d_bn_relu_impl
    monkeypatch.setattr(conv_ops, "_conv2d_bn_relu_impl", lambda *a: impl_calls.append(1) or real_impl(*a))
    conv_ops.conv2d_bn_relu(x, weight, scale, shift, padding=1)
    assert impl_calls == [1]
    with torch.profiler.profile() as prof:  # profiled, the op keeps its name in the trace
        conv_ops.conv2d_bn_relu(x, weight, scale, shift, padding=1)
    assert impl_calls == [1]
    assert any(e.name == "tlcore::conv2d_bn_relu" for e in prof.events())


@pytest.mark.parametrize("kernel", ["pointers", "tma"])
def test_int8_conv_launch_plans_are_reused_only_for_calls_like_their_first(kernel, monkeypatch, device):
    """An eager Triton int8 conv keeps its first call's launch plan (kernel, tile config, grid, other
    arguments) per weight version and call configuration: calls on other data of the same sizes reuse it,
    and a new weight version, batch size, residual layout, x's alignment (the TMA kernel's) or forced
    kernel makes a new one. Every output, freshly allocated and poisoned, equals the integer reference."""
    from test_int8_ops import assert_bit_exact, make_case, on_device, reference, run
    from tlcore.kernels import int8_conv, int8_conv_tma

    tma_here = int8_conv_tma.TensorDescriptor is not None and not (
        device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9)
    if kernel == "tma" and not tma_here:
        pytest.skip("no TMA kernel here")
    monkeypatch.setenv(int8_ops.TRITON_KERNEL_ENV, kernel)
    poison = iter([-128, 127] * 50)
    allocate = int8_ops._int8_output
    monkeypatch.setattr(int8_ops, "_int8_output", lambda *a: allocate(*a).fill_(next(poison)))
    plans_made = []
    make_plan = int8_ops._triton_plan
    monkeypatch.setattr(int8_ops, "_triton_plan", lambda *a: plans_made.append(1) or make_plan(*a))
    launched = []
    for launcher in (int8_conv.Int8ConvLaunch, int8_conv_tma.Int8ConvTmaLaunch):
        monkeypatch.setattr(launcher, "__call__", lambda self, *a, call=launcher.__call__: launched.append(
            type(self).__name__) or call(self, *a))
    tma_name = "Int8ConvTmaLaunch" if kernel == "tma" else "Int8ConvLaunch"

    def check(case, what, plans, launcher=tma_name):
        assert_bit_exact(run(on_device(case, device), "triton").cpu(), reference(on_device(case, "cpu")), what)
        assert len(plans_made) == plans and launched[-1] == launcher, what

    shape = (2, 32, 7, 9, 48, 3, 3, 1, 1, 1)  # padded: the plan keeps the weight's border corrections
    c = make_case(*shape, seed=1)
    c["weight"] = c["weight"].to(device).contiguous(memory_format=torch.channels_last)
    c["residual"] = c["residual"].contiguous(memory_format=torch.channels_last)
    check(c, "first call", 1)
    check(dict(c, x=make_case(*shape, seed=2)["x"], residual=make_case(*shape, seed=3)["residual"].contiguous(
        memory_format=torch.channels_last)), "other x and residual values", 1)
    with torch.no_grad():
        c["weight"].copy_(-c["weight"])  # in place: a new version, new corrections
    check(c, "after an in-place change of the weight", 2)
    check(c, "again", 2)
    bigger = make_case(3, *shape[1:], seed=4)
    check(dict(bigger, weight=c["weight"]), "another batch size", 3)
    check(dict(c, residual=c["residual"].contiguous()), "an NCHW residual", 4)
    check(c, "back to the first configuration", 4)
    # x 1 byte past 16-byte alignment, same sizes and strides: TMA cannot box it
    storage = torch.empty(c["x"].numel() + 1, dtype=torch.int8)
    shifted = storage[1:].as_strided(c["x"].shape, c["x"].stride()).copy_(c["x"])
    check(dict(c, x=shifted), "x off alignment", 5, "Int8ConvLaunch")
    monkeypatch.setenv(int8_ops.TRITON_KERNEL_ENV, "pointers" if kernel == "tma" else "tma")
    check(c, "the other kernel forced", 6,
          "Int8ConvTmaLaunch" if kernel == "pointers" and tma_here else "Int8ConvLaunch")


def test_int8_conv_launch_plans_only_for_untraced_gpu_kernel_calls(monkeypatch):
    """No plan for traced calls (their tensors are fake) or for calls that run the C++ CPU kernel."""
    from test_int8_ops import make_case, run

    c = make_case(1, 16, 5, 5, 16, 3, 3, 1, 1, 1)
    with FakeTensorMode() as mode:
        assert int8_ops._launch_plans(mode.from_tensor(c["x"]), mode.from_tensor(c["weight"])) is None
    if int8_ops.backend.interpreting():  # (else CPU tensors never get plans)
        run(c, "cpu")
        run(c, "torch")
        assert int8_ops._launch_plans(c["x"], c["weight"]) == {}
        run(c, "triton")
        assert len(int8_ops._launch_plans(c["x"], c["weight"])) == 1


def _plan_test_case(device, seed=0, n=1):
    """A small padded conv on `device` (the plans' weight is the device copy)."""
    from test_int8_ops import make_case, on_device

    return on_device(make_case(n, 16, 5, 5, 16, 3, 3, 1, 1, 1, seed=seed), device)


def _op_call(case, stride=(1, 1), padding=(1, 1), dilation=(1, 1)):
    with use_backend("triton"):
        return torch.ops.tlcore.int8_conv2d(case["x"], case["x_zero"], case["weight"], case["multiplier"],
                                            case["offset"], case["shift"], case["residual"], case["res_multiplier"],
                                            case["out_zero"], case["relu"], list(stride), list(padding),
                                            list(dilation), 127, 127, None, 1)


def test_a_launch_plan_never_skips_the_checks_of_other_arguments(device):
    """stride [1], padding [1, 1, 1] holds the same numbers as a valid call's pairs: its plan key must
    differ, so that the call is checked (and refused) rather than launched on the valid call's plan."""
    case = _plan_test_case(device)
    _op_call(case)
    with pytest.raises(ValueError, match="pairs"):
        _op_call(case, stride=(1,), padding=(1, 1, 1))
    with pytest.raises(ValueError, match="pairs"):
        _op_call(case, padding=(1,), dilation=(1, 1, 1))


def test_launch_plans_are_not_used_or_kept_while_a_cuda_graph_is_captured(monkeypatch, device):
    """A plan made before the capture holds corrections of the weight's values then (outside the graph's
    pool); one made during it would keep the pool's tensors. Inside a capture every call plans afresh
    and nothing is stored."""
    from test_int8_ops import on_device, reference

    case = _plan_test_case(device)
    expected = reference(on_device(case, "cpu"))
    _op_call(case)
    plans = int8_ops._launch_plans(case["x"], case["weight"])
    assert len(plans) == 1
    made = []
    make_plan = int8_ops._triton_plan
    monkeypatch.setattr(int8_ops, "_triton_plan", lambda *a: made.append(1) or make_plan(*a))
    monkeypatch.setattr(int8_ops, "capturing_graph", lambda t: True)
    for _ in range(2):
        assert torch.equal(_op_call(case).cpu(), expected)
    assert len(made) == 2 and len(plans) == 1
    monkeypatch.undo()
    assert int8_ops._launch_plans(case["x"], case["weight"]) is plans


def test_a_launch_plan_is_not_kept_when_its_timing_measured_nothing(monkeypatch, device):
    """A plan whose kernel choice fell back to a default because the timing failed is not stored: the
    next call plans (and times) again."""
    from tlcore import backend

    case = _plan_test_case(device)
    made = []
    make_plan = int8_ops._triton_plan

    def plan_while_timing_fails(*args):
        made.append(1)
        monkeypatch.setattr(backend, "_unmeasured", backend.unmeasured_choices() + 1)  # as fastest_of failing does
        return make_plan(*args)

    monkeypatch.setattr(int8_ops, "_triton_plan", plan_while_timing_fails)
    _op_call(case)
    _op_call(case)
    assert len(made) == 2 and int8_ops._launch_plans(case["x"], case["weight"]) == {}
    monkeypatch.setattr(int8_ops, "_triton_plan", lambda *a: made.append(1) or make_plan(*a))
    _op_call(case)
    _op_call(case)
    assert len(made) == 3 and len(int8_ops._launch_plans(case["x"], case["weight"])) == 1


def test_launch_plans_per_weight_are_bounded(monkeypatch, device):
    """Calls of ever-new sizes start a weight's plans over past MAX_LAUNCH_PLANS."""
    monkeypatch.setattr(int8_ops, "MAX_LAUNCH_PLANS", 2)
    case = _plan_test_case(device)
    sizes = []
    for n in (1, 2, 3, 1):
        x = _plan_test_case(device, seed=n, n=n)
        _op_call(dict(x, weight=case["weight"], residual=None))
        sizes.append(len(int8_ops._launch_plans(case["x"], case["weight"])))
    assert sizes == [1, 2, 1, 2]
