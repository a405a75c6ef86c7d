// Exact integer Winograd F(2x2, 3x3) for the C++ CPU int8 conv: 3x3 stride-1 convs on CPUs whose
// exact int8 dot product runs on int16 pairs (AVX2 without VNNI: vpmaddwd, 16 multiply-adds per
// instruction; torch.ao's vpmaddubsw + vpmaddwd does no better per multiply). The algorithm is
// Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016).
//
// A 2x2 output tile is Y = A^T [ (G g G^T) . (B^T d B) ] A for the 4x4 input tile d around it:
// 16 products per channel instead of 36. With G' = 2G every matrix is an integer one:
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   G' = [2 0 0; 1 1 1; 1 -1 1; 0 0 2]
//   A^T = [1 1 1 0; 0 1 -1 -1]
// U = G' g G'^T (|U| <= 9 * 128) and V = B^T d B (|V| <= 4 * 128) are int16, so vpmaddwd
// multiplies them exactly, and A^T M A = 4 * acc. Everything after the products is a sum; int32
// sums wrap modulo 2**32, so 4 * acc comes out exact whenever |4 * acc| < 2**31, which
// winograd_supported's bound on C guarantees (it also keeps each M = sum_c U V in int32).
// The result is bit-identical to the direct kernel's.
//
// Work: the 16 products of a tile position (xi, nu) form a GEMM [tiles x C] x [C x K], run by the
// direct kernel's pairs micro-kernel (int8_conv.cpp) with one tap. A task transforms a chunk of
// tiles that fits in L2 (reading the int8 input directly: no padded copy), then runs every
// 16-channel weight block of its share of K over it.
#include "cpu/int8_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace tlcore {
namespace int8_cpu {
namespace {

constexpr int kPositions = 16;    // the 4 x 4 positions (xi, nu) of a transformed tile
constexpr int64_t kVectorWords = 8;  // 16 int16 channels: the transforms' vector; groups round up to it
constexpr int kMaxChunkTiles = 48;

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

// The transformed tile V = B^T d B of the 4x4 input tile d whose top-left pixel is (y0, x0) in
// image n (read straight from the int8 NHWC input): v is (16 positions, groups) words.
__attribute__((always_inline)) inline void input_transform(const Int8ConvArgs& a, int64_t n, int64_t y0, int64_t x0,
                                                           int64_t groups, int32_t* v) {
  for (int64_t g = 0; g < groups; g += kVectorWords) {
    I16x16 x[4][4], t[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) input_pixel(a, n, y0 + i, x0 + j, 2 * g, x[i][j]);
    }
    for (int j = 0; j < 4; ++j) {  // t = B^T d
      t[0][j] = x[0][j] - x[2][j];
      t[1][j] = x[1][j] + x[2][j];
      t[2][j] = x[2][j] - x[1][j];
      t[3][j] = x[1][j] - x[3][j];
    }
    for (int i = 0; i < 4; ++i) {  // V = t B
      int32_t* out = v + 4 * i * groups + g;
      store(out, t[i][0] - t[i][2]);
      store(out + groups, t[i][1] + t[i][2]);
      store(out + 2 * groups, t[i][2] - t[i][1]);
      store(out + 3 * groups, t[i][1] - t[i][3]);
    }
  }
}

// m: one tile's 16 positions, each 16 channels; y: its 2x2 outputs (acc = A^T M A / 4).
__attribute__((always_inline)) inline void output_transform(const int32_t (*m)[kTileM][kTileN], int tile,
                                                            int32_t (*y)[kTileN]) {
  for (int h = 0; h < kTileN; h += 8) {
    U32x8 a[2][4];
    for (int j = 0; j < 4; ++j) {  // a = A^T M
      U32x8 m0, m1, m2, m3;
      load(m0, m[j][tile] + h);
      load(m1, m[4 + j][tile] + h);
      load(m2, m[8 + j][tile] + h);
      load(m3, m[12 + j][tile] + h);
      a[0][j] = m0 + m1 + m2;
      a[1][j] = m1 - m2 - m3;
    }
    for (int i = 0; i < 2; ++i) {  // a A, then / 4: exact, 4 * acc is a multiple of 4
      store(y[2 * i] + h, (I32x8)(a[i][0] + a[i][1] + a[i][2]) >> 2);
      store(y[2 * i + 1] + h, (I32x8)(a[i][1] - a[i][2] - a[i][3]) >> 2);
    }
  }
}

struct Transforms {
  void (*input)(const Int8ConvArgs&, int64_t, int64_t, int64_t, int64_t, int32_t*);
  void (*output)(const int32_t (*)[kTileM][kTileN], int, int32_t (*)[kTileN]);
};

void input_generic(const Int8ConvArgs& a, int64_t n, int64_t y0, int64_t x0, int64_t groups, int32_t* v) {
  input_transform(a, n, y0, x0, groups, v);
}
void output_generic(const int32_t (*m)[kTileM][kTileN], int tile, int32_t (*y)[kTileN]) {
  output_transform(m, tile, y);
}
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2"))) void input_avx2(const Int8ConvArgs& a, int64_t n, int64_t y0, int64_t x0,
                                                int64_t groups, int32_t* v) {
  input_transform(a, n, y0, x0, groups, v);
}
__attribute__((target("avx2"))) void output_avx2(const int32_t (*m)[kTileM][kTileN], int tile, int32_t (*y)[kTileN]) {
  output_transform(m, tile, y);
}
#endif

Transforms transforms_for(Int8Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa != Int8Isa::kScalar) return {input_avx2, output_avx2};
#endif
  return {input_generic, output_generic};
}

}  // namespace

int64_t winograd_packed_words(int64_t k, int64_t c) {
  return kHeaderWords + (k + kTileN - 1) / kTileN * kPositions * padded_groups(c) * kTileN;
}

void pack_winograd_weight(const int8_t* weight, int64_t k, int64_t c, int32_t* packed) {
  static constexpr int kG[4][3] = {{2, 0, 0}, {1, 1, 1}, {1, -1, 1}, {0, 0, 2}};  // G' = 2G
  const int64_t groups = padded_groups(c);
  std::fill(packed, packed + winograd_packed_words(k, c), 0);
  write_header(packed, Layout::kWinogradPairs, k, c, 3, 3);
  int32_t* words = packed + kHeaderWords;
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> u(static_cast<size_t>(2 * groups));  // one position of U for every channel c
    for (int64_t channel = begin; channel < end; ++channel) {
      const int8_t* g = weight + channel * 9 * c;  // (3, 3, C)
      for (int xi = 0; xi < 4; ++xi) {
        for (int nu = 0; nu < 4; ++nu) {
          for (int64_t ci = 0; ci < c; ++ci) {
            int32_t sum = 0;
            for (int r = 0; r < 3; ++r) {
              for (int s = 0; s < 3; ++s) sum += kG[xi][r] * kG[nu][s] * g[(r * 3 + s) * c + ci];
            }
            u[ci] = static_cast<int16_t>(sum);
          }
          int32_t* dst = words + ((channel / kTileN * kPositions + xi * 4 + nu) * groups) * kTileN + channel % kTileN;
          for (int64_t gi = 0; gi < groups; ++gi) std::memcpy(dst + gi * kTileN, u.data() + 2 * gi, sizeof(int32_t));
        }
      }
    }
  });
}

void int8_conv2d_winograd(const Int8ConvArgs& a, Int8Isa isa) {
  const int64_t groups = padded_groups(a.c);
  const int64_t tiles_h = (a.oh + 1) / 2, tiles_w = (a.ow + 1) / 2, tiles = a.n * tiles_h * tiles_w;
  const int64_t blocks = (a.k + kTileN - 1) / kTileN, block_words = kPositions * groups * kTileN;
  std::vector<int32_t> packed_here;
  const int32_t* packed = a.packed_weight;
  if (packed == nullptr) {
    packed_here.resize(static_cast<size_t>(winograd_packed_words(a.k, a.c)));
    pack_winograd_weight(a.weight, a.k, a.c, packed_here.data());
    packed = packed_here.data();
  } else if (!header_matches(packed, Layout::kWinogradPairs, a.k, a.c, a.r, a.s)) {
    throw std::invalid_argument("tlcore int8 conv: packed_weight was packed for another weight, instruction set "
                                "or algorithm");
  }
  const int32_t* weight = packed + kHeaderWords;

  // A chunk's transformed tiles (16 * groups words each) take at most half of L2.
  const int64_t fit = kL2Bytes / 2 / (kPositions * groups * static_cast<int64_t>(sizeof(int32_t)));
  const int64_t chunk_tiles = std::clamp<int64_t>(fit / kTileM * kTileM, kTileM, kMaxChunkTiles);
  const int64_t chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  // Few chunks (small images): split K too, so every thread gets work; each split transforms its own copy.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::clamp<int64_t>((4 * threads + chunks - 1) / chunks, 1, blocks);
  const int64_t blocks_per_split = (blocks + splits - 1) / splits;
  const TileFn run_tile = pairs_tile_fn(isa);
  const EpilogueFn epilogue = epilogue_fn(isa, a);
  const Transforms transform = transforms_for(isa);

  at::parallel_for(0, chunks * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> v(static_cast<size_t>(chunk_tiles * kPositions * groups));
    alignas(32) int32_t m[kPositions][kTileM][kTileN];
    alignas(32) int32_t acc[4 * kTileM][kTileN];
    int64_t ms[4 * kTileM];
    const int64_t no_offset = 0;
    Tile t;
    t.tap_offsets = &no_offset;
    t.taps = 1;
    t.groups = groups;
    t.correction = nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task / splits * chunk_tiles, count = std::min(chunk_tiles, tiles - first);
      const int64_t block_begin = task % splits * blocks_per_split;
      const int64_t block_end = std::min(blocks, block_begin + blocks_per_split);
      if (block_begin >= block_end) continue;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t tile = first + i, n = tile / (tiles_h * tiles_w);
        const int64_t ty = tile / tiles_w % tiles_h, tx = tile % tiles_w;
        transform.input(a, n, 2 * ty - a.pad_h, 2 * tx - a.pad_w, groups, v.data() + i * kPositions * groups);
      }
      for (int64_t block = block_begin; block < block_end; ++block) {
        for (int64_t g0 = 0; g0 < count; g0 += kTileM) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileM, count - g0));
          for (int p = 0; p < kPositions; ++p) {
            for (int i = 0; i < kTileM; ++i) {  // rows past the end repeat the last tile, not stored
              t.rows[i] = v.data() + ((g0 + std::min(i, rows - 1)) * kPositions + p) * groups;
            }
            t.weight = weight + block * block_words + p * groups * kTileN;
            run_tile(t, m[p]);
          }
          int outputs = 0;
          for (int i = 0; i < rows; ++i) {
            int32_t y[4][kTileN];
            transform.output(m, i, y);
            const int64_t tile = first + g0 + i, n = tile / (tiles_h * tiles_w);
            const int64_t oy = 2 * (tile / tiles_w % tiles_h), ox = 2 * (tile % tiles_w);
            for (int q = 0; q < 4; ++q) {
              const int64_t yy = oy + q / 2, xx = ox + q % 2;
              if (yy >= a.oh || xx >= a.ow) continue;  // the far half of an edge tile of an odd size
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

bool winograd_supported(int64_t c, int64_t r, int64_t s, int64_t stride_h, int64_t stride_w, int64_t dil_h,
                        int64_t dil_w, Int8Isa isa) {
  // 4 * |acc| <= 4 * 128 * 128 * 9 * C must stay below 2**31 (see the file comment).
  constexpr int64_t kMaxChannels = ((int64_t{1} << 31) - 1) / (4 * 128 * 128 * 9);
  const bool pairs = isa == Int8Isa::kScalar || isa == Int8Isa::kAvx2 || isa == Int8Isa::kAvx2U7;
  return pairs && r == 3 && s == 3 && stride_h == 1 && stride_w == 1 && dil_h == 1 && dil_w == 1 && c >= 1 &&
         c <= kMaxChannels;
}

}  // namespace int8_cpu
}  // namespace tlcore
