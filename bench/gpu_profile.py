"""Where the GPU time goes: profiles for a lent GPU (`bash bench/gpu_run.sh profile`).

    python bench/gpu_profile.py models OUT   torch.profiler over ResNet-50 at batch 256: eager fp16
                                             channels_last, tlcore.fuse fp16 and tlcore.quantize int8
    python bench/gpu_profile.py layers OUT   one int8 conv call per ResNet-50 shape and GPU backend, each
                                             in a CUDA profiler range: run it under
                                             `ncu --profile-from-start off`

models writes, per variant, profile-<variant>.txt (kernels by device time, then tlcore's and torch's
ops by input shape) and models.json: a forward's wall time against the time its kernels kept the
GPU busy (a busy share well under 1 means the host's launches, not the kernels, set the pace), and
a Chrome trace of the int8 model's forwards, and the GPU backend each int8 conv configuration was
measured fastest on. layers writes layers.txt: the profiled calls in launch
order, the order of ncu's report (a padded conv on Triton launches two kernels there: its
padding corrections, then the conv).
"""
import json
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from tlcore import backend
from tlcore.benchmark import suites

FORWARDS = 3  # profiled forwards per model variant, after two warm-up ones (compilation, autotuning)
BATCH = 256


def busy_ms(kernels) -> float:
    """Milliseconds in which at least one of the kernel events (FunctionEvents) ran."""
    busy, end = 0.0, float("-inf")
    for kernel in sorted(kernels, key=lambda k: k.time_range.start):
        start, stop = max(kernel.time_range.start, end), kernel.time_range.end
        busy += max(0.0, stop - start)
        end = max(end, stop)
    return busy / 1e3  # profiler times are in microseconds


def profile_variant(variant, out: Path, trace: bool) -> dict:
    """Profile FORWARDS calls of a suite variant; write its tables; return its timings."""
    with torch.no_grad():
        for x in variant.inputs[:2]:
            variant.fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            start = time.perf_counter()
            for i in range(FORWARDS):
                variant.fn(variant.inputs[i % len(variant.inputs)])
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - start) * 1e3 / FORWARDS
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # (copies and memsets too)
    name = variant.name.replace(" ", "-").replace(".", "")
    tables = [prof.key_averages().table(sort_by="self_device_time_total", row_limit=40),
              prof.key_averages(group_by_input_shape=True).table(sort_by="device_time_total", row_limit=80)]
    (out / f"profile-{name}.txt").write_text("\n\n".join(tables))
    if trace:
        prof.export_chrome_trace(str(out / f"trace-{name}.json"))
    busy = busy_ms(kernels) / FORWARDS
    return {"wall_ms_per_forward (profiled)": wall_ms, "kernel_busy_ms_per_forward": busy,
            "gpu_busy_share": busy / wall_ms, "device_events_per_forward": len(kernels) / FORWARDS}


def profile_models(out: Path) -> None:
    device = torch.device("cuda")
    fuse = suites.fuse_suite("resnet50", BATCH, device, torch.float16, compile_=False)
    int8 = suites.int8_suite("resnet50", BATCH, device, torch.float16)
    variants = [v for v in fuse.variants if v.name != "eager fp32"] + [v for v in int8.variants if "int8" in v.name]
    summary = {"model": "resnet50", "batch": BATCH, "forwards": FORWARDS, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(), "variants": {}}
    for variant in variants:
        summary["variants"][variant.name] = profile_variant(variant, out, trace=variant.name == "tlcore.quantize int8")
        print(variant.name, summary["variants"][variant.name], flush=True)
    # the GPU kernel each int8 conv configuration ran on, by its timing key (tlcore/ops/int8.py's _timing_key):
    # the backend, and the Triton backend's kernel where it had two
    choices = backend.fastest_choices().items()
    summary["int8 conv backends"] = {f"{op} {key}": chosen for (op, _, key), chosen in choices}
    (out / "models.json").write_text(json.dumps(summary, indent=1))


def profile_layers(out: Path) -> None:
    from test_bench_conv import shape_id
    from test_bench_int8 import LAYER_CASES, gpu_layer_operands, gpu_layer_residual, int8_layer

    from tlcore import _extension

    backends = ["triton"] + (["cuda"] if _extension.has_cuda_kernels() else [])
    order = []
    for shape, residual in LAYER_CASES:
        xs, weight, _ = gpu_layer_operands(shape)
        layer = int8_layer(weight, shape[4], shape[5], residual=gpu_layer_residual(shape) if residual else None)
        for backend in backends:
            with torch.no_grad():
                layer(xs[0], backend)  # compile and autotune outside the profiled range
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
                layer(xs[1], backend)
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
            order.append(f"{shape_id(shape)}{'-residual' if residual else ''} {backend}")
    (out / "layers.txt").write_text("\n".join(order) + "\n")


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"models": profile_models, "layers": profile_layers}[mode](out_dir)
