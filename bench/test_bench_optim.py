"""Optimizer step time: tlcore AdamW (bf16 + stochastic rounding) vs torch AdamW on fp32 master weights.

    pytest bench/test_bench_optim.py --benchmark-only --benchmark-json=optim.json

tlcore keeps param, grad and both states in bf16: 8 bytes/param held, 14 moved per
step (read 4 tensors, write 3). The AMP setup keeps fp32 masters for torch's fused or
foreach AdamW: 16 bytes/param held (plus the bf16 model copy), 28 moved. On a GPU the
cases are ResNet-50's parameter shapes (25.6M) and a 1e9-element stress tensor, and
extra_info records GB/s achieved against the measured memory bandwidth; on a CPU a small
case keeps the run short.
"""
import functools

import pytest
import torch

import tlcore
from conftest import DEVICE, run_benchmark
from tlcore.benchmark.timing import memory_peak_gbs, median_ms


@functools.cache
def _resnet50_shapes() -> list[tuple[int, ...]]:
    import torchvision

    with torch.device("meta"):
        return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


CASES = {
    "resnet50": _resnet50_shapes,                    # 25.6M parameters in 161 tensors
    "stress-1e9": lambda: [(1_000_000_000,)],
    "cpu-small": lambda: [(64, 64, 3, 3)] * 8 + [(513, 1023), (1000,)],  # 0.82M parameters
}
VARIANTS = {  # name: (param dtype, optimizer factory, bytes held per param, bytes moved per param)
    "tlcore bf16 sr": (torch.bfloat16, lambda ps: tlcore.optim.AdamW(ps, lr=1e-4, seed=0), 8, 14),
    "torch fused fp32 masters": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), 16, 28),
    "torch foreach fp32 masters": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True), 16, 28),
}


def _cases():
    names = ["resnet50", "stress-1e9"] if DEVICE.type == "cuda" else ["cpu-small"]
    return [pytest.param(name, id=name) for name in names]


def _check_one_step(dtype, make):
    """The variant's first step lands within a bf16 rounding of fp32 AdamW's (checked before timing)."""
    torch.manual_seed(0)
    start = torch.randn(4099, device=DEVICE)
    grad = torch.randn(4099, device=DEVICE)
    p = torch.nn.Parameter(start.to(dtype))
    p.grad = grad.to(dtype)
    make([p]).step()
    ref = torch.nn.Parameter(start.to(dtype).float())
    ref.grad = grad.to(dtype).float()
    torch.optim.AdamW([ref], lr=1e-4).step()
    tolerance = 2 * torch.finfo(dtype).eps * ref.detach().abs()
    assert ((p.detach().float() - ref.detach()).abs() <= tolerance).all()


@pytest.mark.parametrize("case", _cases())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adamw_step(benchmark, variant, case):
    dtype, make, held, moved = VARIANTS[variant]
    _check_one_step(dtype, make)
    params = [torch.nn.Parameter(torch.empty(s, device=DEVICE, dtype=dtype).normal_()) for s in CASES[case]()]
    for p in params:
        p.grad = torch.empty_like(p).normal_()
    opt = make(params)
    numel = sum(p.numel() for p in params)
    info = dict(variant=variant, case=case, params=numel, bytes_held_per_param=held, bytes_moved_per_param=moved)
    if DEVICE.type == "cuda":
        info["memory_peak_gbs"] = memory_peak_gbs(DEVICE)
        ms = median_ms(lambda _: opt.step(), [None], DEVICE)
        info["achieved_gbs"] = moved * numel / (ms * 1e-3) / 1e9
        info["fraction_of_memory_bandwidth"] = info["achieved_gbs"] / info["memory_peak_gbs"]
    run_benchmark(benchmark, lambda _: opt.step(), [None], **info)
