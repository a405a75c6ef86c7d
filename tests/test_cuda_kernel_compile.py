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
            kernel = next((k for k in (MMA, DP4A) if k in line), line.split()[-1])
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
            kernel = next((k for k in (MMA, DP4A) if k in line), None)
        elif kernel is not None and "REG:" in line:
            usage[kernel] = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", line)}
    return opcodes, usage


@pytest.mark.parametrize("arch", [80, 90])
def test_mma_kernel_uses_imma_without_spills(arch, tmp_path):
    opcodes, usage = compile_cubin(arch, tmp_path)
    assert set(opcodes) >= {MMA, DP4A} and set(usage) >= {MMA, DP4A}, (sorted(opcodes), sorted(usage))
    imma = [op for op in opcodes[MMA] if op.startswith("IMMA")]
    assert len(imma) >= MMA_PER_STEP, f"sm_{arch}: {len(imma)} IMMA instructions in the mma kernel"
    assert set(imma) == {"IMMA.16832.S8.S8"}, set(imma)
    assert not any(op.startswith("IMMA") for op in opcodes[DP4A])
    assert any(op.startswith("IDP.4A") for op in opcodes[DP4A]), "the dp4a kernel does not use dp4a"
    for kernel in (MMA, DP4A):
        spills = [op for op in opcodes[kernel] if op.startswith(("LDL", "STL"))]
        assert not spills and usage[kernel]["STACK"] + usage[kernel]["LOCAL"] == 0, f"sm_{arch} {kernel}: {usage}"
    # 8 warps a block: at most 128 registers a thread keeps two blocks (16 warps) per SM.
    assert usage[MMA]["REG"] <= 128, f"sm_{arch}: {usage[MMA]['REG']} registers a thread"


def test_pre_ampere_build_compiles_the_mma_body_out(tmp_path):
    opcodes, _ = compile_cubin(75, tmp_path)
    assert not any(op.startswith("IMMA") for op in opcodes[MMA])
    assert any(op.startswith("IDP.4A") for op in opcodes[DP4A])
