// CPU kernels of the stochastic-rounding AdamW / SGD step (csrc/sr_optim.h holds the math).
//
// Bit-identical to the Triton and CUDA kernels: same Philox stream, same operation
// order, IEEE fp32 (x86-64 SSE, no FTZ) and no contraction of a*b+c into an FMA.
// The element loop is instantiated per (param, state) format: no per-element dispatch.
// The scalar loop (sr::adamw_element / sr::sgd_element) does not auto-vectorise (Philox's
// 32x32->64-bit products, sqrt's errno path; ~30 ns per element on one core), so on CPUs
// with AVX2 the loop runs hand-vectorised code below (runtime dispatch; Philox 16 lanes wide
// with AVX-512 where available), lane for lane the same operations; the scalar loop stays
// the fallback and does the tails. ResNet-18 AdamW step, bf16, 1 core (Zen 5): 320 -> 26 ms.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <ATen/Parallel.h>
#include <algorithm>
#include <utility>
#include <vector>
#include <c10/util/Exception.h>

#include "sr_optim.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define TLCORE_SR_AVX2 1
#if !defined(__clang__)
// GCC 12 false positive inside avx512fintrin.h (its _mm512_undefined_* self-initialisation).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace tlcore {
namespace {
// Elements per parallel task: big enough to amortise a task, small enough to spread a 1M-element tensor.
constexpr int64_t kChunk = 1 << 15;

// Runs element(slot, t, begin, end) over every tensor's elements in chunks, in ONE parallel
// region: a model has hundreds of small tensors, and a region per tensor would wait on
// the slowest thread hundreds of times per step.
template <typename Element>
void for_each_element(const sr::Slot* slots, int64_t count, const Element& element) {
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (tensor, first element)
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t first = 0; first < slots[t].numel; first += kChunk) chunks.emplace_back(t, first);
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto [t, first] = chunks[c];
      const sr::Slot slot = slots[t];
      element(slot, t, first, std::min(first + kChunk, slot.numel));
    }
  });
}

#ifdef TLCORE_SR_AVX2
// AVX2 path (16 elements per step as two 8-lane halves, runtime-dispatched; the scalar
// element loop in sr_adamw_cpu / sr_sgd_cpu stays the fallback and handles the tails). Every
// lane computes exactly what the scalar code computes: Philox with 32x32->64-bit products from
// _mm256_mul_epu32 (_mm512_mul_epu32 in the AVX-512 variant), IEEE vmulps/vaddps/vsubps/
// vdivps/vsqrtps (correctly rounded, like their scalar SSE forms), the bit-pattern rounding
// with compares and blends. Neither target("avx2") nor the AVX-512 target string enables FMA,
// contraction is off (pragma above) and no intrinsic below fuses a product into a sum.
// Lanes are independent and blocks start at chunk offsets, so thread count changes nothing.
namespace avx2 {
#define TLCORE_AVX2 __attribute__((target("avx2"))) inline

bool supported() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

constexpr int64_t kLanes = 8;

// (hi, lo) 32-bit halves of a[lane] * k for k the same in every lane.
TLCORE_AVX2 void mulhilo(__m256i a, __m256i k, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, k);                         // products of lanes 0,2,4,6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), k);  // products of lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Philox4x32-10 of sr::philox for the 8 counters (c0 + lane, c1, c2, c3); r0..r2 out.
TLCORE_AVX2 void philox8(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, __m256i& r0,
                         __m256i& r1, __m256i& r2) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1));
  __m256i x2 = _mm256_set1_epi32(static_cast<int>(c2));
  __m256i x3 = _mm256_set1_epi32(static_cast<int>(c3));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(x2, m0, hi0, lo0);
    mulhilo(x0, m1, hi1, lo1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi0, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi1, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x1 = lo0;
    x3 = lo1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  r0 = x0;
  r1 = x1;
  r2 = x2;
}

// philox8 on 16 lanes with AVX-512 (c0 + lane for lanes 0..15); r0..r2 as two 8-lane halves each.
// Only called from the flattened AVX-512 entry points below, after a runtime check.
#define TLCORE_AVX512_TARGET "avx2,avx512f,avx512vl,avx512dq,avx512bw"
__attribute__((target(TLCORE_AVX512_TARGET))) inline void philox16(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                                   uint32_t k0, uint32_t k1, __m256i r0[2],
                                                                   __m256i r1[2], __m256i r2[2]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1));
  __m512i x2 = _mm512_set1_epi32(static_cast<int>(c2));
  __m512i x3 = _mm512_set1_epi32(static_cast<int>(c3));
  for (int round = 0; round < 10; ++round) {
    const __m512i even0 = _mm512_mul_epu32(x2, m0), odd0 = _mm512_mul_epu32(_mm512_srli_epi64(x2, 32), m0);
    const __m512i even1 = _mm512_mul_epu32(x0, m1), odd1 = _mm512_mul_epu32(_mm512_srli_epi64(x0, 32), m1);
    const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even0, 32), odd0);
    const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even1, 32), odd1);
    const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, even0, _mm512_slli_epi64(odd0, 32));
    const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, even1, _mm512_slli_epi64(odd1, 32));
    x0 = _mm512_ternarylogic_epi32(hi0, x1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // three-way xor
    x2 = _mm512_ternarylogic_epi32(hi1, x3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    x1 = lo0;
    x3 = lo1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  r0[0] = _mm512_castsi512_si256(x0);
  r0[1] = _mm512_extracti64x4_epi64(x0, 1);
  r1[0] = _mm512_castsi512_si256(x1);
  r1[1] = _mm512_extracti64x4_epi64(x1, 1);
  r2[0] = _mm512_castsi512_si256(x2);
  r2[1] = _mm512_extracti64x4_epi64(x2, 1);
}

bool supported512() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw");
  return yes;
}

// sr::round_bf16 on 8 lanes (bf16 bits in the low 16 bits of each lane).
template <bool Stochastic>
TLCORE_AVX2 __m256i round_bf16(__m256 v, __m256i r) {
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x8000));
  const __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i q = _mm256_srli_epi32(mag, 16);
  const __m256i rem = _mm256_slli_epi32(mag, 16);
  const __m256i rem_s = _mm256_xor_si256(rem, top);  // unsigned order as signed order
  __m256i up;                                         // all ones where the magnitude rounds up
  if (Stochastic) {
    up = _mm256_cmpgt_epi32(rem_s, _mm256_xor_si256(r, top));  // r < rem
  } else {
    const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1));
    up = _mm256_or_si256(_mm256_cmpgt_epi32(rem_s, _mm256_setzero_si256()),  // rem > 0x80000000
                         _mm256_and_si256(_mm256_cmpeq_epi32(rem, top), odd));
  }
  const __m256i rounded = _mm256_sub_epi32(q, up);
  const __m256i frac_zero = _mm256_cmpeq_epi32(_mm256_and_si256(mag, _mm256_set1_epi32(0x7FFFFF)),
                                               _mm256_setzero_si256());
  const __m256i special = _mm256_or_si256(q, _mm256_andnot_si256(frac_zero, _mm256_set1_epi32(0x40)));
  const __m256i is_special = _mm256_cmpeq_epi32(_mm256_srli_epi32(mag, 23), _mm256_set1_epi32(0xFF));
  return _mm256_or_si256(sign, _mm256_blendv_epi8(rounded, special, is_special));
}

template <int64_t F>
TLCORE_AVX2 __m256 load8(const void* base, int64_t i) {
  if (F == sr::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  if (F == sr::kBFloat16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  alignas(32) float tmp[kLanes];
  for (int l = 0; l < kLanes; ++l) tmp[l] = sr::load<F>(base, i + l);
  return _mm256_load_ps(tmp);
}

template <int64_t F, bool Stochastic>
TLCORE_AVX2 void store8(void* base, int64_t i, __m256 v, __m256i r) {
  if (F == sr::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(base) + i, v);
  } else if (F == sr::kBFloat16) {
    const __m256i b = round_bf16<Stochastic>(v, r);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + i), packed);
  } else {
    alignas(32) float vt[kLanes];
    alignas(32) uint32_t rt[kLanes];
    _mm256_store_ps(vt, v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(rt), r);
    uint16_t* out = static_cast<uint16_t*>(base) + i;
    for (int l = 0; l < kLanes; ++l) out[l] = sr::round_fp16(vt[l], rt[l], Stochastic);
  }
}

constexpr int64_t kBlock = 2 * kLanes;  // elements per step: two 8-lane halves

// Philox words r0..r2 of elements i..i+15 (the caller keeps the 16 in one 2^32 block).
template <bool Wide>
TLCORE_AVX2 void words16(uint64_t seed, int64_t i, const sr::Slot& s, __m256i r0[2], __m256i r1[2], __m256i r2[2]) {
  const uint64_t e = static_cast<uint64_t>(i);
  const uint32_t c0 = static_cast<uint32_t>(e), c1 = static_cast<uint32_t>(e >> 32);
  const uint32_t c2 = static_cast<uint32_t>(s.index), c3 = static_cast<uint32_t>(s.step);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  if constexpr (Wide) {
    philox16(c0, c1, c2, c3, k0, k1, r0, r1, r2);
  } else {
    philox8(c0, c1, c2, c3, k0, k1, r0[0], r1[0], r2[0]);
    philox8(c0 + static_cast<uint32_t>(kLanes), c1, c2, c3, k0, k1, r0[1], r1[1], r2[1]);
  }
}

// Elements i..i+15 can share one vector counter: their high counter words agree.
inline bool one_block(int64_t i) {
  return (static_cast<uint64_t>(i) >> 32) == (static_cast<uint64_t>(i + kBlock - 1) >> 32);
}

// sr::adamw_element on elements [begin, end) in steps of 16; returns where the scalar tail starts.
template <int64_t P, int64_t S, bool Stochastic, bool Wide>
TLCORE_AVX2 int64_t adamw_range(const sr::Slot& s, const float* h, int64_t begin, int64_t end, uint64_t seed) {
  const __m256 inv_scale = _mm256_set1_ps(h[sr::kAdamInvScale]);
  const __m256 decay = _mm256_set1_ps(h[sr::kDecay]);
  const __m256 one_minus_beta1 = _mm256_set1_ps(h[sr::kOneMinusBeta1]);
  const __m256 beta2 = _mm256_set1_ps(h[sr::kBeta2]);
  const __m256 one_minus_beta2 = _mm256_set1_ps(h[sr::kOneMinusBeta2]);
  const __m256 bias_correction2_sqrt = _mm256_set1_ps(h[sr::kBiasCorrection2Sqrt]);
  const __m256 eps = _mm256_set1_ps(h[sr::kEps]);
  const __m256 step_size = _mm256_set1_ps(h[sr::kStepSize]);
  const void* grad = reinterpret_cast<const void*>(s.grad);
  void* param = reinterpret_cast<void*>(s.param);
  void* state0 = reinterpret_cast<void*>(s.state0);
  void* state1 = reinterpret_cast<void*>(s.state1);
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    if (!one_block(i)) {
      for (int64_t j = i; j < i + kBlock; ++j) sr::adamw_element<P, S>(s, h, j, seed, Stochastic);
      continue;
    }
    __m256i r0[2] = {}, r1[2] = {}, r2[2] = {};
    if (Stochastic) words16<Wide>(seed, i, s, r0, r1, r2);
    for (int half = 0; half < 2; ++half) {
      const int64_t k = i + half * kLanes;
      const __m256 g = _mm256_mul_ps(load8<P>(grad, k), inv_scale);
      __m256 p = load8<P>(param, k);
      __m256 m = load8<S>(state0, k);
      __m256 v = load8<S>(state1, k);
      p = _mm256_mul_ps(p, decay);
      m = _mm256_add_ps(m, _mm256_mul_ps(one_minus_beta1, _mm256_sub_ps(g, m)));
      v = _mm256_add_ps(_mm256_mul_ps(v, beta2), _mm256_mul_ps(one_minus_beta2, _mm256_mul_ps(g, g)));
      const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bias_correction2_sqrt), eps);
      p = _mm256_sub_ps(p, _mm256_mul_ps(step_size, _mm256_div_ps(m, denom)));
      store8<P, Stochastic>(param, k, p, r0[half]);
      store8<S, Stochastic>(state0, k, m, r1[half]);
      store8<S, Stochastic>(state1, k, v, r2[half]);
    }
  }
  return i;
}

// sr::sgd_element on elements [begin, end) in steps of 16; returns where the scalar tail starts.
template <int64_t P, int64_t S, bool Momentum, bool Nesterov, bool Stochastic, bool Wide>
TLCORE_AVX2 int64_t sgd_range(const sr::Slot& s, const float* h, int64_t begin, int64_t end, uint64_t seed) {
  const __m256 inv_scale = _mm256_set1_ps(h[sr::kSgdInvScale]);
  const bool decay = h[sr::kWeightDecay] != 0.0f;
  const __m256 weight_decay = _mm256_set1_ps(h[sr::kWeightDecay]);
  const __m256 momentum = _mm256_set1_ps(h[sr::kMomentum]);
  const __m256 one_minus_dampening = _mm256_set1_ps(h[sr::kOneMinusDampening]);
  const __m256 lr = _mm256_set1_ps(h[sr::kLr]);
  const void* grad = reinterpret_cast<const void*>(s.grad);
  void* param = reinterpret_cast<void*>(s.param);
  void* state0 = reinterpret_cast<void*>(s.state0);
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    if (!one_block(i)) {
      for (int64_t j = i; j < i + kBlock; ++j) sr::sgd_element<P, S, Momentum, Nesterov>(s, h, j, seed, Stochastic);
      continue;
    }
    __m256i r0[2] = {}, r1[2] = {}, r2[2] = {};
    if (Stochastic) words16<Wide>(seed, i, s, r0, r1, r2);
    for (int half = 0; half < 2; ++half) {
      const int64_t k = i + half * kLanes;
      __m256 g = _mm256_mul_ps(load8<P>(grad, k), inv_scale);
      const __m256 p = load8<P>(param, k);
      if (decay) g = _mm256_add_ps(g, _mm256_mul_ps(weight_decay, p));
      if (Momentum) {
        const __m256 buf = s.fresh ? g
                                   : _mm256_add_ps(_mm256_mul_ps(load8<S>(state0, k), momentum),
                                                   _mm256_mul_ps(one_minus_dampening, g));
        store8<S, Stochastic>(state0, k, buf, r1[half]);
        g = Nesterov ? _mm256_add_ps(g, _mm256_mul_ps(momentum, buf)) : buf;
      }
      store8<P, Stochastic>(param, k, _mm256_sub_ps(p, _mm256_mul_ps(lr, g)), r0[half]);
    }
  }
  return i;
}

// Entry points: the AVX2 loops, and the same loops with 16-lane Philox, flattened into one
// AVX-512 function (flatten inlines the AVX2 body and philox16 into it).
template <int64_t P, int64_t S, bool Stochastic>
TLCORE_AVX2 int64_t adamw_avx2(const sr::Slot& s, const float* h, int64_t begin, int64_t end, uint64_t seed) {
  return adamw_range<P, S, Stochastic, false>(s, h, begin, end, seed);
}
template <int64_t P, int64_t S, bool Stochastic>
__attribute__((target(TLCORE_AVX512_TARGET), flatten)) int64_t adamw_avx512(const sr::Slot& s, const float* h,
                                                                          int64_t begin, int64_t end, uint64_t seed) {
  return adamw_range<P, S, Stochastic, true>(s, h, begin, end, seed);
}
template <int64_t P, int64_t S, bool Momentum, bool Nesterov, bool Stochastic>
TLCORE_AVX2 int64_t sgd_avx2(const sr::Slot& s, const float* h, int64_t begin, int64_t end, uint64_t seed) {
  return sgd_range<P, S, Momentum, Nesterov, Stochastic, false>(s, h, begin, end, seed);
}
template <int64_t P, int64_t S, bool Momentum, bool Nesterov, bool Stochastic>
__attribute__((target(TLCORE_AVX512_TARGET), flatten)) int64_t sgd_avx512(const sr::Slot& s, const float* h,
                                                                        int64_t begin, int64_t end, uint64_t seed) {
  return sgd_range<P, S, Momentum, Nesterov, Stochastic, true>(s, h, begin, end, seed);
}
#undef TLCORE_AVX2
#undef TLCORE_AVX512_TARGET
}  // namespace avx2
#endif
}  // namespace

void sr_adamw_cpu(const sr::Slot* slots, const float* hyper, int64_t count, int64_t param_format,
                  int64_t state_format, uint64_t seed, bool stochastic) {
  const bool known = sr::dispatch_formats(param_format, state_format, [&]<int64_t P, int64_t S>() {
    for_each_element(slots, count, [&](const sr::Slot& slot, int64_t t, int64_t begin, int64_t end) {
      const float* h = hyper + t * sr::kHyperColumns;
      int64_t i = begin;
#ifdef TLCORE_SR_AVX2
      if (avx2::supported512()) {
        i = stochastic ? avx2::adamw_avx512<P, S, true>(slot, h, begin, end, seed)
                       : avx2::adamw_avx512<P, S, false>(slot, h, begin, end, seed);
      } else if (avx2::supported()) {
        i = stochastic ? avx2::adamw_avx2<P, S, true>(slot, h, begin, end, seed)
                       : avx2::adamw_avx2<P, S, false>(slot, h, begin, end, seed);
      }
#endif
      for (; i < end; ++i) sr::adamw_element<P, S>(slot, h, i, seed, stochastic);
    });
  });
  TORCH_CHECK(known, "tlcore sr AdamW: unsupported parameter/state formats ", param_format, "/", state_format);
}

void sr_sgd_cpu(const sr::Slot* slots, const float* hyper, int64_t count, int64_t param_format,
                int64_t state_format, bool momentum, bool nesterov, uint64_t seed, bool stochastic) {
  const bool known = sr::dispatch_formats(param_format, state_format, [&]<int64_t P, int64_t S>() {
    auto run = [&]<bool Momentum, bool Nesterov>() {
      for_each_element(slots, count, [&](const sr::Slot& slot, int64_t t, int64_t begin, int64_t end) {
        const float* h = hyper + t * sr::kHyperColumns;
        int64_t i = begin;
#ifdef TLCORE_SR_AVX2
        if (avx2::supported512()) {
          i = stochastic ? avx2::sgd_avx512<P, S, Momentum, Nesterov, true>(slot, h, begin, end, seed)
                         : avx2::sgd_avx512<P, S, Momentum, Nesterov, false>(slot, h, begin, end, seed);
        } else if (avx2::supported()) {
          i = stochastic ? avx2::sgd_avx2<P, S, Momentum, Nesterov, true>(slot, h, begin, end, seed)
                         : avx2::sgd_avx2<P, S, Momentum, Nesterov, false>(slot, h, begin, end, seed);
        }
#endif
        for (; i < end; ++i) sr::sgd_element<P, S, Momentum, Nesterov>(slot, h, i, seed, stochastic);
      });
    };
    if (!momentum) {
      run.template operator()<false, false>();
    } else if (nesterov) {
      run.template operator()<true, true>();
    } else {
      run.template operator()<true, false>();
    }
  });
  TORCH_CHECK(known, "tlcore sr SGD: unsupported parameter/state formats ", param_format, "/", state_format);
}

}  // namespace tlcore
