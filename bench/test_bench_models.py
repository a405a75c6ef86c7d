"""Whole-model forward: tlcore.fuse against eager fp16 channels_last and torch.compile (the CLI's suites)."""
import functools

import pytest
import torch

from conftest import DEVICE, needs_gpu, run_benchmark
from tlcore.benchmark import suites

pytestmark = needs_gpu

CASES = [("resnet18", 32), ("resnet18", 256), ("resnet50", 32), ("resnet50", 256)]
VARIANTS = ["eager fp16 channels_last", "torch.compile fp16", "tlcore.fuse fp16", "tlcore.fuse + torch.compile fp16"]


@functools.cache
def suite(model, batch):
    return suites.fuse_suite(model, batch, DEVICE, torch.float16, compile_=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model,batch", CASES)
def test_forward(benchmark, model, batch, variant):
    s = suite(model, batch)
    v = next(v for v in s.variants if v.name == variant)
    with torch.no_grad():
        error = suites.rel_error(v.fn(v.inputs[0]), s.reference)
    assert error <= v.tolerance, f"{variant} disagrees with the fp32 model: {error:.3g}"
    run_benchmark(benchmark, v.fn, v.inputs, model=model, batch=batch, rel_error=error,
                  flops=s.work)
