"""`python -m tlcore bench`: compare tlcore with stock PyTorch on this machine."""
import argparse
import os

import torch

from tlcore.benchmark import report, suites
from tlcore.benchmark.provenance import provenance

MODES = ("fuse", "int8", "optim")
ALIASES = {"fp16": "fuse", "bf16": "fuse", "all": MODES}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tlcore bench", description=(
        "Time tlcore against stock PyTorch on the same inputs: eager (fp32; fp16/bf16 channels_last on GPU), "
        "torch.compile (GPU), torch.ao int8 (CPU), and tlcore fuse / quantize / optim. Every variant is "
        "checked against the fp32 model before it is timed; one that disagrees is reported failed."))
    p.add_argument("--model", default=None, choices=RESNETS, metavar="MODEL",
                   help=f"torchvision ResNet: {', '.join(RESNETS)} (default: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 64 on GPU, 8 on CPU)")
    p.add_argument("--size", type=int, default=224, help="input height and width (default: 224)")
    p.add_argument("--modes", default="all",
                   help="comma-separated: fuse (alias fp16), int8, optim, or all (default: all)")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="GPU low precision (default: fp16)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile variants (default: on GPU only; slow to compile on CPU)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compiled variants, e.g. max-autotune (default: default)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per variant (default: 1)")
    p.add_argument("--out", default=None, help="write results with provenance to this JSON file")
    p.add_argument("--plot", default=None, help="write a bar chart of speedups to this .png file (needs matplotlib)")
    return p


def parse_modes(text: str) -> list[str]:
    modes = []
    for word in filter(None, (word.strip() for word in text.split(","))):
        expanded = ALIASES.get(word, word)
        for mode in (expanded if isinstance(expanded, tuple) else (expanded,)):
            if mode not in MODES:
                raise SystemExit(f"unknown mode {word!r}; choose from fuse, fp16, int8, optim, all")
            if mode not in modes:
                modes.append(mode)
    if not modes:
        raise SystemExit("--modes names no mode; choose from fuse, fp16, int8, optim, all")
    return modes


def check_writable(option: str, path: str) -> None:
    """Exit with a message unless `path` can be written (tried now, before the run, not after it)."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise SystemExit(f"{option} {path}: cannot write it ({error.strerror})") from None
    if not existed:
        os.remove(path)


def check_plotting(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise SystemExit(f"--plot {path}: the chart is a PNG, name a .png file")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or tlcore[bench])") from None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    on_gpu = device.type == "cuda"
    model = args.model or ("resnet50" if on_gpu else "resnet18")
    batch = args.batch if args.batch is not None else (64 if on_gpu else 8)
    for option, value, ok, need in (("--batch", batch, batch >= 1, "at least 1"),
                                    ("--size", args.size, args.size >= 32, "at least 32"),
                                    ("--min-time", args.min_time, args.min_time > 0, "above 0")):
        if not ok:
            raise SystemExit(f"{option} {value}: must be {need}")
    modes = parse_modes(args.modes)
    if args.plot:
        check_plotting(args.plot)
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            check_writable(option, path)
    compile_ = on_gpu if args.compile is None else args.compile
    unused = [option for option, given, used in (
        ("--dtype", args.dtype, on_gpu and ("fuse" in modes or "int8" in modes)),
        ("--compile", args.compile, "fuse" in modes),
        ("--compile-mode", args.compile_mode, "fuse" in modes and compile_)) if given is not None and not used]
    if unused:
        print(f"note: {', '.join(unused)} does not apply to this run (--dtype: the GPU's fuse and int8 modes; "
              "--compile and --compile-mode: the fuse mode, compiled)")
    dtype = DTYPES[args.dtype or "fp16"]
    compile_mode = args.compile_mode or "default"
    builders = {
        "fuse": lambda: suites.fuse_suite(model, batch, device, dtype, compile_, compile_mode, args.size),
        "int8": lambda: suites.int8_suite(model, batch, device, dtype, args.size),
        "optim": lambda: suites.optim_suite(model, device, torch.float32),
    }
    from tqdm import tqdm

    info = provenance(device)
    info["run"] = {"model": model, "batch": batch, "size": args.size, "modes": modes, "min_time_s": args.min_time,
                   "compile": compile_, "compile_mode": compile_mode if compile_ else None,
                   "low_precision": (args.dtype or "fp16") if on_gpu else "fp32 (CPU)"}
    print(f"tlcore bench: {model}, batch {batch}, {args.size}x{args.size}, on {info['device']} ({info['cpu']}), "
          f"torch {info['torch']}")
    results = []
    with tqdm(desc="variants", unit="variant", leave=False) as progress:
        for mode in modes:
            try:
                suite = builders[mode]()
            except Exception as error:  # noqa: BLE001 - report the mode as failed, run the others
                results.append(suites.Result(mode, model, batch, "(setup)",
                                             status=f"failed: {type(error).__name__}: {error}"[:200]))
                continue
            progress.total = (progress.total or 0) + len(suite.variants)
            results += suites.run(suite, args.min_time, progress)
    print(report.table(results))
    if args.out:
        report.write_json(args.out, info, results)
        print(f"wrote {args.out}")
    if args.plot:
        report.plot(args.plot, info, results)
        print(f"wrote {args.plot}")
    return 0 if all(r.status == "ok" for r in results) else 1
