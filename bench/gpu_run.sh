#!/usr/bin/env bash
# One call on a lent GPU machine: build, GPU tests, compute-sanitizer, benchmarks.
#   bash bench/gpu_run.sh [all|tests|cpu-int8|sanitize|int8|int8-model|int8-layers|int8-grouped|bench|autotune|
#                          profile]...
#   (default: all but autotune and profile; int8 = int8-model + int8-layers + int8-grouped)
# One device call may run 10 minutes: on a first, cold machine run the stages in separate calls
# (tests, int8-model, int8-layers, int8-grouped, bench).
# Writes logs and result files to $OUT (or ./gpu-out); copy the result files you keep
# into bench/results/ unedited.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
stages=${*:-all}
export PYTHONUNBUFFERED=1
unset TLCORE_AUTOTUNE  # timings autotune over every config; only the tests stage sets it to 0
status=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

want() { [[ ( " $stages " == *" all "* && $1 != autotune && $1 != profile ) || " $stages " == *" $1 "* ||
            ( " $stages " == *" int8 "* && $1 == int8-* ) ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
step build python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import tlcore, tlcore._extension as e; print('extension:', e.loaded(), 'cuda kernels:', e.has_cuda_kernels(), e.missing_reason())"

if want tests; then
  # one tile configuration per Triton kernel (TLCORE_AUTOTUNE=0): each test shape's kernels compile
  # once, not once per autotune config, on a machine whose compile cache starts empty. The GPU-only
  # tests (marker gpu: the CUDA C++ kernels, compile, 2**31-element tensors) run first, so that a
  # call cut off at its time limit has them; then the rest of the suite, on the GPU too.
  step tests-gpu env TLCORE_AUTOTUNE=0 python -m pytest -q -x tests -m gpu -p no:cacheprovider --durations=15
  step tests env TLCORE_AUTOTUNE=0 python -m pytest -q -x tests -m "not gpu" -p no:cacheprovider --durations=15
fi
if want cpu-int8; then
  # the C++ CPU int8 kernels on this machine's CPU (an Intel Xeon, where one run segfaulted in
  # _int8_conv_cpu): under a debugger, for a native backtrace if it crashes again. The GPU image
  # has no gdb but cuda-gdb, which debugs host code too.
  runner=()
  debugger=$(command -v gdb || command -v cuda-gdb)
  [ -n "$debugger" ] && runner=("$debugger" -q -batch -ex run -ex bt -ex 'quit $_exitcode' --args)
  # (the debugger needs the interpreter's binary, not a wrapper script; gdb exits 1 after a crash, else
  # with pytest's code)
  step cpu-int8 env TLCORE_AUTOTUNE=0 "${runner[@]}" "$(python -c 'import sys; print(sys.executable)')" -m pytest -q \
    tests/test_int8_ops.py tests/test_int8_layers.py tests/test_int8_quantize.py tests/test_int8_grouped.py \
    -m "not gpu" -p no:cacheprovider
fi
if want sanitize; then
  # memcheck over the fused conv kernel on odd shapes (out-of-bounds reads/writes, misaligned access)
  step sanitize compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q tests/test_conv_op.py -k "matches_reference and float16" -p no:cacheprovider
fi
# The issue's INT8 bars: ResNet-50 at batch 256, int8 against tlcore fp16 (fuse suite) and eager fp16
# channels_last, in one report; and each conv shape's int8 kernels in TOP/s against the int8 peak,
# beside cuDNN's fp16 conv of the shape and (1x1 convs) cuBLAS's int8 GEMM;
# and ResNeXt-50's grouped convs, int8 (Triton) against cuDNN fp16.
if want int8-model; then
  step int8-model python -m tlcore bench --modes fuse,int8 --batch 256 --no-compile \
    --out "$OUT/tlcore-bench-int8-b256.json"
fi
if want int8-layers; then
  step int8-layers python -m pytest -q bench/test_bench_int8.py --benchmark-only \
    -k "test_gpu_int8_conv_layer or test_gpu_conv_layer_reference" \
    --benchmark-json="$OUT/int8-layers.json" -p no:cacheprovider
fi
if want int8-grouped; then
  step int8-grouped python -m pytest -q bench/test_bench_int8.py -k test_gpu_grouped_conv_layer --benchmark-only \
    --benchmark-json="$OUT/int8-grouped.json" -p no:cacheprovider
fi
if want profile; then
  # where the time goes: torch.profiler over ResNet-50 (fp16 eager, tlcore.fuse, int8) at batch 256, then
  # ncu's counters for one call of each int8 conv shape per backend (ncu leaves the clocks alone)
  mkdir -p "$OUT/profile"
  step profile-models python bench/gpu_profile.py models "$OUT/profile"
  if command -v ncu >/dev/null; then
    step profile-layers ncu --profile-from-start off --target-processes all --clock-control none --csv \
      --page details --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --log-file "$OUT/profile/ncu-int8-layers.csv" \
      python bench/gpu_profile.py layers "$OUT/profile"
  fi
fi
if want autotune; then
  # the issue's bar: tlcore.fuse against torch.compile(mode="max-autotune") (long compiles)
  step autotune python -m tlcore bench --modes fuse --batch 256 --compile-mode max-autotune \
    --out "$OUT/tlcore-bench-max-autotune.json"
fi
if want bench; then
  step cli python -m tlcore bench --out "$OUT/tlcore-bench.json" --plot "$OUT/tlcore-bench.png"
  step pytest-bench python -m pytest -q bench --benchmark-only --benchmark-json="$OUT/pytest-bench.json" \
    -k "not test_gpu_int8_conv_layer and not test_gpu_conv_layer_reference and not test_gpu_grouped_conv_layer" \
    -p no:cacheprovider  # (the int8 stages run those)
fi
exit $status
