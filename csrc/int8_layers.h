// Plain C++ entry points of the int8 model's layers around the convolutions (no torch headers).
#pragma once

#include <cstdint>

namespace tlcore {

// x: fp32 (N, C, H, W), NCHW-contiguous (channels_last = false) or NHWC-contiguous (true);
// out: int8 (N, H, W, C) contiguous.
// q = clamp(floor(x * inv_scale + 0.5) + zero_point, -128, 127), NaN -> zero_point: the same fp32
// operations, unfused, as the other backends (tlcore/ops/int8.py), so every backend agrees bit for bit.
void quantize_to_nhwc_cpu(const float* x, int64_t n, int64_t c, int64_t hw, bool channels_last, float inv_scale,
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

}  // namespace tlcore
