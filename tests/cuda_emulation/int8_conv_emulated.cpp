// csrc/cuda/int8_conv_kernels.cuh run on the CPU (cuda_emulation.h), behind a C function that
// tests/test_cuda_kernel_emulated.py calls through ctypes: the same arguments as Int8ConvArgs, and
// what the launch ran in counts[0] (mma.sync operations: warps x calls) and counts[1] (__dp4a calls).
#include "cuda_emulation.h"
#include "cuda/int8_conv_kernels.cuh"

// Runs the kernel asked for, without the launcher's fallback to dp4a for coordinates past int32.
extern "C" void tlcore_emulated_int8_conv(int mma, const int8_t* x, int64_t n, int64_t h, int64_t w, int64_t c,
                                          int32_t x_zero, const int8_t* weight, int64_t k, int64_t r, int64_t s,
                                          const int32_t* multiplier, const int64_t* offset, int32_t shift,
                                          const int8_t* residual, int64_t res_multiplier, int32_t out_zero,
                                          int32_t relu, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                          int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t oh, int64_t ow,
                                          int8_t* out, int32_t out_max, int64_t* counts) {
  tlcore::Int8ConvArgs a{x, n, h, w, c, x_zero, weight, k, r, s, multiplier, offset, shift, residual,
                         res_multiplier, out_zero, relu != 0, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                         oh, ow, out};
  a.out_max = out_max;
  const tlcore::Int8ConvLaunch launch = tlcore::int8_conv_launch(a, mma != 0);
  const cuda_emulation::Counts ran = cuda_emulation::launch(launch.grid, launch.threads, [&] { launch.kernel(a); });
  counts[0] = ran.warp_mma;
  counts[1] = ran.dp4a;
}
