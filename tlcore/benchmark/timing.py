"""Median latency of a callable over rotating inputs, with warm-up and device synchronisation."""
import itertools
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def median_ms(fn: Callable[[object], object], inputs: Sequence[object], device: torch.device,
              min_run_time_s: float = 1.0) -> float:
    """Median milliseconds of fn(input), cycling through `inputs` so caches don't flatter.

    GPU: triton.testing.do_bench (CUDA events, L2 flushed between runs). CPU:
    torch.utils.benchmark (warm-up, then blocked runs for about min_run_time_s).
    """
    cycle = itertools.cycle(inputs)
    call = lambda: fn(next(cycle))  # noqa: E731
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(call, warmup=100, rep=int(min_run_time_s * 1000), return_mode="median"))
    from torch.utils.benchmark import Timer

    call()  # warm-up: lazy initialisation, first-touch allocation
    measurement = Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return measurement.blocked_autorange(min_run_time=min_run_time_s).median * 1e3


class Turns:
    """Calls callables in turns, one call of each per round, and keeps each call's time.

    A CPU machine's speed drifts over seconds (cloud VMs, turbo, a busy neighbour): timed one
    after the other, two variants see different machines. On a 2-core Intel Xeon VM (2026-11-23)
    pytest-benchmark, which times each variant's rounds together, put tlcore's int8 ResNet-50 at
    1.19x torch.ao's at batch 8, while alternating them forward by forward gave 1.05-1.09x.
    In turns, the drift lands on every variant alike.
    """

    def __init__(self, calls: Sequence[Callable[[], object]]):
        self.calls = list(calls)
        self.seconds: list[list[float]] = [[] for _ in self.calls]

    def __call__(self) -> None:
        """One round: each call once, in order."""
        for call, seconds in zip(self.calls, self.seconds):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)

    def medians_ms(self) -> list[float]:
        return [statistics.median(seconds) * 1e3 for seconds in self.seconds]


def medians_in_turns_ms(fns: Sequence[Callable[[object], object]], inputs: Sequence[Sequence[object]],
                        min_run_time_s: float = 1.0, min_rounds: int = 5) -> list[float]:
    """CPU: the median milliseconds of fns[i](input), each cycling through inputs[i], timed in
    turns (Turns) for about min_run_time_s per callable, after one warm-up round."""
    cycles = [itertools.cycle(batch) for batch in inputs]
    turns = Turns([lambda fn=fn, cycle=cycle: fn(next(cycle)) for fn, cycle in zip(fns, cycles)])
    for call in turns.calls:
        call()  # warm-up: lazy initialisation, first-touch allocation
    start = time.perf_counter()
    while len(turns.seconds[0]) < min_rounds or time.perf_counter() - start < min_run_time_s * len(fns):
        turns()
    return turns.medians_ms()


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense compute rate in `dtype` (TFLOP/s, TOP/s for int8): the compute-bound ceiling.

    GPU: a large matmul. CPU: the better of a matmul and a large 3x3 conv, since oneDNN's
    conv can outrun the BLAS matmul on CPUs and a ceiling must not be beaten.
    """
    n = 8192 if device.type == "cuda" else 2048
    if dtype == torch.int8:  # int8 x int8 -> int32 on tensor cores
        a = torch.randint(-127, 128, (n, n), device=device, dtype=dtype)
        b = torch.randint(-127, 128, (n, n), device=device, dtype=dtype).t()
        product = lambda _: torch._int_mm(a, b)  # noqa: E731
    else:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        product = lambda _: a @ b  # noqa: E731
    rate = 2 * n**3 / (median_ms(product, [None], device, min_run_time_s=0.5) * 1e-3) / 1e12
    if device.type == "cpu" and dtype == torch.float32:
        x = torch.randn(4, 256, 56, 56).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
        conv = lambda _: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
        flops = 2 * 4 * 56 * 56 * 256 * 256 * 9
        rate = max(rate, flops / (median_ms(conv, [None], device, min_run_time_s=0.5) * 1e-3) / 1e12)
    return rate


def memory_peak_gbs(device: torch.device) -> float:
    """Measured device memory bandwidth (GB/s, bytes read + written): the memory-bound ceiling.

    Timed on an in-place update, as an optimizer step's traffic is. A copy into another array
    also reads its destination first on CPUs (write-allocate), more traffic than the bytes counted:
    on a 2-core AMD EPYC (2026-11-22) `copy_` came out at 62 GB/s and an in-place add at 133.
    """
    numel = 2**28 if device.type == "cuda" else 2**26  # far beyond the caches either way
    x = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    ms = median_ms(lambda _: x.add_(1.0), [None], device, min_run_time_s=0.5)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
