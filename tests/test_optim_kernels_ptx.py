"""The optimizer's Triton kernels compiled for real GPUs (no GPU needed): bit-identity preconditions.

Bit-identical results across backends need IEEE fp32 on the GPU too: no a*b+c fused
into an FMA, no flush-to-zero, correctly rounded division and square root. Triton
compiles ahead of time for a target GPU without one, so the PTX is checked here on
every CI run; the interpreter used by the other tests cannot show any of this.
"""
import json
import os
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: the test session sets TRITON_INTERPRET=1, under which
# @triton.jit builds interpreter objects that cannot be compiled.
_COMPILE = r"""
import itertools, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tlcore.kernels import sr_optim

capability = int(sys.argv[1])
kernels = {"adamw": (sr_optim._sr_adamw_kernel, {}),
           "sgd": (sr_optim._sr_sgd_kernel, {"MOMENTUM": True, "NESTEROV": True})}
pointers = {"slots_ptr": "*i64", "hyper_ptr": "*fp32", "chunks_ptr": "*i64", "seed_lo": "i64", "seed_hi": "i64"}
report = {}
for (name, (kernel, extra)), (param, state) in itertools.product(kernels.items(), [(1, 1), (2, 0), (0, 0)]):
    constexprs = dict(PARAM_FORMAT=param, STATE_FORMAT=state, STOCHASTIC=True, CHUNK=65536, BLOCK=1024, **extra)
    source = ASTSource(fn=kernel, signature=dict(pointers, **{c: "constexpr" for c in constexprs}),
                       constexprs={(kernel.arg_names.index(c),): v for c, v in constexprs.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                         options={"enable_fp_fusion": False}).asm["ptx"]
    lines = ptx.splitlines()
    report[f"{name}-{param}-{state}"] = {
        "fma": sum("fma." in line and ".f32" in line for line in lines),
        "ftz": sum(".ftz" in line and ".f32" in line for line in lines),
        "approx": sum(".approx" in line and ".f32" in line for line in lines),
        "div_rn": sum("div.rn.f32" in line for line in lines),
        "sqrt_rn": sum("sqrt.rn.f32" in line for line in lines),
        "mul_hi": sum("mul.hi.u32" in line for line in lines),
    }
print(json.dumps(report))
"""


@pytest.mark.parametrize("capability", [80, 90])
def test_triton_kernels_compile_to_ieee_fp32_without_fma(capability):
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(capability)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for case, counts in report.items():
        assert counts["fma"] == 0 and counts["ftz"] == 0 and counts["approx"] == 0, (case, counts)
        if case.startswith("adamw"):
            assert counts["div_rn"] > 0 and counts["sqrt_rn"] > 0, (case, counts)
        if not case.endswith("-0-0"):  # 16-bit outputs draw Philox words: the rounds must be there
            assert counts["mul_hi"] >= 20, (case, counts)
