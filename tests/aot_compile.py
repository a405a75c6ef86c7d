"""Compile Triton kernels for real GPU targets without a GPU (run as a script: no interpreter).

The interpreter runs a kernel's Python, not Triton's compiler: a kernel can pass every
interpreted test and still fail to compile, or compile into a slow form. This script
compiles a kernel ahead of time for a CUDA target with the specialisations a real launch
gets (16-divisible pointers and strides, unit channel strides) and reports what the
compiler made of it.

    python tests/aot_compile.py '<json list of cases>'  ->  one JSON line per case
    case: {"kernel": "module:name", "target": 90, "num_warps": 8, "num_stages": 3,
           "types": {arg: "*fp16" | "i32" | ...}, "constexprs": {arg: value}, "divisible_by_16": [arg, ...],
           "options": {launch option: value, e.g. "enable_fp_fusion": False} (optional)}
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported


def compile_case(case: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module, name = case["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), name)
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # an autotuner wraps the JITFunction
    names = fn.arg_names
    signature = {arg: case["types"].get(arg, "i32") for arg in names}
    for arg in case["constexprs"]:
        signature[arg] = "constexpr"
    constexprs = {(names.index(arg),): value for arg, value in case["constexprs"].items()}
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in case.get("divisible_by_16", [])}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", case["target"], 32),
                              options={"num_warps": case["num_warps"], "num_stages": case["num_stages"],
                                       **case.get("options", {})})
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    return {
        "shared_bytes": compiled.metadata.shared,
        "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
        "wgmma": "wgmma" in ptx,
        "a_from_shared": a_operand_from_shared(ttgir),
        "shared_reshapes": ttgir.count("ttg.memdesc_reshape"),  # loaded tiles reshaped where they lie
        "mma_sync": "mma.sync" in ptx,
        "divisions": len(re.findall(r"\b(?:div|rem)\.[su](?:32|64)\b", ptx)),  # integer / and %
        **resource_usage(compiled.asm["cubin"]),
    }


def a_operand_from_shared(ttgir: str) -> bool:
    """Whether every Hopper tensor-core dot (wgmma) reads its A operand straight from shared memory,
    as the async copies left it, rather than from registers after arithmetic on the loaded tile."""
    types = [line.split("} : ", 1)[1] for line in ttgir.splitlines() if "ttng.warp_group_dot %" in line]
    return bool(types) and all(t.startswith("!ttg.memdesc") for t in types)


def resource_usage(cubin: bytes) -> dict:
    """Registers and local memory per thread (spills show as LOCAL or STACK bytes), via cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", report)}
    return {"registers": usage["REG"], "spill_bytes": usage["STACK"] + usage["LOCAL"]}


if __name__ == "__main__":
    for case in json.loads(sys.argv[1]):
        print(json.dumps({"case": case, "result": compile_case(case)}), flush=True)
