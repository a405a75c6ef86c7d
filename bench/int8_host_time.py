"""Host (Python) time of an eager int8 conv call on the GPU code path, measured on a CPU.

    TRITON_INTERPRET=1 python bench/int8_host_time.py [tma|pointers]

In eager mode a GPU forward is host-bound when its calls take longer to issue than their kernels
take to run (bench/NOTES.md, session 39). This script times what tlcore's Python does per call of
ResNet-50's Int8Conv2d modules (random weights, 2x3x64x64 calibration) without a GPU: CPU tensors take
the Triton backend's route in the interpreter, every kernel launch is stubbed out (its config's
pre-hook still runs), and the public op skips torch's dispatcher as it does for GPU tensors. What it
leaves out: Triton's own launch (its JIT binding and launcher: ~30-60 us a call on an H100 machine's
host, session 39) and the GPU-only checks (device capability, stream capture). What it adds: the
CPU-only ones (the weight-packing lookup, the headroom check), and the stem's space-to-depth copies
(real work on CPU tensors). Prints microseconds per call: the stem, then the median and mean of the
other 52 convs.
"""
import os
import statistics
import sys
import time

import torch
import torchvision

import tlcore
import tlcore.ops.int8 as int8_ops
from tlcore.kernels import launch
from tlcore.nn.int8 import Int8Conv2d
from tlcore.ops.eager import plain_eager_call

CALLS = 300


def _stub_launches() -> None:
    def tuned_without_launch(kernel, grid, *args, **kwargs):
        config = kernel.configs[0]
        if config.pre_hook is not None:
            config.pre_hook(launch._named_arguments(kernel, args, kwargs, config.all_kwargs()))
        return config

    tuned_call = launch.TunedLaunch.__call__

    def call_without_launch(self, *args, **kwargs):
        tuned_call(self, *args, **kwargs)
        self._launch = lambda *a, **k: None  # (set by the first call: the chosen config's JIT function)

    launch.launch_tuned = tuned_without_launch
    launch.TunedLaunch.__call__ = call_without_launch
    int8_ops.skips_dispatcher = plain_eager_call  # (GPU tensors' route: tlcore/ops/eager.py)


def _conv_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Each Int8Conv2d's inputs (x, residual) in one forward, channels_last as between int8 layers."""
    inputs = {}

    def keep(module, args):
        inputs[module] = tuple(None if a is None else a.contiguous(memory_format=torch.channels_last) for a in args)

    hooks = [m.register_forward_pre_hook(keep) for m in model.modules() if isinstance(m, Int8Conv2d)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


def main(kernel: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (CPU tensors on the Triton backend)")
    os.environ[int8_ops.TRITON_KERNEL_ENV] = kernel
    torch.manual_seed(0)
    batch = torch.randn(2, 3, 64, 64)
    qmodel = tlcore.quantize(torchvision.models.resnet50().eval(), [batch], progress=False, backend="torch")
    inputs = _conv_inputs(qmodel, batch)
    _stub_launches()
    microseconds = []
    with torch.no_grad():
        for conv, args in inputs.items():
            conv.backend = "triton"
            conv(*args)  # the first call: checks, choices, the launch plan
            start = time.perf_counter()
            for _ in range(CALLS):
                conv(*args)
            microseconds.append((time.perf_counter() - start) / CALLS * 1e6)
    rest = microseconds[1:]
    print(f"{kernel}: stem {microseconds[0]:.1f} us; other {len(rest)} convs: median {statistics.median(rest):.1f} "
          f"us, mean {statistics.mean(rest):.1f} us a call")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tma")
