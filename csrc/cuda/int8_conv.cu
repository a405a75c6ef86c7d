// CUDA C++ kernel of tlcore's int8 convolution: an implicit GEMM on dp4a (4-way int8 dot
// product into int32) with the fused requantize epilogue. The integer math is the contract in
// csrc/int8_conv.h; it is exact, so results equal the Triton kernel and the reference bit for bit.
//
//   x: (N, H, W, C) int8   weight: (K, R, S, C) int8   out / residual: (N, OH, OW, K) int8
//
// GEMM view: rows m = (n, oh, ow), columns k, reduction over (tap, channel). A block computes a
// 64 x 64 output tile with 256 threads (4 x 4 outputs each); the reduction advances one tap and
// 64 channels (16 int32 words) at a time through shared memory. Words are assembled byte by byte,
// so any C (and any alignment) works; outside the image the input reads as x_zero.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "int8_conv.h"

namespace tlcore {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kWords = 16;  // int32 words (4 channels each) per reduction step
constexpr int kThreads = 256;

__device__ __forceinline__ int32_t pack4(const int8_t* p, int64_t valid) {
  // Channels past C pack as 0: the matching weights are 0 too.
  uint32_t word = 0;
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte = j < valid ? static_cast<uint8_t>(p[j]) : 0u;
    word |= byte << (8 * j);
  }
  return static_cast<int32_t>(word);
}

__global__ void __launch_bounds__(kThreads) int8_conv_dp4a_kernel(Int8ConvArgs a) {
  __shared__ int32_t x_tile[kWords][kTileM + 1];
  __shared__ int32_t w_tile[kWords][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m_total = a.n * a.oh * a.ow;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t words = (a.c + 3) / 4;
  const uint32_t zero_byte = static_cast<uint8_t>(static_cast<int8_t>(a.x_zero));
  const int32_t zero_word = static_cast<int32_t>(zero_byte * 0x01010101u);

  int32_t acc[4][4] = {};
  for (int64_t tap = 0; tap < a.r * a.s; ++tap) {
    const int64_t r = tap / a.s, s = tap % a.s;
    for (int64_t w0 = 0; w0 < words; w0 += kWords) {
      for (int i = tid; i < kTileM * kWords; i += kThreads) {
        const int row = i / kWords, word = i % kWords;
        const int64_t m = m0 + row, c = 4 * (w0 + word);
        int32_t value = 0;
        if (m < m_total && c < a.c) {
          const int64_t n = m / (a.oh * a.ow), oh = (m / a.ow) % a.oh, ow = m % a.ow;
          const int64_t ih = oh * a.stride_h - a.pad_h + r * a.dil_h;
          const int64_t iw = ow * a.stride_w - a.pad_w + s * a.dil_w;
          value = (ih >= 0 && ih < a.h && iw >= 0 && iw < a.w)
                      ? pack4(a.x + ((n * a.h + ih) * a.w + iw) * a.c + c, a.c - c)
                      : zero_word;
        }
        x_tile[word][row] = value;
      }
      for (int i = tid; i < kTileN * kWords; i += kThreads) {
        const int col = i / kWords, word = i % kWords;
        const int64_t k = k0 + col, c = 4 * (w0 + word);
        w_tile[word][col] = (k < a.k && c < a.c) ? pack4(a.weight + (k * a.r * a.s + tap) * a.c + c, a.c - c) : 0;
      }
      __syncthreads();
#pragma unroll
      for (int word = 0; word < kWords; ++word) {
        int32_t xs[4], ws[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          xs[i] = x_tile[word][ty * 4 + i];
          ws[i] = w_tile[word][tx * 4 + i];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(xs[i], ws[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
  }

  const int64_t lo = a.relu ? max(a.out_zero, -128) : -128;
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= m_total) break;
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + tx * 4 + j;
      if (k >= a.k) break;
      int64_t total = static_cast<int64_t>(acc[i][j]) * a.multiplier[k] + a.offset[k];
      if (a.residual != nullptr) total += static_cast<int64_t>(a.residual[m * a.k + k]) * a.res_multiplier;
      const int64_t q = (total >> a.shift) + a.out_zero;  // arithmetic shift: floor division
      a.out[m * a.k + k] = static_cast<int8_t>(min(max(q, lo), static_cast<int64_t>(a.out_max)));
    }
  }
}

}  // namespace

void int8_conv2d_cuda(const Int8ConvArgs& args, void* stream) {
  const int64_t m_total = args.n * args.oh * args.ow;
  const dim3 grid(static_cast<unsigned>((m_total + kTileM - 1) / kTileM),
                  static_cast<unsigned>((args.k + kTileN - 1) / kTileN));
  if (grid.y > 65535) throw std::invalid_argument("tlcore int8 conv (CUDA): too many output channels");
  int8_conv_dp4a_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("tlcore int8 conv (CUDA): launch failed: ") + cudaGetErrorString(error));
  }
}

}  // namespace tlcore
