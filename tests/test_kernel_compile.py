"""The Triton conv (and int8 quantize) kernels compile for sm_80 and sm_90 as a GPU launch would, and well.

Runs Triton's real compiler (no GPU needed) in a subprocess without the interpreter:
every autotune configuration must use the tensor cores (wgmma on Hopper), pipeline its
loads, fit in shared memory and spill no registers.
"""
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from markers import triton_kernels_or_skip

with triton_kernels_or_skip():
    from tlcore.kernels import conv, int8_conv

HOPPER_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
AMPERE_SHARED_LIMIT = 163 * 1024  # on sm_80

# NHWC activations and channels_last weights: unit channel strides, 16-divisible others.
DIVISIBLE = ["x_ptr", "w_ptr", "res_ptr", "out_ptr", "C", "K", "sxn", "sxh", "sxw", "swk", "swr", "sws",
             "srn", "srh", "srw", "son", "soh", "sow"]
UNIT_STRIDES = {"sxc": 1, "swc": 1, "src": 1, "soc": 1}


def run_cases(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    proc = subprocess.run([sys.executable, str(script), json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["result"] for line in proc.stdout.splitlines()]


def conv_case(dtype, block, target=90, flat=False, residual=True, precision="ieee"):
    ptr = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
    types = {"x_ptr": ptr, "w_ptr": ptr, "res_ptr": ptr, "out_ptr": ptr, "scale_ptr": "*fp32", "shift_ptr": "*fp32"}
    constexprs = {"R": 7 if flat else 3, "S": 7 if flat else 3, "FLAT_C": 4 if flat else 0, "PADDED": not flat,
                  "X_PIXEL_ROWS": False, "OUT_PIXEL_ROWS": True,
                  "HAS_RESIDUAL": residual, "RELU": True, "DOT_PRECISION": precision, "BF16_INTERPRETER": False}
    case = _case("tlcore.kernels.conv:_conv2d_bn_act_fwd_kernel", types, constexprs, block, target,
                 ["scale_ptr", "shift_ptr"])
    if flat:  # the stem as flat_operands leave it: 4 channels, so C and the strides are not 16-divisible
        case["divisible_by_16"] = [arg for arg in case["divisible_by_16"] if arg not in STEM_NOT_DIVISIBLE]
    return case


STEM_NOT_DIVISIBLE = ("C", "sxn", "sxh", "sxw", "swk", "swr", "sws")


def int8_case(block, target=90, grouped=False, group_align=16, stem=False, pointwise=False, shift_route="high",
              pixel_rows=True):
    """A padded 3x3 conv with a residual, the RGB stem (7x7, flat reduction, as the launcher's
    flat_operands leave it: 4 channels, padding written out), or an unpadded 1x1 conv with a residual
    (pointwise). group_align: gcd(channels a group, 16); below 16 a launch does not mark the weight
    strides (multiples of the channels a group) 16-divisible, nor, for the stem, C and x's strides.
    shift_route: the epilogue's (int8_conv.shift_route). pixel_rows: the tensors' pixels in row order
    (channels_last, implicit_gemm.pixel_rows), as in tlcore's models."""
    types = {"x_ptr": "*i8", "w_ptr": "*i8", "res_ptr": "*i8", "out_ptr": "*i8", "mult_ptr": "*i32",
             "offset_ptr": "*i64", "corr_ptr": "*i32"}
    taps = 7 if stem else 1 if pointwise else 3
    case = _case("tlcore.kernels.int8_conv:_int8_conv2d_fwd_kernel", types,
                 {"R": taps, "S": taps, "FLAT_C": 4 if stem else 0, "HAS_RESIDUAL": not stem, "GROUPED": grouped,
                  "GROUP_ALIGN": 4 if stem else group_align, "SHIFT_ROUTE": shift_route,
                  "PADDED": not (pointwise or stem), "X_PIXEL_ROWS": pointwise and pixel_rows,
                  "OUT_PIXEL_ROWS": pixel_rows},
                 block, target, ["mult_ptr", "offset_ptr", "corr_ptr"])
    not_divisible = STEM_NOT_DIVISIBLE if stem else ("swk", "swr", "sws")
    if stem or group_align < 16:
        case["divisible_by_16"] = [arg for arg in case["divisible_by_16"] if arg not in not_divisible]
    return case


def _case(kernel, types, constexprs, block, target, extra_divisible):
    bm, bn, bk, stages, warps = block
    blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return {"kernel": kernel, "target": target, "num_warps": warps, "num_stages": stages, "types": types,
            "constexprs": {**constexprs, **blocks, **UNIT_STRIDES}, "divisible_by_16": DIVISIBLE + extra_divisible}


def production_blocks(module, monkeypatch):
    """The autotuner's GPU configurations (the interpreter, or TLCORE_AUTOTUNE=0, gets a single one)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TLCORE_AUTOTUNE", raising=False)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
            for c in module._configs()]


@pytest.mark.parametrize("module", [conv, int8_conv], ids=["conv", "int8_conv"])
def test_autotune_off_keeps_the_first_config(monkeypatch, module):
    blocks = production_blocks(module, monkeypatch)
    monkeypatch.setenv("TLCORE_AUTOTUNE", "0")
    only = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
            for c in module._configs()]
    assert len(blocks) > 1 and only == blocks[:1]


@pytest.mark.parametrize("module,make_case", [
    (conv, lambda b: conv_case("fp16", b)), (int8_conv, int8_case),
    (int8_conv, lambda b: int8_case(b, pointwise=True, shift_route="split")),  # ResNet's residual 1x1 convs
], ids=["conv_fp16", "int8_conv", "int8_conv_pointwise"])
def test_every_autotune_config_compiles_well_on_hopper(monkeypatch, module, make_case):
    blocks = production_blocks(module, monkeypatch)
    for block, result in zip(blocks, run_cases([make_case(block) for block in blocks])):
        assert result["wgmma"], f"{block}: no wgmma, the dot is not on Hopper's tensor-core path"
        assert result["async_copies"] > 0, f"{block}: loads are not software-pipelined"
        assert result["shared_bytes"] <= HOPPER_SHARED_LIMIT, f"{block}: {result['shared_bytes']} B shared"
        assert result["spill_bytes"] == 0, f"{block}: {result['spill_bytes']} B of register spills"


def pointwise_case(config, c_pad):
    """_int8_pointwise_kernel with a residual (ResNet's expansions: the split epilogue route) on NHWC
    tensors, at a reduction of c_pad channels."""
    types = {"x_ptr": "*i8", "w_ptr": "*i8", "res_ptr": "*i8", "out_ptr": "*i8", "mult_ptr": "*i32",
             "offset_ptr": "*i64"}
    return {"kernel": "tlcore.kernels.int8_conv:_int8_pointwise_kernel", "target": 90, "num_warps": config.num_warps,
            "num_stages": config.num_stages, "types": types,
            "constexprs": {"C_PAD": c_pad, "HAS_RESIDUAL": True, "SHIFT_ROUTE": "split", **config.kwargs,
                           "sxc": 1, "swc": 1, "src": 1, "soc": 1},
            "divisible_by_16": ["x_ptr", "w_ptr", "res_ptr", "out_ptr", "mult_ptr", "offset_ptr", "C", "K", "sxm",
                                "swk", "srm", "som"]}


def test_every_pointwise_int8_config_pipelines_its_row_tiles_on_hopper(monkeypatch):
    """Every autotune config of the row-tile loop kernel, at 64 and at 256 channels (the most it
    takes): wgmma reading A from shared memory, no spills, within shared memory, and asynchronous copies
    (the loop's loads software-pipelined) exactly where a program loops over several row tiles."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TLCORE_AUTOTUNE", raising=False)
    configs = int8_conv._pointwise_configs()
    assert any(config.kwargs["TILES"] > 1 for config in configs)
    cases = [(config, c_pad) for config in configs for c_pad in (64, int8_conv.POINTWISE_MAX_CHANNELS)]
    for (config, c_pad), result in zip(cases, run_cases([pointwise_case(*case) for case in cases])):
        what = f"{config.kwargs}, {config.num_stages} stages, {config.num_warps} warps, C_PAD {c_pad}"
        assert result["wgmma"] and result["a_from_shared"], what
        assert result["spill_bytes"] == 0, f"{what}: {result['spill_bytes']} B of register spills"
        assert result["shared_bytes"] <= HOPPER_SHARED_LIMIT, f"{what}: {result['shared_bytes']} B shared"
        assert (result["async_copies"] > 0) == (config.kwargs["TILES"] > 1), f"{what}: {result['async_copies']}"


def tma_case(config, taps, padded, residual, shift_route, stride=1):
    """The TMA int8 conv (kernels/int8_conv_tma.py) with this autotune config's boxes."""
    meta = config.kwargs
    pixels = f"{meta['TILE_N']}, {meta['TILE_H']}, {meta['TILE_W']}"
    x_pixels = f"{meta['TILE_N']}, {meta['TILE_H']}, 1, {meta['TILE_W']}" if stride == 2 else pixels
    types = {"x_desc": f"tensordesc<i8[{x_pixels}, {meta['BLOCK_K']}]>",
             "w_desc": f"tensordesc<i8[{meta['BLOCK_N']}, {meta['BLOCK_K']}]>",
             "res_desc": f"tensordesc<i8[{pixels}, {meta['BLOCK_N']}]>",
             "out_desc": f"tensordesc<i8[{pixels}, {meta['BLOCK_N']}]>",
             "mult_ptr": "*i32", "offset_ptr": "*i64", "corr_ptr": "*i32"}
    return {"kernel": "tlcore.kernels.int8_conv_tma:_int8_conv_tma_body", "target": 90,
            "num_warps": config.num_warps, "num_stages": config.num_stages, "types": types,
            "constexprs": {"R": taps, "S": taps, "STRIDE": stride, "PADDED": padded, "HAS_RESIDUAL": residual,
                           "SHIFT_ROUTE": shift_route, **meta},
            "divisible_by_16": ["mult_ptr", "offset_ptr", "corr_ptr", "K", "C"]}


def test_every_tma_int8_config_compiles_well_on_hopper(monkeypatch):
    """Every autotune config of the TMA int8 conv, 3x3 padded (stride 1 and 2) and pointwise, with and
    without a residual: TMA copies, wgmma with the image-grid box reshaped in shared memory (not sent
    through registers), no spills, within shared memory. And at most 168 registers a thread: from a
    constant-zero accumulator Triton compiled the unpadded loop with ~200 (the kernel's comment)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TLCORE_AUTOTUNE", raising=False)
    int8_conv_tma = importlib.import_module("tlcore.kernels.int8_conv_tma")
    if int8_conv_tma.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    cases = [(config, 3, True, residual, route) for config in int8_conv_tma._configs(pointwise=False)
             for residual, route in ((False, "high"), (True, "split"))]
    cases += [(config, 3, True, False, "high", 2) for config in int8_conv_tma._configs(pointwise=False)]
    cases += [(config, 1, False, residual, route) for config in int8_conv_tma._configs(pointwise=True)
              for residual, route in ((False, "high"), (True, "split"))]
    for case, result in zip(cases, run_cases([tma_case(*case) for case in cases])):
        what = f"{case[0].kwargs}, {case[0].num_stages} stages, {case[0].num_warps} warps, {case[1:]}"
        # (a pointwise box, 1 x 1 x rows x channels, needs no reshape)
        assert result["wgmma"] and result["a_from_shared"] and (result["shared_reshapes"] > 0 or case[1] == 1), \
            f"{what}: {result}"
        assert result["async_copies"] > 0, f"{what}: no TMA copies"
        assert result["spill_bytes"] == 0 and result["registers"] <= 168, f"{what}: {result}"
        assert result["shared_bytes"] <= HOPPER_SHARED_LIMIT, f"{what}: {result['shared_bytes']} B shared"


def test_int8_conv_feeds_the_tensor_cores_from_shared_memory(monkeypatch):
    """Nothing fills the input tile with the zero point, also where the conv is padded (the
    accumulator starts at the padding's share: kernels/int8_border.py), so wgmma reads both operands where the async
    copies put them. (A select on the loaded tile took most of the padded loop's instructions and
    sent A through registers.) Every epilogue route compiles, unpadded and padded, also grouped."""
    block = production_blocks(int8_conv, monkeypatch)[0]
    routes = ["high", "split", "int64"]
    results = run_cases([int8_case(block, pointwise=True, shift_route=route) for route in routes]
                        + [int8_case(block, shift_route=route) for route in routes]
                        + [int8_case(block, grouped=True)])
    assert all(r["a_from_shared"] and r["spill_bytes"] == 0 for r in results), results


def test_pointwise_int8_conv_on_pixel_rows_divides_no_row_index(monkeypatch):
    """A 1x1 stride-1 conv on channels_last tensors reads and writes output row m at pixel m: no
    (n, oh, ow) from integer divisions per row (the tile's scalar ones remain), in any epilogue route;
    on other layouts each row's divisions stay."""
    block = production_blocks(int8_conv, monkeypatch)[0]
    results = run_cases([int8_case(block, pointwise=True, shift_route=route) for route in ("high", "split")]
                        + [int8_case(block, pointwise=True, pixel_rows=False)])
    scalar_divisions = 4  # the program's tile: pid // and % the group size, then the group's rows
    assert all(r["divisions"] <= scalar_divisions and r["spill_bytes"] == 0 for r in results[:2]), results[:2]
    assert results[2]["divisions"] > scalar_divisions, results[2]


def test_dtypes_flat_reduction_and_ampere_compile():
    block = (128, 64, 32, 4, 4)
    results = run_cases([
        conv_case("bf16", block), conv_case("fp32", block, precision="tf32"),
        conv_case("fp32", block, precision="ieee"), conv_case("fp16", block, flat=True, residual=False),
        conv_case("fp16", block, target=80), conv_case("bf16", block, target=80),
        int8_case((128, 128, 64, 3, 8), target=80), int8_case((64, 64, 32, 5, 4), stem=True),
    ])
    assert results[0]["wgmma"] and results[1]["wgmma"]  # bf16 and tf32 on Hopper tensor cores
    assert not results[2]["wgmma"]  # IEEE fp32 must not use (tf32) tensor cores
    assert all(r["mma_sync"] for r in results[4:7]) and results[7]["wgmma"]  # int8 too, the stem included
    # the stems' (flat reductions') word loads are pipelined into shared memory, where wgmma reads them
    # (element loads were not pipelined at all)
    for stem in (results[3], results[7]):
        assert stem["async_copies"] > 0 and stem["a_from_shared"], stem
    assert all(r["shared_bytes"] <= AMPERE_SHARED_LIMIT for r in results[4:7])
    # IEEE fp32 runs on FMA units with the whole tile in registers; a few spilled bytes there are
    # tolerable (cuDNN itself defaults to TF32), anywhere else they are not.
    assert all(r["spill_bytes"] == 0 for i, r in enumerate(results) if i != 2)


def kernel_arg_names(case) -> list[str]:
    module, name = case["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    while hasattr(fn, "fn"):  # the Python function under an autotuner and a JIT (or interpreted) function
        fn = fn.fn
    return list(inspect.signature(fn).parameters)


def border_case(target=90):
    """The padding corrections' kernel (kernels/int8_border.py) for a 3x3 conv."""
    return {"kernel": "tlcore.kernels.int8_border:_border_correction_kernel", "target": target, "num_warps": 4,
            "num_stages": 3, "types": {"w_ptr": "*i8", "corr_ptr": "*i32"},
            "constexprs": {"R": 3, "S": 3, "BLOCK_N": 64, "BLOCK_C": 64, "swc": 1},
            "divisible_by_16": ["w_ptr", "corr_ptr", "K", "C_GROUP", "swk", "swr", "sws"]}


def test_int8_conv_compiles_with_the_arguments_a_launch_makes_constant():
    """A launch turns integer arguments equal to 1 into compile-time constants (plain Python ints in
    the kernel): the padded, grouped and stem kernels, and the padding corrections' kernel, must
    compile with every such argument at 1."""
    ones = ("x_zero", "shift", "res_multiplier", "out_zero", "stride_h", "stride_w", "dil_h", "dil_w", "top_h",
            "bottom_h", "top_w", "bottom_w")
    cases = [int8_case((128, 128, 64, 3, 8), shift_route="int64"),
             int8_case((128, 128, 64, 3, 8), grouped=True, shift_route="int64"),
             int8_case((64, 64, 32, 5, 4), stem=True, shift_route="int64"), border_case(), border_case(target=80)]
    for case in cases:
        case["constexprs"].update({name: 1 for name in ones if name in kernel_arg_names(case)})
    assert all(r["spill_bytes"] == 0 for r in run_cases(cases))


def test_grouped_int8_pipelines_both_operands_like_the_dense_kernel(monkeypatch):
    """ResNeXt's grouped convs: the per-column group mask on the weight loads must not keep them
    out of the cp.async pipeline. Every config as many async copies as the dense kernel's, and no
    spills, with 16-aligned groups; with 4-channel groups (ResNeXt-50's first stage) the same in
    the first config, the one TLCORE_AUTOTUNE=0 keeps (larger tiles spill there)."""
    blocks = production_blocks(int8_conv, monkeypatch)
    results = run_cases([int8_case(b) for b in blocks] + [int8_case(b, grouped=True) for b in blocks]
                        + [int8_case(blocks[0], grouped=True, group_align=4)])
    dense, grouped, narrow = results[:len(blocks)], results[len(blocks):-1], results[-1]
    for block, d, g in zip(blocks, dense, grouped):
        assert g["wgmma"] and g["async_copies"] == d["async_copies"] > 0, f"{block}: {g} against dense {d}"
        assert g["spill_bytes"] == 0 and g["shared_bytes"] <= HOPPER_SHARED_LIMIT, f"{block}: {g}"
    assert narrow["async_copies"] == dense[0]["async_copies"] and narrow["spill_bytes"] == 0, narrow


def test_quantize_and_dequantize_kernels_compile():
    """The elementwise int8 kernels compile for sm_80 and sm_90 from every float dtype, without spills."""
    def case(kernel, types, target, options):
        return {"kernel": f"tlcore.kernels.int8_conv:{kernel}", "target": target, "num_warps": 4, "num_stages": 3,
                "types": {"total": "i64", **types}, "constexprs": {"BLOCK": 1024},
                "divisible_by_16": [name for name in types if name.endswith("_ptr")], "options": options}
    # (quantize launches without FMA contraction: int8_conv._no_fp_fusion)
    cases = [case("_quantize_kernel", {"x_ptr": ptr, "out_ptr": "*i8", "inv_scale": "fp32"}, target,
                  {"enable_fp_fusion": False}) for ptr in ("*fp16", "*bf16", "*fp32") for target in (80, 90)]
    cases += [case("_dequantize_kernel", {"q_ptr": "*i8", "out_ptr": "*fp32", "scale": "fp32"}, target, {})
              for target in (80, 90)]
    assert all(result["spill_bytes"] == 0 for result in run_cases(cases))
