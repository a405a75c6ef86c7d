// CUDA kernels of the stochastic-rounding AdamW / SGD step, multi-tensor-apply style
// (after apex's multi_tensor_apply): one launch covers every tensor of a (dtype, state
// dtype) group; block b works on chunk b, a (slot, first element) pair from a table.
// The per-element math is csrc/sr_optim.h, shared with the CPU kernels, using
// __f*_rn intrinsics so nvcc cannot contract it into FMAs (bit-identical to the CPU).
#include <cuda_runtime.h>

#include <cstdint>

#include "sr_optim.h"

namespace tlcore {
namespace {
constexpr int kThreads = 256;

// The chunk of block blockIdx.x: its slot and element range [first, end).
struct Chunk {
  int64_t t, first, end;
};

__device__ __forceinline__ Chunk block_chunk(const sr::Slot* slots, const int64_t* chunks, int64_t chunk_size) {
  const int64_t t = chunks[2 * blockIdx.x];
  const int64_t first = chunks[2 * blockIdx.x + 1];
  const int64_t numel = slots[t].numel;
  return {t, first, first + chunk_size < numel ? first + chunk_size : numel};
}

template <int64_t P, int64_t S>
__global__ void sr_adamw_kernel(const sr::Slot* slots, const float* hyper, const int64_t* chunks, int64_t chunk_size,
                                uint64_t seed, bool stochastic) {
  const Chunk c = block_chunk(slots, chunks, chunk_size);
  const sr::Slot slot = slots[c.t];
  const float* h = hyper + c.t * sr::kHyperColumns;
  for (int64_t i = c.first + threadIdx.x; i < c.end; i += blockDim.x) {
    sr::adamw_element<P, S>(slot, h, i, seed, stochastic);
  }
}

template <int64_t P, int64_t S, bool Momentum, bool Nesterov>
__global__ void sr_sgd_kernel(const sr::Slot* slots, const float* hyper, const int64_t* chunks, int64_t chunk_size,
                              uint64_t seed, bool stochastic) {
  const Chunk c = block_chunk(slots, chunks, chunk_size);
  const sr::Slot slot = slots[c.t];
  const float* h = hyper + c.t * sr::kHyperColumns;
  for (int64_t i = c.first + threadIdx.x; i < c.end; i += blockDim.x) {
    sr::sgd_element<P, S, Momentum, Nesterov>(slot, h, i, seed, stochastic);
  }
}

struct LaunchAdamW {
  const sr::Slot* slots;
  const float* hyper;
  const int64_t* chunks;
  int64_t num_chunks, chunk_size;
  uint64_t seed;
  bool stochastic;
  cudaStream_t stream;
  template <int64_t P, int64_t S>
  void operator()() const {
    sr_adamw_kernel<P, S><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(slots, hyper, chunks,
                                                                                      chunk_size, seed, stochastic);
  }
};

struct LaunchSgd {
  const sr::Slot* slots;
  const float* hyper;
  const int64_t* chunks;
  int64_t num_chunks, chunk_size;
  bool momentum, nesterov;
  uint64_t seed;
  bool stochastic;
  cudaStream_t stream;
  template <int64_t P, int64_t S, bool Momentum, bool Nesterov>
  void launch() const {
    sr_sgd_kernel<P, S, Momentum, Nesterov><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
        slots, hyper, chunks, chunk_size, seed, stochastic);
  }
  template <int64_t P, int64_t S>
  void operator()() const {
    if (!momentum) {
      launch<P, S, false, false>();
    } else if (nesterov) {
      launch<P, S, true, true>();
    } else {
      launch<P, S, true, false>();
    }
  }
};
}  // namespace

bool sr_adamw_cuda(const sr::Slot* slots, const float* hyper, const int64_t* chunks, int64_t num_chunks,
                   int64_t chunk_size, int64_t param_format, int64_t state_format, uint64_t seed, bool stochastic,
                   void* stream) {
  if (num_chunks == 0) return true;
  return sr::dispatch_formats(param_format, state_format,
                              LaunchAdamW{slots, hyper, chunks, num_chunks, chunk_size, seed, stochastic,
                                          static_cast<cudaStream_t>(stream)});
}

bool sr_sgd_cuda(const sr::Slot* slots, const float* hyper, const int64_t* chunks, int64_t num_chunks,
                 int64_t chunk_size, int64_t param_format, int64_t state_format, bool momentum, bool nesterov,
                 uint64_t seed, bool stochastic, void* stream) {
  if (num_chunks == 0) return true;
  return sr::dispatch_formats(param_format, state_format,
                              LaunchSgd{slots, hyper, chunks, num_chunks, chunk_size, momentum, nesterov, seed,
                                        stochastic, static_cast<cudaStream_t>(stream)});
}

}  // namespace tlcore
