"""torch.ops.tlcore.sr_adamw_ / sr_sgd_ as ops: opcheck, fake tensors, clear errors on bad input."""
import pytest
import torch

import tlcore
from numerics import opcheck_utils
from tlcore import _extension
from tlcore.backend import use_backend
from tlcore.ops import optim as ops

BACKENDS = ["cpu", "triton", "torch"]


def _adamw_args(n=3, dtype=torch.bfloat16, state_dtype=torch.bfloat16):
    torch.manual_seed(0)
    shapes = [(5,), (3, 4), (2, 1, 3)][:n]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    m = [torch.randn(s).to(state_dtype) * 0.1 for s in shapes]
    v = [torch.rand(s).to(state_dtype) * 0.1 for s in shapes]
    hyper = torch.tensor([[1 - 1e-4, 1e-2, 0.3, 1e-8, 0.1, 0.999, 1e-3, 1.0]] * n, dtype=torch.float32)
    counters = torch.tensor([[i, 4, 0] for i in range(n)], dtype=torch.int64)
    return params, grads, m, v, hyper, counters, 17, True


def _sgd_args(n=3, dtype=torch.float16):
    params, grads, bufs, _, _, counters, seed, stochastic = _adamw_args(n, dtype, torch.float32)
    hyper = torch.tensor([[0.1, 0.01, 0.9, 1.0, 0.5, 0, 0, 0]] * n, dtype=torch.float32)
    return params, grads, bufs, hyper, counters, True, seed, stochastic


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_sr_adamw(backend):
    with use_backend(backend):
        torch.library.opcheck(torch.ops.tlcore.sr_adamw_.default, _adamw_args(),
                              test_utils=opcheck_utils(backend, torch.device("cpu")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_sr_sgd(backend):
    with use_backend(backend):
        torch.library.opcheck(torch.ops.tlcore.sr_sgd_.default, _sgd_args(),
                              test_utils=opcheck_utils(backend, torch.device("cpu")))


@pytest.mark.skipif(not _extension.loaded(), reason="tlcore's compiled extension is not built")
def test_opcheck_compiled_cpu_kernels():
    torch.library.opcheck(torch.ops.tlcore._sr_adamw_cpu.default, _adamw_args())
    torch.library.opcheck(torch.ops.tlcore._sr_sgd_cpu.default, _sgd_args())


def test_op_writes_in_place_and_is_deterministic():
    a, b = _adamw_args(), _adamw_args()
    before = [p.clone() for p in a[0]]
    ops.sr_adamw_(*a)
    ops.sr_adamw_(*b)
    assert all(not torch.equal(x, y) for x, y in zip(a[0], before))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[2] + a[3], b[0] + b[2] + b[3]))


def test_empty_lists_and_empty_tensors_are_fine():
    ops.sr_adamw_([], [], [], [], torch.zeros(0, 8), torch.zeros(0, 3, dtype=torch.int64), 0, True)
    args = list(_adamw_args(1))
    args[:4] = [[torch.empty(0, 3, dtype=torch.bfloat16)] for _ in range(4)]
    for backend in BACKENDS:
        with use_backend(backend):
            ops.sr_adamw_(*args)


def _bad(index, value):
    args = list(_adamw_args())
    args[index] = value(args[index]) if callable(value) else value
    return args


BAD_OP_ARGS = {
    "unsupported dtype": (_bad(0, lambda ps: [p.double() for p in ps]), TypeError, "dtype"),
    "grad dtype": (_bad(1, lambda gs: [g.float() for g in gs]), ValueError, "gradient 0"),
    "state shape": (_bad(2, lambda ms: [m[:1] for m in ms]), ValueError, "state 0"),
    "fp16 states": (_bad(3, lambda vs: [v.half() for v in vs]), TypeError, "states"),
    "list lengths": (_bad(1, lambda gs: gs[:2]), ValueError, "one length"),
    "hyper shape": (_bad(4, torch.zeros(3, 7)), ValueError, "hyper"),
    "counters dtype": (_bad(5, torch.zeros(3, 3)), ValueError, "counters"),
    # the same values with a row stride of 16: the kernels would read row r at 8 * r
    "strided hyper": (_bad(4, lambda h: torch.cat([h, torch.full_like(h, 7.0)], 1)[:, :8]), ValueError, "contiguous"),
    "negative seed": (_bad(6, -1), ValueError, "seed"),
    "strided param": (_bad(0, lambda ps: [torch.randn(5, 2).to(torch.bfloat16)[:, 0]] + ps[1:]), ValueError,
                      "dense"),
}


@pytest.mark.parametrize("case", sorted(BAD_OP_ARGS))
def test_op_rejects_bad_arguments(case):
    args, error, match = BAD_OP_ARGS[case]
    with pytest.raises(error, match=match):
        ops.sr_adamw_(*args)


@pytest.mark.skipif(not _extension.loaded(), reason="tlcore's compiled extension is not built")
def test_compiled_kernel_checks_its_own_arguments():
    """The compiled op, called directly, refuses what the Python op would have caught."""
    args = _bad(1, lambda gs: [g.float() for g in gs])
    with pytest.raises(RuntimeError, match="gradient"):
        torch.ops.tlcore._sr_adamw_cpu(*args)


def test_optimizer_errors():
    p = torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    with pytest.raises(ValueError, match="seed"):
        tlcore.optim.AdamW([p], seed=-3)
    with pytest.raises(ValueError, match="Nesterov"):
        tlcore.optim.SGD([p], nesterov=True)
    opt = tlcore.optim.SGD([p], lr=0.1, seed=0)
    p.grad = torch.randn(4, 4).to_sparse().to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None  # newer torch refuses a grad of another dtype unless allowed
    try:
        p.grad = torch.randn(4, 4)
    except RuntimeError:  # torch before grad_dtype (2.6) refuses such a gradient itself
        p.grad = None
    else:
        with pytest.raises(TypeError, match="gradient is torch.float32"):
            opt.step()
    c = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    c.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        tlcore.optim.AdamW([c], seed=0).step()
    strided = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    strided.grad = torch.randn(4, 3)
    with pytest.raises(ValueError, match="dense"):
        tlcore.optim.SGD([strided], seed=0).step()


def test_grad_with_other_strides_is_matched_to_the_parameter():
    """A contiguous grad for a channels_last param is paired element by element, not by memory offset."""
    w = torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)
    p, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    g = torch.randn(4, 3, 2, 2)
    p.grad = g.contiguous()
    ref.grad = g.to(memory_format=torch.channels_last)
    tlcore.optim.SGD([p], lr=0.1, seed=0).step()
    torch.optim.SGD([ref], lr=0.1).step()
    assert torch.allclose(p, ref, rtol=1e-6, atol=0)
