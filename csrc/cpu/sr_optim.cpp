// CPU kernels of the stochastic-rounding AdamW / SGD step (csrc/sr_optim.h holds the math).
//
// Bit-identical to the Triton and CUDA kernels: same Philox stream, same operation
// order, IEEE fp32 (x86-64 SSE, no FTZ) and no contraction of a*b+c into an FMA.
// The element loop is instantiated per (param, state) format: no per-element dispatch.
// (It stays scalar: Philox's 32x32->64-bit products and sqrt's errno path keep GCC's
// SSE2 baseline from vectorising it; ~30 ns per element on one core.)
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
}  // namespace

void sr_adamw_cpu(const sr::Slot* slots, const float* hyper, int64_t count, int64_t param_format,
                  int64_t state_format, uint64_t seed, bool stochastic) {
  const bool known = sr::dispatch_formats(param_format, state_format, [&]<int64_t P, int64_t S>() {
    for_each_element(slots, count, [&](const sr::Slot& slot, int64_t t, int64_t begin, int64_t end) {
      const float* h = hyper + t * sr::kHyperColumns;
      for (int64_t i = begin; i < end; ++i) sr::adamw_element<P, S>(slot, h, i, seed, stochastic);
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
        for (int64_t i = begin; i < end; ++i) sr::sgd_element<P, S, Momentum, Nesterov>(slot, h, i, seed, stochastic);
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
