// Plain C++ entry points of the int8 model's layers around the convolutions (no torch headers).
#pragma once

#include <cstdint>

namespace tlcore {

// x: fp32 (N, C, H, W), NCHW-contiguous (channels_last = false) or NHWC-contiguous (true);
// out: int8 (N, H, W, C) contiguous.
// q = clamp(floor(x * inv_scale + 0.5) + zero_point, -128, 127), NaN -> zero_point: the same fp32
// operations, unfused, as the other backends (tlcore/ops/int8_layers.py), so every backend agrees bit for bit.
// Returns whether x holds a NaN or an infinity (found in the same pass, for the int8 model's input check).
bool quantize_to_nhwc_cpu(const float* x, int64_t n, int64_t c, int64_t hw, bool channels_last, float inv_scale,
                          int32_t zero_point, int8_t* out);

// Max-pool over int8 codes, (N, H, W, C) -> (N, OH, OW, C) contiguous; window positions outside
// the image are skipped (PyTorch's implicit -inf padding).
struct Int8PoolArgs {
  const int8_t* x;
  int64_t n, h, w, c;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t oh, ow;
  int8_t* out;
};
void int8_max_pool_cpu(const Int8PoolArgs& args);

// Global average pool of int8 codes, (N, H*W, C) contiguous -> fp32 (N, C):
// out = float(sum of the codes - hw * zero_point) * float(scale / hw); the int32 sums are exact.
void int8_global_avg_pool_cpu(const int8_t* q, int64_t n, int64_t hw, int64_t c, double scale, int32_t zero_point,
                              float* out);

// An fc on int8 weights: out (N, K) = (x (N, C) . w (K, C) summed in fp32) * w_scale[k] + bias[k];
// all contiguous. The weights stay int8 in memory (a quarter of fp32's traffic, which is what a
// batch-1 fc waits for) and are widened to fp32 in registers. plain: the plain C++ loop even where
// AVX2 runs (tests reach the fallback of CPUs without it that way).
struct Int8LinearArgs {
  const float* x;
  int64_t n, c;
  const int8_t* w;
  int64_t k;
  const float* w_scale;
  const float* bias;
  float* out;
};
void int8_weight_linear_cpu(const Int8LinearArgs& args, bool plain);

}  // namespace tlcore
