"""Where and with what a benchmark ran: device, CPU, library versions, tlcore commit, date."""
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from tlcore.ops.int8_cpu import resolved_cpu_isa_name


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    """The CPU's name, with its family and model numbers where the name alone may not tell its generation
    (a VM's "AMD EPYC")."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return f"{name} (family {family}, model {model})" if family and model else name


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not (root / "kernels" / "conv.py").exists():
        return "unknown (not a source checkout)"
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The variables that cap the instruction sets of torch's own CPU kernels (oneDNN, FBGEMM, ATen):
# with TLCORE_INT8_CPU_ISA=avx2 they make a VNNI CPU behave like an AVX2-only one for every side.
LIBRARY_CAPS = ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def tlcore_settings() -> dict:
    """The TLCORE_* environment variables set (backend, instruction set, autotuning, ...)."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("TLCORE_")}


def library_caps() -> dict:
    """The LIBRARY_CAPS variables that are set in this process, with their values."""
    return {name: os.environ[name] for name in LIBRARY_CAPS if name in os.environ}


def provenance(device: torch.device) -> dict:
    import tlcore

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tlcore": tlcore.__version__,
        "tlcore_commit": _commit(),
        "python": platform.python_version(),
        "tlcore_settings": tlcore_settings(),
        "library_caps": library_caps(),
        "tlcore_cpu_isa": resolved_cpu_isa_name(),  # the C++ int8 kernel's instruction set here
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
