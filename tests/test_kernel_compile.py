"""The Triton kernels compile for sm_80 and sm_90 as a GPU launch would, and compile well.

Runs Triton's real compiler (no GPU needed) in a subprocess without the interpreter.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from tlcore.kernels.conv import _configs

HOPPER_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
AMPERE_SHARED_LIMIT = 163 * 1024  # on sm_80

CONV = "tlcore.kernels.conv:_conv2d_bn_act_fwd_kernel"
CONV_DIVISIBLE = ["x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "res_ptr", "out_ptr", "C", "K",
                  "sxn", "sxh", "sxw", "swk", "swr", "sws", "srn", "srh", "srw", "son", "soh", "sow"]


def run_cases(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    proc = subprocess.run([sys.executable, str(script), json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["result"] for line in proc.stdout.splitlines()]


def conv_case(dtype, block, target=90, flat=False, residual=True, precision="ieee"):
    bm, bn, bk, stages, warps = block
    ptr = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
    return {
        "kernel": CONV, "target": target, "num_warps": warps, "num_stages": stages,
        "types": {"x_ptr": ptr, "w_ptr": ptr, "res_ptr": ptr, "out_ptr": ptr, "scale_ptr": "*fp32",
                  "shift_ptr": "*fp32"},
        # NHWC activations and channels_last weights: unit channel strides
        "constexprs": {"R": 1 if flat else 3, "S": 1 if flat else 3, "FLAT_K": flat, "HAS_RESIDUAL": residual,
                       "RELU": True, "DOT_PRECISION": precision, "BF16_INTERPRETER": False, "BLOCK_M": bm,
                       "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "sxc": 1, "swc": 1, "src": 1, "soc": 1},
        "divisible_by_16": CONV_DIVISIBLE,
    }


def production_blocks(monkeypatch):
    """The autotuner's GPU configurations (the interpreter gets a single one)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
            for c in _configs()]


def test_every_autotune_config_compiles_pipelined_on_hopper(monkeypatch):
    blocks = production_blocks(monkeypatch)
    results = run_cases([conv_case("fp16", block) for block in blocks])
    for block, result in zip(blocks, results):
        assert result["wgmma"], f"{block}: no wgmma, the fp16 dot is not on Hopper's tensor-core path"
        assert result["async_copies"] > 0, f"{block}: loads are not software-pipelined"
        assert result["shared_bytes"] <= HOPPER_SHARED_LIMIT, f"{block}: {result['shared_bytes']} B shared"
        assert result["spill_bytes"] == 0, f"{block}: {result['spill_bytes']} B of register spills"


def test_dtypes_flat_reduction_and_ampere_compile():
    block = (128, 64, 32, 4, 4)
    results = run_cases([
        conv_case("bf16", block), conv_case("fp32", block, precision="tf32"),
        conv_case("fp32", block, precision="ieee"), conv_case("fp16", block, flat=True, residual=False),
        conv_case("fp16", block, target=80), conv_case("bf16", block, target=80),
    ])
    assert results[0]["wgmma"] and results[1]["wgmma"]  # bf16 and tf32 on Hopper tensor cores
    assert not results[2]["wgmma"]  # IEEE fp32 must not use (tf32) tensor cores
    # IEEE fp32 runs on FMA units with the whole tile in registers; a few spilled bytes there are
    # tolerable (cuDNN itself defaults to TF32), anywhere else they are not.
    assert all(r["spill_bytes"] == 0 for i, r in enumerate(results) if i != 2)
    assert results[4]["mma_sync"] and results[5]["mma_sync"]
    assert all(r["shared_bytes"] <= AMPERE_SHARED_LIMIT for r in results[4:])
