// The device code of tlcore's CUDA int8 convolution: two implicit GEMMs with the same fused
// requantize epilogue (requantize_store), one on dp4a (4-way int8 dot product into int32, any GPU)
// and one on the Ampere+ tensor cores (mma.sync m16n8k32 s8 x s8 -> s32, "IMMA"). The integer math
// is the contract in csrc/int8_conv.h; it is exact, so results equal the Triton kernel and the
// reference bit for bit whichever kernel runs.
//
//   x: (N, H, W, C) int8   weight: (K, R, S, C) int8   out / residual: (N, OH, OW, K) int8
//
// GEMM view: rows m = (n, oh, ow), columns k, reduction over (tap, channel). Channels past C pack
// as 0 in the weights, so any C works (the inputs there are 0 inside the image and x_zero outside
// it, where every input byte reads as x_zero: the zero weights cancel them). Below
// kFlatChannelsBelow channels (the RGB stem) the reduction runs over the flattened (r, s, c) window
// instead (Reduction).
//
// Included by int8_conv.cu (the launcher) and by tests/cuda_emulation, which runs these kernels on
// the CPU (one thread per CUDA thread, TLCORE_CUDA_EMULATION) so that CI checks them bit for bit.
#pragma once

#include <cstdint>

#include "int8_conv.h"

namespace tlcore {
namespace {

// ---- shared pieces ---------------------------------------------------------------------------

__device__ __forceinline__ int32_t pack4(const int8_t* p, int64_t valid) {
  // Channels past C pack as 0: the matching weights are 0 too.
  uint32_t word = 0;
  for (int j = 0; j < 4; ++j) {
    const uint32_t byte = j < valid ? static_cast<uint8_t>(p[j]) : 0u;
    word |= byte << (8 * j);
  }
  return static_cast<int32_t>(word);
}

// The reduction a kernel walks, in the weights' KRSC order: `taps` runs of `length` values, weight row
// k's run t at weight + (k * taps + t) * length. A run is one tap's C channels, or, below
// kFlatChannelsBelow channels, the whole flattened (r, s, c) window (flat): a tap of the 3-channel
// stem in 64-channel steps would be 61 channels of padding, 21x the products. Each kernel is
// compiled for both (kFlat): the flat gather's state would cost the other every register it holds.
constexpr int64_t kFlatChannelsBelow = 16;

__host__ __device__ inline bool flat_reduction(const Int8ConvArgs& a) { return a.c < kFlatChannelsBelow; }

struct Reduction {
  int64_t taps, length;
};

template <bool kFlat>
__device__ __forceinline__ Reduction reduction_of(const Int8ConvArgs& a) {
  return {kFlat ? 1 : a.r * a.s, kFlat ? a.r * a.s * a.c : a.c};
}

// Where a value of a flat reduction sits in the (r, s, c) window: value (r * S + s) * C + c. The
// gathers step a cursor value by value (next) instead of dividing for each byte; r == R is past
// the window's last value.
struct FlatCursor {
  int r, s, c;
};

__device__ __forceinline__ FlatCursor flat_cursor_at(const Int8ConvArgs& a, int value) {
  // int32 math: a window's C * R * S values are at most 131071 (int32 accumulation's bound, checked
  // by the op: csrc/ops.cpp).
  const int channels = static_cast<int>(a.c), width = static_cast<int>(a.s);
  const int tap = value / channels;
  return {tap / width, tap % width, value - tap * channels};
}

__device__ __forceinline__ void next(const Int8ConvArgs& a, FlatCursor& at) {
  if (++at.c < a.c) return;
  at.c = 0;
  if (++at.s < a.s) return;
  at.s = 0;
  ++at.r;
}

// The word of the 4 values from `at` on (moving `at` past them) for the output whose window's
// top-left input is (ih0, iw0) in the image starting at pixel `img`: the value at (r, s, c) is x at
// (ih0 + r * dil_h, iw0 + s * dil_w, c), x_zero outside the image, and 0 past the window (where the
// weights pack as 0).
__device__ __forceinline__ int32_t flat_window_word(const Int8ConvArgs& a, int64_t img, int64_t ih0, int64_t iw0,
                                                    FlatCursor& at, uint32_t zero_byte) {
  uint32_t word = 0;
  for (int j = 0; j < 4 && at.r < a.r; ++j, next(a, at)) {
    const int64_t ih = ih0 + at.r * a.dil_h, iw = iw0 + at.s * a.dil_w;
    const bool inside = ih >= 0 && ih < a.h && iw >= 0 && iw < a.w;
    const uint32_t byte = inside ? static_cast<uint8_t>(a.x[(img + ih * a.w + iw) * a.c + at.c]) : zero_byte;
    word |= byte << (8 * j);
  }
  return static_cast<int32_t>(word);
}

// Output row m's window: the image's first pixel, and the input (ih0, iw0) of its top-left tap.
struct RowWindow {
  int64_t img, ih0, iw0;
};

__device__ __forceinline__ RowWindow row_window(const Int8ConvArgs& a, int64_t m) {
  const int64_t n = m / (a.oh * a.ow), rest = m % (a.oh * a.ow);
  return {n * a.h * a.w, (rest / a.ow) * a.stride_h - a.pad_h, (rest % a.ow) * a.stride_w - a.pad_w};
}

// The lowest output code: out_zero under a ReLU (codes below it are negative reals), else -128.
__device__ __forceinline__ int64_t output_floor(const Int8ConvArgs& a) {
  return a.relu ? max(a.out_zero, -128) : -128;
}

// The fused epilogue of csrc/int8_conv.h for output (m, k) of accumulator `acc`; both kernels call
// it, so they requantize identically.
__device__ __forceinline__ void requantize_store(const Int8ConvArgs& a, int64_t m, int64_t k, int32_t acc,
                                                 int64_t lo) {
  int64_t total = static_cast<int64_t>(acc) * a.multiplier[k] + a.offset[k];
  if (a.residual != nullptr) total += static_cast<int64_t>(a.residual[m * a.k + k]) * a.res_multiplier;
  const int64_t q = (total >> a.shift) + a.out_zero;  // arithmetic shift: floor division
  a.out[m * a.k + k] = static_cast<int8_t>(min(max(q, lo), static_cast<int64_t>(a.out_max)));
}

// ---- dp4a kernel: 64 x 64 output tile, 256 threads (4 x 4 outputs each); the reduction advances
// 64 values (16 int32 words) of a Reduction run at a time through shared memory. Words are
// assembled byte by byte, so any C (and any alignment) works. ------------------------------------

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kWords = 16;  // int32 words (4 channels each) per reduction step
constexpr int kThreads = 256;

template <bool kFlat>
__global__ void __launch_bounds__(kThreads) int8_conv_dp4a_kernel(Int8ConvArgs a) {
  __shared__ int32_t x_tile[kWords][kTileM + 1];
  __shared__ int32_t w_tile[kWords][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m_total = a.n * a.oh * a.ow;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const Reduction reduction = reduction_of<kFlat>(a);
  const int64_t words = (reduction.length + 3) / 4;
  const uint32_t zero_byte = static_cast<uint8_t>(static_cast<int8_t>(a.x_zero));
  const int32_t zero_word = static_cast<int32_t>(zero_byte * 0x01010101u);

  // Each tile row's window (image offset in pixels, top-left input), found once per block: the
  // loaders read it for every word instead of dividing m again. Past the last row: img = -1.
  __shared__ int64_t row_img[kTileM], row_ih0[kTileM], row_iw0[kTileM];
  static_assert(kThreads >= kTileM, "a thread per tile row");
  if (tid < kTileM) {
    const RowWindow window = row_window(a, m0 + tid);
    row_img[tid] = m0 + tid < m_total ? window.img : -1;
    row_ih0[tid] = window.ih0;
    row_iw0[tid] = window.iw0;
  }
  __syncthreads();

  // Loader roles: each thread loads word `load_word` of a step for tile rows (and weight columns)
  // load_row + kRowStride * i, i < kLoads.
  constexpr int kRowStride = kThreads / kWords, kLoads = kTileM / kRowStride;
  static_assert(kTileM == kTileN && kThreads % kWords == 0 && kTileM % kRowStride == 0, "loader roles");
  const int load_word = tid % kWords, load_row = tid / kWords;

  int32_t acc[4][4] = {};
  for (int64_t tap = 0; tap < reduction.taps; ++tap) {
    const int64_t r = tap / a.s, s = tap % a.s;  // (flat: the one run starts at tap 0)
    for (int64_t w0 = 0; w0 < words; w0 += kWords) {
      const int64_t c = 4 * (w0 + load_word);  // the word's first value in the run
      const bool in_run = c < reduction.length;
      const FlatCursor flat_start = kFlat && in_run ? flat_cursor_at(a, static_cast<int>(c)) : FlatCursor{};
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int row = load_row + kRowStride * i;
        const int64_t img = row_img[row], ih0 = row_ih0[row], iw0 = row_iw0[row];
        int32_t value = 0;
        if (img >= 0 && in_run) {
          if (kFlat) {
            FlatCursor at = flat_start;
            value = flat_window_word(a, img, ih0, iw0, at, zero_byte);
          } else {
            const int64_t ih = ih0 + r * a.dil_h, iw = iw0 + s * a.dil_w;
            value = (ih >= 0 && ih < a.h && iw >= 0 && iw < a.w)
                        ? pack4(a.x + (img + ih * a.w + iw) * a.c + c, a.c - c)
                        : zero_word;
          }
        }
        x_tile[load_word][row] = value;
        const int64_t k = k0 + row;  // column `row` of w_tile
        w_tile[load_word][row] =
            k < a.k && in_run ? pack4(a.weight + (k * reduction.taps + tap) * reduction.length + c, reduction.length - c)
                              : 0;
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

  const int64_t lo = output_floor(a);
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= m_total) break;
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + tx * 4 + j;
      if (k >= a.k) break;
      requantize_store(a, m, k, acc[i][j], lo);
    }
  }
}

// ---- mma kernel (IMMA, sm_80+): mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 -------------------
//
// A block computes a 128 x 64 output tile with 8 warps in a 4 (m) x 2 (k) grid, each warp 32 x 32:
// 2 x 4 mma tiles of 16 x 8, 32 int32 accumulators per thread. The reduction advances 64 values of
// a Reduction run (a tap's channels, or the flat window) at a time (16 int32 words, two k32 mma
// steps) through double-buffered shared memory:
//
//   a_tile[buffer][row][word]: input rows m0 + row, values 4 * word .. 4 * word + 3 of a step
//   b_tile[buffer][col][word]: weights of output channel k0 + col, the same values
//
// Both keep the reduction (channel) index contiguous, the order NHWC inputs and KRSC weights have
// in memory and the order one fragment register holds (4 consecutive k in one 32-bit word, lowest
// k in the low byte). Rows are padded to kMmaStride = 20 words: a warp's fragment load touches
// words 20 * g + t (g = 0..7, t = 0..3), 32 distinct banks; 20 words keep rows 16-byte aligned for
// the 128-bit tile stores.
//
// Fragments of one m16n8k32 (PTX ISA, "Matrix Fragments for mma.m16n8k32", .s8), with
// lane = threadIdx.x % 32, g = lane / 4 (groupID), t = lane % 4 (threadID_in_group):
//   A (16 x 32, row-major), 4 registers of 4 s8 (a0..a15), element i at
//       row = g for i in 0..3 and 8..11, g + 8 otherwise; col = 4 t + (i & 3) (+ 16 for i >= 8)
//     so  a[0] = A[g][4t .. 4t+3]      a[1] = A[g+8][4t .. 4t+3]
//         a[2] = A[g][16+4t .. 16+4t+3] a[3] = A[g+8][16+4t .. 16+4t+3]
//     = words  a_tile[g][t], a_tile[g+8][t], a_tile[g][t+4], a_tile[g+8][t+4]  (of the k32 step)
//   B (32 x 8, column-major), 2 registers of 4 s8 (b0..b7), element i at
//       row (k) = 4 t + (i & 3) (+ 16 for i >= 4); col (n) = g
//     so  b[0] = B[4t .. 4t+3][g]      b[1] = B[16+4t .. 16+4t+3][g]
//     = words  b_tile[g][t], b_tile[g][t+4]
//   C/D (16 x 8, s32), 4 registers c0..c3: row = g (c0, c1), g + 8 (c2, c3); col = 2 t + (i & 1).
constexpr int kMmaTileM = 128;
constexpr int kMmaTileN = 64;
constexpr int kMmaWords = 16;                // int32 words (4 channels each) per reduction step
constexpr int kMmaStride = kMmaWords + 4;    // padded row of a shared tile, in words
constexpr int kMmaThreads = 256;             // 8 warps
constexpr int kWarpM = 32, kWarpN = 32;      // one warp's tile: 2 x 4 mma tiles
static_assert(kMmaTileM * kMmaWords == kMmaThreads * 8, "a_tile loader: 8 words per thread");
static_assert(kMmaTileN * kMmaWords == kMmaThreads * 4, "b_tile loader: 4 words per thread");
static_assert((kMmaTileM / kWarpM) * (kMmaTileN / kWarpN) * 32 == kMmaThreads, "warp grid");
static_assert(kMmaStride % 4 == 0 && kMmaStride % 32 == 20, "16-byte aligned rows, conflict-free fragment loads");

// Built for an arch without s8 mma.sync (< sm_80), the helpers and the kernel body are compiled
// out (the kernel only traps; int8_conv2d_cuda never launches it there).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

// Four words (16 channels) from p, `valid` of them real channels: one 128-bit load when all 16 are
// real and p is 16-byte aligned, else word by word (4-byte loads when aligned, bytes otherwise).
__device__ __forceinline__ int4 load16(const int8_t* p, int64_t valid) {
  if (valid >= 16 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) return *reinterpret_cast<const int4*>(p);
  int32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int8_t* q = p + 4 * j;
    const int64_t left = valid - 4 * j;
    w[j] = (left >= 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) ? *reinterpret_cast<const int32_t*>(q)
                                                                      : pack4(q, left);
  }
  return make_int4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void mma_s8_m16n8k32(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(TLCORE_CUDA_EMULATION)
  emulated_mma_s8_m16n8k32(c, a, b);  // the same warp-wide operation, computed on the CPU
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif  // !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

template <bool kFlat>
__global__ void __launch_bounds__(kMmaThreads) int8_conv_mma_kernel(Int8ConvArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Two buffers: while the warps multiply one step from one, the threads hold the next step's
  // global loads in registers and then store them into the other, so a load's latency overlaps the
  // multiplies and a step takes one barrier.
  __shared__ __align__(16) int32_t a_tile[2][kMmaTileM][kMmaStride];
  __shared__ __align__(16) int32_t b_tile[2][kMmaTileN][kMmaStride];
  const int tid = threadIdx.x;
  const int64_t m_total = a.n * a.oh * a.ow;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kMmaTileM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kMmaTileN;
  const uint32_t zero_byte = static_cast<uint8_t>(static_cast<int8_t>(a.x_zero));
  const int32_t zero_word = static_cast<int32_t>(zero_byte * 0x01010101u);
  const int4 zero4 = make_int4(0, 0, 0, 0), pad4 = make_int4(zero_word, zero_word, zero_word, zero_word);

  // Loader roles. a_tile: thread -> row tid / 2, words 8 * (tid % 2) .. + 7 (32 values of the step);
  // b_tile: thread -> column tid / 4, words 4 * (tid % 4) .. + 3 (16 values).
  const int a_row = tid >> 1, a_word = (tid & 1) * 8;
  const int b_col = tid >> 2, b_word = (tid & 3) * 4;
  const int64_t am = m0 + a_row;
  const bool a_row_valid = am < m_total;
  // The row's image offset in pixels and window's top-left input; int32 coordinates (fewer
  // registers: 3 blocks an SM) as the launcher checks (mma_coordinates_fit).
  int64_t a_img = 0;
  int a_ih0 = 0, a_iw0 = 0;
  if (a_row_valid) {
    const RowWindow window = row_window(a, am);
    a_img = window.img;
    a_ih0 = static_cast<int>(window.ih0);
    a_iw0 = static_cast<int>(window.iw0);
  }
  const int64_t bk = k0 + b_col;
  const bool b_col_valid = bk < a.k;

  // MMA roles.
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wm = (warp % (kMmaTileM / kWarpM)) * kWarpM, wn = (warp / (kMmaTileM / kWarpM)) * kWarpN;

  // Steps in order: runs (taps) outer, 64 values of the run inner. The next one to load is values
  // c0 .. c0 + 63 of the current run: of tap (r, s), at input pixel (ih, iw) of this thread's row
  // (flat: the one run). Its addresses move along with it rather than being recomputed from the tap
  // every step: (ih, iw) with s, the pixel's offset in x, and the weights' run.
  const Reduction reduction = reduction_of<kFlat>(a);
  const int64_t run_steps = (reduction.length + 4 * kMmaWords - 1) / (4 * kMmaWords);
  const int64_t steps = reduction.taps * run_steps;
  int64_t s = 0, c0 = 0;
  int ih = a_ih0, iw = a_iw0;
  int64_t x_pixel = (a_img + static_cast<int64_t>(ih) * a.w + iw) * a.c;  // used only inside the image
  const int64_t next_column = a.dil_w * a.c, next_row = (a.dil_h * a.w - (a.s - 1) * a.dil_w) * a.c;
  const int8_t* w_run = a.weight + bk * reduction.taps * reduction.length;  // dereferenced only when b_col_valid
  int4 next_a[2], next_b;
  const auto load_next = [&] {
    const bool inside = a_row_valid && ih >= 0 && ih < a.h && iw >= 0 && iw < a.w;
    FlatCursor at{};
    if (a_row_valid && kFlat) at = flat_cursor_at(a, static_cast<int>(c0 + 4 * a_word));
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int64_t c = c0 + 4 * (a_word + 4 * q);
      next_a[q] = a_row_valid ? pad4 : zero4;
      if (a_row_valid && kFlat) {
        int32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = flat_window_word(a, a_img, a_ih0, a_iw0, at, zero_byte);
        next_a[q] = make_int4(w[0], w[1], w[2], w[3]);
      } else if (inside) {
        next_a[q] = load16(a.x + x_pixel + c, a.c - c);
      }
    }
    const int64_t c = c0 + 4 * b_word;
    next_b = b_col_valid ? load16(w_run + c, reduction.length - c) : zero4;
    c0 += 4 * kMmaWords;  // on to the step after
    if (kFlat || c0 < reduction.length) return;  // (flat: one run, nothing after it)
    c0 = 0;
    w_run += reduction.length;
    if (++s < a.s) {
      iw += a.dil_w, x_pixel += next_column;
    } else {
      s = 0, iw = a_iw0, ih += a.dil_h, x_pixel += next_row;
    }
  };
  const auto store_next = [&](int buffer) {
    *reinterpret_cast<int4*>(&a_tile[buffer][a_row][a_word]) = next_a[0];
    *reinterpret_cast<int4*>(&a_tile[buffer][a_row][a_word + 4]) = next_a[1];
    *reinterpret_cast<int4*>(&b_tile[buffer][b_col][b_word]) = next_b;
  };

  int32_t acc[2][4][4] = {};
  if (steps > 0) {
    load_next();
    store_next(0);
    __syncthreads();
  }
  for (int64_t step = 0; step < steps; ++step) {
    const int buffer = static_cast<int>(step & 1);
    const bool more = step + 1 < steps;
    if (more) load_next();
#pragma unroll
    for (int kw = 0; kw < kMmaWords; kw += 8) {  // two k32 steps
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = wm + 16 * i + g;
        af[i][0] = a_tile[buffer][row][kw + t];
        af[i][1] = a_tile[buffer][row + 8][kw + t];
        af[i][2] = a_tile[buffer][row][kw + 4 + t];
        af[i][3] = a_tile[buffer][row + 8][kw + 4 + t];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = wn + 8 * j + g;
        bf[j][0] = b_tile[buffer][col][kw + t];
        bf[j][1] = b_tile[buffer][col][kw + 4 + t];
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8_m16n8k32(acc[i][j], af[i], bf[j]);
      }
    }
    // The other buffer was last read in the step before, which every thread finished before the
    // barrier that ended it.
    if (more) store_next(buffer ^ 1);
    __syncthreads();
  }

  const int64_t lo = output_floor(a);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // c0, c1: row g; c2, c3: row g + 8
      const int64_t m = m0 + wm + 16 * i + 8 * h + g;
      if (m >= m_total) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t k = k0 + wn + 8 * j + 2 * t + e;
          if (k < a.k) requantize_store(a, m, k, acc[i][j][2 * h + e], lo);
        }
      }
    }
  }
#else
  __trap();  // built for an arch without s8 mma.sync: int8_conv2d_cuda never launches this
#endif
}


// Whether the mma kernel's int32 input coordinates hold every (ih, iw) it visits: from -pad to
// below h + pad (the last window ends by h + pad - 1), and one tap row or column past a window
// after its last step. Only absurd padding or dilation (or sides of 2**31 pixels) fail it; the
// launcher runs those on dp4a.
inline bool mma_coordinates_fit(const Int8ConvArgs& a) {
  constexpr int64_t kMax = 0x7fffffff;
  return a.h + a.pad_h + a.dil_h <= kMax && a.w + a.pad_w + a.dil_w <= kMax;
}

// The kernel a launch of the mma or the dp4a kind runs for this conv, its threads a block and its
// grid (a block per output tile); the launcher and tests/cuda_emulation both launch from it.
struct Int8ConvLaunch {
  void (*kernel)(Int8ConvArgs);
  int threads;
  dim3 grid;
};

inline Int8ConvLaunch int8_conv_launch(const Int8ConvArgs& a, bool mma) {
  const int64_t m_total = a.n * a.oh * a.ow;
  const int64_t tile_m = mma ? kMmaTileM : kTileM, tile_n = mma ? kMmaTileN : kTileN;
  const dim3 grid(static_cast<unsigned>((m_total + tile_m - 1) / tile_m), static_cast<unsigned>((a.k + tile_n - 1) / tile_n));
  const bool flat = flat_reduction(a);
  if (mma) return {flat ? int8_conv_mma_kernel<true> : int8_conv_mma_kernel<false>, kMmaThreads, grid};
  return {flat ? int8_conv_dp4a_kernel<true> : int8_conv_dp4a_kernel<false>, kThreads, grid};
}

}  // namespace
}  // namespace tlcore
