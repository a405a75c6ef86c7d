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


def graph_median_ms(fn: Callable[[object], object], inputs: Sequence[object], rep_ms: int = 500) -> float | None:
    """GPU: median milliseconds of fn(input) replayed as a CUDA graph (triton.testing.do_bench_cudagraph),
    cycling through `inputs` as median_ms does; None where fn cannot be captured (it synchronises
    with the host, or allocates outside the graph's pool).

    A replayed graph launches its kernels without Python, so this is the kernels' time: where an
    eager call's host work outlasts its kernels, median_ms measures the host instead
    (bench/NOTES.md, session 39). Call fn once before (autotuning and a backend's timing do not capture).
    """
    from triton.testing import do_bench_cudagraph

    cycle = itertools.cycle(inputs)
    try:
        return float(do_bench_cudagraph(lambda: fn(next(cycle)), rep=rep_ms, return_mode="median"))
    except RuntimeError:  # a capture that failed: nothing was launched
        torch.cuda.synchronize()
        return None


class Turns:
    """Calls callables in turns, one call of each per round, and keeps each call's time.

    A CPU machine's speed drifts over seconds (cloud VMs, turbo, a busy neighbour): timed one
    after the other, two variants see different machines. On a 2-core Intel Xeon VM (2026-11-23)
    pytest-benchmark, which times each variant's rounds together, put tlcore's int8 ResNet-50 at
    1.19x torch.ao's at batch 8, while alternating them forward by forward gave 1.05-1.09x.
    In turns, the drift lands on every variant alike. Every other round runs in reverse order, so
    no call always follows the same neighbour (whose data may have evicted its own from the
    caches). A call that raises is left out of later rounds, its exception in `errors`.
    """

    def __init__(self, calls: Sequence[Callable[[], object]]):
        self.calls = list(calls)
        self.seconds: list[list[float]] = [[] for _ in self.calls]
        self.errors: list[Exception | None] = [None] * len(self.calls)
        self.rounds = 0

    @classmethod
    def rotating(cls, fns: Sequence[Callable[[object], object]], inputs: Sequence[Sequence[object]]) -> "Turns":
        """Turns of fns[i](input), each cycling through its own inputs[i]."""
        cycles = [itertools.cycle(batch) for batch in inputs]
        return cls([lambda fn=fn, cycle=cycle: fn(next(cycle)) for fn, cycle in zip(fns, cycles)])

    def __call__(self) -> None:
        """One round: each call that has not raised once, forward or backward by turn."""
        order = range(len(self.calls)) if self.rounds % 2 == 0 else reversed(range(len(self.calls)))
        self.rounds += 1
        for i in order:
            if self.errors[i] is not None:
                continue
            start = time.perf_counter()
            try:
                self.calls[i]()
            except Exception as error:  # noqa: BLE001 - the others go on; the caller reports it
                self.errors[i] = error
                continue
            self.seconds[i].append(time.perf_counter() - start)

    def warm_up(self) -> None:
        """One round, not recorded: lazy initialisation, first-touch allocation."""
        self()
        for seconds in self.seconds:
            seconds.clear()

    def live(self) -> bool:
        return any(error is None for error in self.errors)

    def medians_ms(self) -> list[float | None]:
        """Each call's median time; None for a call that raised or never ran."""
        return [statistics.median(seconds) * 1e3 if error is None and seconds else None
                for seconds, error in zip(self.seconds, self.errors)]


def time_in_turns(fns: Sequence[Callable[[object], object]], inputs: Sequence[Sequence[object]],
                  min_run_time_s: float = 1.0, min_rounds: int = 5) -> Turns:
    """CPU: fns[i](input), each cycling through inputs[i], timed in turns (Turns) after one warm-up
    round, for at least min_rounds rounds and about min_run_time_s * len(fns) seconds in all.
    The returned Turns has each one's median (medians_ms) and any exception (errors)."""
    turns = Turns.rotating(fns, inputs)
    turns.warm_up()
    start, recorded = time.perf_counter(), 0
    while turns.live() and (recorded < min_rounds or time.perf_counter() - start < min_run_time_s * len(fns)):
        turns()
        recorded += 1
    return turns


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
