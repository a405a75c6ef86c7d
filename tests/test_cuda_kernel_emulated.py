"""The CUDA C++ int8 conv kernels (csrc/cuda/int8_conv_kernels.cuh), run on the CPU by
tests/cuda_emulation, bit-exact against the integer reference: what CI checks of their arithmetic,
indexing and fragment layouts without a GPU (tests/test_int8_ops.py runs them on one)."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_int8_ops import CASES, CUDA_CASES, assert_bit_exact, make_case, reference
from tlcore.ops.conv import output_size

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "cuda_emulation" / "int8_conv_emulated.cpp"
CXX = shutil.which("g++") or shutil.which("c++")
KERNELS = ["dp4a", "mma"]
POISON = 0x5A  # every output is written over it

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++20 compiler")


@pytest.fixture(scope="module")
def emulated_conv(tmp_path_factory):
    """tlcore_emulated_int8_conv from a fresh build of the emulator (warnings are errors)."""
    library = tmp_path_factory.mktemp("cuda_emulation") / "int8_conv_emulated.so"
    proc = subprocess.run([CXX, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
                           "-Wno-unknown-pragmas", "-I", str(ROOT / "csrc"), "-o", str(library), str(SOURCE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    function = ctypes.CDLL(str(library)).tlcore_emulated_int8_conv
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    function.argtypes = ([i32, ptr, i64, i64, i64, i64, i32, ptr, i64, i64, i64, ptr, ptr, i32, ptr, i64, i32, i32]
                         + [i64] * 8 + [ptr, i32, ptr])
    function.restype = None
    return function


def run_emulated(function, case, kernel):
    """(the kernel's output for a tests/test_int8_ops.py case, (N, K, OH, OW) channels_last,
    {"mma": mma.sync operations (warps x calls), "dp4a": __dp4a calls})."""
    x = case["x"].permute(0, 2, 3, 1).contiguous()                      # (N, H, W, C)
    weight = case["weight"].permute(0, 2, 3, 1).contiguous()            # (K, R, S, C)
    residual = case["residual"]
    residual = None if residual is None else residual.permute(0, 2, 3, 1).contiguous()
    (n, h, w, c), (k, r, s, _) = x.shape, weight.shape
    (sh, sw), (ph, pw), (dh, dw) = case["stride"], case["padding"], case["dilation"]
    oh, ow = output_size(h, r, sh, ph, dh), output_size(w, s, sw, pw, dw)
    out = torch.full((n, oh, ow, k), POISON, dtype=torch.int8)
    multiplier, offset = case["multiplier"].contiguous(), case["offset"].contiguous()
    residual_ptr = 0 if residual is None else residual.data_ptr()
    counts = torch.zeros(2, dtype=torch.int64)
    function(KERNELS.index(kernel), x.data_ptr(), n, h, w, c, case["x_zero"], weight.data_ptr(), k, r, s,
             multiplier.data_ptr(), offset.data_ptr(), case["shift"], residual_ptr, case["res_multiplier"],
             case["out_zero"], int(case["relu"]), sh, sw, ph, pw, dh, dw, oh, ow, out.data_ptr(), case["out_max"],
             counts.data_ptr())
    mma_ops, dp4a_calls = counts.tolist()
    return out.permute(0, 3, 1, 2), {"mma": mma_ops, "dp4a": dp4a_calls}


# The GPU test's cases (tests/test_int8_ops.py: stem-like, odd channels, strides, dilation, K = 4608,
# several m-tiles, partial n-tiles, flat windows of several steps) that emulate in seconds.
EMULATED_CASES = [c for c in CUDA_CASES if c[0] * c[2] * c[3] * c[4] <= 150_000]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_emulated_cuda_kernel_bit_exact(emulated_conv, kernel, case):
    for residual, relu in ((True, True), (False, False)):
        c = make_case(*case, residual=residual, relu=relu)
        out, _ = run_emulated(emulated_conv, c, kernel)
        assert_bit_exact(out, reference(c), f"emulated cuda {kernel} {case} residual={residual} relu={relu}")


# Per kernel: (output tile rows, columns; the operations a block runs per 64-value step):
# mma 8 warps x 2 k32 x (2 x 4) mma tiles; dp4a 256 threads x 16 words x (4 x 4) outputs.
STEP_COST = {"mma": (128, 64, 8 * 2 * 8), "dp4a": (64, 64, 256 * 16 * 16)}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", [CASES[0], (2, 3, 32, 32, 64, 7, 7, 2, 3, 1), (1, 15, 9, 8, 20, 5, 5, 1, 2, 1),
                                  CASES[1], (1, 80, 13, 12, 70, 3, 3, 1, 1, 1)], ids=lambda c: "x".join(map(str, c[:7])))
def test_emulated_kernel_reduction_steps(emulated_conv, kernel, case):
    """Each kernel multiplies what the conv needs: below 16 channels (the RGB stem) one step per
    64 values of the flattened (r, s, c) window, not a padded 64-channel step per tap (21x the
    products for 3 channels); otherwise a step per tap and 64 channels."""
    n, c, _, _, k, r, s = case[:7]
    out, ran = run_emulated(emulated_conv, make_case(*case), kernel)
    oh, ow = out.shape[2:]
    steps = -(-r * s * c // 64) if c < 16 else r * s * -(-c // 64)
    tile_m, tile_n, per_step = STEP_COST[kernel]
    blocks = -(-n * oh * ow // tile_m) * -(-k // tile_n)
    assert ran == {kernel: blocks * per_step * steps, ("dp4a" if kernel == "mma" else "mma"): 0}
