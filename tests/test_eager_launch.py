"""The eager launch path: autotuned kernels launched with the chosen config (kernels/launch.py), and
public ops skipping torch's dispatcher only where it would do nothing (tlcore/ops/eager.py)."""
import pytest
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensorMode

from tlcore.backend import use_backend
from tlcore.kernels import launch
from tlcore.ops import conv as conv_ops
from tlcore.ops import int8 as int8_ops
from tlcore.ops.eager import plain_eager_call


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
