"""The CUDA C++ int8 conv kernels compile for sm_80 and sm_90 (and sm_75) and compile well.

Runs nvcc on csrc/cuda/int8_conv.cu (no torch headers, so it takes about a second per arch; no GPU
needed) and reads the machine code with cuobjdump, as tests/aot_compile.py does for Triton: the
mma kernel must run on the tensor cores (IMMA.16832.S8.S8 in its SASS) with no local-memory
spills, and the file must compile without warnings; for an arch without s8 mma.sync the mma
kernel's body must be compiled out.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "int8_conv.cu"
MMA, DP4A = "int8_conv_mma_kernel", "int8_conv_dp4a_kernel"
# Each kernel is built for both reductions (template argument kFlat: per tap, or the flat stem window).
MMA_KERNELS = [f"{MMA}<{flat}>" for flat in ("false", "true")]
DP4A_KERNELS = [f"{DP4A}<{flat}>" for flat in ("false", "true")]
MMA_PER_STEP = 16  # one 64-channel reduction step: 2 k32 steps x (2 x 4) m16n8 tiles per warp


def _tool(name):
    """A CUDA binary from CUDA_HOME, /usr/local/cuda, PATH, or (cuobjdump) Triton's bundled copy."""
    folders = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for folder in filter(None, folders):
        path = os.path.join(folder, "bin", name)
        if os.access(path, os.X_OK):
            return path
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


NVCC, CUOBJDUMP = _tool("nvcc"), _tool("cuobjdump")
pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None, reason="needs nvcc and cuobjdump")


def _kernel(line):
    """"int8_conv_mma_kernel<true>"-style name of the kernel a cuobjdump line names, or None."""
    match = re.search(rf"({MMA}|{DP4A})ILb([01])E", line)
    return match and f"{match.group(1)}<{('false', 'true')[int(match.group(2))]}>"


def compile_cubin(arch, tmp_path):
    """(per-kernel SASS opcode lists, per-kernel resource usage) of int8_conv.cu built for sm_<arch>."""
    cubin = tmp_path / f"int8_conv_sm{arch}.cubin"
    proc = subprocess.run([NVCC, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-DTLCORE_WITH_CUDA=1",
                           "-I", str(ROOT / "csrc"), "-Xcompiler", "-Wall,-Wextra", "-o", str(cubin), str(SOURCE)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "Unsupported gpu architecture" in proc.stderr:
        pytest.skip(f"this nvcc cannot build sm_{arch}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    opcodes, kernel = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            kernel = _kernel(line) or line.split()[-1]
            opcodes[kernel] = []
        elif kernel is not None:
            # "/*0a30*/  @!P0 IMMA.16832.S8.S8 R4, R8.ROW, R12.COL, R4 ;  /* 0x... */"
            match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if match:
                opcodes[kernel].append(match.group(1))
    report = subprocess.run([CUOBJDUMP, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage, kernel = {}, None
    for line in report.splitlines():
        if "Function" in line:
            kernel = _kernel(line)
        elif kernel is not None and "REG:" in line:
            usage[kernel] = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", line)}
    return opcodes, usage


@pytest.mark.parametrize("arch", [80, 90])
def test_mma_kernel_uses_imma_without_spills(arch, tmp_path):
    opcodes, usage = compile_cubin(arch, tmp_path)
    kernels = MMA_KERNELS + DP4A_KERNELS
    assert set(opcodes) >= set(kernels) and set(usage) >= set(kernels), (sorted(opcodes), sorted(usage))
    for kernel in MMA_KERNELS:
        imma = [op for op in opcodes[kernel] if op.startswith("IMMA")]
        assert len(imma) >= MMA_PER_STEP, f"sm_{arch}: {len(imma)} IMMA instructions in {kernel}"
        assert set(imma) == {"IMMA.16832.S8.S8"}, set(imma)
        # 8 warps a block: at most 128 registers a thread keeps two blocks (16 warps) per SM.
        assert usage[kernel]["REG"] <= 128, f"sm_{arch} {kernel}: {usage[kernel]['REG']} registers a thread"
    for kernel in DP4A_KERNELS:
        assert not any(op.startswith("IMMA") for op in opcodes[kernel])
        assert any(op.startswith("IDP.4A") for op in opcodes[kernel]), f"{kernel} does not use dp4a"
    for kernel in kernels:
        spills = [op for op in opcodes[kernel] if op.startswith(("LDL", "STL"))]
        assert not spills and usage[kernel]["STACK"] + usage[kernel]["LOCAL"] == 0, f"sm_{arch} {kernel}: {usage}"


def test_pre_ampere_build_compiles_the_mma_body_out(tmp_path):
    opcodes, _ = compile_cubin(75, tmp_path)
    for kernel in MMA_KERNELS:
        assert not any(op.startswith("IMMA") for op in opcodes[kernel]), kernel
    for kernel in DP4A_KERNELS:
        assert any(op.startswith("IDP.4A") for op in opcodes[kernel]), kernel
