// csrc/cuda/int8_conv_kernels.cuh run on the CPU (cuda_emulation.h), behind a C function that
// tests/test_cuda_kernel_emulated.py calls through ctypes: the same arguments as Int8ConvArgs, and
// returns the mma.sync operations the launch ran (warps x calls; 0 for dp4a).
#include "cuda_emulation.h"
#include "cuda/int8_conv_kernels.cuh"

extern "C" int64_t tlcore_emulated_int8_conv(int mma, const int8_t* x, int64_t n, int64_t h, int64_t w, int64_t c,
                                             int32_t x_zero, const int8_t* weight, int64_t k, int64_t r, int64_t s,
                                             const int32_t* multiplier, const int64_t* offset, int32_t shift,
                                             const int8_t* residual, int64_t res_multiplier, int32_t out_zero,
                                             int32_t relu, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                             int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t oh, int64_t ow,
                                             int8_t* out, int32_t out_max) {
  tlcore::Int8ConvArgs a{x, n, h, w, c, x_zero, weight, k, r, s, multiplier, offset, shift, residual,
                         res_multiplier, out_zero, relu != 0, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                         oh, ow, out};
  a.out_max = out_max;
  const dim3 grid = tlcore::int8_conv_grid(a, mma != 0);
  if (mma) {
    cuda_emulation::launch(grid, tlcore::kMmaThreads, [&a] { tlcore::int8_conv_mma_kernel(a); });
  } else {
    cuda_emulation::launch(grid, tlcore::kThreads, [&a] { tlcore::int8_conv_dp4a_kernel(a); });
  }
  return cuda_emulation::warp_mma_count;
}
