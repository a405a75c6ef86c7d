// The int8 model's input quantization and max-pool on the CPU (csrc/int8_layers.h).
// Both are memory-bound passes; before them the model spent more time converting layouts and
// dtypes around PyTorch's ops (fp32 NCHW -> int8 NHWC in five passes, fp16 round trips for the
// max-pool, whose CPU kernel has no int8 path) than in its stem conv.
#include "int8_layers.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TLCORE_X86 1
#endif

namespace tlcore {
namespace {

constexpr int64_t kBlock = 512;  // pixels quantized per step of the NCHW -> NHWC transpose

// No fused multiply-add: x * inv_scale is rounded to fp32 before + 0.5, as on every backend.
__attribute__((optimize("fp-contract=off"))) void quantize_span_scalar(const float* x, int64_t count, float inv,
                                                                        int32_t zero, int8_t* out) {
  const float lo = static_cast<float>(-128 - zero), hi = static_cast<float>(127 - zero);
  for (int64_t i = 0; i < count; ++i) {
    const float product = x[i] * inv;
    float t = std::floor(product + 0.5f);
    t = std::isnan(t) ? 0.0f : std::min(std::max(t, lo), hi);
    out[i] = static_cast<int8_t>(static_cast<int32_t>(t) + zero);
  }
}

#ifdef TLCORE_X86
__attribute__((target("avx2"))) void quantize_span_avx2(const float* x, int64_t count, float inv, int32_t zero,
                                                        int8_t* out) {
  const __m256 scale = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f);
  const __m256 lo = _mm256_set1_ps(static_cast<float>(-128 - zero)), hi = _mm256_set1_ps(static_cast<float>(127 - zero));
  const __m256i zero_point = _mm256_set1_epi32(zero);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    __m256 t = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale), half));
    t = _mm256_and_ps(t, _mm256_cmp_ps(t, t, _CMP_ORD_Q));  // NaN -> 0
    t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
    const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(t), zero_point);  // integral already: exact
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packs_epi16(q16, q16));
  }
  quantize_span_scalar(x + i, count - i, inv, zero, out + i);
}
#endif

using QuantizeSpan = void (*)(const float*, int64_t, float, int32_t, int8_t*);

QuantizeSpan quantize_span() {
#ifdef TLCORE_X86
  if (__builtin_cpu_supports("avx2")) return quantize_span_avx2;
#endif
  return quantize_span_scalar;
}

// dst = max(dst, src) over c int8 codes; the vector type makes one source for every target.
typedef int8_t I8x32 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline void max_into(int8_t* dst, const int8_t* src, int64_t c) {
  int64_t i = 0;
  for (; i + 32 <= c; i += 32) {
    I8x32 a, b;
    std::memcpy(&a, dst + i, sizeof(a));
    std::memcpy(&b, src + i, sizeof(b));
    a = a > b ? a : b;
    std::memcpy(dst + i, &a, sizeof(a));
  }
  for (; i < c; ++i) dst[i] = std::max(dst[i], src[i]);
}

__attribute__((always_inline)) inline void max_pool_rows(const Int8PoolArgs& a, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / a.oh, oy = row % a.oh;
    for (int64_t ox = 0; ox < a.ow; ++ox) {
      int8_t* dst = a.out + (row * a.ow + ox) * a.c;
      std::fill(dst, dst + a.c, static_cast<int8_t>(-128));
      for (int64_t ky = 0; ky < a.kernel_h; ++ky) {
        const int64_t y = oy * a.stride_h - a.pad_h + ky * a.dil_h;
        if (y < 0 || y >= a.h) continue;
        for (int64_t kx = 0; kx < a.kernel_w; ++kx) {
          const int64_t x = ox * a.stride_w - a.pad_w + kx * a.dil_w;
          if (x >= 0 && x < a.w) max_into(dst, a.x + ((n * a.h + y) * a.w + x) * a.c, a.c);
        }
      }
    }
  }
}

void max_pool_rows_generic(const Int8PoolArgs& a, int64_t begin, int64_t end) { max_pool_rows(a, begin, end); }
#ifdef TLCORE_X86
__attribute__((target("avx2"))) void max_pool_rows_avx2(const Int8PoolArgs& a, int64_t begin, int64_t end) {
  max_pool_rows(a, begin, end);
}
#endif

}  // namespace

void quantize_to_nhwc_cpu(const float* x, int64_t n, int64_t c, int64_t hw, bool channels_last, float inv_scale,
                          int32_t zero_point, int8_t* out) {
  const QuantizeSpan span = quantize_span();
  if (channels_last || c == 1) {  // the same element order in and out
    const int64_t total = n * hw * c;
    at::parallel_for(0, (total + kBlock - 1) / kBlock, 16, [&](int64_t begin, int64_t end) {
      const int64_t first = begin * kBlock, last = std::min(total, end * kBlock);
      span(x + first, last - first, inv_scale, zero_point, out + first);
    });
    return;
  }
  const int64_t blocks = (hw + kBlock - 1) / kBlock;
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> planes(static_cast<size_t>(c * kBlock));  // (C, block) codes, then transposed
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / blocks, first = task % blocks * kBlock, count = std::min(kBlock, hw - first);
      for (int64_t ci = 0; ci < c; ++ci) {
        span(x + (image * c + ci) * hw + first, count, inv_scale, zero_point, planes.data() + ci * kBlock);
      }
      int8_t* dst = out + (image * hw + first) * c;
      for (int64_t p = 0; p < count; ++p) {
        for (int64_t ci = 0; ci < c; ++ci) dst[p * c + ci] = planes[ci * kBlock + p];
      }
    }
  });
}

void int8_max_pool_cpu(const Int8PoolArgs& args) {
  auto rows = max_pool_rows_generic;
#ifdef TLCORE_X86
  if (__builtin_cpu_supports("avx2")) rows = max_pool_rows_avx2;
#endif
  at::parallel_for(0, args.n * args.oh, 1, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

}  // namespace tlcore
