"""Rounding fp32 -> bf16/fp16 in tlcore's optimizers: nearest-even matches torch, stochastic is unbiased."""
import math

import pytest
import torch

import tlcore
from tlcore.backend import use_backend
from tlcore.ops.optim import philox_words, round_to_bits

DTYPES16 = [torch.bfloat16, torch.float16]
BACKENDS = ["cpu", "triton", "torch"]


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    """fp32 values around every hard spot of `dtype`: binade edges, ties, subnormals, overflow, specials."""
    info = torch.finfo(dtype)
    anchors = [0.0, 1.0, 2.0, 0.5, 3.0, info.max, info.tiny, info.tiny * 0.5, info.smallest_normal * 2**-9,
               2.0**-24, 2.0**-25, 2.0**-26, 2.0**-30, 2.0**-40, 2.0**-130, 1e-45, 65504.0, 65520.0, 65535.9,
               65536.0, 3.0e38, 1.0 + 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11]
    base = torch.tensor(anchors, dtype=torch.float32)
    # fp32 neighbours of each anchor: exact ties and the values one fp32 ulp either side
    bits = base.view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in (-2, -1, 0, 1, 2)])
    near = near[torch.isfinite(near)]
    values = torch.cat([near, -near, torch.tensor([math.inf, -math.inf, math.nan])])
    wide = torch.randn(20000) * torch.exp2(torch.randint(-40, 20, (20000,)).float())
    return torch.cat([values, wide])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, with every NaN equal to every NaN."""
    nan = torch.isnan(a.float())
    return bool(torch.equal(nan, torch.isnan(b.float())) and torch.equal(a.view(torch.int16)[~nan],
                                                                          b.view(torch.int16)[~nan]))


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_nearest_matches_torch_cast(dtype):
    x = _edge_values(dtype)
    r = torch.randint(0, 2**32, x.shape, dtype=torch.int64)  # ignored by round-to-nearest
    assert _same_bits(round_to_bits(x, r, dtype, stochastic=False), x.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_stochastic_gives_a_neighbour(dtype):
    """Every stochastic result is x's sign times the 16-bit magnitude just below or just above |x|."""
    x = _edge_values(dtype)
    x = x[torch.isfinite(x)]
    r = philox_words(7, torch.arange(x.numel()), 0, 1)[0]
    out = round_to_bits(x, r, dtype, stochastic=True)
    magnitude = x.abs()
    nearest = magnitude.to(dtype)
    bits = nearest.view(torch.int16)
    above = nearest.double() >= magnitude.double()  # nearest is the upper neighbour
    lower = torch.where(above & (bits > 0), bits - 1, bits).view(dtype)
    upper = torch.where(above, bits, bits + 1).view(dtype)  # the step past the largest finite value is inf
    got = out.abs().double()
    ok = (got == lower.double()) | (got == upper.double())
    assert ok.all(), f"{(~ok).sum().item()} results are not a neighbour, e.g. x={x[~ok][:4].tolist()}"
    assert torch.equal(torch.signbit(out), torch.signbit(x))
    # both neighbours occur: the rounding is not secretly deterministic
    inexact = lower.double() != upper.double()
    assert (got[inexact] == lower.double()[inexact]).any() and (got[inexact] == upper.double()[inexact]).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf * 0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_specials_pass_through(backend, dtype):
    p = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1.0], dtype=dtype)
    param = torch.nn.Parameter(p.clone())
    param.grad = torch.zeros_like(p)
    opt = tlcore.optim.SGD([param], lr=0.1, seed=3)
    with use_backend(backend):
        opt.step()
    assert _same_bits(param.detach()[:2], p[:2]) and torch.isnan(param[2])
    assert torch.equal(param.detach()[3:].view(torch.int16), p[3:].view(torch.int16))


# (start value, gradient) per dtype and place: lr = 0.3 makes each update 0.3 of an ulp
# (mid-binade) or crosses down a power of two, where the ulp below is half the one above.
UNBIASED_CASES = {
    "mid": lambda ulp: (1.0 + 3 * ulp, ulp),
    "edge": lambda ulp: (1.0, ulp / 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("place", sorted(UNBIASED_CASES))
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_one_step_is_unbiased(backend, dtype, place):
    """1e5 copies, one SGD step of 0.3 ulp: each result a neighbour, the mean the fp32 result."""
    n = 100_000
    ulp = torch.finfo(dtype).eps  # ulp of [1, 2)
    start, grad = UNBIASED_CASES[place](ulp)
    lr = 0.3
    param = torch.nn.Parameter(torch.full((n,), start, dtype=dtype))
    param.grad = torch.full((n,), grad, dtype=dtype)
    opt = tlcore.optim.SGD([param], lr=lr, seed=11)
    with use_backend(backend):
        opt.step()
    exact = torch.tensor(start, dtype=torch.float32) - torch.tensor(lr, dtype=torch.float32) * grad
    exact = exact.double().item()
    out = param.detach().double()
    hi = start
    lo = start - (ulp if place == "mid" else ulp / 2)
    assert lo < exact < hi
    assert ((out == lo) | (out == hi)).all()
    p_up = (exact - lo) / (hi - lo)
    standard_error = math.sqrt(p_up * (1 - p_up) / n) * (hi - lo)
    assert abs(out.mean().item() - exact) < 4 * standard_error, (out.mean().item(), exact, standard_error)


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_adamw_sub_ulp_step_is_unbiased(dtype):
    """AdamW too: a first step of lr = 0.25 ulp moves the mean by lr (rounding to nearest would not move)."""
    n = 100_000
    ulp = torch.finfo(dtype).eps
    param = torch.nn.Parameter(torch.full((n,), 1.5, dtype=dtype))
    param.grad = torch.full((n,), 1.0, dtype=dtype)
    lr = 0.25 * ulp
    opt = tlcore.optim.AdamW([param], lr=lr, weight_decay=0.0, eps=1e-8, seed=5)
    opt.step()
    moved = 1.5 - param.detach().double()
    assert set(moved.unique().tolist()) <= {0.0, ulp}
    standard_error = math.sqrt(0.25 * 0.75 / n) * ulp
    assert abs(moved.mean().item() - lr) < 4 * standard_error


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: 3e38 * 1.23
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_kernels_round_every_range_like_the_reference(dtype, stochastic):
    """Drive each backend's rounding over the whole range through the op: p = 0 - (-1) * g * 1.2345679
    hits subnormals, binade edges, the overflow zone and specials; round-to-nearest must equal
    torch's cast, and every backend must write the same bits."""
    g = _edge_values(dtype).to(dtype)
    scale = torch.tensor(1.2345679, dtype=torch.float32)
    expected_value = 0.0 - (-1.0) * (g.float() * scale)  # the fp32 value each kernel rounds (-0 becomes +0)
    hyper = torch.tensor([[-1.0, 0.0, 0.0, 1.0, scale.item(), 0.0, 0.0, 0.0]], dtype=torch.float32)
    counters = torch.tensor([[3, 9, 0]], dtype=torch.int64)
    results = {}
    for backend in BACKENDS:
        param = torch.zeros_like(g)
        with use_backend(backend):
            torch.ops.tlcore.sr_sgd_([param], [g], [], hyper, counters, False, 77, stochastic)
        results[backend] = param
    r = philox_words(77, torch.arange(g.numel()), 3, 9)[0]
    reference = round_to_bits(expected_value, r, dtype, stochastic)
    if not stochastic:
        assert _same_bits(reference, expected_value.to(dtype))
    for backend, param in results.items():
        assert _same_bits(param, reference), f"{backend} differs from the reference rounding"
