// Internals shared by the C++ CPU int8 convolutions: the direct implicit GEMM (int8_conv.cpp, with
// the split codes of int8_split.cpp and the AMX tiles of int8_amx.cpp) and the Winograd one
// (int8_winograd.cpp). Public entry points: csrc/int8_conv.h.
#pragma once

#include "int8_conv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TLCORE_X86 1  // the SIMD kernels' builds
#endif

namespace tlcore {
namespace int8_cpu {

constexpr int kTileM = 6;    // rows (output pixels, or Winograd tiles) per micro-tile
constexpr int kTileN = 16;   // output channels per packed weight block
constexpr int64_t kL2Bytes = 256 * 1024;  // a conservative per-core L2 size

constexpr int64_t kHeaderWords = 16;  // packed weights start with (magic, layout, K, C, R, S, G), 64 B aligned
constexpr int32_t kPackedMagic = 0x38746c63;  // "clt8"

// Runs tasks 0 .. count - 1 on at::get_num_threads() threads: worker(tasks) runs once per thread and
// loops `for (int64_t task; tasks.next(task);)`. Threads claim runs of consecutive tasks from a shared
// counter, each run a share of the tasks left (guided scheduling: long runs first, single tasks at the
// end), so a thread that finishes early takes more instead of waiting at the end of the region, while
// consecutive tasks (a chunk of rows, a weight block) mostly stay on one thread. With at::parallel_for's
// static halves, whose tasks differ in cost (a short last chunk, conversions), the second thread waited
// 14% of ResNet-50's int8 forward at batch 8 and 32% at batch 1 (AVX2, 2 threads, perf); with claimed
// runs 5% and 17% (mostly while the first one runs the Python between convs), and the forward ran
// 1.06-1.14x as fast (in-process A/B; AVX512-VNNI 1.05-1.13x, AMX 1.08x at batch 8, 0.97-0.99x at batch 1).
class ClaimedTasks {
 public:
  ClaimedTasks(std::atomic<int64_t>& shared, int64_t count, int64_t threads)
      : shared_(shared), count_(count), threads_(threads) {}
  bool next(int64_t& task) {
    if (task_ + 1 < end_) {
      task = ++task_;
      return true;
    }
    int64_t start = shared_.load(std::memory_order_relaxed);
    while (start < count_) {
      const int64_t run = std::max<int64_t>(1, (count_ - start) / (2 * threads_));
      if (shared_.compare_exchange_weak(start, start + run, std::memory_order_relaxed)) {
        task = task_ = start;
        end_ = start + run;
        return true;
      }
    }
    return false;
  }

 private:
  std::atomic<int64_t>& shared_;
  const int64_t count_, threads_;
  int64_t task_ = 0, end_ = 0;  // this thread's run: the current task, one past its last
};

template <class Worker>
void parallel_tasks(int64_t count, const Worker& worker) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  std::atomic<int64_t> shared{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) {
      ClaimedTasks tasks(shared, count, threads);
      worker(tasks);
    }
  });
}

// How a packed weight and the padded input group channels into 4-byte words (int8_conv.cpp).
// kAmxQuads: kQuads with each block's (tap, group) rows padded to whole AMX steps (int8_amx.cpp).
// kSplitQuads: kQuads of the (K, 1, 1, R S C) weight followed by its int16 weight table (int8_split.cpp);
// the header keeps (K, C, R, S).
enum class Layout : int32_t {
  kPairs = 1, kQuads = 2, kWinogradPairs = 3, kRowPairs = 4, kWinograd24Pairs = 5, kWinogradStrideTwoPairs = 6,
  kAmxQuads = 7, kSplitQuads = 8, kWinograd44Pairs = 9
};

// One micro-tile's operands; every pointer and offset counts 4-byte groups.
struct Tile {
  const int32_t* rows[kTileM];  // each row's first group (an output pixel's tap (0, 0), or a Winograd tile)
  const int32_t* weight;        // the packed block of this tile's 16 channels
  const int64_t* tap_offsets;   // offsets of the taps from a row pointer
  int64_t taps, groups;         // taps, groups per tap
  const int32_t* correction;    // quads layouts: the block's 16 values of 128 * sum(w), subtracted; else nullptr
  // Where the accumulators start instead of at -correction (the split algorithm): row i's 16 values
  // at starts + i * start_stride; nullptr: not used.
  const int32_t* starts = nullptr;
  int64_t start_stride = 0;
  int count = kTileM;           // rows computed (1 .. kTileM); acc rows past it are left unwritten
  // Narrow groups (int8_conv.cpp's ChannelWindows::narrow): channel j of the block reads the
  // `groups` words of its own conv group, which start (j / channels a group) * groups words past the
  // row pointers; otherwise every channel reads the same `groups` words from the row pointers.
  bool narrow = false;
};

// acc[i][j] = sum over taps and groups of rows[i] . weight (the layout's dot product) - correction[j] (or
// + starts[i * start_stride + j]), int32, for i < count.
using TileFn = void (*)(const Tile&, int32_t (*acc)[kTileN]);

// The fused requantize epilogue of int8_conv.h on `rows` rows of acc: row i is output pixel m[i],
// the columns are output channels k0 .. k0 + 15 (fewer at the end of K).
using EpilogueFn = void (*)(const Int8ConvArgs&, const int32_t (*acc)[kTileN], const int64_t* m, int rows,
                            int64_t k0);

// Asks for the residual bytes of output pixels m0 .. m0 + rows - 1, channels k0 .. k0 + 15, before a
// tile's products, so that they arrive while it runs. The kernels call it for pointwise convs only:
// there a short reduction leaves the epilogue waiting on the residual's loads (ResNet-50's 64- and
// 128-channel 1x1 convs with their residual, batch 8: 0.96-1.18x as fast on AVX2, AVX-512 VNNI and
// AMX, the most while the VM's memory was slow), while its 256- and 512-channel ones and 3x3 convs,
// direct or Winograd, measured no faster.
inline void prefetch_residual(const Int8ConvArgs& a, int64_t m0, int64_t rows, int64_t k0) {
#ifdef TLCORE_X86
  if (a.residual == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(a.residual + (m0 + i) * a.k + k0), _MM_HINT_T0);
  }
#endif
}

// The output rows' first lines from column k0 (one per row: a tile's block or pair of blocks), into L1
// before the epilogue stores to them: each store to a line not in cache waits on its read from DRAM.
inline void prefetch_output(const Int8ConvArgs& a, int64_t m0, int64_t rows, int64_t k0) {
#ifdef TLCORE_X86
  for (int64_t i = 0; i < rows; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(a.out + (m0 + i) * a.k + k0), _MM_HINT_T0);
  }
#endif
}

TileFn pairs_tile_fn(Int8Isa isa);        // the int16-pairs micro-kernel of `isa` (vpmaddwd, or scalar)
EpilogueFn epilogue_fn(Int8Isa isa, const Int8ConvArgs& a);  // the fastest exact one for a

// (N, H, W, C) int8 -> (N, hp, wp, groups) int32 words of the layout (int16 pairs, or quads of
// u = x + 128): pixel (y, x) lands at (y + pad_h, x + pad_w); everything else (the padding, and
// any extra rows/columns below and to the right) holds x_zero; channels past C are 0. With
// `seven_bit` (the avx2u7 kernel, whose caller checks x_zero), throws unless every code is <= -1.
// tail_words: zero words after the last pixel (for readers that run past it).
std::unique_ptr<int32_t[]> pad_input(const Int8ConvArgs& a, Layout layout, int64_t hp, int64_t wp, int64_t groups,
                                     bool seven_bit, int64_t tail_words = 0);

// The input pixels of output pixels first .. first + count - 1 of a pointwise (1x1, unpadded) conv,
// converted to the layout: (count, groups) words. Returns whether a code was >= 0 (quads).
bool convert_pointwise_rows(const Int8ConvArgs& a, Layout layout, int64_t groups, int64_t first, int64_t count,
                            int32_t* dst);

// The direct algorithm's packed weights (int8_conv.cpp): blocks of 16 output channels, each
// block_rows(layout, taps * groups) rows of 16 words ([tap][group][16 channels]), then for the
// quads layouts the 16 values of 128 * sum(w) per block.
int64_t block_rows(Layout layout, int64_t reduction_words);
int64_t direct_packed_words(int64_t k, int64_t c, int64_t r, int64_t s, Layout layout, int64_t conv_groups = 1);
void pack_direct_weight(const int8_t* weight, int64_t k, int64_t c, int64_t r, int64_t s, Layout layout,
                        int32_t* packed, int64_t conv_groups = 1);

// Writes the packed-weight header.
void write_header(int32_t* packed, Layout layout, int64_t k, int64_t c, int64_t r, int64_t s,
                  int64_t conv_groups = 1);
bool header_matches(const int32_t* packed, Layout layout, int64_t k, int64_t c, int64_t r, int64_t s,
                    int64_t conv_groups = 1);

// ---- The split algorithm's input and top-bit products (int8_split.cpp) ----

// The int16 weight table of a (K, 1, 1, C) weight: C rows of K rounded up to whole blocks of 16
// (0 past K), row c the weights of input channel c. split_table_words: its size in words. (A (K, R, S, C)
// weight is packed as the (K, 1, 1, R S C) one, a grouped (K, R, S, C / G) one as (K, 1, 1, R S C / G): row c
// then holds each output channel's weight of channel c of its own group.)
int64_t split_table_words(int64_t k, int64_t c);
void pack_split_table(const int8_t* weight, int64_t k, int64_t c, int32_t* table);

// A chunk of a conv's output pixels with their input pixels (all their taps') converted for the split
// algorithm: `words` (rows, groups) quads of the codes t the micro-kernel multiplies (0 past R S C; none for a
// grouped conv, whose tiles read its SplitInput),
// `top` (rows, K rounded up to blocks) int32, the listed table rows' sum in its unit - 128 * the sum of all of them:
// where the accumulators start (Tile::starts), and `lanes` (rows): whether a row's codes are for
// split_tile (else for the 7-bit quads kernel, tile_avx2u7). See int8_split.cpp.
struct SplitChunk {
  int32_t* words;
  int32_t* top;
  bool* lanes;
};

// Room for `rows` converted pixels; at(row): the SplitChunk that starts at pixel `row`.
class SplitBuffers {
 public:
  SplitBuffers(int64_t rows, int64_t groups, int64_t k_blocks);
  SplitChunk at(int64_t row) const;

 private:
  int64_t groups_, top_words_;
  std::unique_ptr<int32_t[]> words_, top_;
  std::unique_ptr<bool[]> lanes_;
};

// Output pixels first .. first + count - 1 of an ungrouped conv (any kernel, stride, padding and dilation:
// taps in the padding read x_zero; C % 8 == 0 where R S > 1) into `chunk`. border: C codes of x_zero;
// table: split_table's, past the packed header; correction: the quads' 128 * sum(w) of every block.
void convert_split_rows(const Int8ConvArgs& a, int64_t groups, const int8_t* border, const int16_t* table,
                        const int32_t* correction, int64_t first, int64_t count, const SplitChunk& chunk);

// A grouped conv's input for the split algorithm (C / G and K / G multiples of 16, C <= 32768), converted
// once: `words` (N, hp, wp, C / 4) quads of codes t, the padding converted from x_zero (hp = H + 2 pad_h);
// `rows` (N hp) the channels each padded row's pixels listed, and `lanes`: split_tile's rule for all of
// them (else the pairs', for the 7-bit quads kernel).
struct SplitInput {
  struct RowLists {
    // pixel by pixel: group << 16 | channel within the group << 1 | doubled (else single)
    std::vector<uint32_t> entries;
    std::vector<uint32_t> starts;  // (wp + 1): where pixel x's entries start; each run ends where the next starts
  };
  std::unique_ptr<int32_t[]> words;
  std::vector<RowLists> rows;
  bool lanes = true;
};
SplitInput convert_split_input(const Int8ConvArgs& a, int64_t wp, const int8_t* border);

// The top sums of output pixels first .. first + count - 1 of a grouped conv (SplitChunk::top and lanes;
// its words are not used: the tiles read `input`): each tap's listed channels add their table rows (tap *
// C / G + the channel within the group) to their group's K / G values.
void grouped_split_tops(const Int8ConvArgs& a, const SplitInput& input, const int16_t* table,
                        const int32_t* correction, int64_t first, int64_t count, const SplitChunk& chunk);

// The split algorithm's micro-kernel on rows converted for it (SplitChunk::lanes, SplitInput::lanes; starts
// set; `groups` even where taps > 1): per int16 lane the products of two quads (vpmaddubsw twice, vpaddw),
// then one vpmaddwd + vpaddd: 5 instructions per 64 products.
void split_tile(const Tile& t, int32_t (*acc)[kTileN]);

// ---- AMX (int8_amx.cpp) ----

constexpr int64_t kAmxStepWords = 16;  // one TDPBUSD step reduces 16 words (64 channels) per row
bool amx_supported();                  // the CPU has AMX-INT8 and AVX-512, and Linux lets this process use it
void int8_conv2d_amx(const Int8ConvArgs& a);  // the direct algorithm on AMX tiles (conv_groups 1)

// ---- Winograd F(4x4, 3x3), F(2x4, 3x3) and F(2x2, 3x3), and the stride-2 one (int8_winograd.cpp) ----

bool winograd_supported(int64_t c, int64_t r, int64_t s, int64_t stride_h, int64_t stride_w, int64_t dil_h,
                        int64_t dil_w, Int8Isa isa);  // isa resolved; stride 1 or 2

int64_t winograd_packed_words(int64_t k, int64_t c, bool stride_two);
void pack_winograd_weight(const int8_t* weight, int64_t k, int64_t c, bool stride_two, int32_t* packed);
void int8_conv2d_winograd(const Int8ConvArgs& a, Int8Isa isa);

}  // namespace int8_cpu
}  // namespace tlcore
