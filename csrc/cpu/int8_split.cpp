// The split algorithm (Int8Algorithm::kSplit): convs on AVX2 CPUs without VNNI, exact on 8-bit codes,
// in fewer instructions per product than torch.ao's 7-bit kernel; described below for a 1x1 conv. A
// conv with R x S taps runs as the 1x1 conv of R S C channels whose input pixel is an output pixel's
// taps (convert_taps: an im2col row, converted as it is gathered; the weights packed as (K, 1, 1, R S C)).
// A grouped conv (C / G and K / G multiples of 16: ResNeXt's wider stages) instead converts its padded
// input once (convert_split_input: the codes, and per pixel and group the listed channels), and its tiles
// read the taps of each block's own group there, as the direct algorithm's do (split_tile over taps): an
// im2col row would convert each code once per tap, which took half of a stride-1 3x3 conv's time. Each
// output pixel's top sums gather its taps' lists per group (grouped_split_tops) and add their table rows
// to that group's K / G channels only; the weights are packed as (K, 1, 1, R S C / G), which is the
// direct layout of the group's window.
//
// AVX2's exact int16 pairs (vpmaddwd + vpaddd, int8_conv.cpp) take 4 instructions per 32
// products; vpmaddubsw + vpmaddwd + vpaddd (torch.ao's reduce_range kernel, tile_avx2u7) take 3.
// split_tile takes 2.5: per int16 lane it adds the vpmaddubsw pairs of two quads (vpaddw) before
// one vpmaddwd + vpaddd widens them, so a lane holds 4 products u w of codes u = x + 128. That is
// exact, for any int8 weights (|w| <= 128), while the lane's 4 codes sum to at most 256, and
// post-ReLU codes are mostly small. So the kernel runs on codes t that keep u where the lane is
// safe; in a lane past the bound they drop bit 7, then bit 6 if that is not enough (4 codes < 64
// sum to at most 252):
//   u = t + 64 * l, with l (0..3) what a channel dropped, in units of 64,
//   acc = sum_c x w = sum_c t w - 128 * sum_c w + 64 * sum_c l_c w.
// The second sum is the quads' correction; the third adds, per pixel, the weights of the listed
// channels (those that dropped bit 7 in a sum that is then doubled, those that dropped bit 6 after
// it): one vpaddw per entry and 16 output channels, over rows of a (C, K) int16 table read front to
// back (per block of 16 channels, C scattered 32-byte reads took a third as long as the 7-bit
// products, waiting on L2). Both corrections are summed once per pixel
// for all K, as the accumulators' starting values.
// Post-ReLU activations list few: in ResNet-50's 1x1 convs (torchvision's initial weights, minmax
// calibration) 0.5-11% of the lanes are past the bound, 0.004-0.1 units of 64 a code (mean codes
// 20-33), except layer1.0's max-pooled input (mean 71): 67%, 0.5 units a code. Rows that would list that
// many (judged on their first pixel; a grouped conv's whole input on its first row) take vpmaddubsw's
// pairs instead (tile_avx2u7, the same packed weights), bounded the same way but in pairs of codes, which
// list ~1/100 as many there: layer1.0's 1x1 convs ran 1.25-1.35x faster, and on uniform codes (half of
// them >= 128) 1024 -> 256, 256 -> 64 and 64 -> 256 convs 1.5-1.75x. With every channel listed the conv
// would take ~1.5x the int16 pairs kernel's time: slower, never wrong. 7-bit codes (reduce_range) take
// the same path and never drop bit 7.
#include "cpu/int8_cpu.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace tlcore {
namespace int8_cpu {

namespace {
int64_t blocks_of(int64_t k) { return (k + kTileN - 1) / kTileN; }
}  // namespace

int64_t split_table_words(int64_t k, int64_t c) { return c * blocks_of(k) * kTileN / 2; }

void pack_split_table(const int8_t* weight, int64_t k, int64_t c, int32_t* table) {
  const int64_t width = blocks_of(k) * kTileN;
  int16_t* values = reinterpret_cast<int16_t*>(table);  // int16 through int32 storage: both sides are ours
  for (int64_t ch = 0; ch < c; ++ch) {
    for (int64_t out = 0; out < width; ++out) values[ch * width + out] = out < k ? weight[out * c + ch] : 0;
  }
}

SplitBuffers::SplitBuffers(int64_t rows, int64_t groups, int64_t k_blocks)
    : groups_(groups), top_words_(k_blocks * kTileN),
      words_(new int32_t[static_cast<size_t>(rows * groups)]),
      top_(new int32_t[static_cast<size_t>(rows * top_words_)]), lanes_(new bool[static_cast<size_t>(rows)]) {}

SplitChunk SplitBuffers::at(int64_t row) const {
  return {words_.get() + row * groups_, top_.get() + row * top_words_, lanes_.get() + row};
}

#ifdef TLCORE_X86
namespace {

// An int16 sum of table rows, each added once or twice, ends exact while they count 256 in all (|256 * -128|
// <= 2**15): vpaddw wraps modulo 2**16 in between, and the true sum fits.
constexpr int64_t kInt16Rows = 256;
constexpr int64_t kPrefetchAhead = 4;
// An int16 lane of products u w (2 in vpmaddubsw's pairs, 4 in split_tile's lanes) stays within int16
// for every int8 w while its codes sum to <= 256.
constexpr int kSafeLaneSum = 256;
// The listed table rows are summed in units of 64 for split_tile (bit 6 once, bit 7 doubled), of 128 for
// the pairs (bit 7 only).
constexpr int kLanesUnitShift = 6, kPairsUnitShift = 7;
// Rows whose first pixel lists more than one unit per kDenseCodesPerUnit codes under split_tile's rule
// take the pairs' (ResNet-50's layer1.0 input, the max-pool's: ~0.5 units a code; the other 1x1 convs'
// inputs 0.004-0.1).
constexpr int64_t kDenseCodesPerUnit = 8;

// One pixel's listed channels, the table rows its top sums: 2 * the `doubled` rows + the `single` ones,
// in the rule's unit. Adding the row of a dropped bit 7 once to a sum then doubled, instead of twice,
// ran ResNet-50's 1x1 convs with many entries (1024 -> 256, 256 -> 1024, 2048 -> 512 at batch 8) 3-4%
// faster (AVX2-capped AMD Zen 5).
struct Listed {
  uint16_t* doubled;
  uint16_t* single;
  int64_t doubled_count = 0, single_count = 0;
  int64_t units() const { return 2 * doubled_count + single_count; }
};

// sum[0 .. V) += table rows rows[begin .. end) (of `count`), values [0 .. 16 V) (`width` apart) as int16.
template <int V>
__attribute__((target("avx2"), always_inline)) inline void add_rows(const int16_t* table, int64_t width,
                                                                     const uint16_t* rows, int64_t begin,
                                                                     int64_t end, int64_t count, __m256i* sum) {
  for (int64_t e = begin; e < end; ++e) {
    if (e + kPrefetchAhead < count) {
      _mm_prefetch(reinterpret_cast<const char*>(table + rows[e + kPrefetchAhead] * width), _MM_HINT_T0);
    }
    const int16_t* row = table + rows[e] * width;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      sum[v] = _mm256_add_epi16(sum[v], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * v)));
    }
  }
}

// top[0 .. 16 V) = 2**unit_shift * (2 * the doubled + the single rows of the table, values [0 .. 16 V),
// `width` apart) - correction[0 .. 16 V): V ymm of int16 sums in registers, widened to int32 per run of
// rows that count kInt16Rows; prefetching the rows kPrefetchAhead on cut the conversion's time by ~15%
// (L2 latency).
template <int V>
__attribute__((target("avx2"), always_inline)) inline void sum_rows(const int16_t* table, int64_t width,
                                                                     const Listed& listed, int unit_shift,
                                                                     const int32_t* correction, int32_t* top) {
  __m256i sum[V];
  int64_t d = 0, e = 0;  // the next doubled and single rows
  const int32_t* base = correction;  // the first run subtracts the correction, the others add to top
  do {  // once at least: with no rows listed, top = -correction
    const int64_t d_stop = std::min(listed.doubled_count, d + kInt16Rows / 2);
    const int64_t e_stop = std::min(listed.single_count, e + kInt16Rows - 2 * (d_stop - d));
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) sum[v] = _mm256_setzero_si256();
    if (d < d_stop) {
      add_rows<V>(table, width, listed.doubled, d, d_stop, listed.doubled_count, sum);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) sum[v] = _mm256_add_epi16(sum[v], sum[v]);
    }
    add_rows<V>(table, width, listed.single, e, e_stop, listed.single_count, sum);
    d = d_stop;
    e = e_stop;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      for (int h = 0; h < 2; ++h) {
        const __m128i half = h == 0 ? _mm256_castsi256_si128(sum[v]) : _mm256_extracti128_si256(sum[v], 1);
        const __m256i products = _mm256_sll_epi32(_mm256_cvtepi16_epi32(half), _mm_cvtsi32_si128(unit_shift));
        const __m256i from = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 16 * v + 8 * h));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(top + 16 * v + 8 * h),
                            base == top ? _mm256_add_epi32(from, products) : _mm256_sub_epi32(products, from));
      }
    }
    base = top;
  } while (d < listed.doubled_count || e < listed.single_count);
}

// kSetBits[m]: the positions of m's set bits, in increasing order (then 0s).
struct SetBits {
  uint8_t at[256][8] = {};
  constexpr SetBits() {
    for (int m = 0; m < 256; ++m) {
      for (int bit = 0, n = 0; bit < 8; ++bit) {
        if (m >> bit & 1) at[m][n++] = static_cast<uint8_t>(bit);
      }
    }
  }
};
constexpr SetBits kSetBits;

// Appends channel + i for each set bit i of `set` (32 channels) to listed[count ..]; returns the new
// count. Writes 8 entries per 8 channels whatever their bits (listed has room for 8 more),
// without branches: with a loop over the set bits, which mispredicted its exit per 32 channels, a
// 256 -> 64 1x1 conv's conversion took 0.7x as long as its 7-bit products; with this, 0.5x (perf).
__attribute__((target("avx2"), always_inline)) inline int64_t list_set_channels(uint32_t set, int64_t channel,
                                                                                uint16_t* listed, int64_t count) {
  for (int q = 0; q < 4; ++q, set >>= 8) {
    const uint32_t bits = set & 0xff;
    const __m128i at = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kSetBits.at[bits])));
    const __m128i channels = _mm_add_epi16(at, _mm_set1_epi16(static_cast<int16_t>(channel + 8 * q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(listed + count), channels);
    count += __builtin_popcount(bits);
  }
  return count;
}

// Lane j of quads 2m and 2m + 1, the int16 lane split_tile sums them in: 4 of the 8 channels from 8m.
constexpr int kLaneChannels[2][4] = {{0, 1, 4, 5}, {2, 3, 6, 7}};

// 0xffff in each int16 lane of 32 codes t whose split_tile lane (kLaneChannels) sums its 4 codes to
// more than kSafeLaneSum; the two int16 lanes that hold one such sum get the same mask.
__attribute__((target("avx2"), always_inline)) inline __m256i lanes_past_bound(__m256i t) {
  const __m256i pair_sums = _mm256_maddubs_epi16(t, _mm256_set1_epi8(1));  // t0 + t1 <= 510: exact
  const __m256i lane_sums = _mm256_add_epi16(pair_sums, _mm256_shuffle_epi32(pair_sums, 0xb1));  // + the other quad's
  return _mm256_cmpgt_epi16(lane_sums, _mm256_set1_epi16(kSafeLaneSum));
}

// split_tile's rule on 32 codes x, channels first .. first + 31: returns the codes t to store; lists the
// channels that dropped bit 7 doubled and those that dropped bit 6 single (units of 64).
__attribute__((target("avx2"), always_inline)) inline __m256i lanes_rule(__m256i x, int64_t first, Listed& listed) {
  __m256i t = _mm256_xor_si256(x, _mm256_set1_epi8(-128));  // u = x + 128
  __m256i unsafe = lanes_past_bound(t);
  if (_mm256_testz_si256(unsafe, unsafe)) return t;
  // drop bit 7, then bit 6 where that is not enough
  const __m256i top7 = _mm256_and_si256(unsafe, _mm256_and_si256(t, _mm256_set1_epi8(-128)));
  t = _mm256_xor_si256(t, top7);
  unsafe = lanes_past_bound(t);
  const __m256i top6 = _mm256_and_si256(unsafe, _mm256_and_si256(t, _mm256_set1_epi8(64)));
  t = _mm256_xor_si256(t, top6);
  const uint32_t bits7 = static_cast<uint32_t>(_mm256_movemask_epi8(top7));
  const uint32_t bits6 = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_add_epi8(top6, top6)));
  listed.doubled_count = list_set_channels(bits7, first, listed.doubled, listed.doubled_count);
  listed.single_count = list_set_channels(bits6, first, listed.single, listed.single_count);
  return t;
}

// The pairs' rule (tile_avx2u7) on 32 codes x, channels first .. first + 31: vpmaddubsw's pair
// u0 w0 + u1 w1 is exact while u0 + u1 <= 256, so codes t keep u where the pair is safe and drop bit 7
// where not; those channels are listed single, in units of 128. It lists far fewer than split_tile's
// rule where most lanes are past the bound.
__attribute__((target("avx2"), always_inline)) inline __m256i pairs_rule(__m256i x, int64_t first, Listed& listed) {
  const __m256i u = _mm256_xor_si256(x, _mm256_set1_epi8(-128));
  const __m256i pair_sums = _mm256_maddubs_epi16(u, _mm256_set1_epi8(1));
  const __m256i unsafe = _mm256_cmpgt_epi16(pair_sums, _mm256_set1_epi16(kSafeLaneSum));
  const __m256i top = _mm256_and_si256(unsafe, _mm256_and_si256(u, _mm256_set1_epi8(-128)));
  const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_epi8(top));
  if (bits != 0) listed.single_count = list_set_channels(bits, first, listed.single, listed.single_count);
  return _mm256_xor_si256(u, top);
}

// One pixel's C codes into dst (C bytes) by split_tile's rule (LANES) or the pairs', numbered from
// first_channel (a tap's place in the row of a conv with several). Each list comes out in runs of 8
// channels in increasing order.
template <bool LANES>
__attribute__((target("avx2"), always_inline)) inline void convert_codes(const int8_t* __restrict src,
                                                                         uint8_t* __restrict dst, int64_t c,
                                                                         int64_t first_channel, Listed& listed) {
  int64_t ch = 0;
  for (; ch + 32 <= c; ch += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + ch));
    const __m256i t = LANES ? lanes_rule(x, first_channel + ch, listed) : pairs_rule(x, first_channel + ch, listed);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + ch), t);
  }
  if (!LANES) {
    for (; ch < c; ch += 2) {  // the tail's pairs
      const int u0 = src[ch] + 128, u1 = ch + 1 < c ? src[ch + 1] + 128 : 0;
      const bool unsafe = u0 + u1 > kSafeLaneSum;
      for (int j = 0; j < 2 && ch + j < c; ++j) {
        const int u = j == 0 ? u0 : u1;
        const bool dropped = unsafe && u >= 128;
        dst[ch + j] = static_cast<uint8_t>(dropped ? u - 128 : u);
        if (dropped) listed.single[listed.single_count++] = static_cast<uint16_t>(first_channel + ch + j);
      }
    }
    return;
  }
  for (; ch < c; ch += 8) {  // the tail's lanes; past C, the quads' padding holds 0
    for (const auto& lane : kLaneChannels) {
      int t[4], sum = 0;
      for (int e = 0; e < 4; ++e) sum += t[e] = ch + lane[e] < c ? src[ch + lane[e]] + 128 : 0;
      for (int bit = 7; bit >= 6 && sum > kSafeLaneSum; --bit) {
        for (int e = 0; e < 4; ++e) {
          if (!(t[e] >> bit & 1)) continue;
          t[e] -= 1 << bit;
          sum -= 1 << bit;
          const auto channel = static_cast<uint16_t>(first_channel + ch + lane[e]);
          if (bit == 7) {
            listed.doubled[listed.doubled_count++] = channel;
          } else {
            listed.single[listed.single_count++] = channel;
          }
        }
      }
      for (int e = 0; e < 4; ++e) {
        if (ch + lane[e] < c) dst[ch + lane[e]] = static_cast<uint8_t>(t[e]);
      }
    }
  }
}

// One output pixel's row: the codes of its R x S taps in the weight's (R, S, C) order, tap (i, j) from
// input pixel (iy + i dil_h, ix + j dil_w) of image n, or from `border` (C codes of x_zero) outside
// the image; by split_tile's rule (LANES) or the pairs'. C is a multiple of 8 where R S > 1, so every
// tap starts on a lane of split_tile.
template <bool LANES>
__attribute__((target("avx2"), always_inline)) inline void convert_taps(const Int8ConvArgs& a, int64_t n, int64_t iy,
                                                                        int64_t ix, const int8_t* border, uint8_t* dst,
                                                                        Listed& listed) {
  const int64_t c = a.c;  // a local: byte stores may alias a's fields
  for (int64_t i = 0, tap = 0; i < a.r; ++i) {
    for (int64_t j = 0; j < a.s; ++j, ++tap) {
      const int64_t y = iy + i * a.dil_h, x = ix + j * a.dil_w;
      const bool inside = y >= 0 && y < a.h && x >= 0 && x < a.w;
      convert_codes<LANES>(inside ? a.x + ((n * a.h + y) * a.w + x) * c : border, dst + tap * c, c, tap * c, listed);
    }
  }
}

// top[0 .. width) for `listed` (sum_rows), 8 registers (128 channels) at a time, then the rest in one pass.
__attribute__((target("avx2"), always_inline)) inline void sum_columns(const int16_t* table, int64_t width,
                                                                       const Listed& listed, int unit_shift,
                                                                       const int32_t* correction, int32_t* top) {
  int64_t v = 0;
  for (; v + 8 <= width / 16; v += 8) {
    sum_rows<8>(table + 16 * v, width, listed, unit_shift, correction + 16 * v, top + 16 * v);
  }
  table += 16 * v;
  correction += 16 * v;
  top += 16 * v;
  switch (width / 16 - v) {
    case 1: return sum_rows<1>(table, width, listed, unit_shift, correction, top);
    case 2: return sum_rows<2>(table, width, listed, unit_shift, correction, top);
    case 3: return sum_rows<3>(table, width, listed, unit_shift, correction, top);
    case 4: return sum_rows<4>(table, width, listed, unit_shift, correction, top);
    case 5: return sum_rows<5>(table, width, listed, unit_shift, correction, top);
    case 6: return sum_rows<6>(table, width, listed, unit_shift, correction, top);
    case 7: return sum_rows<7>(table, width, listed, unit_shift, correction, top);
    default: return;
  }
}

}  // namespace

__attribute__((target("avx2"))) void convert_split_rows(const Int8ConvArgs& a, int64_t groups, const int8_t* border,
                                                        const int16_t* table, const int32_t* correction,
                                                        int64_t first, int64_t count, const SplitChunk& chunk) {
  const int64_t row_c = a.r * a.s * a.c, bytes = 4 * groups, width = blocks_of(a.k) * kTileN;
  // Each (tap, channel) is in each list at most once; list_set_channels writes 8 at a time.
  std::vector<uint16_t> channels(static_cast<size_t>(2 * (row_c + 8)));
  bool lanes = true;  // split_tile's rule, or the pairs' for a dense input (decided on the first pixel)
  int64_t n = first / (a.oh * a.ow), y = (first / a.ow) % a.oh, col = first % a.ow;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t iy = y * a.stride_h - a.pad_h, ix = col * a.stride_w - a.pad_w;
    uint8_t* dst = reinterpret_cast<uint8_t*>(chunk.words + i * groups);
    Listed listed{channels.data(), channels.data() + row_c + 8};
    if (lanes) {
      convert_taps<true>(a, n, iy, ix, border, dst, listed);
    } else {
      convert_taps<false>(a, n, iy, ix, border, dst, listed);
    }
    if (i == 0 && lanes && listed.units() * kDenseCodesPerUnit > row_c) {  // a dense input: pairs for these rows
      lanes = false;
      listed = Listed{channels.data(), channels.data() + row_c + 8};
      convert_taps<false>(a, n, iy, ix, border, dst, listed);
    }
    std::fill(dst + row_c, dst + bytes, 0);
    sum_columns(table, width, listed, lanes ? kLanesUnitShift : kPairsUnitShift, correction, chunk.top + i * width);
    chunk.lanes[i] = lanes;
    if (++col == a.ow) {
      col = 0;
      if (++y == a.oh) y = 0, ++n;
    }
  }
}

// ---- Grouped convs: the input converted once ----

namespace {

// One padded pixel's codes into dst and its listed channels onto `lists` (SplitInput::RowLists) as entries
// (group << 16 | channel within the group << 1 | doubled). scratch: room for 2 (C + 8) channels.
template <bool LANES>
__attribute__((target("avx2"))) void convert_input_pixel(const int8_t* src, int64_t c, int64_t c_group, uint8_t* dst,
                                                         uint16_t* scratch, SplitInput::RowLists& lists) {
  Listed listed{scratch, scratch + c + 8};
  convert_codes<LANES>(src, dst, c, 0, listed);
  const auto entry = [c_group](uint16_t channel, uint32_t doubled) {
    return static_cast<uint32_t>(channel / c_group) << 16 | static_cast<uint32_t>(channel % c_group) << 1 | doubled;
  };
  for (int64_t d = 0; d < listed.doubled_count; ++d) lists.entries.push_back(entry(listed.doubled[d], 1));
  for (int64_t e = 0; e < listed.single_count; ++e) lists.entries.push_back(entry(listed.single[e], 0));
  lists.starts.push_back(static_cast<uint32_t>(lists.entries.size()));
}

// Padded row `row` (image row * hp + row within the padded image) into dst (wp pixels of C codes) and `lists`.
template <bool LANES>
__attribute__((target("avx2"))) void convert_input_row(const Int8ConvArgs& a, int64_t wp, const int8_t* border,
                                                       int64_t row, uint8_t* dst, uint16_t* scratch,
                                                       SplitInput::RowLists& lists) {
  const int64_t hp = a.h + 2 * a.pad_h, n = row / hp, y = row % hp - a.pad_h, c_group = a.c / a.conv_groups;
  lists.entries.clear();
  lists.starts.assign(1, 0);
  for (int64_t x = 0; x < wp; ++x) {
    const bool inside = y >= 0 && y < a.h && x >= a.pad_w && x < a.pad_w + a.w;
    const int8_t* src = inside ? a.x + ((n * a.h + y) * a.w + x - a.pad_w) * a.c : border;
    convert_input_pixel<LANES>(src, a.c, c_group, dst + x * a.c, scratch, lists);
  }
}

}  // namespace

SplitInput convert_split_input(const Int8ConvArgs& a, int64_t wp, const int8_t* border) {
  const int64_t hp = a.h + 2 * a.pad_h, rows = a.n * hp;
  SplitInput input{std::unique_ptr<int32_t[]>(new int32_t[static_cast<size_t>(rows * wp * a.c / 4)]),
                   std::vector<SplitInput::RowLists>(static_cast<size_t>(rows)), true};
  uint8_t* codes = reinterpret_cast<uint8_t*>(input.words.get());
  // The rule, decided on the first image row (dense rows list more than one unit per kDenseCodesPerUnit
  // codes under split_tile's): every tile reads taps of several rows, so all must take the same one.
  {
    std::vector<uint16_t> scratch(static_cast<size_t>(2 * (a.c + 8)));
    SplitInput::RowLists& first = input.rows[a.pad_h];
    convert_input_row<true>(a, wp, border, a.pad_h, codes + a.pad_h * wp * a.c, scratch.data(), first);
    int64_t units = 0;
    for (const uint32_t entry : first.entries) units += 1 + (entry & 1);
    input.lanes = units * kDenseCodesPerUnit <= wp * a.c;
  }
  parallel_tasks(rows, [&](ClaimedTasks& tasks) {
    std::vector<uint16_t> scratch(static_cast<size_t>(2 * (a.c + 8)));
    for (int64_t row; tasks.next(row);) {
      (input.lanes ? convert_input_row<true> : convert_input_row<false>)(a, wp, border, row, codes + row * wp * a.c,
                                                                         scratch.data(), input.rows[row]);
    }
  });
  return input;
}

__attribute__((target("avx2"))) void grouped_split_tops(const Int8ConvArgs& a, const SplitInput& input,
                                                        const int16_t* table, const int32_t* correction,
                                                        int64_t first, int64_t count, const SplitChunk& chunk) {
  const int64_t hp = a.h + 2 * a.pad_h, width = blocks_of(a.k) * kTileN;
  const int64_t c_group = a.c / a.conv_groups, k_group = a.k / a.conv_groups;
  const int unit_shift = input.lanes ? kLanesUnitShift : kPairsUnitShift;
  int64_t n = first / (a.oh * a.ow), y = (first / a.ow) % a.oh, col = first % a.ow;
  for (int64_t i = 0; i < count; ++i) {
    int32_t* top = chunk.top + i * width;
    for (int64_t k = 0; k < width; k += 8) {
      const __m256i from = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(correction + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(top + k), _mm256_sub_epi32(_mm256_setzero_si256(), from));
    }
    // Each tap's listed channels add their table rows (tap * C / G + the channel within the group) to their
    // group's K / G values, in int32 (wrapping, like the accumulators they start).
    for (int64_t r = 0, tap = 0; r < a.r; ++r) {
      const SplitInput::RowLists& lists = input.rows[n * hp + y * a.stride_h + r * a.dil_h];
      for (int64_t s = 0; s < a.s; ++s, ++tap) {
        const int64_t x = col * a.stride_w + s * a.dil_w;
        for (uint32_t e = lists.starts[x]; e < lists.starts[x + 1]; ++e) {
          const uint32_t entry = lists.entries[e];
          const int64_t g = entry >> 16, channel = entry >> 1 & 0x7fff;
          const int16_t* values = table + (tap * c_group + channel) * width + g * k_group;
          int32_t* dst = top + g * k_group;
          const __m128i shift = _mm_cvtsi32_si128(unit_shift + static_cast<int>(entry & 1));
          for (int64_t k = 0; k < k_group; k += 8) {
            const __m256i products = _mm256_sll_epi32(
                _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values + k))), shift);
            const __m256i sum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dst + k));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_add_epi32(sum, products));
          }
        }
      }
    }
    chunk.lanes[i] = input.lanes;
    if (++col == a.ow) {
      col = 0;
      if (++y == a.oh) y = 0, ++n;
    }
  }
}

namespace {

constexpr int64_t kPrefetchGroups = 64;  // 4 KB ahead in the block's weight stream

// Register REG (8 of the block's 16 channels) of split_tile, for M rows.
template <int M, int REG>
__attribute__((target("avx2"))) void split_register(const Tile& t, int32_t (*acc)[kTileN]) {
  __m256i sum[M];
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) {
    sum[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.starts + i * t.start_stride + 8 * REG));
  }
  const __m256i ones = _mm256_set1_epi16(1);
  const int32_t* b = t.weight + 8 * REG;
  for (int64_t tap = 0; tap < t.taps; ++tap) {
    const int64_t offset = t.tap_offsets[tap];
    int64_t g = 0;
    for (; g + 2 <= t.groups; g += 2, b += 2 * kTileN) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kTileN));
      if (REG == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(b + kPrefetchGroups * kTileN), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + (kPrefetchGroups + 1) * kTileN), _MM_HINT_T0);
      }
#pragma GCC unroll 6
      for (int i = 0; i < M; ++i) {
        const __m256i lanes = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_set1_epi32(t.rows[i][offset + g]), w0),
                                               _mm256_maddubs_epi16(_mm256_set1_epi32(t.rows[i][offset + g + 1]), w1));
        sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(lanes, ones));
      }
    }
    if (g < t.groups) {  // an odd last quad, alone (a conv of one tap)
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
#pragma GCC unroll 6
      for (int i = 0; i < M; ++i) {
        const __m256i lanes = _mm256_maddubs_epi16(_mm256_set1_epi32(t.rows[i][offset + g]), w0);
        sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(lanes, ones));
      }
      b += kTileN;
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < M; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc[i] + 8 * REG), sum[i]);
}

template <int M>
void split_rows(const Tile& t, int32_t (*acc)[kTileN]) {
  split_register<M, 0>(t, acc);
  split_register<M, 1>(t, acc);
}

}  // namespace

void split_tile(const Tile& t, int32_t (*acc)[kTileN]) {
  static_assert(kTileM == 6, "one case per row count");
  switch (t.count) {
    case 1: return split_rows<1>(t, acc);
    case 2: return split_rows<2>(t, acc);
    case 3: return split_rows<3>(t, acc);
    case 4: return split_rows<4>(t, acc);
    case 5: return split_rows<5>(t, acc);
    default: return split_rows<6>(t, acc);
  }
}

#else
void convert_split_rows(const Int8ConvArgs&, int64_t, const int8_t*, const int16_t*, const int32_t*, int64_t,
                        int64_t, const SplitChunk&) {
  throw std::logic_error("tlcore int8 conv: the split algorithm needs AVX2");
}
void split_tile(const Tile&, int32_t (*)[kTileN]) {
  throw std::logic_error("tlcore int8 conv: the split algorithm needs AVX2");
}
SplitInput convert_split_input(const Int8ConvArgs&, int64_t, const int8_t*) {
  throw std::logic_error("tlcore int8 conv: the split algorithm needs AVX2");
}
void grouped_split_tops(const Int8ConvArgs&, const SplitInput&, const int16_t*, const int32_t*, int64_t, int64_t,
                        const SplitChunk&) {
  throw std::logic_error("tlcore int8 conv: the split algorithm needs AVX2");
}
#endif  // TLCORE_X86

}  // namespace int8_cpu
}  // namespace tlcore
