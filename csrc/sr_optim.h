// Stochastic-rounding AdamW / SGD: the pieces every backend must compute bit-identically.
//
// Included by csrc/cpu/sr_optim.cpp (host) and csrc/cuda/sr_optim.cu (device), and
// mirrored line for line by kernels/sr_optim.py (Triton). Light headers only (nvcc).
//
// The random stream (one definition for all backends):
//   Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
//   with the constants and round order of Triton's tl.philox_impl,
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (element & 0xffffffff, element >> 32, parameter index, step)
//   words   r0 rounds the parameter, r1 the first state, r2 the second state.
// `element` is the element's offset in the parameter's memory, so the bits do not
// depend on block size, grid, thread count or backend.
//
// Rounding fp32 -> 16 bits works on bit patterns: the fp32 magnitude splits into the
// truncated 16-bit magnitude q and the dropped fraction of one 16-bit ulp, scaled to
// 32 bits (rem). Stochastic rounding goes up iff r < rem, so P(up) = rem / 2^32, the
// exact fraction (unbiased); round-to-nearest-even goes up iff rem > 1/2 or ties to odd q.
// Carries ripple into the exponent, so binade edges and overflow to inf come out right.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define TLCORE_HD __host__ __device__ __forceinline__
#else
#define TLCORE_HD inline
#endif

namespace tlcore {
namespace sr {

// Storage formats of parameters and optimizer states.
enum Format : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Columns of the per-tensor fp32 hyper-parameter table (tlcore/ops/optim.py fills it).
enum AdamWColumn { kDecay = 0, kStepSize, kBiasCorrection2Sqrt, kEps, kOneMinusBeta1, kBeta2, kOneMinusBeta2,
                   kAdamInvScale };
enum SgdColumn { kLr = 0, kWeightDecay, kMomentum, kOneMinusDampening, kSgdInvScale };
constexpr int kHyperColumns = 8;  // the table's row length (SGD leaves the last three 0)

// One tensor of a multi-tensor launch: addresses (param, grad, up to two states),
// its size and the Philox counter words. ops.cpp fills it; the CUDA kernel reads it.
struct Slot {
  int64_t param, grad, state0, state1;
  int64_t numel;
  int64_t index;  // parameter index: Philox counter word 2
  int64_t step;   // step number: Philox counter word 3
  int64_t fresh;  // SGD: the momentum buffer is initialised by this step
};

// IEEE round-to-nearest fp32 arithmetic that no compiler may contract into FMAs:
// Triton is launched with enable_fp_fusion=False and the CPU file turns contraction off.
TLCORE_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TLCORE_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TLCORE_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
TLCORE_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
TLCORE_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

TLCORE_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}
TLCORE_HD float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

TLCORE_HD uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

struct Words {
  uint32_t r0, r1, r2, r3;
};

// Philox4x32-10 exactly as Triton's tl.philox_impl (same constants, same word order).
TLCORE_HD Words philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = mulhi(0xCD9E8D57u, old2) ^ c1 ^ k0;
    c2 = mulhi(0xD2511F53u, old0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old2;
    c3 = 0xD2511F53u * old0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

TLCORE_HD Words element_words(uint64_t seed, int64_t element, const Slot& slot) {
  const uint64_t e = static_cast<uint64_t>(element);
  return philox(static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32), static_cast<uint32_t>(slot.index),
                static_cast<uint32_t>(slot.step), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

TLCORE_HD uint32_t rounds_up(uint32_t q, uint32_t rem, uint32_t r, bool stochastic) {
  const uint32_t random = r < rem ? 1u : 0u;
  const uint32_t nearest = (rem > 0x80000000u || (rem == 0x80000000u && (q & 1u))) ? 1u : 0u;
  return stochastic ? random : nearest;
}

// The rounding below is written with selects, not branches (GPU threads do not diverge,
// compilers can vectorise it); it mirrors kernels/sr_optim.py line for line.

// fp32 -> bf16 bits. bf16 keeps fp32's exponent, so dropping 16 bits is the whole story.
TLCORE_HD uint16_t round_bf16(float v, uint32_t r, bool stochastic) {
  const uint32_t bits = float_bits(v);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t mag = bits & 0x7FFFFFFFu;
  const uint32_t q = mag >> 16;
  const uint32_t rounded = q + rounds_up(q, mag << 16, r, stochastic);  // 0x7F7F + 1 is inf
  // inf stays inf; NaN stays NaN (made quiet)
  const uint32_t special = (mag & 0x7FFFFFu) ? (q | 0x40u) : q;
  return static_cast<uint16_t>(sign | ((mag >> 23) == 0xFFu ? special : rounded));
}

// fp32 -> fp16 bits: 13 dropped bits in fp16's normal range, more below 2^-14 where the
// ulp stays 2^-24 (subnormals); beyond 32 dropped bits the fraction is rem's top bits.
TLCORE_HD uint16_t round_fp16(float v, uint32_t r, bool stochastic) {
  const uint32_t bits = float_bits(v);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t mag = bits & 0x7FFFFFFFu;
  const int32_t expo = static_cast<int32_t>(mag >> 23);
  const uint32_t frac = mag & 0x7FFFFFu;
  const uint32_t m24 = expo > 0 ? (frac | 0x800000u) : frac;
  const int32_t e_eff = expo > 1 ? expo : 1;
  const int32_t shift = (126 - e_eff) > 13 ? (126 - e_eff) : 13;  // bits of m24 below one fp16 ulp
  const bool near = shift < 32;
  const uint32_t shift_lo = static_cast<uint32_t>(shift < 31 ? shift : 31);
  const int32_t beyond = shift - 32 > 0 ? shift - 32 : 0;
  const uint32_t shift_hi = static_cast<uint32_t>(beyond < 31 ? beyond : 31);
  uint32_t q = near ? (m24 >> shift_lo) : 0u;
  const uint32_t rem = near ? (m24 << (32u - shift_lo)) : (m24 >> shift_hi);
  q += rounds_up(q, rem, r, stochastic);
  const uint32_t exponent = shift == 13 ? static_cast<uint32_t>(e_eff - 113) << 10 : 0u;
  uint32_t out = q + exponent;  // a carry out of q bumps the exponent (to inf past 65504)
  out = expo >= 127 + 16 ? 0x7C00u : out;  // |v| >= 2^16: beyond fp16's last binade
  out = expo == 0xFF ? (frac ? 0x7E00u : 0x7C00u) : out;
  return static_cast<uint16_t>(sign | out);
}

TLCORE_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t expo = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  // subnormal: mant * 2^-24, exact in fp32
  const float subnormal = bits_float(sign | float_bits(static_cast<float>(mant) * 5.9604644775390625e-8f));
  const uint32_t normal = expo == 0x1F ? (sign | 0x7F800000u | (mant << 13)) : (sign | ((expo + 112u) << 23) | (mant << 13));
  return expo == 0 ? subnormal : bits_float(normal);
}

template <int64_t Format>
TLCORE_HD float load(const void* base, int64_t i) {
  if (Format == kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return Format == kBFloat16 ? bits_float(static_cast<uint32_t>(h) << 16) : fp16_to_float(h);
}

template <int64_t Format>
TLCORE_HD void store(void* base, int64_t i, float v, uint32_t r, bool stochastic) {
  if (Format == kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = Format == kBFloat16 ? round_bf16(v, r, stochastic) : round_fp16(v, r, stochastic);
  }
}

// One AdamW element (torch.optim.AdamW's math, decoupled weight decay) in fp32.
template <int64_t P, int64_t S>
TLCORE_HD void adamw_element(const Slot& s, const float* h, int64_t i, uint64_t seed, bool stochastic) {
  const float g = fmul(load<P>(reinterpret_cast<const void*>(s.grad), i), h[kAdamInvScale]);
  float p = load<P>(reinterpret_cast<const void*>(s.param), i);
  float m = load<S>(reinterpret_cast<const void*>(s.state0), i);
  float v = load<S>(reinterpret_cast<const void*>(s.state1), i);
  p = fmul(p, h[kDecay]);
  m = fadd(m, fmul(h[kOneMinusBeta1], fsub(g, m)));
  v = fadd(fmul(v, h[kBeta2]), fmul(h[kOneMinusBeta2], fmul(g, g)));
  const float denom = fadd(fdiv(fsqrt(v), h[kBiasCorrection2Sqrt]), h[kEps]);
  p = fsub(p, fmul(h[kStepSize], fdiv(m, denom)));
  const Words w = element_words(seed, i, s);
  store<P>(reinterpret_cast<void*>(s.param), i, p, w.r0, stochastic);
  store<S>(reinterpret_cast<void*>(s.state0), i, m, w.r1, stochastic);
  store<S>(reinterpret_cast<void*>(s.state1), i, v, w.r2, stochastic);
}

// One SGD element (torch.optim.SGD's math) in fp32; state0 is the momentum buffer.
template <int64_t P, int64_t S, bool Momentum, bool Nesterov>
TLCORE_HD void sgd_element(const Slot& s, const float* h, int64_t i, uint64_t seed, bool stochastic) {
  float g = fmul(load<P>(reinterpret_cast<const void*>(s.grad), i), h[kSgdInvScale]);
  const float p = load<P>(reinterpret_cast<const void*>(s.param), i);
  if (h[kWeightDecay] != 0.0f) g = fadd(g, fmul(h[kWeightDecay], p));  // torch skips it at 0 (inf * 0 is NaN)
  const Words w = element_words(seed, i, s);
  if (Momentum) {
    const float buf = s.fresh ? g
                              : fadd(fmul(load<S>(reinterpret_cast<const void*>(s.state0), i), h[kMomentum]),
                                     fmul(h[kOneMinusDampening], g));
    store<S>(reinterpret_cast<void*>(s.state0), i, buf, w.r1, stochastic);
    g = Nesterov ? fadd(g, fmul(h[kMomentum], buf)) : buf;
  }
  store<P>(reinterpret_cast<void*>(s.param), i, fsub(p, fmul(h[kLr], g)), w.r0, stochastic);
}

// Calls f.template operator()<P, S>() for runtime formats (P: fp32/bf16/fp16, S: fp32/bf16).
template <typename F>
bool dispatch_formats(int64_t param_format, int64_t state_format, F&& f) {
#define TLCORE_SR_CASE(P, S) \
  if (param_format == P && state_format == S) { f.template operator()<P, S>(); return true; }
  TLCORE_SR_CASE(kFloat32, kFloat32)
  TLCORE_SR_CASE(kFloat32, kBFloat16)
  TLCORE_SR_CASE(kBFloat16, kFloat32)
  TLCORE_SR_CASE(kBFloat16, kBFloat16)
  TLCORE_SR_CASE(kFloat16, kFloat32)
  TLCORE_SR_CASE(kFloat16, kBFloat16)
#undef TLCORE_SR_CASE
  return false;
}

}  // namespace sr

// Plain entry points (ops.cpp wraps tensors and calls these).
void sr_adamw_cpu(const sr::Slot* slots, const float* hyper, int64_t count, int64_t param_format,
                  int64_t state_format, uint64_t seed, bool stochastic);
void sr_sgd_cpu(const sr::Slot* slots, const float* hyper, int64_t count, int64_t param_format,
                int64_t state_format, bool momentum, bool nesterov, uint64_t seed, bool stochastic);
#ifdef TLCORE_WITH_CUDA
// slots, hyper and chunks are device arrays; chunks holds (slot, first element) pairs.
// They launch on `stream` (a cudaStream_t) and return false for unsupported formats.
bool sr_adamw_cuda(const sr::Slot* slots, const float* hyper, const int64_t* chunks, int64_t num_chunks,
                   int64_t chunk_size, int64_t param_format, int64_t state_format, uint64_t seed, bool stochastic,
                   void* stream);
bool sr_sgd_cuda(const sr::Slot* slots, const float* hyper, const int64_t* chunks, int64_t num_chunks,
                 int64_t chunk_size, int64_t param_format, int64_t state_format, bool momentum, bool nesterov,
                 uint64_t seed, bool stochastic, void* stream);
#endif

}  // namespace tlcore
