// The int8 model's layers around the convolutions on the CPU (csrc/int8_layers.h): the input
// quantization, the max-pool, the global average pool and the fc on int8 weights. All are
// memory-bound passes; before them the model spent more time converting layouts and dtypes around
// PyTorch's ops (fp32 NCHW -> int8 NHWC in five passes, fp16 round trips for the max-pool, whose
// CPU kernel has no int8 path) than in its stem conv, and its fp32 fc read 8 MB per forward.
#include "int8_layers.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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
// Each span returns whether it met a NaN or an infinity in x.
__attribute__((optimize("fp-contract=off"))) bool quantize_span_scalar(const float* x, int64_t count, float inv,
                                                                        int32_t zero, int8_t* out) {
  const float lo = static_cast<float>(-128 - zero), hi = static_cast<float>(127 - zero);
  bool non_finite = false;
  for (int64_t i = 0; i < count; ++i) {
    non_finite |= !std::isfinite(x[i]);
    const float product = x[i] * inv;
    float t = std::floor(product + 0.5f);
    t = std::isnan(t) ? 0.0f : std::min(std::max(t, lo), hi);
    out[i] = static_cast<int8_t>(static_cast<int32_t>(t) + zero);
  }
  return non_finite;
}

#ifdef TLCORE_X86
__attribute__((target("avx2"))) bool quantize_span_avx2(const float* x, int64_t count, float inv, int32_t zero,
                                                        int8_t* out) {
  const __m256 scale = _mm256_set1_ps(inv), half = _mm256_set1_ps(0.5f);
  const __m256 lo = _mm256_set1_ps(static_cast<float>(-128 - zero)), hi = _mm256_set1_ps(static_cast<float>(127 - zero));
  const __m256i zero_point = _mm256_set1_epi32(zero);
  __m256 finite = _mm256_cmp_ps(half, half, _CMP_EQ_OQ);  // all lanes set; a NaN or an infinity clears its lane
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_sub_ps(v, v), half, _CMP_LT_OQ));  // v - v: 0, or NaN
    __m256 t = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(v, scale), half));
    t = _mm256_and_ps(t, _mm256_cmp_ps(t, t, _CMP_ORD_Q));  // NaN -> 0
    t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
    const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(t), zero_point);  // integral already: exact
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packs_epi16(q16, q16));
  }
  const bool non_finite = _mm256_movemask_ps(finite) != 0xFF;
  return quantize_span_scalar(x + i, count - i, inv, zero, out + i) || non_finite;
}
#endif

using QuantizeSpan = bool (*)(const float*, int64_t, float, int32_t, int8_t*);

QuantizeSpan quantize_span() {
#ifdef TLCORE_X86
  if (__builtin_cpu_supports("avx2")) return quantize_span_avx2;
#endif
  return quantize_span_scalar;
}

// (C, block) planes of codes -> `count` pixels of C codes (NCHW -> NHWC within a block).
void interleave_generic(const int8_t* planes, int64_t c, int64_t count, int8_t* dst) {
  for (int64_t p = 0; p < count; ++p) {
    for (int64_t ci = 0; ci < c; ++ci) dst[p * c + ci] = planes[ci * kBlock + p];
  }
}

#ifdef TLCORE_X86
// Three planes (an RGB input, the common case, where the byte-by-byte loop cost more than the
// quantization itself): 16 pixels per step, each 16-byte output word gathered from the three
// planes by byte shuffles. kRgbShuffle[word][plane][byte]: which pixel of that plane goes there (-128: none).
struct RgbShuffle {
  int8_t index[3][3][16];
  constexpr RgbShuffle() : index() {
    for (int word = 0; word < 3; ++word) {
      for (int plane = 0; plane < 3; ++plane) {
        for (int byte = 0; byte < 16; ++byte) {
          const int position = 16 * word + byte;
          index[word][plane][byte] = static_cast<int8_t>(position % 3 == plane ? position / 3 : -128);
        }
      }
    }
  }
};
constexpr RgbShuffle kRgbShuffle;

__attribute__((target("avx2"))) void interleave_rgb_avx2(const int8_t* planes, int64_t c, int64_t count, int8_t* dst) {
  int64_t p = 0;
  for (; p + 16 <= count; p += 16) {
    __m128i plane[3];
    for (int i = 0; i < 3; ++i) plane[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(planes + i * kBlock + p));
    for (int word = 0; word < 3; ++word) {
      __m128i bytes = _mm_setzero_si128();
      for (int i = 0; i < 3; ++i) {
        const __m128i index = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kRgbShuffle.index[word][i]));
        bytes = _mm_or_si128(bytes, _mm_shuffle_epi8(plane[i], index));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * p + 16 * word), bytes);
    }
  }
  interleave_generic(planes + p, c, count - p, dst + 3 * p);
}
#endif

using Interleave = void (*)(const int8_t*, int64_t, int64_t, int8_t*);

Interleave interleave(int64_t c) {
#ifdef TLCORE_X86
  if (c == 3 && __builtin_cpu_supports("avx2")) return interleave_rgb_avx2;
#endif
  return interleave_generic;
}

// The vector type makes one source for every target.
typedef int8_t I8x32 __attribute__((vector_size(32)));

// Each output pixel's channels, 32 at a time, as the max over its window's pixels inside the image,
// held in a register (max-accumulating into the output through memory took twice as long). Locals
// and __restrict: a byte store may alias anything, `a` included.
__attribute__((always_inline)) inline void max_pool_rows(const Int8PoolArgs& a, int64_t begin, int64_t end) {
  const int64_t c = a.c;
  const int8_t* x = a.x;
  int8_t* __restrict out = a.out;
  std::vector<const int8_t*> window;
  window.reserve(static_cast<size_t>(a.kernel_h * a.kernel_w));
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / a.oh, oy = row % a.oh;
    for (int64_t ox = 0; ox < a.ow; ++ox) {
      window.clear();
      for (int64_t ky = 0; ky < a.kernel_h; ++ky) {
        const int64_t y = oy * a.stride_h - a.pad_h + ky * a.dil_h;
        if (y < 0 || y >= a.h) continue;
        for (int64_t kx = 0; kx < a.kernel_w; ++kx) {
          const int64_t col = ox * a.stride_w - a.pad_w + kx * a.dil_w;
          if (col >= 0 && col < a.w) window.push_back(x + ((n * a.h + y) * a.w + col) * c);
        }
      }
      int8_t* dst = out + (row * a.ow + ox) * c;
      int64_t i = 0;
      for (; i + 32 <= c; i += 32) {
        I8x32 m = I8x32{} + static_cast<int8_t>(-128);
        for (const int8_t* pixel : window) {
          I8x32 v;
          std::memcpy(&v, pixel + i, sizeof(v));
          m = m > v ? m : v;
        }
        std::memcpy(dst + i, &m, sizeof(m));
      }
      for (; i < c; ++i) {
        int8_t m = -128;
        for (const int8_t* pixel : window) m = std::max(m, pixel[i]);
        dst[i] = m;
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

// ---- the fc on int8 weights ----

// One block of the fc: rows k0 .. k0 + KR of the weight against rows n0 .. n0 + NR of x. Plain C++.
// Eight partial sums, as the AVX2 kernel's eight lanes: one running sum over ResNet-50's 2048
// channels had 2-3.7x PyTorch's own fp32 rounding error (8.2e-7 against 2.2e-7 with MKL on an
// Intel Xeon).
template <int KR, int NR>
void linear_block_generic(const Int8LinearArgs& a, int64_t k0, int64_t n0) {
  constexpr int kParts = 8;
  for (int i = 0; i < KR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const float* x = a.x + (n0 + j) * a.c;
      const int8_t* w = a.w + (k0 + i) * a.c;
      float part[kParts] = {};
      int64_t c = 0;
      for (; c + kParts <= a.c; c += kParts) {
        for (int p = 0; p < kParts; ++p) part[p] += x[c + p] * static_cast<float>(w[c + p]);
      }
      float sum = ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
      for (; c < a.c; ++c) sum += x[c] * static_cast<float>(w[c]);
      a.out[(n0 + j) * a.k + k0 + i] = sum * a.w_scale[k0 + i] + a.bias[k0 + i];
    }
  }
}

#ifdef TLCORE_X86
__attribute__((target("avx2"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The same block with 8 channels per step: each weight vector is widened once and used for NR rows
// of x; KR * NR independent accumulators keep the FMA pipes fed at batch 1 (KR = 4).
template <int KR, int NR>
__attribute__((target("avx2,fma"))) void linear_block_avx2(const Int8LinearArgs& a, int64_t k0, int64_t n0) {
  __m256 acc[KR][NR];
  for (int i = 0; i < KR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  int64_t c = 0;
  for (; c + 8 <= a.c; c += 8) {
    __m256 x[NR];
    for (int j = 0; j < NR; ++j) x[j] = _mm256_loadu_ps(a.x + (n0 + j) * a.c + c);
    for (int i = 0; i < KR; ++i) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.w + (k0 + i) * a.c + c));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(w, x[j], acc[i][j]);
    }
  }
  for (int i = 0; i < KR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const float* x = a.x + (n0 + j) * a.c;
      const int8_t* w = a.w + (k0 + i) * a.c;
      float sum = horizontal_sum(acc[i][j]);
      for (int64_t r = c; r < a.c; ++r) sum += x[r] * static_cast<float>(w[r]);
      a.out[(n0 + j) * a.k + k0 + i] = sum * a.w_scale[k0 + i] + a.bias[k0 + i];
    }
  }
}
#endif

constexpr int kLinearRows = 4;  // weight rows per block
constexpr int kLinearBatch = 2;  // rows of x per block

struct LinearBlocks {
  void (*full)(const Int8LinearArgs&, int64_t, int64_t);      // kLinearRows x kLinearBatch
  void (*short_x)(const Int8LinearArgs&, int64_t, int64_t);   // kLinearRows x 1
  void (*one_row)(const Int8LinearArgs&, int64_t, int64_t);   // 1 x 1
};

LinearBlocks linear_blocks(bool plain) {
#ifdef TLCORE_X86
  if (!plain && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {linear_block_avx2<kLinearRows, kLinearBatch>, linear_block_avx2<kLinearRows, 1>,
            linear_block_avx2<1, 1>};
  }
#endif
  return {linear_block_generic<kLinearRows, kLinearBatch>, linear_block_generic<kLinearRows, 1>,
          linear_block_generic<1, 1>};
}

}  // namespace

bool quantize_to_nhwc_cpu(const float* x, int64_t n, int64_t c, int64_t hw, bool channels_last, float inv_scale,
                          int32_t zero_point, int8_t* out) {
  const QuantizeSpan span = quantize_span();
  std::atomic<bool> non_finite{false};
  if (channels_last || c == 1) {  // the same element order in and out
    const int64_t total = n * hw * c;
    at::parallel_for(0, (total + kBlock - 1) / kBlock, 16, [&](int64_t begin, int64_t end) {
      const int64_t first = begin * kBlock, last = std::min(total, end * kBlock);
      if (span(x + first, last - first, inv_scale, zero_point, out + first)) {
        non_finite.store(true, std::memory_order_relaxed);
      }
    });
    return non_finite.load();
  }
  const Interleave to_pixels = interleave(c);
  const int64_t blocks = (hw + kBlock - 1) / kBlock;
  at::parallel_for(0, n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> planes(static_cast<size_t>(c * kBlock));  // (C, block) codes, then transposed
    bool found = false;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / blocks, first = task % blocks * kBlock, count = std::min(kBlock, hw - first);
      for (int64_t ci = 0; ci < c; ++ci) {
        found |= span(x + (image * c + ci) * hw + first, count, inv_scale, zero_point, planes.data() + ci * kBlock);
      }
      to_pixels(planes.data(), c, count, out + (image * hw + first) * c);
    }
    if (found) non_finite.store(true, std::memory_order_relaxed);
  });
  return non_finite.load();
}

void int8_max_pool_cpu(const Int8PoolArgs& args) {
  auto rows = max_pool_rows_generic;
#ifdef TLCORE_X86
  if (__builtin_cpu_supports("avx2")) rows = max_pool_rows_avx2;
#endif
  at::parallel_for(0, args.n * args.oh, 1, [&](int64_t begin, int64_t end) { rows(args, begin, end); });
}

void int8_global_avg_pool_cpu(const int8_t* q, int64_t n, int64_t hw, int64_t c, double scale, int32_t zero_point,
                              float* out) {
  constexpr int64_t kChannels = 256;  // one task's sums, on the stack (int64: int32 wraps past 16.7 M pixels)
  const int64_t chunks = (c + kChannels - 1) / kChannels;
  const float factor = static_cast<float>(scale / static_cast<double>(hw));
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / chunks, first = task % chunks * kChannels, width = std::min(kChannels, c - first);
      int64_t sums[kChannels] = {};
      for (int64_t p = 0; p < hw; ++p) {
        const int8_t* codes = q + (image * hw + p) * c + first;
        for (int64_t i = 0; i < width; ++i) sums[i] += codes[i];
      }
      for (int64_t i = 0; i < width; ++i) {
        out[image * c + first + i] = static_cast<float>(sums[i] - hw * zero_point) * factor;
      }
    }
  });
}

void int8_weight_linear_cpu(const Int8LinearArgs& args, bool plain) {
  const LinearBlocks blocks = linear_blocks(plain);
  const int64_t row_blocks = (args.k + kLinearRows - 1) / kLinearRows;
  // Split the weight rows between threads: at batch 1 the fc is one pass over its weight.
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t k0 = block * kLinearRows;
      if (k0 + kLinearRows > args.k) {  // the last, short block: row by row
        for (int64_t k = k0; k < args.k; ++k) {
          for (int64_t n = 0; n < args.n; ++n) blocks.one_row(args, k, n);
        }
        continue;
      }
      int64_t n = 0;
      for (; n + kLinearBatch <= args.n; n += kLinearBatch) blocks.full(args, k0, n);
      for (; n < args.n; ++n) blocks.short_x(args, k0, n);
    }
  });
}

}  // namespace tlcore
