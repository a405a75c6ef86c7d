"""Which variant of the C++ int8 conv runs on this CPU: its instruction set and its algorithm.

Every variant computes the same codes (the contract in tlcore/ops/int8.py); they differ in speed,
and the packed weight's layout depends on both (tlcore.ops.int8.pack_weight_cpu). The instruction
set is the best one this CPU runs unless TLCORE_INT8_CPU_ISA forces one; the algorithm, the fastest
the kernel has for the conv's shape (csrc/cpu/int8_conv.cpp) unless TLCORE_INT8_CPU_ALGORITHM=direct.
"""
import functools
import os
from typing import Sequence

import torch

from tlcore import _extension, backend

CPU_ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avxvnni": 3, "avx512vnni": 4, "avx2u7": 5, "amx": 6}
CPU_ISA_ENV = "TLCORE_INT8_CPU_ISA"  # force the C++ kernel's instruction set (tests, benchmarks)
ALGORITHM_ENV = "TLCORE_INT8_CPU_ALGORITHM"  # "direct": no Winograd, rows or split in the C++ kernel (tests, benchmarks)
CPU_ALGORITHMS = {"direct": 0, "winograd": 1, "rows": 2, "winograd_stride2": 3, "split": 4}  # csrc/int8_conv.h's Int8Algorithm
# Winograd tiles: F(4x4, 3x3) while 576 * acc stays int32-recoverable (|acc| < 2**25), F(2x4, 3x3) while
# 48 * acc does (|acc| < 2**27), else F(2x2, 3x3) (csrc/cpu/int8_winograd.cpp).
WINOGRAD_4X4_MAX_CHANNELS = (2**25 - 1) // (128 * 128 * 9)
WINOGRAD_2X4_MAX_CHANNELS = (2**27 - 1) // (128 * 128 * 9)


def selected_cpu_isa() -> int:
    """The C++ kernel's instruction set selected now (TLCORE_INT8_CPU_ISA, default auto); packed weights depend on it."""
    name = os.environ.get(CPU_ISA_ENV) or "auto"
    if name not in CPU_ISAS:
        raise ValueError(f"{CPU_ISA_ENV}={name!r}; choose one of {', '.join(CPU_ISAS)}")
    if not _isa_runs_here(name):
        here = [isa for isa in CPU_ISAS if _isa_runs_here(isa)]
        raise ValueError(f"{CPU_ISA_ENV}={name!r}: this CPU has no {name}; it can run {', '.join(here)}")
    return CPU_ISAS[name]


@functools.cache
@torch.compiler.assume_constant_result  # (traced calls, e.g. torch.compile's, take its value as it is)
def _isa_runs_here(name: str) -> bool:
    """Whether the C++ kernel can run instruction set `name` on this CPU (True without the
    extension: then no C++ kernel runs, whatever is selected)."""
    return name == "auto" or not _extension.loaded() or cpu_isa_supported(name)


def cpu_isa_for(x_zero: int, x_max: int) -> int:
    """The C++ kernel's instruction set for an input whose codes lie in [-128, x_max].

    Where the kernel would run AVX2 without VNNI (chosen automatically or by
    TLCORE_INT8_CPU_ISA=avx2), 7-bit inputs (x_max <= -1) take vpmaddubsw, exact for them;
    otherwise the selected set (VNNI is faster than either). An input that may hold 8-bit codes
    runs AVX2's exact kernels even where avx2u7 is selected: a reduce_range model's stem takes
    the 8-bit input quantization, and vpmaddubsw could saturate on it.
    """
    isa = selected_cpu_isa()
    if not _extension.loaded():
        return isa  # no C++ kernel to choose for
    if isa == CPU_ISAS["avx2u7"] and x_max > -1:
        return CPU_ISAS["avx2"]
    avx2 = (_auto_isa() if isa == CPU_ISAS["auto"] else isa) == CPU_ISAS["avx2"]
    if avx2 and x_max <= -1 and x_zero <= -1:
        return CPU_ISAS["avx2u7"]
    return isa


@functools.cache
def _auto_isa() -> int:
    return torch.ops.tlcore._int8_cpu_resolve_isa(CPU_ISAS["auto"])


def cpu_algorithm(weight_shape: Sequence[int], stride: Sequence[int], dilation: Sequence[int], isa: int,
                  groups: int = 1) -> int:
    """How the C++ kernel runs this conv with `isa` (CPU_ALGORITHMS; the results are the same bits).

    The fastest it supports: exact integer Winograd for 3x3 stride-1 convs on instruction sets
    without VNNI (F(4x4, 3x3) tiles up to 227 channels, F(2x4, 3x3) up to 910: 2.25 or 3 products per
    output instead of 9; 1.5-2x faster there),
    and for 3x3 stride-2 convs with C * K <= 256 * 256 on 8-bit codes (25 products per 2x2 tile
    instead of 36; 7-bit codes run them on vpmaddubsw, split or direct: as fast or faster),
    the split algorithm for 1x1 convs on AVX2 (vpmaddubsw, two quads per int16 lane, plus the
    listed top bits of lanes past its bound: ResNet-50's 1x1 convs up to 1.35x faster than on the
    int16 pairs, and 7-bit ones up to 1.27x faster than on the 7-bit quads) and for the other convs
    with C a multiple of 32 on the rows of their taps' codes (ResNet-50's 512-channel stride-2 3x3
    conv 1.37x faster than direct, 7-bit stride-2 ones 1.2-1.25x) and for grouped convs whose groups
    hold a multiple of 32 input channels, or of 16 on 7-bit codes, and of 16 output channels
    (ResNeXt's grouped 3x3 convs of 32-64 channels a group: 0.47-0.88x direct's time), the rows layout
    for odd channel counts (the RGB stem), else direct.
    TLCORE_INT8_CPU_ALGORITHM=direct keeps every conv direct.
    """
    setting = os.environ.get(ALGORITHM_ENV) or "auto"
    if setting not in ("auto", "direct"):
        raise ValueError(f"{ALGORITHM_ENV}={setting!r}; choose auto or direct")
    if setting == "direct" or not _extension.loaded():
        return CPU_ALGORITHMS["direct"]
    k, c, r, s = (int(size) for size in weight_shape)  # weight sizes: static even under dynamic-shape tracing
    return _best_algorithm(k, c * groups, r, s, tuple(stride), tuple(dilation), isa, groups)


@functools.cache
def _best_algorithm(k: int, c: int, r: int, s: int, stride: tuple, dilation: tuple, isa: int, groups: int) -> int:
    return torch.ops.tlcore._int8_cpu_best_algorithm(k, c, r, s, list(stride), list(dilation), isa, groups)


def resolved_cpu_isa_name() -> str:
    """The instruction set the C++ kernel runs here for 8-bit inputs ("no C++ extension" without it)."""
    if not _extension.loaded():
        return "no C++ extension"
    isa = selected_cpu_isa()
    resolved = _auto_isa() if isa == CPU_ISAS["auto"] else isa
    return next(name for name, value in CPU_ISAS.items() if value == resolved)


def cpu_isa_supported(name: str) -> bool:
    """Whether the C++ int8 kernel can run with instruction set `name` here (see CPU_ISAS)."""
    return _extension.loaded() and torch.ops.tlcore._int8_cpu_isa_supported(CPU_ISAS[name])


def runs_cpu_kernel(op: str, t: torch.Tensor, implemented: Sequence[str] = ("cpu", "torch")) -> bool:
    """Whether `op` (with kernels for the `implemented` backends) runs its C++ CPU kernel on tensor t."""
    return t.device.type == "cpu" and backend.select(op, t.device, implemented) == "cpu"
