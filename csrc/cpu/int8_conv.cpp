// C++ CPU kernel of tlcore's int8 convolution: an implicit GEMM over NHWC int8 with the
// fused requantize epilogue (the integer math is in csrc/int8_conv.h).
//
// Exactness. AVX2's vpmaddubsw (u8 x s8) adds two products into a *saturating* int16
// (255 * 127 * 2 > 32767), which is why torch.ao's x86 backend keeps activations to 7 bits
// (reduce_range). Two exact layouts are used instead, both in 4-byte groups of one pixel:
//   pairs (scalar, AVX2): 2 channels sign-extended to int16, multiplied by vpmaddwd (s16 x s16,
//     pairs summed into int32; |pair| <= 2 * 128 * 127, nothing saturates).
//   quads (AVX-VNNI, AVX512-VNNI): 4 channels as uint8 u = x + 128, multiplied by vpdpbusd
//     (u8 x s8, 4 products summed straight into int32, no 16-bit step); the extra
//     128 * sum(w[k]) is subtracted from the accumulator before the epilogue.
// Either way activations keep all 8 bits. The one inexact-prone instruction is used only where
// it is exact: kAvx2U7 runs the quads layout on AVX2's vpmaddubsw when every input code is <= -1
// (u <= 127, checked), so a pair sums to at most 2 * 127 * 127 = 32258 < 32767 -- the 7-bit
// activations of torch.ao's reduce_range, chosen by the model (tlcore.quantize(reduce_range=True)).
// The split algorithm (int8_split.cpp, kAvx2 and kAvx2U7; 1x1 convs, and larger kernels on rows of
// their taps' codes) runs vpmaddubsw on 8-bit codes too, bounding the codes' sum per int16 lane
// itself (so it checks nothing).
//
// Layout. The input is copied once into a buffer of groups with the spatial padding written
// out (x_zero) and channels padded to the group size (met by zero weights), so the inner loop
// has no bounds checks. Weights are packed per block of 16 output channels as
// [tap][group][16 channels] 4-byte words: one multiply-add of a broadcast input group with two
// ymm of weights gives partial sums for 16 channels. The register tile is 6 output pixels x 16
// channels = 12 ymm accumulators, the outer-product micro-kernel of BLIS (Van Zee & van de
// Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS Functionality"). AVX512-VNNI has its
// own 512-bit kernel over the same packed layout (tile_avx512vnni_zmm): a block's group of 16
// words is one zmm, and a tile covers two blocks (12 pixels x 32 channels, 24 zmm accumulators).
#include "cpu/int8_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tlcore {
namespace int8_cpu {
namespace {

constexpr int kChunkM = 8;   // micro-tiles per parallel task: one packed block stays hot in L2
// The micro-kernels prefetch the packed weights this far ahead (4 KB): a block streams through
// once per tile, from L2 or, for the big layers at batch 1, from DRAM. 4 KB ran ResNet-18's int8
// forward 10-15% faster than no prefetch at batch 1 and 8 (AVX2, AMD EPYC; 1-8 KB within noise).
constexpr int64_t kPrefetchWords = 1024;
// The AVX512-VNNI zmm kernel's micro-tile: 12 rows x 32 channels = 24 zmm accumulators. 6, 8 and
// 12 rows ran within noise of each other on ResNet-18 layers (AMD EPYC, 1 thread); 12 halves the
// weight loads of 6.
constexpr int kZmmTileM = 2 * kTileM;
constexpr int kZmmChunkM = kChunkM * kTileM / kZmmTileM;  // its tiles per task: the same 48 rows

// The direct algorithm's layout: AMX packs ungrouped convs for its tiles; its grouped ones run the
// AVX512-VNNI kernel.
Layout layout_for(Int8Isa isa, int64_t conv_groups = 1) {
  if (isa == Int8Isa::kAvx2 || isa == Int8Isa::kScalar) return Layout::kPairs;
  return isa == Int8Isa::kAmx && conv_groups == 1 ? Layout::kAmxQuads : Layout::kQuads;
}

bool is_quads(Layout layout) {
  return layout == Layout::kQuads || layout == Layout::kAmxQuads || layout == Layout::kSplitQuads;
}

int64_t group_size(Layout layout) { return is_quads(layout) ? 4 : 2; }

// The pairs layout in plain C++ (the reference-speed fallback of every CPU).
void tile_scalar(const Tile& t, int32_t (*acc)[kTileN]) {
  for (int i = 0; i < t.count; ++i) {
    for (int j = 0; j < kTileN; ++j) {
      acc[i][j] = t.starts != nullptr ? t.starts[i * t.start_stride + j] : t.correction == nullptr ? 0 : -t.correction[j];
    }
  }
  // Where channel j's words start past the row pointers: narrow groups of 2 * groups channels
  // (pairs) start `groups` words apart; otherwise every channel reads the same words.
  int64_t group_start[kTileN];
  for (int j = 0; j < kTileN; ++j) group_start[j] = t.narrow ? j / (2 * t.groups) * t.groups : 0;
  const int32_t* b = t.weight;
  for (int64_t tap = 0; tap < t.taps; ++tap) {
    for (int64_t g = 0; g < t.groups; ++g, b += kTileN) {
      int16_t w[kTileN][2];
      std::memcpy(w, b, sizeof(w));
      for (int i = 0; i < t.count; ++i) {
        for (int j = 0; j < kTileN; ++j) {
          int16_t x[2];
          std::memcpy(x, t.rows[i] + t.tap_offsets[tap] + group_start[j] + g, sizeof(x));
          // Wrapping sums (unsigned), like vpaddd: Winograd's position sums may wrap (int8_winograd.cpp).
          acc[i][j] = static_cast<int32_t>(static_cast<uint32_t>(acc[i][j]) +
                                           static_cast<uint32_t>(x[0] * w[j][0] + x[1] * w[j][1]));
        }
      }
    }
  }
}

#ifdef TLCORE_X86
__attribute__((target("avx2"))) inline __m256i madd_pairs_avx2(__m256i acc, __m256i x, __m256i w) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w));
}
__attribute__((target("avx2"))) inline __m256i madd_quads_u7_avx2(__m256i acc, __m256i x, __m256i w) {
  // u8 x s8 pairs into int16 (exact for u <= 127), then pairs of those into int32.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)));
}
__attribute__((target("avx2,avxvnni"))) inline __m256i madd_quads_avxvnni(__m256i acc, __m256i x, __m256i w) {
  return _mm256_dpbusd_avx_epi32(acc, x, w);
}

// Narrow groups (ChannelWindows::narrow): the block's 16 channels hold 4 or 2 whole groups, and
// channel j reads only its own group's `gw` words per tap. The 4 channels of each quarter of the
// block (a 128-bit lane) are one group's, so step j feeds quarter q word narrow_word(size, gw, q, j)
// of the block's window: one register's worth of products per 8 channels and step instead of the
// window's 16 words times 16 channels (4x fewer products with 4-channel groups, 2x with 8).
// `size`: channels a word.
constexpr int narrow_word(int size, int gw, int quarter, int j) { return 4 * quarter / (size * gw) * gw + j; }
// A dword of vpshufb control that copies word `word` of its 128-bit lane.
constexpr int32_t pick_word(int word) { return 0x03020100 + 0x04040404 * word; }

// The SIMD micro-kernel, instantiated once per instruction set: a function compiled for one
// target cannot inline helpers of a wider one, so a template cannot share the body. NAME runs
// NAME##_rows<GW, M> with M = t.count: a conv's last tile is often short (49 rows at 7x7 are 8 tiles
// of 6 and one of 1): computing all 6 rows there made ResNet-50's 7x7 layers 8-30% slower at batch 1.
// GW = 0 is the block-window kernel: per word, one broadcast feeds both registers (channels 0-7
// and 8-15). GW > 0 the narrow one (GW words a group), which runs the registers one after the
// other (NAME##_narrow_register: two registers' different inputs, 12 accumulators and their weights
// would need more than 16 ymm, and GCC spilled accumulators). Its input for step j comes from one
// 16-byte load broadcast to both halves and shuffled per half, or a plain broadcast where both
// halves read the same word. SIZE: channels a word (2: pairs, 4: quads); the window is 16
// channels, so the register for channels 8-15 reads from 16 / SIZE - 4 words on (its words are the
// window's last four at most).
#define TLCORE_DEFINE_SIMD_TILE(NAME, TARGET, MADD, SIZE)                                        \
  /* Step j's input: word word0 + j of the row at p for channels 0-3 of the register, word1 + j  \
     for channels 4-7 (the words of the register's quarters at step 0). */                       \
  __attribute__((target(TARGET), always_inline)) inline __m256i NAME##_narrow_input(             \
      const int32_t* p, int j, int word0, int word1, int base) {                                 \
    if (word0 == word1) return _mm256_set1_epi32(p[word0 + j]);                                  \
    const __m256i words = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + base))); \
    const int32_t pick0 = pick_word(word0 - base), pick1 = pick_word(word1 - base);              \
    const __m256i pick = _mm256_setr_epi32(pick0, pick0, pick0, pick0, pick1, pick1, pick1, pick1); \
    return _mm256_shuffle_epi8(words, _mm256_add_epi32(pick, _mm256_set1_epi32(pick_word(j) - pick_word(0)))); \
  }                                                                                              \
  /* Channels 8 * REG .. 8 * REG + 7 of a narrow-groups tile. */                                 \
  template <int GW, int M, int REG>                                                              \
  __attribute__((target(TARGET), always_inline)) inline void NAME##_narrow_register(                 \
      const Tile& t, int32_t (*acc)[kTileN]) {                                                   \
    constexpr int kBase = REG == 0 ? 0 : 16 / (SIZE) - 4;                                        \
    __m256i sum[M], start = _mm256_setzero_si256();                                              \
    if (t.correction != nullptr) {                                                               \
      start = _mm256_sub_epi32(start, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.correction + 8 * REG))); \
    }                                                                                            \
    _Pragma("GCC unroll 6") for (int i = 0; i < M; ++i) sum[i] = start;                          \
    const int32_t* b = t.weight + 8 * REG;                                                       \
    for (int64_t tap = 0; tap < t.taps; ++tap, b += GW * kTileN) {                               \
      const int64_t offset = t.tap_offsets[tap];                                                 \
      __m256i w[GW];                                                                             \
      _Pragma("GCC unroll 4") for (int j = 0; j < GW; ++j) {                                     \
        w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + j * kTileN));             \
        _mm_prefetch(reinterpret_cast<const char*>(b + j * kTileN + kPrefetchWords), _MM_HINT_T0); \
      }                                                                                          \
      /* Row by row, all steps of a row together: the other way round, GCC reassociated the    \
         steps' sums across rows and spilled accumulators. */                                    \
      _Pragma("GCC unroll 6") for (int i = 0; i < M; ++i) {                                      \
        _Pragma("GCC unroll 4") for (int j = 0; j < GW; ++j) {                                   \
          sum[i] = MADD(sum[i], NAME##_narrow_input(t.rows[i] + offset, j, narrow_word(SIZE, GW, 2 * REG, 0), \
                                                    narrow_word(SIZE, GW, 2 * REG + 1, 0), kBase), w[j]); \
        }                                                                                        \
      }                                                                                          \
    }                                                                                            \
    for (int i = 0; i < M; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc[i] + 8 * REG), sum[i]); \
  }                                                                                              \
  template <int GW, int M>                                                                       \
  __attribute__((target(TARGET))) void NAME##_rows(const Tile& t, int32_t (*acc)[kTileN]) {      \
    if constexpr (GW > 0) {                                                                      \
      NAME##_narrow_register<GW, M, 0>(t, acc);                                                      \
      NAME##_narrow_register<GW, M, 1>(t, acc);                                                      \
      return;                                                                                    \
    }                                                                                            \
    __m256i lo[M], hi[M], start_lo = _mm256_setzero_si256(), start_hi = start_lo;                \
    if (t.correction != nullptr) { /* quads: start at -128 * sum(w), see the file comment */      \
      start_lo = _mm256_sub_epi32(start_lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.correction))); \
      start_hi = _mm256_sub_epi32(start_hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.correction + 8))); \
    }                                                                                            \
    _Pragma("GCC unroll 6") for (int i = 0; i < M; ++i) lo[i] = start_lo, hi[i] = start_hi;      \
    if (t.starts != nullptr) { /* the split algorithm's per-row starts */                        \
      _Pragma("GCC unroll 6") for (int i = 0; i < M; ++i) {                                      \
        lo[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.starts + i * t.start_stride)); \
        hi[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.starts + i * t.start_stride + 8)); \
      }                                                                                          \
    }                                                                                            \
    const int32_t* b = t.weight;                                                                 \
    for (int64_t tap = 0; tap < t.taps; ++tap) {                                                 \
      const int64_t offset = t.tap_offsets[tap];                                                 \
      for (int64_t g = 0; g < t.groups; ++g, b += kTileN) {                                      \
        const __m256i b_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));            \
        const __m256i b_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 8));        \
        _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchWords), _MM_HINT_T0);            \
        _Pragma("GCC unroll 6") for (int i = 0; i < M; ++i) {                                    \
          const __m256i a = _mm256_set1_epi32(t.rows[i][offset + g]);                            \
          lo[i] = MADD(lo[i], a, b_lo);                                                          \
          hi[i] = MADD(hi[i], a, b_hi);                                                          \
        }                                                                                        \
      }                                                                                          \
    }                                                                                            \
    for (int i = 0; i < M; ++i) {                                                                \
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc[i]), lo[i]);                            \
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc[i] + 8), hi[i]);                        \
    }                                                                                            \
  }                                                                                              \
  template <int GW>                                                                              \
  void NAME##_gw(const Tile& t, int32_t (*acc)[kTileN]) {                                        \
    static_assert(kTileM == 6, "one case per row count");                                        \
    switch (t.count) {                                                                           \
      case 1: return NAME##_rows<GW, 1>(t, acc);                                                 \
      case 2: return NAME##_rows<GW, 2>(t, acc);                                                 \
      case 3: return NAME##_rows<GW, 3>(t, acc);                                                 \
      case 4: return NAME##_rows<GW, 4>(t, acc);                                                 \
      case 5: return NAME##_rows<GW, 5>(t, acc);                                                 \
      default: return NAME##_rows<GW, 6>(t, acc);                                                \
    }                                                                                            \
  }                                                                                              \
  /* Narrow groups hold 4 or 8 channels: 4 / SIZE or 8 / SIZE words. */                          \
  void NAME(const Tile& t, int32_t (*acc)[kTileN]) {                                             \
    if (!t.narrow) return NAME##_gw<0>(t, acc);                                                  \
    return t.groups == 4 / (SIZE) ? NAME##_gw<4 / (SIZE)>(t, acc) : NAME##_gw<8 / (SIZE)>(t, acc); \
  }

TLCORE_DEFINE_SIMD_TILE(tile_avx2, "avx2", madd_pairs_avx2, 2)
TLCORE_DEFINE_SIMD_TILE(tile_avx2u7, "avx2", madd_quads_u7_avx2, 4)
TLCORE_DEFINE_SIMD_TILE(tile_avxvnni, "avx2,avxvnni", madd_quads_avxvnni, 4)
#undef TLCORE_DEFINE_SIMD_TILE

// The 512-bit AVX512-VNNI micro-kernel: a packed block's group (16 int32 words) is exactly one
// zmm, so one vpdpbusd of a broadcast input group covers a whole block. It runs `B` consecutive
// blocks (B * 16 channels) of `M` rows at once: per group, B weight loads, M broadcasts and
// M * B vpdpbusd into M * B independent zmm accumulators (enough chains to hide vpdpbusd's
// latency at 2 per cycle). The accumulators start at -correction (128 * sum(w), see the
// file comment), so what comes out is the exact acc of int8_conv.h; int32 wraps, and the final
// value is in range. Block j's results land in acc[j * M .. j * M + M - 1].
#define TLCORE_ZMM_TARGET "avx512f,avx512bw,avx512vnni,avx512vl,avx2"

// One step of every row times B blocks' weights: x[i][offset] . b[j * block_words .. + 15] (GW = 0),
// or for narrow groups (GW > 0, B = 1; `offset` is then the step j) narrow_word's: each 128-bit lane
// q of the zmm (channels 4q .. 4q + 3) gets word narrow_word(4, GW, q, j) of the window at x[i].
template <int M, int B, int GW>
__attribute__((target(TLCORE_ZMM_TARGET), always_inline)) inline void zmm_step(__m512i (&sum)[M][B],
                                                                               const int32_t* const* x,
                                                                               int64_t offset, const int32_t* b,
                                                                               int64_t block_words) {
  static_assert(GW == 0 || B == 1, "a narrow tile runs one block");
  __m512i w[B];
#pragma GCC unroll 4
  for (int j = 0; j < B; ++j) w[j] = _mm512_loadu_si512(static_cast<const void*>(b + j * block_words));
  __m512i pick = _mm512_setzero_si512();
  if constexpr (GW > 0) {
    const int step = static_cast<int>(offset);
    const int32_t lane[4] = {pick_word(narrow_word(4, GW, 0, step)), pick_word(narrow_word(4, GW, 1, step)),
                             pick_word(narrow_word(4, GW, 2, step)), pick_word(narrow_word(4, GW, 3, step))};
    pick = _mm512_setr_epi32(lane[0], lane[0], lane[0], lane[0], lane[1], lane[1], lane[1], lane[1], lane[2],
                             lane[2], lane[2], lane[2], lane[3], lane[3], lane[3], lane[3]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    // (The maskz broadcast is the plain one; the plain intrinsic trips GCC 12's -Wmaybe-uninitialized.)
    const __m512i u = GW == 0 ? _mm512_set1_epi32(x[i][offset])
                              : _mm512_shuffle_epi8(_mm512_maskz_broadcast_i32x4(
                                    0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i]))), pick);
#pragma GCC unroll 4
    for (int j = 0; j < B; ++j) sum[i][j] = _mm512_dpbusd_epi32(sum[i][j], u, w[j]);
  }
}

template <int M, int B, int GW>
__attribute__((target(TLCORE_ZMM_TARGET))) void tile_avx512vnni_zmm(
    const int32_t* const* rows, const int32_t* weight, int64_t block_words, const int64_t* tap_offsets,
    int64_t taps, int64_t groups, const int32_t* correction, int32_t (*acc)[kTileN]) {
  __m512i sum[M][B];
#pragma GCC unroll 4
  for (int j = 0; j < B; ++j) {
    const __m512i start = _mm512_sub_epi32(
        _mm512_setzero_si512(), _mm512_loadu_si512(static_cast<const void*>(correction + j * kTileN)));
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) sum[i][j] = start;
  }
  const int32_t* b = weight;
  if (GW == 0 && groups == 1) {
    // C <= 4 (the RGB stem): one flat loop over the taps, without the per-tap row pointers
    // below (their setup cost as much as the tap's one group; ~10% of the stem).
    for (int64_t tap = 0; tap < taps; ++tap, b += kTileN) zmm_step<M, B, GW>(sum, rows, tap_offsets[tap], b, block_words);
  } else {
    const int64_t steps = GW > 0 ? GW : groups;
    for (int64_t tap = 0; tap < taps; ++tap) {
      const int32_t* x[M];
#pragma GCC unroll 16
      for (int i = 0; i < M; ++i) x[i] = rows[i] + tap_offsets[tap];
#pragma GCC unroll 2
      for (int64_t g = 0; g < steps; ++g, b += kTileN) zmm_step<M, B, GW>(sum, x, g, b, block_words);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < B; ++j) {
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) _mm512_storeu_si512(static_cast<void*>(acc[j * M + i]), sum[i][j]);
  }
}
#undef TLCORE_ZMM_TARGET

// tile_avx512vnni_zmm on a tile of `count` rows (rows[0 .. kZmmTileM - 1], those past count repeating
// the last: computed, never stored) with the fewest rows of 4, 8 or 12 that covers them: 49 rows at
// 7x7 are four tiles of 12 and one of 4, not five of 12. Returns that M: block j's results are acc[j * M .. j * M + count - 1].
template <int B, int GW>
int zmm_tile(int count, const int32_t* const* rows, const int32_t* weight, int64_t block_words,
             const int64_t* tap_offsets, int64_t taps, int64_t groups, const int32_t* correction,
             int32_t (*acc)[kTileN]) {
  static_assert(kZmmTileM == 12, "one variant per third of a tile");
  if (count <= 4) {
    tile_avx512vnni_zmm<4, B, GW>(rows, weight, block_words, tap_offsets, taps, groups, correction, acc);
    return 4;
  }
  if (count <= 8) {
    tile_avx512vnni_zmm<8, B, GW>(rows, weight, block_words, tap_offsets, taps, groups, correction, acc);
    return 8;
  }
  tile_avx512vnni_zmm<12, B, GW>(rows, weight, block_words, tap_offsets, taps, groups, correction, acc);
  return 12;
}
#endif  // TLCORE_X86

const char* isa_name(Int8Isa isa) {
  switch (isa) {
    case Int8Isa::kAuto: return "auto";
    case Int8Isa::kScalar: return "scalar";
    case Int8Isa::kAvx2: return "avx2";
    case Int8Isa::kAvxVnni: return "avxvnni";
    case Int8Isa::kAvx512Vnni: return "avx512vnni";
    case Int8Isa::kAvx2U7: return "avx2u7";
    case Int8Isa::kAmx: return "amx";
  }
  return "unknown";
}

Int8Isa best_isa() {
  // AMX first (one TDPBUSD is 16,384 multiply-adds), then AVX512-VNNI: its zmm kernel does twice the
  // work per vpdpbusd of AVX-VNNI's ymm one.
  for (Int8Isa isa : {Int8Isa::kAmx, Int8Isa::kAvx512Vnni, Int8Isa::kAvxVnni, Int8Isa::kAvx2}) {
    if (int8_isa_supported(isa)) return isa;
  }
  return Int8Isa::kScalar;
}

TileFn tile_fn(Int8Isa isa) {
  switch (isa) {
#ifdef TLCORE_X86
    case Int8Isa::kAvx2: return tile_avx2;
    case Int8Isa::kAvxVnni: return tile_avxvnni;
    case Int8Isa::kAvx512Vnni:
    case Int8Isa::kAmx: return nullptr;  // no 16-channel Tile kernel: see tile_avx512vnni_zmm, int8_amx.cpp
    case Int8Isa::kAvx2U7: return tile_avx2u7;
#endif
    default: return tile_scalar;
  }
}

typedef int16_t AliasingInt16 __attribute__((may_alias));  // int16 elements of the int32 words

// dst[i] = src[i] + 128 (xor 0x80) for `bytes` codes: the quads' u for pixels of whole words, as one
// run the compiler vectorizes. Returns the OR of the u (its top bit: a code >= 0). The __restrict
// pointers matter: a byte store may alias anything, the callers' args included, which had kept GCC
// to a scalar loop reloading them per byte (4x the time of the whole AMX GEMM on a 256 -> 64 1x1
// conv).
__attribute__((always_inline)) inline uint8_t offset_codes(const int8_t* __restrict src, int64_t bytes,
                                                           uint8_t* __restrict dst) {
  uint8_t high = 0;
  for (int64_t i = 0; i < bytes; ++i) {
    const uint8_t u = static_cast<uint8_t>(src[i]) ^ 0x80;
    dst[i] = u;
    high |= u;
  }
  return high;
}

// One pixel's C int8 codes -> `groups` words of the layout (int16 pairs, or quads of u = x + 128),
// 0 past C; returns the OR of the quads (its top bit: an input code >= 0).
__attribute__((always_inline)) inline uint8_t convert_pixel(const int8_t* src, int64_t c, Layout layout,
                                                            int64_t groups, int32_t* dst) {
  const int64_t width = group_size(layout) * groups;
  uint8_t high = 0;
  if (layout == Layout::kPairs) {
    AliasingInt16* pairs = reinterpret_cast<AliasingInt16*>(dst);
    for (int64_t i = 0; i < c; ++i) pairs[i] = src[i];
    for (int64_t i = c; i < width; ++i) pairs[i] = 0;
  } else {
    uint8_t* quads = reinterpret_cast<uint8_t*>(dst);
    for (int64_t i = 0; i < c; ++i) {
      quads[i] = static_cast<uint8_t>(src[i] + 128);
      high |= quads[i];
    }
    for (int64_t i = c; i < width; ++i) quads[i] = 0;
  }
  return high;
}

// The border pixel (x_zero) is converted once, into `border` (groups words), and copied; an image
// row's pixels are converted in one run. With one group per pixel (C <= 4, the RGB stem) a quads
// word is the pixel's C bytes read at once, + 128 each (xor 0x80), the bytes past C masked to 0:
// the per-pixel loops of convert_pixel cost about half as much as the stem's kernel.
__attribute__((always_inline)) inline bool pad_rows(const Int8ConvArgs& a, Layout layout, int64_t hp, int64_t wp,
                                                    int64_t groups, const int32_t* border, int64_t begin,
                                                    int64_t end, int32_t* padded) {
  const bool one_quad = is_quads(layout) && groups == 1;
  const uint32_t mask = a.c >= 4 ? ~0u : (1u << (8 * a.c)) - 1;
  // Pixels whose 4-byte read stays inside their image row: c * x + 4 <= c * w.
  const int64_t word_pixels = one_quad && a.c * a.w >= 4 ? (a.c * a.w - 4) / a.c + 1 : 0;
  uint8_t high = 0;
  uint32_t high_words = 0;
  const auto fill = [&](int32_t* dst, int64_t pixels) {
    for (int64_t p = 0; p < pixels; ++p, dst += groups) std::copy(border, border + groups, dst);
  };
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / hp, y = row % hp - a.pad_h;
    int32_t* dst = padded + row * wp * groups;
    if (y < 0 || y >= a.h) {
      fill(dst, wp);
      continue;
    }
    fill(dst, a.pad_w);
    dst += a.pad_w * groups;
    const int8_t* src = a.x + (n * a.h + y) * a.w * a.c;
    if (is_quads(layout) && a.c == 4 * groups) {  // whole words: the image row is one run
      high |= offset_codes(src, a.w * a.c, reinterpret_cast<uint8_t*>(dst));
    } else {
      for (int64_t x = 0; x < word_pixels; ++x) {
        uint32_t word;
        std::memcpy(&word, src + x * a.c, sizeof(word));
        word = (word ^ 0x80808080u) & mask;
        high_words |= word;
        dst[x] = static_cast<int32_t>(word);
      }
      for (int64_t x = word_pixels; x < a.w; ++x) high |= convert_pixel(src + x * a.c, a.c, layout, groups, dst + x * groups);
    }
    fill(dst + a.w * groups, wp - a.pad_w - a.w);
  }
  return ((high | high_words | high_words >> 8 | high_words >> 16 | high_words >> 24) & 0x80) != 0;
}

// convert_pointwise_rows (int8_cpu.h), compiled once per target.
__attribute__((always_inline)) inline bool convert_rows(const Int8ConvArgs& a, Layout layout, int64_t groups,
                                                        int64_t first, int64_t count, int32_t* dst) {
  uint8_t high = 0;
  if (layout != Layout::kPairs && a.stride_h == 1 && a.stride_w == 1 && a.c == 4 * groups) {
    // Stride 1 with whole words: the rows are one run of the input's bytes, instead of one per pixel.
    return offset_codes(a.x + first * a.c, count * a.c, reinterpret_cast<uint8_t*>(dst)) & 0x80;
  }
  int64_t n = first / (a.oh * a.ow), y = (first / a.ow) % a.oh, col = first % a.ow;
  for (int64_t i = 0; i < count; ++i, dst += groups) {
    high |= convert_pixel(a.x + ((n * a.h + y * a.stride_h) * a.w + col * a.stride_w) * a.c, a.c, layout, groups, dst);
    if (++col == a.ow) {
      col = 0;
      if (++y == a.oh) y = 0, ++n;
    }
  }
  return high & 0x80;
}

bool convert_rows_generic(const Int8ConvArgs& a, Layout layout, int64_t groups, int64_t first, int64_t count,
                          int32_t* dst) {
  return convert_rows(a, layout, groups, first, count, dst);
}
#ifdef TLCORE_X86
__attribute__((target("avx2"))) bool convert_rows_avx2(const Int8ConvArgs& a, Layout layout, int64_t groups,
                                                       int64_t first, int64_t count, int32_t* dst) {
  return convert_rows(a, layout, groups, first, count, dst);
}
#endif

bool pad_rows_generic(const Int8ConvArgs& a, Layout layout, int64_t hp, int64_t wp, int64_t groups,
                      const int32_t* border, int64_t begin, int64_t end, int32_t* padded) {
  return pad_rows(a, layout, hp, wp, groups, border, begin, end, padded);
}
#ifdef TLCORE_X86
__attribute__((target("avx2"))) bool pad_rows_avx2(const Int8ConvArgs& a, Layout layout, int64_t hp, int64_t wp,
                                                   int64_t groups, const int32_t* border, int64_t begin, int64_t end,
                                                   int32_t* padded) {
  return pad_rows(a, layout, hp, wp, groups, border, begin, end, padded);
}
#endif

}  // namespace

bool convert_pointwise_rows(const Int8ConvArgs& a, Layout layout, int64_t groups, int64_t first, int64_t count,
                            int32_t* dst) {
#ifdef TLCORE_X86
  if (__builtin_cpu_supports("avx2")) return convert_rows_avx2(a, layout, groups, first, count, dst);
#endif
  return convert_rows_generic(a, layout, groups, first, count, dst);
}

namespace {
[[noreturn]] void throw_eight_bit_input() {
  throw std::invalid_argument("tlcore int8 conv: the avx2u7 kernel got an input code >= 0; it needs 7-bit "
                              "activations (codes <= -1), where vpmaddubsw cannot saturate");
}
}  // namespace

std::unique_ptr<int32_t[]> pad_input(const Int8ConvArgs& a, Layout layout, int64_t hp, int64_t wp, int64_t groups,
                                     bool seven_bit, int64_t tail_words) {
  auto rows = pad_rows_generic;
#ifdef TLCORE_X86
  if (__builtin_cpu_supports("avx2")) rows = pad_rows_avx2;
#endif
  std::atomic<bool> eight_bit{false};
  // Every word is written below: no zero-filling pass first (but for the tail).
  const int64_t words = a.n * hp * wp * groups;
  std::unique_ptr<int32_t[]> padded(new int32_t[static_cast<size_t>(words + tail_words)]);
  std::fill(padded.get() + words, padded.get() + words + tail_words, 0);
  const std::vector<int8_t> zeros(static_cast<size_t>(a.c), static_cast<int8_t>(a.x_zero));
  std::vector<int32_t> border(static_cast<size_t>(groups));
  convert_pixel(zeros.data(), a.c, layout, groups, border.data());  // x_zero's code is checked above
  at::parallel_for(0, a.n * hp, 1, [&](int64_t begin, int64_t end) {
    if (rows(a, layout, hp, wp, groups, border.data(), begin, end, padded.get())) {
      eight_bit.store(true, std::memory_order_relaxed);
    }
  });
  if (seven_bit && eight_bit.load()) throw_eight_bit_input();
  return padded;
}

namespace {

// pad_input for the rows layout: (N, H, W, C) int8 -> (N, hp, row_words) words, padded row (n, y)
// as one run of wp * C int16 values (pixel (y, x) at (y + pad_h, x + pad_w), x_zero elsewhere),
// then zeros to the row's end. One source for every target.
__attribute__((always_inline)) inline void pad_flat_rows(const Int8ConvArgs& a, int64_t hp, int64_t wp,
                                                         int64_t row_words, int64_t begin, int64_t end,
                                                         int32_t* padded) {
  const int64_t used = wp * a.c, inside = a.w * a.c, left = a.pad_w * a.c;
  const int16_t zero = static_cast<int16_t>(a.x_zero);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / hp, y = row % hp - a.pad_h;
    AliasingInt16* values = reinterpret_cast<AliasingInt16*>(padded + row * row_words);
    if (y < 0 || y >= a.h) {
      for (int64_t e = 0; e < used; ++e) values[e] = zero;
    } else {
      const int8_t* src = a.x + (n * a.h + y) * inside;
      for (int64_t e = 0; e < left; ++e) values[e] = zero;
      for (int64_t e = 0; e < inside; ++e) values[left + e] = src[e];
      for (int64_t e = left + inside; e < used; ++e) values[e] = zero;
    }
    for (int64_t e = used; e < 2 * row_words; ++e) values[e] = 0;
  }
}

void pad_flat_rows_generic(const Int8ConvArgs& a, int64_t hp, int64_t wp, int64_t row_words, int64_t begin,
                           int64_t end, int32_t* padded) {
  pad_flat_rows(a, hp, wp, row_words, begin, end, padded);
}
#ifdef TLCORE_X86
__attribute__((target("avx2"))) void pad_flat_rows_avx2(const Int8ConvArgs& a, int64_t hp, int64_t wp,
                                                        int64_t row_words, int64_t begin, int64_t end,
                                                        int32_t* padded) {
  pad_flat_rows(a, hp, wp, row_words, begin, end, padded);
}
#endif

std::unique_ptr<int32_t[]> pad_input_rows(const Int8ConvArgs& a, int64_t hp, int64_t wp, int64_t row_words) {
  auto rows = pad_flat_rows_generic;
#ifdef TLCORE_X86
  if (__builtin_cpu_supports("avx2")) rows = pad_flat_rows_avx2;
#endif
  std::unique_ptr<int32_t[]> padded(new int32_t[static_cast<size_t>(a.n * hp * row_words)]);
  at::parallel_for(0, a.n * hp, 1, [&](int64_t begin, int64_t end) {
    rows(a, hp, wp, row_words, begin, end, padded.get());
  });
  return padded;
}

}  // namespace

namespace {

// int32 tile -> int8 outputs: scale, offset, residual, shift, zero point, ReLU, saturate.
void requantize(const Int8ConvArgs& a, const int32_t (*acc)[kTileN], const int64_t* ms, int rows, int64_t k0) {
  const int64_t cols = std::min<int64_t>(kTileN, a.k - k0);
  const int64_t lo = a.relu ? std::max(a.out_zero, -128) : -128;
  const int64_t hi = a.out_max;
  for (int i = 0; i < rows; ++i) {
    const int64_t m = ms[i];
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t k = k0 + j;
      int64_t total = static_cast<int64_t>(acc[i][j]) * a.multiplier[k] + a.offset[k];
      if (a.residual != nullptr) total += static_cast<int64_t>(a.residual[m * a.k + k]) * a.res_multiplier;
      const int64_t q = (total >> a.shift) + a.out_zero;  // C++20: >> on a negative value is arithmetic
      a.out[m * a.k + k] = static_cast<int8_t>(std::clamp<int64_t>(q, lo, hi));
    }
  }
}

// An upper bound of |total| over every accumulator this conv can produce (|acc| <= 128 * 128 * C / G * R * S),
// in double: a bound, not an exact value, so callers keep a margin.
double largest_total(const Int8ConvArgs& a) {
  double multiplier = 0.0, offset = 0.0;
  for (int64_t k = 0; k < a.k; ++k) {
    multiplier = std::max(multiplier, std::abs(static_cast<double>(a.multiplier[k])));
    offset = std::max(offset, std::abs(static_cast<double>(a.offset[k])));
  }
  return 128.0 * 128.0 * static_cast<double>(a.c / a.conv_groups * a.r * a.s) * multiplier + offset +
         128.0 * std::abs(static_cast<double>(a.res_multiplier));
}

#ifdef TLCORE_X86
// requantize() on 16 outputs per row in 256-bit steps (the scalar epilogue dominated 1x1 convs with
// few channels), for convs whose codes before the clamp provably fit int32 (quantized_fits_int32):
// only the products need 64 bits, the rest runs on 8 lanes, and the clamp on the packed bytes
// (the saturating packs clamp to [-128, 127] already; ReLU's floor and out_max remain).
// The int64 totals come from vpmuldq on the even and the odd channels of a vector; out_zero * 2**shift
// joins the offsets (|total| < 2**62 + 128 * 2**shift <= 2**62 + 2**61 < 2**63 for shifts up to
// kFoldedZeroMaxShift; requantization makes at most 46), so floor(total / 2**shift) is the code
// itself, which fits int32. AVX2 has no 64-bit arithmetic shift, so that floor takes one of two routes:
//   kHighWord (shift >= 32, the usual case: requantization gives the largest multiplier 30
//     significant bits, so shift >= 32 unless some x_scale * w_scale / out_scale, or a residual's
//     res_scale / out_scale, reaches 1/4): the high 32 bits of a total are floor(total / 2**32),
//     and an arithmetic int32 shift by shift - 32 finishes the floor.
//   otherwise (shift < 32, e.g. every conv with a residual): a logical 64-bit shift differs from the
//     arithmetic one only in its top `shift` bits, above bit 32: its low 32 bits are the code.
constexpr int32_t kFoldedZeroMaxShift = 54;

template <bool kHighWord>
__attribute__((target("avx2"))) void requantize_avx2(const Int8ConvArgs& a, const int32_t (*acc)[kTileN],
                                                     const int64_t* ms, int rows, int64_t k0) {
  if (k0 + kTileN > a.k) return requantize(a, acc, ms, rows, k0);  // a partial channel block
  const __m128i shift = _mm_cvtsi32_si128(kHighWord ? a.shift - 32 : a.shift);
  const __m256i res_multiplier = _mm256_set1_epi64x(a.res_multiplier);  // |.| < 2**31: vpmuldq reads 32 bits
  // The saturating packs clamp to [-128, 127]; ReLU's floor and out_max clamp the bytes where they are
  // tighter (not for the usual post-ReLU zero point -128 and 8-bit codes).
  const int32_t lo_code = a.relu ? std::max(a.out_zero, -128) : -128;
  const bool clamp_lo = lo_code > -128, clamp_hi = a.out_max < 127;
  const __m128i lo = _mm_set1_epi8(static_cast<char>(lo_code));
  const __m128i hi = _mm_set1_epi8(static_cast<char>(a.out_max));
  // Per 8 channels: multipliers (vpmuldq reads the even ones; >> 32 brings the odd ones down) and
  // the offsets of the even and of the odd channels, in lane order.
  const __m256i zero_offset = _mm256_set1_epi64x(int64_t{a.out_zero} * (int64_t{1} << a.shift));
  __m256i multiplier[2], multiplier_odd[2], offset_even[2], offset_odd[2];
  for (int h = 0; h < 2; ++h) {
    multiplier[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.multiplier + k0 + 8 * h));
    multiplier_odd[h] = _mm256_srli_epi64(multiplier[h], 32);
    const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.offset + k0 + 8 * h));
    const __m256i second = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.offset + k0 + 8 * h + 4));
    offset_even[h] = _mm256_add_epi64(_mm256_permute4x64_epi64(_mm256_unpacklo_epi64(first, second), 0xd8), zero_offset);
    offset_odd[h] = _mm256_add_epi64(_mm256_permute4x64_epi64(_mm256_unpackhi_epi64(first, second), 0xd8), zero_offset);
  }
  for (int i = 0; i < rows; ++i) {
    const int64_t row = ms[i] * a.k + k0;
    __m256i codes[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc[i] + 8 * h));
      __m256i even = _mm256_add_epi64(_mm256_mul_epi32(x, multiplier[h]), offset_even[h]);
      __m256i odd = _mm256_add_epi64(_mm256_mul_epi32(_mm256_srli_epi64(x, 32), multiplier_odd[h]), offset_odd[h]);
      if (a.residual != nullptr) {
        const __m256i r = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.residual + row + 8 * h)));
        even = _mm256_add_epi64(even, _mm256_mul_epi32(r, res_multiplier));
        odd = _mm256_add_epi64(odd, _mm256_mul_epi32(_mm256_srli_epi64(r, 32), res_multiplier));
      }
      if constexpr (kHighWord) {  // the even totals' high words moved down, the odd ones' in place
        codes[h] = _mm256_sra_epi32(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xaa), shift);
      } else {  // the odd totals' codes moved up into the odd int32 lanes
        codes[h] = _mm256_blend_epi32(_mm256_srl_epi64(even, shift),
                                      _mm256_slli_epi64(_mm256_srl_epi64(odd, shift), 32), 0xaa);
      }
    }
    // 16 int32 -> 16 int8 in channel order (packs works within 128-bit lanes: reorder once).
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(codes[0], codes[1]), 0xd8);
    __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    if (clamp_lo) bytes = _mm_max_epi8(bytes, lo);
    if (clamp_hi) bytes = _mm_min_epi8(bytes, hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.out + row), bytes);
  }
}

// requantize_avx2's math on 512 bits for the AVX512-VNNI path, where requantize_avx2 took two thirds
// as long as the zmm kernel on the stem (its 64-bit shift emulation and 128-bit-lane narrowing).
// As there, out_zero * 2**shift joins the offsets (up to kFoldedZeroMaxShift) and each code
// floor(total / 2**shift) fits int32 (quantized_fits_int32). vpsraq leaves an even channel's code
// in the low word of its total; an odd channel's goes to the high word (where the blend takes it)
// in one shift: right by shift - 32, or, for shift < 32, left by 32 - shift (exact: the code's
// 30 bits plus 32 stay under 2**63).
// Full channel blocks load and store plainly: masked loads and vpmovdb stores to memory took ~40% of
// this function on a 64-channel 1x1 conv with a residual (AMD Zen, perf). Masks handle a partial
// block, so it takes any K and any `rows` (a whole zmm tile per call).
// GCC 12's avx512fintrin.h fills its "undefined" vectors as `__m512i __Y = __Y;` (GCC bug 105593),
// which -Wall reports as uninitialized once inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,avx512bw,avx512vl,avx2"))) void requantize_avx512(
    const Int8ConvArgs& a, const int32_t (*acc)[kTileN], const int64_t* ms, int rows, int64_t k0) {
  const int cols = static_cast<int>(std::min<int64_t>(kTileN, a.k - k0));
  const __mmask16 valid = static_cast<__mmask16>((1u << cols) - 1);
  const bool full = cols == kTileN;
  const __m128i shift = _mm_cvtsi32_si128(a.shift);
  const bool odd_right = a.shift >= 32;
  const __m128i odd_shift = _mm_cvtsi32_si128(odd_right ? a.shift - 32 : 32 - a.shift);
  const __m512i res_multiplier = _mm512_set1_epi64(a.res_multiplier);  // |.| < 2**31: vpmuldq reads 32 bits
  // vpmovsdb saturates to [-128, 127]; ReLU's floor and out_max clamp the bytes where they are
  // tighter (not for the usual post-ReLU zero point -128 and 8-bit codes).
  const int32_t lo = a.relu ? std::max(a.out_zero, -128) : -128;
  const bool clamp_lo = lo > -128, clamp_hi = a.out_max < 127;
  const __m128i lo_bytes = _mm_set1_epi8(static_cast<char>(lo));
  const __m128i hi_bytes = _mm_set1_epi8(static_cast<char>(a.out_max));
  // vpmuldq multiplies the even channels (and the odd ones once shifted down 32 bits): the offsets
  // of the even and of the odd channels, one per 64-bit lane in that order.
  const __m512i multiplier = _mm512_maskz_loadu_epi32(valid, a.multiplier + k0);
  const __m512i multiplier_odd = _mm512_srli_epi64(multiplier, 32);
  const __m512i zero_offset = _mm512_set1_epi64(int64_t{a.out_zero} * (int64_t{1} << a.shift));
  const __m512i first = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid), a.offset + k0);
  const __m512i second = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid >> 8), a.offset + k0 + 8);
  const __m512i offset_even = _mm512_add_epi64(
      _mm512_permutex2var_epi64(first, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), second), zero_offset);
  const __m512i offset_odd = _mm512_add_epi64(
      _mm512_permutex2var_epi64(first, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), second), zero_offset);
  for (int i = 0; i < rows; ++i) {
    const int64_t row = ms[i] * a.k + k0;
    const __m512i x = _mm512_loadu_si512(static_cast<const void*>(acc[i]));
    __m512i even = _mm512_add_epi64(_mm512_mul_epi32(x, multiplier), offset_even);
    __m512i odd = _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(x, 32), multiplier_odd), offset_odd);
    if (a.residual != nullptr) {
      const __m128i bytes = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.residual + row))
                                 : _mm_maskz_loadu_epi8(valid, a.residual + row);
      const __m512i r = _mm512_cvtepi8_epi32(bytes);
      even = _mm512_add_epi64(even, _mm512_mul_epi32(r, res_multiplier));
      odd = _mm512_add_epi64(odd, _mm512_mul_epi32(_mm512_srli_epi64(r, 32), res_multiplier));
    }
    even = _mm512_sra_epi64(even, shift);
    odd = odd_right ? _mm512_sra_epi64(odd, odd_shift) : _mm512_sll_epi64(odd, odd_shift);
    const __m512i codes = _mm512_mask_blend_epi32(0xaaaa, even, odd);
    __m128i q = _mm512_cvtsepi32_epi8(codes);
    if (clamp_lo) q = _mm_max_epi8(q, lo_bytes);
    if (clamp_hi) q = _mm_min_epi8(q, hi_bytes);
    if (full) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a.out + row), q);
    } else {
      _mm_mask_storeu_epi8(a.out + row, valid, q);
    }
  }
}
#pragma GCC diagnostic pop

// Whether every code before the clamp, floor(total / 2**shift) + out_zero, fits int32 for any
// accumulator this conv can produce (|acc| <= 128 * 128 * C * R * S): requantize_avx2's condition.
bool quantized_fits_int32(const Int8ConvArgs& a) {
  return std::ldexp(largest_total(a), -a.shift) + 256.0 < std::ldexp(1.0, 30);  // a wide margin over rounding
}
#endif  // TLCORE_X86

}  // namespace

TileFn pairs_tile_fn(Int8Isa isa) { return tile_fn(isa == Int8Isa::kScalar ? isa : Int8Isa::kAvx2); }

EpilogueFn epilogue_fn(Int8Isa isa, const Int8ConvArgs& a) {
#ifdef TLCORE_X86
  if (isa != Int8Isa::kScalar && quantized_fits_int32(a) && a.shift <= kFoldedZeroMaxShift) {
    if (isa == Int8Isa::kAvx512Vnni || isa == Int8Isa::kAmx) return requantize_avx512;
    return a.shift < 32 ? requantize_avx2<false> : requantize_avx2<true>;
  }
#endif
  return requantize;
}

void write_header(int32_t* packed, Layout layout, int64_t k, int64_t c, int64_t r, int64_t s,
                  int64_t conv_groups) {
  const int32_t header[] = {kPackedMagic, static_cast<int32_t>(layout), static_cast<int32_t>(k),
                            static_cast<int32_t>(c), static_cast<int32_t>(r), static_cast<int32_t>(s),
                            static_cast<int32_t>(conv_groups)};
  std::fill(packed, packed + kHeaderWords, 0);
  std::copy(std::begin(header), std::end(header), packed);
}

bool header_matches(const int32_t* packed, Layout layout, int64_t k, int64_t c, int64_t r, int64_t s,
                    int64_t conv_groups) {
  return packed[0] == kPackedMagic && packed[1] == static_cast<int32_t>(layout) && packed[2] == k &&
         packed[3] == c && packed[4] == r && packed[5] == s && packed[6] == conv_groups;
}

namespace {

// The input words each block of 16 output channels reduces over, per tap. A grouped conv's block
// needs only its own groups' channels: a window of `words` words (the same for every block, so
// blocks stay equally sized) starting `start[block]` words into a pixel; the block's weights are
// zero in the window's other channels. Ungrouped: all of a pixel's words.
// Narrow groups -- 4 or 8 channels a group, in and out, whole blocks (ResNeXt-50's first two
// stages): a block of 16 channels then holds 4 or 2 whole groups and its window is their 16 input
// channels, but multiplying all of it would make 4x or 2x the products needed. There each channel
// reads only its own group's `words` words (Tile::narrow, narrow_word): the kernels pick them per
// 4-channel quarter of a register.
struct ChannelWindows {
  int64_t words;
  std::vector<int64_t> start;
  bool narrow = false;
};

ChannelWindows channel_windows(int64_t k, int64_t c, int64_t conv_groups, Layout layout) {
  const int64_t size = group_size(layout), pixel_words = (c + size - 1) / size;
  const int64_t blocks = (k + kTileN - 1) / kTileN;
  ChannelWindows windows{conv_groups == 1 ? pixel_words : 0, std::vector<int64_t>(static_cast<size_t>(blocks), 0)};
  if (conv_groups == 1) return windows;
  const int64_t k_group = k / conv_groups, c_group = c / conv_groups;
  // Whole blocks (K % 16 == 0, so C % 16 == 0 too) keep the kernels' 16-byte window loads
  // inside each pixel's channels.
  if (k_group == c_group && (c_group == 4 || c_group == 8) && k % kTileN == 0) {
    windows.narrow = true;
    windows.words = c_group / size;
    for (int64_t b = 0; b < blocks; ++b) windows.start[b] = b * kTileN / size;
    return windows;
  }
  std::vector<int64_t> end(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = b * kTileN / k_group, last = (std::min(k, (b + 1) * kTileN) - 1) / k_group;
    windows.start[b] = first * c_group / size;
    end[b] = ((last + 1) * c_group + size - 1) / size;
    windows.words = std::max(windows.words, end[b] - windows.start[b]);
  }
  // A narrower window moves left to keep inside the pixel (its extra channels get zero weights).
  for (int64_t& start : windows.start) start = std::min(start, pixel_words - windows.words);
  return windows;
}

}  // namespace

int64_t block_rows(Layout layout, int64_t reduction_words) {
  if (layout != Layout::kAmxQuads) return reduction_words;
  return (reduction_words + kAmxStepWords - 1) / kAmxStepWords * kAmxStepWords;
}

int64_t direct_packed_words(int64_t k, int64_t c, int64_t r, int64_t s, Layout layout, int64_t conv_groups) {
  // The rows layout packs a (K, R, S, C) weight as the (K, R, 1, S * C) one: a tap row's (s, c) run.
  if (layout == Layout::kRowPairs) return direct_packed_words(k, s * c, r, 1, Layout::kPairs);
  // The split layout packs it as the (K, 1, 1, R * S * C / G) one: an ungrouped conv's converted row is an
  // output pixel's taps' codes; a grouped conv's blocks read their group's codes at each tap of the converted
  // input, in the same order.
  if (layout == Layout::kSplitQuads) {
    const int64_t group_c = r * s * (c / conv_groups);
    return direct_packed_words(k, group_c, 1, 1, Layout::kQuads) + split_table_words(k, group_c);
  }
  const int64_t blocks = (k + kTileN - 1) / kTileN;
  const int64_t correction = is_quads(layout) ? blocks * kTileN : 0;
  return kHeaderWords + blocks * block_rows(layout, r * s * channel_windows(k, c, conv_groups, layout).words) * kTileN +
         correction;
}

// weight: (K, R, S, C / conv_groups); c: the input's channels.
void pack_direct_weight(const int8_t* weight, int64_t k, int64_t c, int64_t r, int64_t s, Layout layout,
                        int32_t* packed, int64_t conv_groups) {
  if (layout == Layout::kRowPairs) {
    pack_direct_weight(weight, k, s * c, r, 1, Layout::kPairs, packed);
    return write_header(packed, Layout::kRowPairs, k, c, r, s);
  }
  if (layout == Layout::kSplitQuads) {  // as (K, 1, 1, R * S * C / G)
    const int64_t group_c = r * s * (c / conv_groups);
    pack_direct_weight(weight, k, group_c, 1, 1, Layout::kQuads, packed);
    pack_split_table(weight, k, group_c, packed + direct_packed_words(k, group_c, 1, 1, Layout::kQuads));
    return write_header(packed, Layout::kSplitQuads, k, c, r, s, conv_groups);
  }
  const ChannelWindows windows = channel_windows(k, c, conv_groups, layout);
  const int64_t size = group_size(layout), groups = windows.words, taps = r * s;
  const int64_t c_group = c / conv_groups, k_group = k / conv_groups;
  const int64_t blocks = (k + kTileN - 1) / kTileN, block_words = block_rows(layout, taps * groups) * kTileN;
  std::fill(packed, packed + direct_packed_words(k, c, r, s, layout, conv_groups), 0);
  write_header(packed, layout, k, c, r, s, conv_groups);
  int32_t* words = packed + kHeaderWords;
  int32_t* correction = words + blocks * block_words;  // quads: 128 * sum(w[k]), see the file comment
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // One (channel, tap) row of the window in the layout's element type; other channels stay 0.
    std::vector<int16_t> pairs(layout == Layout::kPairs ? 2 * groups : 0, 0);
    std::vector<int8_t> quads(is_quads(layout) ? 4 * groups : 0, 0);
    const char* row = layout == Layout::kPairs ? reinterpret_cast<const char*>(pairs.data())
                                               : reinterpret_cast<const char*>(quads.data());
    for (int64_t block = begin; block < end; ++block) {
      for (int j = 0; j < kTileN && block * kTileN + j < k; ++j) {
        const int64_t channel = block * kTileN + j;
        // Where this channel's group starts in the words it reads, in elements.
        const int64_t first = windows.narrow ? 0 : channel / k_group * c_group - windows.start[block] * size;
        int32_t sum = 0;
        for (int64_t tap = 0; tap < taps; ++tap) {
          const int8_t* src = weight + (channel * taps + tap) * c_group;
          if (layout == Layout::kPairs) {
            std::copy(src, src + c_group, pairs.begin() + first);
          } else {
            std::copy(src, src + c_group, quads.begin() + first);
          }
          for (int64_t i = 0; i < c_group; ++i) sum += src[i];
          int32_t* dst = words + block * block_words + tap * groups * kTileN + j;
          for (int64_t g = 0; g < groups; ++g) std::memcpy(dst + g * kTileN, row + 4 * g, sizeof(int32_t));
        }
        std::fill(pairs.begin(), pairs.end(), 0);  // the next channel's group may sit elsewhere
        std::fill(quads.begin(), quads.end(), 0);
        if (is_quads(layout)) correction[channel] = 128 * sum;
      }
    }
  });
}

namespace {

// A tile's input rows: the tap-(0, 0) pointers of output pixels m0 .. m0 + count - 1 in the padded
// input (hp rows of row_words words, column_words per output column) and their indices (ms: the
// next count slots of an array). (n, y, col) is stepped from m0's: one
// division per tile, not three per row (they cost as much as the kernel on a 1x1 conv with few channels).
template <int M>
void tile_rows(const Int8ConvArgs& a, const int32_t* x, int64_t hp, int64_t row_words, int64_t column_words,
               int64_t m0, int count, const int32_t* (&rows)[M], int64_t* ms) {
  int64_t n = m0 / (a.oh * a.ow), y = (m0 / a.ow) % a.oh, col = m0 % a.ow;
  for (int i = 0; i < count; ++i) {
    rows[i] = x + (n * hp + y * a.stride_h) * row_words + col * column_words;
    ms[i] = m0 + i;
    if (++col == a.ow) {
      col = 0;
      if (++y == a.oh) y = 0, ++n;
    }
  }
}

// tile_rows for a converted chunk (a pointwise conv's, or the split algorithm's): output pixel m0 + i reads
// row `offset + i` of it.
template <int M>
void chunk_rows(const int32_t* chunk, int64_t groups, int64_t offset, int64_t m0, int count,
                const int32_t* (&rows)[M], int64_t* ms) {
  for (int i = 0; i < count; ++i) {
    rows[i] = chunk + (offset + i) * groups;
    ms[i] = m0 + i;
  }
}

// kDirect, kRows and kSplit.
void int8_conv2d_direct(const Int8ConvArgs& a, Int8Isa isa, Int8Algorithm algorithm) {
  if (isa == Int8Isa::kAmx) {
    if (a.conv_groups == 1) return int8_conv2d_amx(a);
    isa = Int8Isa::kAvx512Vnni;  // grouped convs: the zmm kernel (layout_for)
  }
  const bool rows_layout = algorithm == Int8Algorithm::kRows, split = algorithm == Int8Algorithm::kSplit;
  const Layout layout = rows_layout ? Layout::kRowPairs : split ? Layout::kSplitQuads : layout_for(isa);
  const int64_t hp = a.h + 2 * a.pad_h, wp = a.w + 2 * a.pad_w;
  // The padded input in words: one pixel, one row, one output column's step, and per tap the
  // offset from a tile row's pointer; `groups`: the words a block reduces over per tap, from its
  // window's start (channel_windows: all of a pixel's words unless the conv is grouped).
  int64_t pixel_words, row_words, column_words, groups;
  std::vector<int64_t> tap_offsets;
  ChannelWindows windows{0, std::vector<int64_t>(static_cast<size_t>((a.k + kTileN - 1) / kTileN), 0)};
  if (rows_layout) {
    row_words = (wp * a.c + 2) / 2;  // + 1 element: the last window's final pair may reach one past the row
    column_words = a.stride_w * a.c / 2;
    pixel_words = groups = (a.s * a.c + 1) / 2;
    for (int64_t r = 0; r < a.r; ++r) tap_offsets.push_back(r * a.dil_h * row_words);
  } else if (split && a.conv_groups == 1) {  // one tap: a converted row holds an output pixel's R x S taps
    windows = channel_windows(a.k, a.r * a.s * a.c, 1, layout);
    pixel_words = groups = windows.words;
    row_words = column_words = 0;  // no padded input
    tap_offsets.push_back(0);
  } else {  // (grouped split: the taps of its converted input, convert_split_input)
    const int64_t size = group_size(layout);
    pixel_words = (a.c + size - 1) / size;
    windows = channel_windows(a.k, a.c, a.conv_groups, layout);
    groups = windows.words;
    row_words = wp * pixel_words;
    column_words = a.stride_w * pixel_words;
    for (int64_t r = 0; r < a.r; ++r) {
      for (int64_t s = 0; s < a.s; ++s) tap_offsets.push_back(r * a.dil_h * row_words + s * a.dil_w * pixel_words);
    }
  }
  const int64_t taps = static_cast<int64_t>(tap_offsets.size());
  const int64_t blocks = (a.k + kTileN - 1) / kTileN, block_words = block_rows(layout, taps * groups) * kTileN;
  std::vector<int32_t> packed_here;
  const int32_t* packed = a.packed_weight;
  if (packed == nullptr) {
    packed_here.resize(static_cast<size_t>(direct_packed_words(a.k, a.c, a.r, a.s, layout, a.conv_groups)));
    pack_direct_weight(a.weight, a.k, a.c, a.r, a.s, layout, packed_here.data(), a.conv_groups);
    packed = packed_here.data();
  } else if (!header_matches(packed, layout, a.k, a.c, a.r, a.s, a.conv_groups)) {
    throw std::invalid_argument("tlcore int8 conv: packed_weight was packed for another weight, instruction set "
                                "or algorithm");
  }
  const int32_t* weight = packed + kHeaderWords;
  const int32_t* correction = is_quads(layout) ? weight + blocks * block_words : nullptr;
  // kSplit: the int16 weight table (int8_split.cpp), after the corrections.
  const int16_t* split_table = split ? reinterpret_cast<const int16_t*>(correction + blocks * kTileN) : nullptr;
  // A pointwise conv (1x1, unpadded) reads each input pixel once, so a converted copy of the whole
  // input costs as much memory traffic as its GEMM takes time (int16 pairs: twice the input's size).
  // Instead, where tasks run chunk by chunk (rows_outer below), each converts the pixels of its own
  // chunk of rows, which then stay in L1.
  const bool pointwise = !rows_layout && a.r == 1 && a.s == 1 && a.pad_h == 0 && a.pad_w == 0;
  const bool seven_bit = isa == Int8Isa::kAvx2U7;
  if (seven_bit && a.x_zero > -1) {
    throw std::invalid_argument("tlcore int8 conv: the avx2u7 kernel needs x_zero <= -1 (7-bit activations)");
  }
  const int64_t m_total = a.n * a.oh * a.ow;
  const int64_t tiles = (m_total + kTileM - 1) / kTileM;
  const int64_t chunks = (tiles + kChunkM - 1) / kChunkM;
  // Task = (weight block, chunk of tiles). When all packed weights fit in L2, consecutive tasks
  // share a chunk of input rows (which then stays in L1); otherwise they share a weight block --
  // except for a pointwise conv with many chunks: sharing a block makes every task convert its
  // chunk again, and streaming all weights per chunk instead ran ResNet-50's 1x1 convs 5-20% faster
  // at batch 8 (AVX2, AMD EPYC). With few chunks (batch 1) the threads would split the rows unevenly,
  // so those tasks share a block, and convert the whole input once first (converting each task's
  // chunk again cost 8% of ResNet-50's 256 -> 1024 1x1 at 14x14, batch 1, 2 threads).
  const bool weights_fit_l2 = blocks * block_words * static_cast<int64_t>(sizeof(int32_t)) <= kL2Bytes;
  // kSplit converts as a pointwise conv does (with its padding and taps, if any): the tasks' own chunks,
  // or the whole input first (then R S C bytes per output pixel, an im2col copy, and its top sums 4 bytes
  // per output value; a grouped conv's chunks hold only top sums, its input converted once).
  const bool converts_rows = pointwise || split;
  const bool rows_outer = weights_fit_l2 || (converts_rows && chunks >= 4 * at::get_num_threads());
  const bool convert_chunks = converts_rows && rows_outer;
  // Where tasks share a chunk and chunks are plenty, a task takes every block of its chunk: its rows are
  // then converted once, not by each thread that took one of its blocks (ResNet-50 at batch 8, AVX2: the
  // 1x1 convs of layer3 and layer4 3-5% faster, the forward ~1% at batches 1 and 8; AVX-512 VNNI: no change).
  const bool whole_chunks = rows_outer && chunks >= 4 * at::get_num_threads();
  constexpr int64_t kChunkRows = kChunkM * kTileM;
  std::unique_ptr<int32_t[]> x;
  std::unique_ptr<SplitBuffers> split_input;
  const std::vector<int8_t> border(static_cast<size_t>(split ? a.c : 0), static_cast<int8_t>(a.x_zero));
  // A grouped split conv's input, converted once; its tiles read their taps there, and its chunks hold only
  // top sums.
  const bool grouped_split = split && a.conv_groups > 1;
  const SplitInput grouped_input = grouped_split ? convert_split_input(a, wp, border.data()) : SplitInput{};
  // kSplit: output pixels first .. first + count - 1 converted into `into`.
  const auto convert_split = [&](int64_t first, int64_t count, const SplitChunk& into) {
    if (grouped_split) return grouped_split_tops(a, grouped_input, split_table, correction, first, count, into);
    convert_split_rows(a, pixel_words, border.data(), split_table, correction, first, count, into);
  };
  if (rows_layout) {
    x = pad_input_rows(a, hp, wp, row_words);
  } else if (split && !convert_chunks) {
    // A task per tile's rows, not per chunk: at batch 1 a 7x7 conv has one chunk of 48 rows and one of 1.
    split_input = std::make_unique<SplitBuffers>(m_total, grouped_split ? 0 : pixel_words, blocks);
    parallel_tasks(tiles, [&](ClaimedTasks& tasks) {
      for (int64_t tile; tasks.next(tile);) {
        const int64_t first = tile * kTileM;
        convert_split(first, std::min<int64_t>(kTileM, m_total - first), split_input->at(first));
      }
    });
  } else if (!convert_chunks) {
    x = pad_input(a, layout, hp, wp, pixel_words, seven_bit);
  }
  std::atomic<bool> eight_bit{false};
  // The rows of chunk `chunk` into `buffer` (once per run of tasks on it); returns the buffer.
  const auto converted_chunk = [&](int64_t chunk, int64_t& current, std::vector<int32_t>& buffer) {
    if (chunk != current) {
      buffer.resize(static_cast<size_t>(kChunkRows * pixel_words));
      const int64_t first = chunk * kChunkRows;
      if (convert_pointwise_rows(a, layout, pixel_words, first, std::min(kChunkRows, a.n * a.oh * a.ow - first), buffer.data())) {
        eight_bit.store(true, std::memory_order_relaxed);
      }
      current = chunk;
    }
    return buffer.data();
  };
  const EpilogueFn epilogue = epilogue_fn(isa, a);

#ifdef TLCORE_X86
  if (isa == Int8Isa::kAvx512Vnni) {
    // The zmm kernel: a task's unit of channels is a pair of blocks (32 channels), or the last
    // block alone when their number is odd; tiles are kZmmTileM rows. A grouped conv's blocks read
    // different channel windows, so there a unit is one block.
    constexpr int M = kZmmTileM;
    const int64_t unit_blocks = a.conv_groups == 1 ? 2 : 1;
    const int64_t units = (blocks + unit_blocks - 1) / unit_blocks;
    const int64_t zmm_tiles = (m_total + M - 1) / M;
    const int64_t zmm_chunks = (zmm_tiles + kZmmChunkM - 1) / kZmmChunkM;
    const int64_t unit_tasks = whole_chunks ? 1 : units;  // tasks per chunk
    parallel_tasks(unit_tasks * zmm_chunks, [&](ClaimedTasks& tasks) {
      alignas(64) int32_t acc[2 * M][kTileN];
      int64_t ms[M];
      const int32_t* rows[M];
      std::vector<int32_t> buffer;
      int64_t current = -1;
      for (int64_t task; tasks.next(task);) {
        const int64_t first_unit = rows_outer ? task % unit_tasks : task / zmm_chunks;
        const int64_t chunk = rows_outer ? task / unit_tasks : task % zmm_chunks;
        for (int64_t unit = first_unit; unit < (whole_chunks ? units : first_unit + 1); ++unit) {
          const int64_t block = unit_blocks * unit;
          const int64_t window = windows.start[block];  // the tile rows point at the block's channel window
          const int n_blocks = block + 1 < blocks && unit_blocks == 2 ? 2 : 1;
          const int32_t* w = weight + block * block_words;
          const int32_t* corr = correction + block * kTileN;
          const int64_t tile_end = std::min(zmm_tiles, (chunk + 1) * kZmmChunkM);
          const int64_t rows_end = std::min(m_total, tile_end * M);
          for (int64_t tile = chunk * kZmmChunkM; tile < tile_end; ++tile) {
            const int64_t m0 = tile * M;
            const int count = static_cast<int>(std::min<int64_t>(M, m_total - m0));
            // The output lines a tile ahead (and the first tile's own): at this kernel's speed, stores to
            // cold lines stalled the epilogue (in ResNet-50 at batch 8 on AMD Zen 5, four of layer1's and
            // layer2's 1x1 convs took 7-13% less time, layer4's 2-4% more, the forward ~1.5% less; the AVX2
            // kernels, three times slower, did not gain).
            if (tile == chunk * kZmmChunkM) prefetch_output(a, m0, count, block * kTileN);
            if (m0 + M < rows_end) prefetch_output(a, m0 + M, std::min<int64_t>(M, rows_end - m0 - M), block * kTileN);
            if (convert_chunks) {
              chunk_rows(converted_chunk(chunk, current, buffer) + window, pixel_words, m0 - chunk * kChunkRows, m0, count,
                         rows, ms);
            } else {
              tile_rows(a, x.get() + window, hp, row_words, column_words, m0, count, rows, ms);
            }
            if (pointwise) prefetch_residual(a, m0, count, block * kTileN);
            for (int i = count; i < M; ++i) rows[i] = rows[count - 1];  // zmm_tile may compute up to M rows
            const int64_t* offsets = tap_offsets.data();
            // Narrow groups have 1 or 2 words a group (quads: 4 or 8 channels), `groups` per tap.
            const int used =
                windows.narrow ? (groups == 1 ? zmm_tile<1, 1>(count, rows, w, block_words, offsets, taps, groups, corr, acc)
                                              : zmm_tile<1, 2>(count, rows, w, block_words, offsets, taps, groups, corr, acc))
                : n_blocks == 2 ? zmm_tile<2, 0>(count, rows, w, block_words, offsets, taps, groups, corr, acc)
                                : zmm_tile<1, 0>(count, rows, w, block_words, offsets, taps, groups, corr, acc);
            // The epilogue takes one block's 16 channels, all the tile's rows at once.
            for (int j = 0; j < n_blocks; ++j) epilogue(a, acc + j * used, ms, count, (block + j) * kTileN);
          }
        }
      }
    });
    return;
  }
#endif  // TLCORE_X86
  const TileFn run_tile = tile_fn(isa), quads_u7_tile = tile_fn(Int8Isa::kAvx2U7);
  const int64_t block_tasks = whole_chunks ? 1 : blocks;  // tasks per chunk
  parallel_tasks(block_tasks * chunks, [&](ClaimedTasks& tasks) {
    // The epilogue runs once per chunk, on all its tiles' rows: its per-block setup (constants
    // loaded and shuffled) cost a third as much as its per-row work when it ran per tile.
    alignas(32) int32_t acc[kChunkRows][kTileN];
    int64_t ms[kChunkRows];  // the chunk's output pixels, each tile's written by its rows helper
    std::vector<int32_t> buffer;
    int64_t current = -1;
    const SplitBuffers own_split(split && convert_chunks ? kChunkRows : 0, grouped_split ? 0 : pixel_words, blocks);
    // kSplit: chunk `chunk`, converted into own_split once per run of tasks on it, or from split_input.
    const auto split_chunk = [&](int64_t chunk) {
      const int64_t first = chunk * kChunkRows;
      if (!convert_chunks) return split_input->at(first);
      if (chunk != current) {
        convert_split(first, std::min(kChunkRows, m_total - first), own_split.at(0));
        current = chunk;
      }
      return own_split.at(0);
    };
    Tile t;
    TileFn split_kernel = nullptr;  // kSplit: split_tile, or the 7-bit quads kernel, as its rows were converted
    t.tap_offsets = tap_offsets.data();
    t.taps = taps;
    t.groups = groups;
    t.narrow = windows.narrow;
    t.start_stride = blocks * kTileN;  // kSplit: SplitChunk::top's rows
    for (int64_t task; tasks.next(task);) {
      const int64_t first_block = rows_outer ? task % block_tasks : task / chunks;
      const int64_t chunk = rows_outer ? task / block_tasks : task % chunks;
      for (int64_t block = first_block; block < (whole_chunks ? blocks : first_block + 1); ++block) {
        const int64_t window = windows.start[block];  // the tile rows point at the block's channel window
        t.weight = weight + block * block_words;
        t.correction = correction == nullptr ? nullptr : correction + block * kTileN;
        const int64_t first_tile = chunk * kChunkM, tile_end = std::min(tiles, first_tile + kChunkM);
        for (int64_t tile = first_tile; tile < tile_end; ++tile) {
          const int64_t m0 = tile * kTileM;
          const int rows = static_cast<int>(std::min<int64_t>(kTileM, m_total - m0));
          const int64_t slot = (tile - first_tile) * kTileM;
          if (split) {
            const SplitChunk converted = split_chunk(chunk);
            if (grouped_split) {
              const int32_t* input = grouped_input.words.get() + window;
              tile_rows(a, input, hp, row_words, column_words, m0, rows, t.rows, ms + slot);
            } else {
              chunk_rows(converted.words, pixel_words, m0 - chunk * kChunkRows, m0, rows, t.rows, ms + slot);
            }
            t.starts = converted.top + (m0 - chunk * kChunkRows) * t.start_stride + block * kTileN;
            split_kernel = converted.lanes[m0 - chunk * kChunkRows] ? split_tile : quads_u7_tile;
          } else if (convert_chunks) {
            chunk_rows(converted_chunk(chunk, current, buffer) + window, pixel_words, m0 - chunk * kChunkRows, m0, rows,
                       t.rows, ms + slot);
          } else {
            tile_rows(a, x.get() + window, hp, row_words, column_words, m0, rows, t.rows, ms + slot);
          }
          t.count = rows;
          if (pointwise) prefetch_residual(a, m0, rows, block * kTileN);
          (split ? split_kernel : run_tile)(t, acc + slot);
        }
        // Only the chunk's last tile can be partial, so its first `rows` slots are its pixels in order.
        const int rows = static_cast<int>(std::min<int64_t>(kChunkRows, m_total - first_tile * kTileM));
        epilogue(a, acc, ms, rows, block * kTileN);
      }
    }
  });
  if (seven_bit && eight_bit.load()) throw_eight_bit_input();
}

}  // namespace
}  // namespace int8_cpu

using namespace int8_cpu;

bool int8_requantization_in_range(const Int8ConvArgs& a) {
  return largest_total(a) < 0.99 * std::ldexp(1.0, 62);
}

bool int8_isa_supported(Int8Isa isa) {
  switch (isa) {
    case Int8Isa::kAuto:
    case Int8Isa::kScalar:
      return true;
#ifdef TLCORE_X86
    case Int8Isa::kAvx2:
    case Int8Isa::kAvx2U7:
      return __builtin_cpu_supports("avx2");
    case Int8Isa::kAvxVnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
    case Int8Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("avx512vl");
    case Int8Isa::kAmx:
      return amx_supported();
#endif
    default:
      return false;
  }
}

Int8Isa int8_resolve_isa(Int8Isa isa) {
  if (isa == Int8Isa::kAuto) isa = best_isa();
  if (!int8_isa_supported(isa)) {
    throw std::invalid_argument(std::string("tlcore int8 conv: this CPU does not support the ") + isa_name(isa) +
                                " kernel");
  }
  return isa;
}

bool int8_algorithm_supported(Int8Algorithm algorithm, int64_t k, int64_t c, int64_t r, int64_t s, int64_t stride_h,
                              int64_t stride_w, int64_t dil_h, int64_t dil_w, Int8Isa isa, int64_t conv_groups) {
  const bool split_isa = isa == Int8Isa::kAvx2 || isa == Int8Isa::kAvx2U7;
  if (conv_groups != 1) {
    // Grouped split: each block of 16 output channels within one group, whose channels start on a lane of
    // split_tile; its lists hold the input's channels as uint16, and its entries a group's in 15 bits.
    const int64_t c_group = c / conv_groups, k_group = k / conv_groups;
    return algorithm == Int8Algorithm::kDirect ||
           (algorithm == Int8Algorithm::kSplit && split_isa && c_group % 16 == 0 && k_group % kTileN == 0 &&
            c <= 32768);
  }
  switch (algorithm) {
    case Int8Algorithm::kDirect:
      return true;
    case Int8Algorithm::kWinograd:
      return stride_h == 1 && stride_w == 1 && winograd_supported(c, r, s, stride_h, stride_w, dil_h, dil_w, isa);
    case Int8Algorithm::kStrideTwoWinograd:
      return stride_h == 2 && stride_w == 2 && winograd_supported(c, r, s, stride_h, stride_w, dil_h, dil_w, isa);
    case Int8Algorithm::kRows:  // pairs must start on a word: every window start, stride_w * C elements apart
      return (isa == Int8Isa::kScalar || isa == Int8Isa::kAvx2) && dil_w == 1 && (c * stride_w) % 2 == 0;
    case Int8Algorithm::kSplit:  // its lists hold (tap, channel) as uint16; each tap starts on a lane of 8 channels
      return split_isa && (r * s == 1 || c % 8 == 0) && r * s * c <= 65536;
  }
  return false;
}

Int8Algorithm int8_best_algorithm(int64_t k, int64_t c, int64_t r, int64_t s, int64_t stride_h, int64_t stride_w,
                                  int64_t dil_h, int64_t dil_w, Int8Isa isa, int64_t conv_groups) {
  const auto supported = [&](Int8Algorithm algorithm) {
    return int8_algorithm_supported(algorithm, k, c, r, s, stride_h, stride_w, dil_h, dil_w, isa, conv_groups);
  };
  if (conv_groups != 1) {
    // On ResNeXt's in-model inputs (AVX2-capped AMD Zen 5, batch 8) the split algorithm ran the grouped 3x3
    // convs of 32 and 64 channels a group in 0.47-0.88x direct's time (8-bit and 7-bit codes; stride 2 the
    // least), and those of 16 in 0.89-0.95x on 7-bit codes but 0.96-1.15x on 8-bit ones: 8-bit codes list
    // more channels, and each listed channel's weights are added at every tap that reads it, against the
    // products of only 16 channels a group.
    const bool split = supported(Int8Algorithm::kSplit) && ((c / conv_groups) % 32 == 0 || isa == Int8Isa::kAvx2U7);
    return split ? Int8Algorithm::kSplit : Int8Algorithm::kDirect;
  }
  if (supported(Int8Algorithm::kWinograd)) return Int8Algorithm::kWinograd;
  // Two quads per int16 lane plus the listed top bits (int8_split.cpp) ran ResNet-50's 1x1 convs at batch 8
  // 0.99-1.35x as fast as the int16 pairs on 8-bit codes (all but one >= 1.05x) and 1.01-1.27x as fast
  // as the 7-bit quads kernel on 7-bit ones (AVX2-capped AMD Zen 5). The exceptions read layer1.0's
  // dense max-pooled input, whose rows take vpmaddubsw's pairs: 64 -> 256 and 64 -> 64 at 0.94x and
  // 0.84x the int16 pairs' speed, ~0.3% of the model.
  if (supported(Int8Algorithm::kSplit) && r * s == 1) return Int8Algorithm::kSplit;
  // Stride 2 saves a third of the products but has 25 / 9 as many weights to stream: measured (AVX2,
  // AMD EPYC) 7-23% faster at batch 8 for C * K <= 256 * 256 and as fast at batch 1, but at 256 x 512 no
  // faster at batch 8 and 5-15% slower at batch 1. Not for 7-bit codes: its int16 products cost 4
  // instructions per 32 where direct vpmaddubsw takes 3, which undoes the saving; direct ran ResNet-50's
  // 128- and 256-channel stride-2 3x3 convs 0.97-1.14x as fast (AVX2-capped Intel Xeon, batch 1 and 8),
  // and the split algorithm below runs them 1.2-1.25x as fast as direct (AMD Zen 5, batches 1 and 8).
  if (c * k <= 256 * 256 && isa != Int8Isa::kAvx2U7 && supported(Int8Algorithm::kStrideTwoWinograd)) {
    return Int8Algorithm::kStrideTwoWinograd;
  }
  // Larger kernels run the split algorithm on each output pixel's taps converted into one row of R S C
  // codes. On ResNet-50's in-model inputs at batch 8 (AVX2-capped AMD Zen 5), the 512-channel 3x3
  // stride-2 conv took 0.73x direct's time, but the 128- and 256-channel ones 0.95x and 1.15x stride-2
  // Winograd's: 3-9% of their codes are >= 128, and each listed code costs K / 16 additions per pixel.
  // On synthetic post-ReLU codes (none >= 128) 5x5 and dilated 3x3 convs ran as fast or faster from
  // 32 channels up; where C is not a multiple of 32 the conversion's scalar tail runs every tap, and
  // 8-48 channels ran up to 4x slower than direct.
  if (supported(Int8Algorithm::kSplit) && c % 32 == 0) return Int8Algorithm::kSplit;
  // Odd C wastes a pair slot per pixel in the direct layout; the rows layout wastes at most one per tap row.
  if (c % 2 == 1 && s > 1 && supported(Int8Algorithm::kRows)) return Int8Algorithm::kRows;
  return Int8Algorithm::kDirect;
}

int64_t int8_packed_weight_words(int64_t k, int64_t c, int64_t r, int64_t s, Int8Isa isa, Int8Algorithm algorithm,
                                 int64_t conv_groups) {
  isa = int8_resolve_isa(isa);
  switch (algorithm) {
    case Int8Algorithm::kWinograd: return winograd_packed_words(k, c, false);
    case Int8Algorithm::kStrideTwoWinograd: return winograd_packed_words(k, c, true);
    case Int8Algorithm::kRows: return direct_packed_words(k, c, r, s, Layout::kRowPairs);
    case Int8Algorithm::kSplit: return direct_packed_words(k, c, r, s, Layout::kSplitQuads, conv_groups);
    default: return direct_packed_words(k, c, r, s, layout_for(isa, conv_groups), conv_groups);
  }
}

namespace {

void check_conv_groups(int64_t c, int64_t k, int64_t conv_groups) {
  if (conv_groups < 1 || c % conv_groups != 0 || k % conv_groups != 0) {
    throw std::invalid_argument("tlcore int8 conv: groups must divide the input and output channels");
  }
}

}  // namespace

void pack_int8_weight_cpu(const int8_t* weight, int64_t k, int64_t c, int64_t r, int64_t s, Int8Isa isa,
                          Int8Algorithm algorithm, int32_t* packed, int64_t conv_groups) {
  isa = int8_resolve_isa(isa);
  check_conv_groups(c, k, conv_groups);
  if (conv_groups != 1 && algorithm != Int8Algorithm::kDirect && algorithm != Int8Algorithm::kSplit) {
    throw std::invalid_argument("tlcore int8 conv: grouped convs are packed for the direct and split algorithms only");
  }
  // Stride and dilation only restrict which convs may use a packing, not the packing itself.
  const bool packable = algorithm == Int8Algorithm::kDirect ||
                        (algorithm == Int8Algorithm::kWinograd && winograd_supported(c, r, s, 1, 1, 1, 1, isa)) ||
                        (algorithm == Int8Algorithm::kStrideTwoWinograd && winograd_supported(c, r, s, 2, 2, 1, 1, isa)) ||
                        (algorithm == Int8Algorithm::kRows && (isa == Int8Isa::kScalar || isa == Int8Isa::kAvx2)) ||
                        (algorithm == Int8Algorithm::kSplit &&
                         int8_algorithm_supported(algorithm, k, c, r, s, 1, 1, 1, 1, isa, conv_groups));
  if (!packable) {
    throw std::invalid_argument("tlcore int8 conv: no packing of this algorithm for this weight and instruction set");
  }
  switch (algorithm) {
    case Int8Algorithm::kWinograd: return pack_winograd_weight(weight, k, c, false, packed);
    case Int8Algorithm::kStrideTwoWinograd: return pack_winograd_weight(weight, k, c, true, packed);
    case Int8Algorithm::kRows: return pack_direct_weight(weight, k, c, r, s, Layout::kRowPairs, packed);
    case Int8Algorithm::kSplit: return pack_direct_weight(weight, k, c, r, s, Layout::kSplitQuads, packed, conv_groups);
    default: return pack_direct_weight(weight, k, c, r, s, layout_for(isa, conv_groups), packed, conv_groups);
  }
}

Int8Isa int8_conv2d_cpu(const Int8ConvArgs& a, Int8Isa isa) {
  isa = int8_resolve_isa(isa);
  check_conv_groups(a.c, a.k, a.conv_groups);
  if (!int8_requantization_in_range(a)) {
    throw std::invalid_argument("tlcore int8 conv: |acc * multiplier + offset (+ residual * res_multiplier)| can "
                                "reach 2**62, beyond the int64 headroom of the epilogue; build the constants with "
                                "tlcore.ops.requantization");
  }
  const auto algorithm = static_cast<Int8Algorithm>(a.algorithm);
  if (!int8_algorithm_supported(algorithm, a.k, a.c, a.r, a.s, a.stride_h, a.stride_w, a.dil_h, a.dil_w, isa,
                                a.conv_groups)) {
    throw std::invalid_argument("tlcore int8 conv: this algorithm cannot run this conv on this instruction set "
                                "(see Int8Algorithm in csrc/int8_conv.h)");
  }
  if (algorithm == Int8Algorithm::kWinograd || algorithm == Int8Algorithm::kStrideTwoWinograd) {
    int8_conv2d_winograd(a, isa);
  } else {
    int8_conv2d_direct(a, isa, algorithm);
  }
  return isa;
}

}  // namespace tlcore
