// Plain C++ entry points of tlcore's int8 convolution (no torch headers: nvcc includes this too).
//
// The integer math, shared bit for bit by every backend (tlcore/ops/int8.py holds the
// PyTorch reference and the derivation):
//
//   acc[m, k]   = sum over (r, s, c) of x[n, ih, iw, g * C / G + c] * w[k, r, s, c]     int32, exact
//                 where c < C / G and g = k / (K / G) is output channel k's conv group
//                 where x outside the image reads as x_zero (zero padding in real terms)
//   total[m, k] = acc * multiplier[k] + offset[k] (+ residual[m, k] * res_multiplier)   int64
//   out[m, k]   = clamp((total >> shift) + out_zero, relu ? max(out_zero, -128) : -128, out_max)
//
// `offset` already holds the bias, the x_zero * sum(w) correction, the residual's zero
// point and the rounding half (1 << (shift - 1)), so `>>` (arithmetic) rounds half up.
#pragma once

#include <cstdint>

namespace tlcore {

struct Int8ConvArgs {
  const int8_t* x;            // (N, H, W, C) contiguous
  int64_t n, h, w, c;
  int32_t x_zero;
  const int8_t* weight;       // (K, R, S, C / conv_groups) contiguous
  int64_t k, r, s;
  const int32_t* multiplier;  // (K,)
  const int64_t* offset;      // (K,)
  int32_t shift;              // 0..62
  const int8_t* residual;     // (N, OH, OW, K) contiguous, or nullptr
  int64_t res_multiplier;
  int32_t out_zero;
  bool relu;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t oh, ow;
  int8_t* out;                // (N, OH, OW, K) contiguous
  const int32_t* packed_weight = nullptr;  // CPU: pack_int8_weight_cpu's output, or nullptr (pack per call)
  int32_t out_max = 127;                   // the largest output code (-1 keeps outputs 7-bit, see kAvx2U7)
  int32_t algorithm = 0;                   // CPU: an Int8Algorithm (int8_algorithm_supported)
  int64_t conv_groups = 1;                 // G, dividing C and K (ResNeXt's grouped 3x3 convs)
};

// Whether every total = acc * multiplier[k] + offset[k] (+ residual * res_multiplier) this conv can
// produce (|acc| <= 128 * 128 * C * R * S) stays below 2**62, the headroom the epilogues assume
// and tlcore.ops.requantization guarantees. Reads multiplier and offset: host memory only.
bool int8_requantization_in_range(const Int8ConvArgs& args);

// Instruction sets of the CPU kernel; kAuto picks the best one the CPU has. kAvx2U7 (AVX2's
// vpmaddubsw, never picked by kAuto) needs 7-bit inputs, x and x_zero <= -1, and checks them
// where its direct kernel runs vpmaddubsw on them (Winograd's int16 products and the split codes
// are exact for any code). kAmx: Intel's tile unit (TDPBUSD) for ungrouped direct convs, the
// AVX512-VNNI kernel for grouped ones.
enum class Int8Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvxVnni = 3, kAvx512Vnni = 4, kAvx2U7 = 5, kAmx = 6 };

bool int8_isa_supported(Int8Isa isa);

// kAuto -> the best supported set; throws std::invalid_argument for an unsupported one.
Int8Isa int8_resolve_isa(Int8Isa isa);

// How the CPU kernel runs a conv; every algorithm gives the same bits.
//   kDirect    implicit GEMM over (tap, channel); each padded input pixel holds its channels
//              (csrc/cpu/int8_conv.cpp)
//   kWinograd  exact integer Winograd, F(4x4, 3x3), F(2x4, 3x3) or F(2x2, 3x3) tiles (csrc/cpu/int8_winograd.cpp):
//              3x3, stride 1, dilation 1, an int16-pairs instruction set (scalar, avx2, avx2u7),
//              and C <= 3640 so that acc is recoverable from its wrapped int32 sums
//   kRows      kDirect with each padded input row stored as one run of (column, channel) int16
//              values, so a tap row reduces over (s, c) without rounding C up to a pair: for odd
//              C (the RGB stem). Needs dilation_w 1, C * stride_w even, an int16-pairs set (scalar, avx2)
//   kStrideTwoWinograd  exact integer Winograd for 3x3 stride-2 convs (else as kWinograd): 2x2 output
//              tiles, the even input rows and columns as F(2, 2) and the odd ones direct (25
//              products per channel instead of 36; no wrapped sums to recover)
//   kSplit     kDirect for 1x1 convs, and R x S ones with C % 8 == 0, on avx2 and avx2u7
//              (csrc/cpu/int8_split.cpp): vpmaddubsw on the codes x + 128, two quads summed per int16
//              lane, exact while a lane's codes sum to <= 256; in the lanes past that, bits 7 and 6 are
//              dropped and the weights of those channels added per pixel from a list. R x S convs run as
//              the 1x1 conv of their R S C taps' codes; R S C <= 65536
// Grouped convs (conv_groups > 1) run kDirect, or kSplit where C / G and K / G are multiples of 16 and
// C <= 32768 (on their input converted once, the tiles reading its taps as kDirect's do).
enum class Int8Algorithm : int { kDirect = 0, kWinograd = 1, kRows = 2, kStrideTwoWinograd = 3, kSplit = 4 };

bool int8_algorithm_supported(Int8Algorithm algorithm, int64_t k, int64_t c, int64_t r, int64_t s, int64_t stride_h,
                              int64_t stride_w, int64_t dil_h, int64_t dil_w, Int8Isa isa, int64_t conv_groups = 1);

// The fastest supported algorithm for a conv of this shape on `isa` (resolved).
Int8Algorithm int8_best_algorithm(int64_t k, int64_t c, int64_t r, int64_t s, int64_t stride_h, int64_t stride_w,
                                  int64_t dil_h, int64_t dil_w, Int8Isa isa, int64_t conv_groups = 1);

// The CPU kernel's weight layout for `isa` and the algorithm, so a model packs each weight once
// instead of on every call: (K, R, S, C / conv_groups) int8 -> int32 words (a header naming the
// layout and shape, then blocks of 16 channels; see csrc/cpu/int8_conv.cpp). c: the input's channels.
int64_t int8_packed_weight_words(int64_t k, int64_t c, int64_t r, int64_t s, Int8Isa isa, Int8Algorithm algorithm,
                                 int64_t conv_groups = 1);
void pack_int8_weight_cpu(const int8_t* weight, int64_t k, int64_t c, int64_t r, int64_t s, Int8Isa isa,
                          Int8Algorithm algorithm, int32_t* packed, int64_t conv_groups = 1);

// Runs the convolution on the CPU with `isa` (threads: ATen's intra-op pool) and args.algorithm.
// Returns the instruction set used; throws std::invalid_argument if `isa` is unsupported or the
// algorithm cannot run this conv.
Int8Isa int8_conv2d_cpu(const Int8ConvArgs& args, Int8Isa isa);

#ifdef TLCORE_WITH_CUDA
// Forces the CUDA kernel (tests, benchmarks): "dp4a", "mma" (tensor cores, sm_80+) or "auto"/unset
// (mma where it can run, else dp4a). Read on every launch.
constexpr const char* kInt8CudaKernelEnv = "TLCORE_INT8_CUDA_KERNEL";

// The same convolution on the GPU (csrc/cuda/int8_conv.cu: an implicit GEMM on mma.sync s8 tensor
// cores on compute capability >= 8.0, on dp4a otherwise), launched on `stream` (a cudaStream_t) for
// the current device. Throws std::invalid_argument for a bad kInt8CudaKernelEnv value.
void int8_conv2d_cuda(const Int8ConvArgs& args, void* stream);

// The kernel int8_conv2d_cuda would launch on the current device now: "mma" or "dp4a" (for convs
// whose coordinates fit int32, i.e. all but absurd padding or dilation; see int8_conv.cu).
const char* int8_cuda_kernel_name();
#endif

}  // namespace tlcore
