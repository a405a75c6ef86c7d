// Runs tlcore's CUDA kernel sources on the CPU, so that CI (no GPU) checks what they compute.
//
// Include this, then the kernel header, in one C++20 translation unit. A launch runs the grid's
// blocks one after another; a block runs one std::thread per CUDA thread, so __syncthreads is a
// barrier and __shared__ arrays are the kernel's function statics (one block at a time). The
// device intrinsics the kernels use are computed from their definitions in the PTX ISA:
// __dp4a and mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (warp-wide: every lane hands in its
// fragments, then each computes its own accumulators from the whole warp's).
//
// What this cannot check: speed, coalescing, bank conflicts, or code nvcc compiles differently
// from g++ (tests/test_cuda_kernel_compile.py checks the nvcc build). Nor, reliably: races (the
// threads interleave however the OS schedules them; build with -fsanitize=thread to look for
// them), reads of shared memory no thread wrote (it starts zeroed, then holds the previous
// block's values), or out-of-bounds global reads (they do not fault; use -fsanitize=address).
// Threads that diverge around a barrier abort the process after kBarrierTimeout instead of
// hanging it. Not reentrant: one launch at a time per process.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
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
constexpr std::chrono::seconds kBarrierTimeout{120};

// A reusable barrier for `count` threads that aborts, naming itself, when they do not all arrive.
class Barrier {
 public:
  Barrier(int count, const char* name) : count_(count), name_(name) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    if (!released_.wait_for(lock, kBarrierTimeout, [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "cuda_emulation: %s: %d of %d threads arrived (diverged around it?)\n", name_, arrived_,
                   count_);
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const int count_;
  const char* const name_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};

// What a launch ran, summed over its threads after each block: mma.sync operations (one per warp
// and call) and __dp4a calls (one per thread and call).
struct Counts {
  int64_t warp_mma = 0, dp4a = 0;
};

inline dim3 block_index;
inline thread_local dim3 thread_index;
inline Barrier* block_barrier = nullptr;
inline std::unique_ptr<Barrier> warp_barriers[kMaxWarps];
// Two slots, used by alternate mma calls: a lane can hand in call n + 1's operands while slower
// lanes still read call n's, and cannot reach call n + 2 before all have passed call n + 1's barrier.
inline MmaOperands staged[2][kMaxWarps][kWarp];
inline thread_local Counts thread_counts;
inline thread_local unsigned mma_calls = 0;  // the thread's mma calls in its block: the staging slot

// Runs kernel() for every block of `grid` with `threads` threads a block (a multiple of 32);
// returns what the threads ran.
template <class Kernel>
Counts launch(dim3 grid, int threads, Kernel kernel) {
  if (threads % kWarp != 0 || threads / kWarp > kMaxWarps) std::abort();
  Counts total;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        block_index = dim3(x, y, z);
        Barrier barrier(threads, "__syncthreads");
        block_barrier = &barrier;
        for (int w = 0; w < threads / kWarp; ++w) warp_barriers[w] = std::make_unique<Barrier>(kWarp, "mma.sync");
        std::vector<Counts> counts(static_cast<size_t>(threads));
        std::vector<std::thread> block;
        for (int t = 0; t < threads; ++t) {
          block.emplace_back([t, &kernel, &counts] {
            thread_index = dim3(static_cast<unsigned>(t));
            thread_counts = Counts{};
            mma_calls = 0;
            kernel();
            counts[static_cast<size_t>(t)] = thread_counts;
          });
        }
        for (auto& thread : block) thread.join();
        for (const Counts& c : counts) total.warp_mma += c.warp_mma, total.dp4a += c.dp4a;
      }
    }
  }
  return total;
}

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index)
#define blockIdx (::cuda_emulation::block_index)

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "cuda_emulation: a kernel trapped\n");
  std::abort();
}

// dp4a: c plus the sum of the four byte products of a and b, int32 wrapping; CUDA's overloads are
// signed x signed (dp4a.s32.s32) for int and unsigned x unsigned (dp4a.u32.u32) for unsigned.
template <class Byte, class Word>
inline Word dp4a_bytes(Word a, Word b, Word c) {
  ++cuda_emulation::thread_counts.dp4a;
  uint32_t sum = static_cast<uint32_t>(c);
  for (int j = 0; j < 4; ++j) {
    const int32_t product = static_cast<Byte>(a >> (8 * j)) * static_cast<Byte>(b >> (8 * j));
    sum += static_cast<uint32_t>(product);
  }
  return static_cast<Word>(sum);
}
inline int __dp4a(int a, int b, int c) { return dp4a_bytes<int8_t>(a, b, c); }
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) { return dp4a_bytes<uint8_t>(a, b, c); }

// D = A (16 x 32, s8, row) x B (32 x 8, s8, col) + C (16 x 8, s32) for one warp. Fragments (PTX ISA,
// "Matrix Fragments for mma.m16n8k32"), lane = 4 g + t:
//   A: register q of lane (g, t) holds row g + 8 (q & 1), columns 16 (q >> 1) + 4 t + 0..3 (byte order)
//   B: register q holds column g, rows 16 q + 4 t + 0..3
//   C: c[e] is row g + 8 (e >> 1), column 2 t + (e & 1)
inline void emulated_mma_s8_m16n8k32(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace cuda_emulation;
  const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;
  if (lane == 0) ++thread_counts.warp_mma;
  MmaOperands(&warp_operands)[kWarp] = staged[mma_calls++ % 2][warp];
  for (int q = 0; q < 4; ++q) warp_operands[lane].a[q] = a[q];
  for (int q = 0; q < 2; ++q) warp_operands[lane].b[q] = b[q];
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
