// Exact integer Winograd convolution for the C++ CPU int8 conv: 3x3 stride-1 convs on CPUs whose
// exact int8 dot product runs on int16 pairs (AVX2 without VNNI: vpmaddwd, 16 multiply-adds per
// instruction; torch.ao's vpmaddubsw + vpmaddwd does no better per multiply). The algorithm is
// Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016).
//
// An output tile of TH x TW is Y = A_h^T [ (G_h g G_w^T) . (B_h^T d B_w) ] A_w for the
// (TH + 2) x (TW + 2) input tile d around it: (TH + 2)(TW + 2) products per channel instead of
// 9 TH TW. Three tile shapes, the one with the fewest products whose C bound (below) holds:
//   F(4x4, 3x3): 36 products per 16 outputs (2.25 each), for C <= 227 (ResNets' first two stages);
//   F(2x4, 3x3): 24 products per 8 outputs (3 each), for C <= 910 (every ResNet 3x3 conv);
//   F(2x2, 3x3): 16 per 4 outputs (4 each), for C <= 3640 (wide ResNets' last stage).
// 1-d transforms, each G row scaled by s to make it integer (G'' = diag(s) G) and each A^T column
// by L / s to undo that (L the largest s): then every matrix is an integer one --
//   F(2,3): B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]       s = (1, 2, 2, 1), L = 2
//           G'' = [1 0 0; 1 1 1; 1 -1 1; 0 0 1]                 A'^T = [2 1 1 0; 0 1 -1 -2]
//   F(4,3): B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
//           G'' = [1 0 0; -1 -1 -1; -1 1 -1; 1 2 4; 1 -2 4; 0 0 1]   s = (4, 6, 6, 24, 24, 1), L = 24
//           A'^T = [6 4 4 1 1 0; 0 4 -4 2 -2 0; 0 4 4 4 4 0; 0 4 -4 8 -8 24]
// -- and Y' = L_h L_w acc. U = G''g G''^T (|U| <= 49 * 128, F(4x4)'s bound, the largest) and
// V = B^T d B (|V| <= 100 * 128) are int16, so vpmaddwd multiplies them exactly (a pair of products
// stays under 2**31). Everything after the products is a sum with integer coefficients, done in int32
// arithmetic that wraps: it yields Y' modulo 2**32. With L_h L_w = 2**k * odd (4 = 2**2 * 1,
// 48 = 2**4 * 3, 576 = 2**6 * 9), Y' >> k (logical) is (odd * acc) mod 2**(32-k),
// times the inverse of odd modulo 2**32 it is acc mod 2**(32-k), and sign-extending those 32-k
// bits gives acc exactly whenever |acc| <= 128 * 128 * 9 * C < 2**(31-k): the C bounds above.
// The result is bit-identical to the direct kernel's (an exact Python model of this arithmetic, not
// kept, checked it at C = 910 with every operand -128, and F(4x4)'s bounds and recovery at C = 227
// and 228; the tests check the kernel at those limits).
//
// Stride 2 (StrideTwoTransform1d): an output reads inputs 2o, 2o + 1, 2o + 2, so the even inputs
// meet taps (w0, w2) as a stride-1 2-tap filter -- F(2, 2), 3 products for 2 outputs -- and the odd
// ones tap w1 alone: 5 products per 2 outputs instead of 6, 25 per 2x2 tile instead of 36. Its
// matrices are 0/+-1 (|U|, |V| <= 4 * 128: int16), so kScale = 1 and the int32 sums end at acc itself.
//
// Work: the products of one tile position form a GEMM [tiles x C] x [C x K], run by the direct
// kernel's pairs micro-kernel (int8_conv.cpp) with one tap. A task transforms a chunk of tiles
// that fits in L2 (reading the int8 input directly: no padded copy), then runs every 16-channel
// weight block of its share of K over it.
#include "cpu/int8_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace tlcore {
namespace int8_cpu {
namespace {

constexpr int64_t kVectorWords = 8;  // 16 int16 channels: the transforms' vector; groups round up to it
constexpr int kMaxChunkTiles = 48;
constexpr int64_t kAccLimit = int64_t{128} * 128 * 9;  // |acc| <= kAccLimit * C

// 1-d integer transforms (file comment): kOutputs outputs from kInputs inputs through kPositions
// products. B^T is (positions x inputs), G (positions x 3 taps), A^T (outputs x positions).
// F(m, 3), stride 1: m outputs from m + 2 inputs, m + 2 products.
template <int M>
struct Transform1d;
template <>
struct Transform1d<2> {
  static constexpr int kInputs = 4, kPositions = 4, kOutputs = 2, kStride = 1;
  static constexpr int kB[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr int kG[4][3] = {{1, 0, 0}, {1, 1, 1}, {1, -1, 1}, {0, 0, 1}};
  static constexpr int kA[2][4] = {{2, 1, 1, 0}, {0, 1, -1, -2}};
  static constexpr int kScale = 2;
};
template <>
struct Transform1d<4> {
  static constexpr int kInputs = 6, kPositions = 6, kOutputs = 4, kStride = 1;
  static constexpr int kB[6][6] = {{4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                   {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr int kG[6][3] = {{1, 0, 0}, {-1, -1, -1}, {-1, 1, -1}, {1, 2, 4}, {1, -2, 4}, {0, 0, 1}};
  static constexpr int kA[4][6] = {{6, 4, 4, 1, 1, 0}, {0, 4, -4, 2, -2, 0}, {0, 4, 4, 4, 4, 0}, {0, 4, -4, 8, -8, 24}};
  static constexpr int kScale = 24;
};
// Stride 2, 2 outputs from inputs d0..d4 (output o reads d[2o], d[2o+1], d[2o+2]): the even inputs
// see taps (w0, w2) as a stride-1 2-tap conv, run as F(2, 2) -- (d0 - d2) w0, d2 (w0 + w2),
// (d4 - d2) w2 -- and the odd ones tap w1: d1 w1, d3 w1. 5 products instead of 6 per 2 outputs,
// 25 instead of 36 per 2x2 tile; every matrix is 0/+-1, so kScale = 1 and nothing needs recovery.
struct StrideTwoTransform1d {
  static constexpr int kInputs = 5, kPositions = 5, kOutputs = 2, kStride = 2;
  static constexpr int kB[5][5] = {{1, 0, -1, 0, 0}, {0, 0, 1, 0, 0}, {0, 0, -1, 0, 1}, {0, 1, 0, 0, 0}, {0, 0, 0, 1, 0}};
  static constexpr int kG[5][3] = {{1, 0, 0}, {1, 0, 1}, {0, 0, 1}, {0, 1, 0}, {0, 1, 0}};
  static constexpr int kA[2][5] = {{1, 1, 0, 1, 0}, {0, 1, 1, 0, 1}};
  static constexpr int kScale = 1;
};

// The 2-d algorithm of transforms H (rows) and W (columns): Y' = kScale * acc = 2**kShift * kOdd * acc.
template <class HT, class WT>
struct Winograd {
  using H = HT;
  using W = WT;
  static_assert(H::kStride == W::kStride, "one stride for both dimensions");
  static constexpr int kStride = H::kStride;
  static constexpr int kInRows = H::kInputs, kInCols = W::kInputs;  // the input tile
  static constexpr int kRows = H::kPositions, kCols = W::kPositions, kPositions = kRows * kCols;
  static constexpr int kTileH = H::kOutputs, kTileW = W::kOutputs, kOutputs = kTileH * kTileW;
  static constexpr int kScale = H::kScale * W::kScale;
  static constexpr int kShift = __builtin_ctz(kScale);
  static constexpr uint32_t kOddInverse = [] {  // the inverse of kScale >> kShift modulo 2**32 (Newton)
    const uint32_t odd = kScale >> kShift;
    uint32_t inverse = odd;
    for (int i = 0; i < 5; ++i) inverse *= 2u - odd * inverse;
    return inverse;
  }();
  static constexpr int64_t kMaxChannels = ((int64_t{1} << (31 - kShift)) - 1) / kAccLimit;
};
// F(4x4, 3x3) ran ResNet-50's 3x3 convs of 64 and 128 channels 6-8% and 10-13% faster than F(2x4) at
// batch 8, 7-16% and 0-13% at batch 1 (AVX2-capped AMD Zen 5, separate runs): a quarter fewer products,
// costlier transforms.
using F4x4 = Winograd<Transform1d<4>, Transform1d<4>>;
using F2x4 = Winograd<Transform1d<2>, Transform1d<4>>;
using F2x2 = Winograd<Transform1d<2>, Transform1d<2>>;
using StrideTwo = Winograd<StrideTwoTransform1d, StrideTwoTransform1d>;  // 2x2 outputs of a stride-2 3x3 conv

// Calls fn with a value of the transform that runs a conv of C channels (stride 1 or 2).
template <class Fn>
decltype(auto) with_transform(int64_t c, bool stride_two, Fn&& fn) {
  if (stride_two) return fn(StrideTwo{});
  if (c <= F4x4::kMaxChannels) return fn(F4x4{});
  return c <= F2x4::kMaxChannels ? fn(F2x4{}) : fn(F2x2{});
}

// GCC vector extensions: one source for every target; inlined into an AVX2 function they
// become ymm instructions, elsewhere SSE2 pairs. Unsigned sums wrap by definition.
typedef int8_t I8x16 __attribute__((vector_size(16)));
typedef int16_t I16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef int32_t I32x8 __attribute__((vector_size(32)));

template <class V>
__attribute__((always_inline)) inline void load(V& v, const void* p) {  // by reference: no vector-return ABI
  std::memcpy(&v, p, sizeof(v));
}

template <class V>
__attribute__((always_inline)) inline void store(void* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

int64_t padded_groups(int64_t c) { return ((c + 1) / 2 + kVectorWords - 1) / kVectorWords * kVectorWords; }

// Input pixel (y, x) of image n, channels c0 .. c0 + 15, as int16: x_zero outside the image (the
// zero padding in real terms); channels past C hold anything finite (their weights are 0).
__attribute__((always_inline)) inline void input_pixel(const Int8ConvArgs& a, int64_t n, int64_t y, int64_t x,
                                                       int64_t c0, I16x16& pixel) {
  I8x16 bytes;
  if (y < 0 || y >= a.h || x < 0 || x >= a.w) {
    bytes = I8x16{} + static_cast<int8_t>(a.x_zero);
  } else if (c0 + 16 <= a.c) {
    std::memcpy(&bytes, a.x + ((n * a.h + y) * a.w + x) * a.c + c0, sizeof(bytes));
  } else {  // the last, partial vector of channels: do not read past the tensor
    bytes = I8x16{};
    std::memcpy(&bytes, a.x + ((n * a.h + y) * a.w + x) * a.c + c0, static_cast<size_t>(std::max<int64_t>(0, a.c - c0)));
  }
  pixel = __builtin_convertvector(bytes, I16x16);
}

// The transformed tile V = B_h^T d B_w of the input tile d whose top-left pixel is (y0, x0) in
// image n (read straight from the int8 NHWC input): v is (positions, groups) words.
template <class F>
__attribute__((always_inline)) inline void input_transform(const Int8ConvArgs& a, int64_t n, int64_t y0, int64_t x0,
                                                           int64_t groups, int32_t* v) {
  for (int64_t g = 0; g < groups; g += kVectorWords) {
    I16x16 x[F::kInRows][F::kInCols], t[F::kRows][F::kInCols];
    for (int i = 0; i < F::kInRows; ++i) {
      for (int j = 0; j < F::kInCols; ++j) input_pixel(a, n, y0 + i, x0 + j, 2 * g, x[i][j]);
    }
    for (int r = 0; r < F::kRows; ++r) {  // t = B_h^T d (the products by constants fold away)
      for (int j = 0; j < F::kInCols; ++j) {
        t[r][j] = I16x16{};
        for (int i = 0; i < F::kInRows; ++i) {
          if (F::H::kB[r][i] != 0) t[r][j] += static_cast<int16_t>(F::H::kB[r][i]) * x[i][j];
        }
      }
    }
    for (int r = 0; r < F::kRows; ++r) {  // V = t B_w
      for (int c = 0; c < F::kCols; ++c) {
        I16x16 sum{};
        for (int j = 0; j < F::kInCols; ++j) {
          if (F::W::kB[c][j] != 0) sum += static_cast<int16_t>(F::W::kB[c][j]) * t[r][j];
        }
        store(v + (r * F::kCols + c) * groups + g, sum);
      }
    }
  }
}

// m: one tile's positions, each 16 channels; y: its TH x TW outputs, acc = (A_h^T M A_w) / kScale
// recovered from the wrapped int32 sums (file comment).
template <class F>
__attribute__((always_inline)) inline void output_transform(const int32_t (*m)[kTileM][kTileN], int tile,
                                                            int32_t (*y)[kTileN]) {
  constexpr int th = F::kTileH, tw = F::kTileW;
  for (int h = 0; h < kTileN; h += 8) {
    U32x8 z[th][F::kCols];
    for (int i = 0; i < th; ++i) {  // z = A_h^T M
      for (int c = 0; c < F::kCols; ++c) {
        z[i][c] = U32x8{};
        for (int r = 0; r < F::kRows; ++r) {
          if (F::H::kA[i][r] == 0) continue;
          U32x8 value;
          load(value, m[r * F::kCols + c][tile] + h);
          z[i][c] += static_cast<uint32_t>(F::H::kA[i][r]) * value;
        }
      }
    }
    for (int i = 0; i < th; ++i) {  // z A_w, then acc from Y' = kScale * acc modulo 2**32
      for (int j = 0; j < tw; ++j) {
        U32x8 sum{};
        for (int c = 0; c < F::kCols; ++c) {
          if (F::W::kA[j][c] != 0) sum += static_cast<uint32_t>(F::W::kA[j][c]) * z[i][c];
        }
        const U32x8 residue = (sum >> F::kShift) * F::kOddInverse;  // acc modulo 2**(32 - kShift)
        store(y[i * tw + j] + h, (I32x8)(residue << F::kShift) >> F::kShift);  // sign-extended
      }
    }
  }
}

struct Transforms {
  void (*input)(const Int8ConvArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*);
  void (*output)(const int32_t (*)[kTileM][kTileN], int, int32_t (*)[kTileN]);
};

template <class F>
void input_generic(const Int8ConvArgs& a, int64_t n, int64_t y0, int64_t x0, int64_t groups, int32_t* v) {
  input_transform<F>(a, n, y0, x0, groups, v);
}
template <class F>
void output_generic(const int32_t (*m)[kTileM][kTileN], int tile, int32_t (*y)[kTileN]) {
  output_transform<F>(m, tile, y);
}
#if defined(__x86_64__) || defined(__i386__)
template <class F>
__attribute__((target("avx2"))) void input_avx2(const Int8ConvArgs& a, int64_t n, int64_t y0, int64_t x0,
                                                int64_t groups, int32_t* v) {
  input_transform<F>(a, n, y0, x0, groups, v);
}
template <class F>
__attribute__((target("avx2"))) void output_avx2(const int32_t (*m)[kTileM][kTileN], int tile, int32_t (*y)[kTileN]) {
  output_transform<F>(m, tile, y);
}
#endif

template <class F>
Transforms transforms_for(Int8Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa != Int8Isa::kScalar) return {input_avx2<F>, output_avx2<F>};
#endif
  return {input_generic<F>, output_generic<F>};
}

template <class F>
constexpr Layout layout_of() {
  if constexpr (std::is_same_v<F, F4x4>) return Layout::kWinograd44Pairs;
  if constexpr (std::is_same_v<F, F2x4>) return Layout::kWinograd24Pairs;
  if constexpr (std::is_same_v<F, F2x2>) return Layout::kWinogradPairs;
  return Layout::kWinogradStrideTwoPairs;
}
int positions(int64_t c, bool stride_two) {
  return with_transform(c, stride_two, [](auto f) { return decltype(f)::kPositions; });
}
Layout layout(int64_t c, bool stride_two) {
  return with_transform(c, stride_two, [](auto f) { return layout_of<decltype(f)>(); });
}

template <class F>
void pack(const int8_t* weight, int64_t k, int64_t c, int32_t* packed) {
  constexpr bool stride_two = F::kStride == 2;
  const int64_t groups = padded_groups(c);
  std::fill(packed, packed + winograd_packed_words(k, c, stride_two), 0);
  write_header(packed, layout(c, stride_two), k, c, 3, 3);
  int32_t* words = packed + kHeaderWords;
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> u(static_cast<size_t>(2 * groups));  // one position of U for every channel c
    for (int64_t channel = begin; channel < end; ++channel) {
      const int8_t* g = weight + channel * 9 * c;  // (3, 3, C)
      for (int p = 0; p < F::kPositions; ++p) {
        const int xi = p / F::kCols, nu = p % F::kCols;
        for (int64_t ci = 0; ci < c; ++ci) {
          int32_t sum = 0;
          for (int r = 0; r < 3; ++r) {
            for (int s = 0; s < 3; ++s) sum += F::H::kG[xi][r] * F::W::kG[nu][s] * g[(r * 3 + s) * c + ci];
          }
          u[ci] = static_cast<int16_t>(sum);
        }
        int32_t* dst = words + ((channel / kTileN * F::kPositions + p) * groups) * kTileN + channel % kTileN;
        for (int64_t gi = 0; gi < groups; ++gi) std::memcpy(dst + gi * kTileN, u.data() + 2 * gi, sizeof(int32_t));
      }
    }
  });
}

template <class F>
void conv(const Int8ConvArgs& a, Int8Isa isa, const int32_t* weight) {
  constexpr int th = F::kTileH, tw = F::kTileW;
  const int64_t groups = padded_groups(a.c);
  const int64_t tiles_h = (a.oh + th - 1) / th, tiles_w = (a.ow + tw - 1) / tw, tiles = a.n * tiles_h * tiles_w;
  const int64_t blocks = (a.k + kTileN - 1) / kTileN, block_words = F::kPositions * groups * kTileN;
  // A chunk's transformed tiles (positions * groups words each) take at most half of L2.
  const int64_t tile_bytes = F::kPositions * groups * static_cast<int64_t>(sizeof(int32_t));
  const int64_t l2_chunk_tiles = std::clamp<int64_t>(kL2Bytes / 2 / tile_bytes / kTileM * kTileM, kTileM, kMaxChunkTiles);
  const int64_t threads = at::get_num_threads();
  // Few chunks (small images): split K too, so every thread gets work; each split transforms its own
  // copy. When the whole image's transformed tiles are small, they form one chunk and each thread takes
  // a share of K: every block's transformed weights then stream from memory once, not once per chunk
  // (at batch 1 the 14x14 and 7x7 layers' weights, 3-13 MB each, are what these convs wait for).
  // ResNet-50 at batch 1, AVX2, AMD EPYC: its 7x7 3x3 convs ~30% faster, the 14x14 ones ~5%.
  const bool few_chunks = (tiles + l2_chunk_tiles - 1) / l2_chunk_tiles < 4 * threads;
  const bool one_chunk = few_chunks && tiles * tile_bytes <= 2 * kL2Bytes;
  const int64_t chunk_tiles = one_chunk ? tiles : l2_chunk_tiles;
  const int64_t chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  const int64_t splits = one_chunk ? std::min(threads, blocks)
                                   : std::clamp<int64_t>((4 * threads + chunks - 1) / chunks, 1, blocks);
  const int64_t blocks_per_split = (blocks + splits - 1) / splits;
  const TileFn run_tile = pairs_tile_fn(isa);
  const EpilogueFn epilogue = epilogue_fn(isa, a);
  const Transforms transform = transforms_for<F>(isa);

  parallel_tasks(chunks * splits, [&](ClaimedTasks& tasks) {
    std::vector<int32_t> v(static_cast<size_t>(chunk_tiles * F::kPositions * groups));
    alignas(32) int32_t m[F::kPositions][kTileM][kTileN];
    alignas(32) int32_t acc[F::kOutputs * kTileM][kTileN];
    int64_t ms[F::kOutputs * kTileM];
    const int64_t no_offset = 0;
    Tile t;
    t.tap_offsets = &no_offset;
    t.taps = 1;
    t.groups = groups;
    t.correction = nullptr;
    for (int64_t task; tasks.next(task);) {
      const int64_t first = task / splits * chunk_tiles, count = std::min(chunk_tiles, tiles - first);
      const int64_t block_begin = task % splits * blocks_per_split;
      const int64_t block_end = std::min(blocks, block_begin + blocks_per_split);
      if (block_begin >= block_end) continue;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t tile = first + i, n = tile / (tiles_h * tiles_w);
        const int64_t ty = tile / tiles_w % tiles_h, tx = tile % tiles_w;
        transform.input(a, n, F::kStride * th * ty - a.pad_h, F::kStride * tw * tx - a.pad_w, groups,
                        v.data() + i * F::kPositions * groups);
      }
      for (int64_t block = block_begin; block < block_end; ++block) {
        for (int64_t g0 = 0; g0 < count; g0 += kTileM) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileM, count - g0));
          t.count = rows;
          for (int p = 0; p < F::kPositions; ++p) {
            for (int i = 0; i < rows; ++i) t.rows[i] = v.data() + ((g0 + i) * F::kPositions + p) * groups;
            t.weight = weight + block * block_words + p * groups * kTileN;
            run_tile(t, m[p]);
          }
          int outputs = 0;
          for (int i = 0; i < rows; ++i) {
            int32_t y[F::kOutputs][kTileN];
            transform.output(m, i, y);
            const int64_t tile = first + g0 + i, n = tile / (tiles_h * tiles_w);
            const int64_t oy = th * (tile / tiles_w % tiles_h), ox = tw * (tile % tiles_w);
            for (int q = 0; q < F::kOutputs; ++q) {
              const int64_t yy = oy + q / tw, xx = ox + q % tw;
              if (yy >= a.oh || xx >= a.ow) continue;  // the part of an edge tile past the image
              std::memcpy(acc[outputs], y[q], sizeof(y[q]));
              ms[outputs++] = (n * a.oh + yy) * a.ow + xx;
            }
          }
          epilogue(a, acc, ms, outputs, block * kTileN);
        }
      }
    }
  });
}

}  // namespace

int64_t winograd_packed_words(int64_t k, int64_t c, bool stride_two) {
  return kHeaderWords + (k + kTileN - 1) / kTileN * positions(c, stride_two) * padded_groups(c) * kTileN;
}

void pack_winograd_weight(const int8_t* weight, int64_t k, int64_t c, bool stride_two, int32_t* packed) {
  with_transform(c, stride_two, [&](auto f) { pack<decltype(f)>(weight, k, c, packed); });
}

void int8_conv2d_winograd(const Int8ConvArgs& a, Int8Isa isa) {
  const bool stride_two = a.stride_h == 2;
  std::vector<int32_t> packed_here;
  const int32_t* packed = a.packed_weight;
  if (packed == nullptr) {
    packed_here.resize(static_cast<size_t>(winograd_packed_words(a.k, a.c, stride_two)));
    pack_winograd_weight(a.weight, a.k, a.c, stride_two, packed_here.data());
    packed = packed_here.data();
  } else if (!header_matches(packed, layout(a.c, stride_two), a.k, a.c, a.r, a.s)) {
    throw std::invalid_argument("tlcore int8 conv: packed_weight was packed for another weight, instruction set "
                                "or algorithm");
  }
  const int32_t* weight = packed + kHeaderWords;
  with_transform(a.c, stride_two, [&](auto f) { conv<decltype(f)>(a, isa, weight); });
}

bool winograd_supported(int64_t c, int64_t r, int64_t s, int64_t stride_h, int64_t stride_w, int64_t dil_h,
                        int64_t dil_w, Int8Isa isa) {
  const bool pairs = isa == Int8Isa::kScalar || isa == Int8Isa::kAvx2 || isa == Int8Isa::kAvx2U7;
  const bool stride_one = stride_h == 1 && stride_w == 1, stride_two = stride_h == 2 && stride_w == 2;
  const int64_t max_channels = stride_two ? StrideTwo::kMaxChannels : F2x2::kMaxChannels;
  return pairs && r == 3 && s == 3 && (stride_one || stride_two) && dil_h == 1 && dil_w == 1 && c >= 1 &&
         c <= max_channels;
}

}  // namespace int8_cpu
}  // namespace tlcore
