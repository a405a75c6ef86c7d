// Runs tlcore's CUDA kernel sources on the CPU, so that CI (no GPU) checks what they compute.
//
// Include this, then the kernel header, in one C++20 translation unit. A launch runs the grid's
// blocks one after another; a block runs one std::thread per CUDA thread, so __syncthreads is a
// barrier and __shared__ arrays are the kernel's function statics (one block at a time). The
// device intrinsics the kernels use are computed from their definitions in the PTX ISA:
// __dp4a and mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (warp-wide: every lane hands in its
// fragments, then each computes its own accumulators from the whole warp's).
//
// What this cannot check: timing, memory coalescing, bank conflicts, or code that behaves
// differently under nvcc; tests/test_cuda_kernel_compile.py checks the nvcc build.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#define TLCORE_CUDA_EMULATION 1
#define __CUDA_ARCH__ 800  // compile the sm_80+ kernel bodies
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace cuda_emulation {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};

inline dim3 block_index;
inline thread_local dim3 thread_index;
inline std::barrier<>* block_barrier = nullptr;
inline std::unique_ptr<std::barrier<>> warp_barriers[kMaxWarps];
// Two slots, used by alternate mma calls: a lane can hand in call n + 1's operands while slower
// lanes still read call n's, and cannot reach call n + 2 before all have passed call n + 1's barrier.
inline MmaOperands staged[2][kMaxWarps][kWarp];
inline thread_local unsigned mma_calls = 0;
inline std::atomic<int64_t> warp_mma_count{0};  // mma.sync operations (one per warp and call) since launch()

// Runs kernel() for every block of `grid` with `threads` threads a block (a multiple of 32).
template <class Kernel>
void launch(dim3 grid, int threads, Kernel kernel) {
  if (threads % kWarp != 0 || threads / kWarp > kMaxWarps) std::abort();
  warp_mma_count = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        block_index = dim3(x, y, z);
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        for (int w = 0; w < threads / kWarp; ++w) warp_barriers[w] = std::make_unique<std::barrier<>>(kWarp);
        std::vector<std::thread> block;
        for (int t = 0; t < threads; ++t) {
          block.emplace_back([t, &kernel] {
            thread_index = dim3(static_cast<unsigned>(t));
            mma_calls = 0;
            kernel();
          });
        }
        for (auto& thread : block) thread.join();
      }
    }
  }
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index)
#define blockIdx (::cuda_emulation::block_index)

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "cuda_emulation: a kernel trapped\n");
  std::abort();
}

// The sum of the four signed byte products of a and b, plus c (int32, wrapping).
inline int __dp4a(int a, int b, int c) {
  uint32_t sum = static_cast<uint32_t>(c);
  for (int j = 0; j < 4; ++j) {
    sum += static_cast<uint32_t>(static_cast<int8_t>(a >> (8 * j)) * static_cast<int8_t>(b >> (8 * j)));
  }
  return static_cast<int>(sum);
}

// D = A (16 x 32, s8, row) x B (32 x 8, s8, col) + C (16 x 8, s32) for one warp. Fragments (PTX ISA,
// "Matrix Fragments for mma.m16n8k32"), lane = 4 g + t:
//   A: register q of lane (g, t) holds row g + 8 (q & 1), columns 16 (q >> 1) + 4 t + 0..3 (byte order)
//   B: register q holds column g, rows 16 q + 4 t + 0..3
//   C: c[e] is row g + 8 (e >> 1), column 2 t + (e & 1)
inline void emulated_mma_s8_m16n8k32(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace cuda_emulation;
  const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;
  MmaOperands(&warp_operands)[kWarp] = staged[mma_calls++ % 2][warp];
  for (int q = 0; q < 4; ++q) warp_operands[lane].a[q] = a[q];
  for (int q = 0; q < 2; ++q) warp_operands[lane].b[q] = b[q];
  if (lane == 0) ++warp_mma_count;
  warp_barriers[warp]->arrive_and_wait();
  const auto byte = [](uint32_t word, int j) { return static_cast<int32_t>(static_cast<int8_t>(word >> (8 * j))); };
  const auto a_at = [&](int row, int col) {
    return byte(warp_operands[4 * (row % 8) + (col % 16) / 4].a[(row / 8) + 2 * (col / 16)], col % 4);
  };
  const auto b_at = [&](int row, int col) {
    return byte(warp_operands[4 * col + (row % 16) / 4].b[row / 16], row % 4);
  };
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    uint32_t sum = static_cast<uint32_t>(c[e]);
    for (int kk = 0; kk < 32; ++kk) sum += static_cast<uint32_t>(a_at(row, kk) * b_at(kk, col));
    c[e] = static_cast<int32_t>(sum);
  }
}
