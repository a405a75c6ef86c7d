"""pytest-benchmark cases: `pytest bench/ --benchmark-only --benchmark-json=r.json`.

Each case checks its variant's answer before timing it. On a GPU every call is
followed by a synchronisation so pytest-benchmark's wall clock sees the kernels;
`extra_info` also records triton.testing.do_bench's median (CUDA events) and the
median as a replayed CUDA graph (the kernels' time, without the host's).
"""
import itertools

import pytest
import torch

from tlcore.benchmark.provenance import tlcore_settings
from tlcore.benchmark.timing import graph_median_ms, median_ms

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU benchmark: needs a CUDA device")


def run_benchmark(benchmark, fn, inputs, **info):
    """Time fn over rotating inputs with pytest-benchmark (and do_bench on a GPU)."""
    cycle = itertools.cycle(inputs)
    with torch.no_grad():  # inference timing: no autograd graphs (tlcore's fused weights need none)
        if DEVICE.type == "cuda":
            call = lambda: (fn(next(cycle)), torch.cuda.synchronize())  # noqa: E731
            info["do_bench_median_ms"] = median_ms(fn, inputs, DEVICE)
            # the kernels' time without the host's (None where fn cannot be captured): small layers'
            # eager calls take longer on the host than on the GPU
            info["graph_median_ms"] = graph_median_ms(fn, inputs)
            if "ops" in info:  # integer operations per call, per kernel-side second where known
                kernel_ms = info["graph_median_ms"] or info["do_bench_median_ms"]
                info["tops"] = info["ops"] / (kernel_ms * 1e-3) / 1e12
        else:
            call = lambda: fn(next(cycle))  # noqa: E731
        benchmark.extra_info.update(info, tlcore_settings=tlcore_settings())
        call()  # warm-up (compilation, autotuning) outside the timed rounds
        benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)
