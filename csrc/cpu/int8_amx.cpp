// The C++ CPU int8 conv on Intel's AMX tile unit (Sapphire Rapids and later): the direct implicit
// GEMM of int8_conv.cpp with TDPBUSD as its micro-kernel.
//
// One TDPBUSD multiplies a 16 x 64 uint8 tile (16 output pixels x 64 channels) by a 16 x 64 int8
// tile of 4-channel words (16 words deep x 16 output channels) into 16 x 16 int32 sums: 16,384
// multiply-adds, each 4 products summed straight into int32 as vpdpbusd does, so the quads layout of
// int8_conv.cpp serves as it is: activations as u = x + 128 in 4-channel words, the accumulators
// starting at -128 * sum(w) (the block's correction), and a weight block's [tap][group][16 channels]
// words are B tiles already, 16 consecutive (tap, group) rows of 64 bytes. The AMX layout
// (Layout::kAmxQuads) only pads each block's rows to whole steps of 16 with zero weights, so the
// last step of a block reads no other block's weights. Its sibling TDPBSSD multiplies signed bytes:
// on the codes x themselves the same weights need no correction.
//
// A tile's rows must lie at one stride in memory, unlike the row pointers of the vector kernels
// (RowSource): stride-1 convs over whole 64-channel steps read them in place, pointwise ones from x
// itself (TDPBSSD), the others from the padded input; the remaining convs gather the im2col rows of
// each chunk of output pixels into a panel, row i holding the words of every tap of pixel i (a
// pointwise conv's panel is its converted pixels). Tasks are
// (chunk, pair of weight blocks), chunks outer, so a thread builds each panel once for all blocks.
// Register tiles: 32 rows x 32 channels, i.e. four accumulator tiles, two A (rows 0-15, 16-31) and
// two B (two blocks of 16 channels) -- the eight tiles the unit has, each 16 rows of 64 bytes.
// The epilogue is the AVX512-VNNI kernel's (requantize_avx512).
#include "cpu/int8_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TLCORE_AMX 1
#endif

namespace tlcore {
namespace int8_cpu {

#ifdef TLCORE_AMX
namespace {

constexpr int kSubRows = 32;                // output pixels per register tile (two A tiles)
constexpr int64_t kPanelRows = 2 * kSubRows;  // output pixels per panel (task chunk)

// LDTILECFG's 64-byte operand: palette 1, every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
const TileConfig kTileConfig{};

// Holds the tile configuration for one thread's run of tasks (the tile state is per thread).
struct TileScope {
  __attribute__((target("amx-tile"))) TileScope() { _tile_loadconfig(&kTileConfig); }
  __attribute__((target("amx-tile"))) ~TileScope() { _tile_release(); }
};

// Tile c += a . b: TDPBSSD (signed A) or TDPBUSD (unsigned A). A macro, as GCC's tile intrinsics
// are: they paste their tile numbers into the asm text.
#define TLCORE_TILE_DOT(kSigned, c, a, b) \
  do {                                    \
    if constexpr (kSigned) {              \
      _tile_dpbssd(c, a, b);              \
    } else {                              \
      _tile_dpbusd(c, a, b);              \
    }                                     \
  } while (0)

// acc[j][i][c] = start[j][c] + sum over steps of A rows i . block j's weights, for the tile's 32 rows
// (each step's A: 16 words per row at rows + step_offsets[step], rows `stride` words apart) and B
// blocks (block_words apart): TDPBUSD on u = x + 128 (start: -correction), or with kSigned TDPBSSD on
// the codes x themselves (start: 0). The tile instructions are inline asm that declares no memory,
// hence the compiler barriers.
template <int B, bool kSigned>
__attribute__((target("amx-tile,amx-int8"))) void amx_tile(const int32_t* rows, int64_t stride,
                                                            const std::vector<int64_t>& step_offsets,
                                                            const int32_t* weight, int64_t block_words,
                                                            const int32_t (*start)[kTileN],
                                                            int32_t (*acc)[kSubRows][kTileN]) {
  asm volatile("" ::: "memory");
  const int64_t a_stride = stride * 4, b_stride = kTileN * 4;
  const int32_t* high = rows + kSubRows / 2 * stride;
  _tile_loadd(0, start[0], 0);  // stride 0: every row starts at the block's -correction
  _tile_loadd(1, start[0], 0);
  if constexpr (B == 2) {
    _tile_loadd(2, start[1], 0);
    _tile_loadd(3, start[1], 0);
  }
  const int64_t steps = static_cast<int64_t>(step_offsets.size());
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t offset = step_offsets[step], b = step * kAmxStepWords * kTileN;
    _tile_loadd(4, rows + offset, a_stride);
    _tile_loadd(5, high + offset, a_stride);
    _tile_loadd(6, weight + b, b_stride);
    TLCORE_TILE_DOT(kSigned, 0, 4, 6);
    TLCORE_TILE_DOT(kSigned, 1, 5, 6);
    if constexpr (B == 2) {
      _tile_loadd(7, weight + block_words + b, b_stride);
      TLCORE_TILE_DOT(kSigned, 2, 4, 7);
      TLCORE_TILE_DOT(kSigned, 3, 5, 7);
    }
  }
  _tile_stored(0, acc[0][0], b_stride);
  _tile_stored(1, acc[0][kSubRows / 2], b_stride);
  if constexpr (B == 2) {
    _tile_stored(2, acc[1][0], b_stride);
    _tile_stored(3, acc[1][kSubRows / 2], b_stride);
  }
  asm volatile("" ::: "memory");
}
#undef TLCORE_TILE_DOT

// dst[0 .. words) = src[0 .. words), in whole 16-word vectors: it reads and writes up to 15 words
// past the run (callers leave that slack; a later run overwrites what it wrote there). Masked moves
// cost 2x as much on the stem (their loads split cache lines), memcpy calls more still.
constexpr int64_t kMoveSlackWords = 16;

__attribute__((target("avx512f"))) inline void move_words(int32_t* dst, const int32_t* src, int64_t words) {
  for (int64_t i = 0; i < words; i += 16) _mm512_storeu_si512(dst + i, _mm512_loadu_si512(src + i));
}

// A panel row's runs: a tap row's taps are adjacent pixels (dilation_w 1), one run of S * groups
// words; otherwise each tap is a run of `groups` words. `offsets`: per run, its first word's offset
// from the pixel's tap (0, 0) in the padded input (hp rows of wp pixels of `groups` words).
struct PanelRuns {
  int64_t words;
  std::vector<int64_t> offsets;
};

PanelRuns panel_runs(const Int8ConvArgs& a, int64_t wp, int64_t groups) {
  const int64_t taps_a_run = a.dil_w == 1 ? a.s : 1;
  PanelRuns runs{taps_a_run * groups, {}};
  for (int64_t tap = 0; tap < a.r * a.s; tap += taps_a_run) {
    runs.offsets.push_back(((tap / a.s) * a.dil_h * wp + (tap % a.s) * a.dil_w) * groups);
  }
  return runs;
}

// The im2col rows of output pixels first .. first + count - 1 into panel ((count, taps * groups)
// words) from the padded input x by `runs`, or, with x null (a pointwise conv), converted from a.x
// directly. Rows past count, to the next whole register tile, are zeroed: computed, never stored.
// The runs' offsets come once per conv: the stem's runs are 7 words, and a memcpy call per run (or
// an index division per tap) took longer than its tile products.
__attribute__((target("avx512f"))) void build_panel(const Int8ConvArgs& a, const int32_t* x, int64_t hp,
                                                     int64_t wp, int64_t groups, const PanelRuns& runs,
                                                     int64_t first, int64_t count, int32_t* panel) {
  const int64_t stride = a.r * a.s * groups;
  if (x == nullptr) {
    convert_pointwise_rows(a, Layout::kQuads, groups, first, count, panel);
  } else {
    int64_t n = first / (a.oh * a.ow), y = (first / a.ow) % a.oh, col = first % a.ow;
    for (int64_t i = 0; i < count; ++i) {
      const int32_t* pixel = x + ((n * hp + y * a.stride_h) * wp + col * a.stride_w) * groups;
      int32_t* row = panel + i * stride;
      for (const int64_t offset : runs.offsets) {  // in order: each run overwrites its predecessor's excess
        move_words(row, pixel + offset, runs.words);
        row += runs.words;
      }
      if (++col == a.ow) {
        col = 0;
        if (++y == a.oh) y = 0, ++n;
      }
    }
  }
  const int64_t rows = (count + kSubRows - 1) / kSubRows * kSubRows;
  std::fill(panel + count * stride, panel + rows * stride, 0);
}

bool os_allows_amx() {
  // Linux hands out the tile state only to processes that ask (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); without it the first tile instruction faults.
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Where a tile's A rows come from. Convs whose pixels fill whole steps (16 words: C / 4 rounded up a
// multiple of 16) read them in place when the stride is 1:
//   kInput (pointwise, C % 64 == 0): output pixel m is input pixel m, so a.x is the A matrix as it
//     is, its signed codes multiplied by TDPBSSD (no conversion to u, no correction); a last chunk
//     short of kPanelRows rows is copied to a panel first, so no tile load reads past a.x. With C
//     not a multiple of 4, a.x's pixels would not start on words (C = 61-63, 125-127, ...: wrong
//     rows, and a read past a.x), so those convert panels.
//   kPadded: over the padded input's pixels in order, output pixel (oh, ow) is padded pixel
//     oh * wp + ow of its image and every tap a fixed offset from it, so 16 rows are 16 consecutive
//     pixels; the wp - ow extra columns per output row are computed and dropped (2 of 58 at 56x56,
//     2 of 9 at 7x7 for 3x3 convs), against an im2col copy of every tap.
// Other convs gather panels (kPanel).
enum class Rows { kInput, kPadded, kPanel };

struct RowSource {
  Rows rows;
  int64_t stride;                     // words between A rows
  std::vector<int64_t> step_offsets;  // per step, the words from a row's start to its A columns
  int64_t rows_per_image;             // kPadded: the padded pixels of an image's output rows
};

RowSource row_source(const Int8ConvArgs& a, int64_t wp, int64_t groups, bool pointwise) {
  RowSource source;
  const bool whole_steps = a.stride_h == 1 && a.stride_w == 1 && groups % kAmxStepWords == 0;
  source.rows = !whole_steps ? Rows::kPanel : !pointwise ? Rows::kPadded : a.c % 4 == 0 ? Rows::kInput : Rows::kPanel;
  source.rows_per_image = 0;
  if (source.rows == Rows::kPadded) {
    source.stride = groups;
    source.rows_per_image = a.oh * wp;
    for (int64_t r = 0; r < a.r; ++r) {
      for (int64_t s = 0; s < a.s; ++s) {
        for (int64_t g = 0; g < groups; g += kAmxStepWords) {
          source.step_offsets.push_back((r * a.dil_h * wp + s * a.dil_w) * groups + g);
        }
      }
    }
  } else {
    source.stride = a.r * a.s * groups;
    for (int64_t g = 0; g < block_rows(Layout::kAmxQuads, source.stride); g += kAmxStepWords) {
      source.step_offsets.push_back(g);
    }
  }
  return source;
}

// Runs the epilogue on a tile of in-place rows: padded pixels q0 .. q0 + 31 of image n, keeping the
// output pixels among them (q < rows_per_image, column < OW), in runs of one output row.
void in_place_epilogue(const Int8ConvArgs& a, EpilogueFn epilogue, int64_t wp, int64_t rows_per_image, int64_t n,
                       int64_t q0, const int32_t (*acc)[kTileN], int64_t k0) {
  int64_t ms[kSubRows];
  const int64_t end = std::min(q0 + kSubRows, rows_per_image);
  // One division a tile, and each run's first output pixel in a local: stores to ms may alias the
  // args' int64 fields, which kept the compiler reloading them per pixel.
  int64_t y = q0 / wp, col = q0 % wp;
  for (int64_t q = q0; q < end; q += wp - col, col = 0, ++y) {
    const int64_t run = std::min(a.ow - col, end - q);
    if (run > 0) {
      const int64_t m = (n * a.oh + y) * a.ow + col;
      for (int64_t i = 0; i < run; ++i) ms[i] = m + i;
      epilogue(a, acc + (q - q0), ms, static_cast<int>(run), k0);
    }
  }
}

}  // namespace

bool amx_supported() {
  static const bool supported = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;  // CPUID.(7, 0):EDX AMX-TILE, AMX-INT8
    return tile && int8 && int8_isa_supported(Int8Isa::kAvx512Vnni) && os_allows_amx();
  }();
  return supported;
}

void int8_conv2d_amx(const Int8ConvArgs& a) {
  if (a.conv_groups != 1) throw std::invalid_argument("tlcore int8 conv: the AMX kernel runs ungrouped convs");
  const int64_t hp = a.h + 2 * a.pad_h, wp = a.w + 2 * a.pad_w;
  const int64_t groups = (a.c + 3) / 4;  // words per pixel
  const bool pointwise = a.r == 1 && a.s == 1 && a.pad_h == 0 && a.pad_w == 0;
  const RowSource source = row_source(a, wp, groups, pointwise);
  const int64_t block_words = block_rows(Layout::kAmxQuads, a.r * a.s * groups) * kTileN;
  const int64_t blocks = (a.k + kTileN - 1) / kTileN;
  std::vector<int32_t> packed_here;
  const int32_t* packed = a.packed_weight;
  if (packed == nullptr) {
    packed_here.resize(static_cast<size_t>(direct_packed_words(a.k, a.c, a.r, a.s, Layout::kAmxQuads)));
    pack_direct_weight(a.weight, a.k, a.c, a.r, a.s, Layout::kAmxQuads, packed_here.data());
    packed = packed_here.data();
  } else if (!header_matches(packed, Layout::kAmxQuads, a.k, a.c, a.r, a.s)) {
    throw std::invalid_argument("tlcore int8 conv: packed_weight was packed for another weight, instruction set "
                                "or algorithm");
  }
  const int32_t* weight = packed + kHeaderWords;
  const int32_t* correction = weight + blocks * block_words;
  const bool padded = source.rows == Rows::kPadded, signed_rows = source.rows == Rows::kInput;
  std::unique_ptr<int32_t[]> x;
  if (!pointwise) {
    // kPadded: an image's last tile runs up to 31 pixels past its output rows, and its taps reach
    // S - 1 columns further: past the last image, into zeros. Panels: the moves' slack.
    const int64_t tail = padded ? (kSubRows + a.dil_w * (a.s - 1)) * groups : kMoveSlackWords;
    x = pad_input(a, Layout::kQuads, hp, wp, groups, false, tail);
  }
  const EpilogueFn epilogue = epilogue_fn(Int8Isa::kAmx, a);
  const PanelRuns runs = panel_runs(a, wp, groups);
  // Task = (chunk of kPanelRows rows, pair of blocks), chunks outer. kPadded: a chunk lies in one
  // image (rows: its padded pixels); otherwise chunks run over all output pixels.
  const int64_t m_total = a.n * a.oh * a.ow;
  const int64_t image_chunks = padded ? (source.rows_per_image + kPanelRows - 1) / kPanelRows : 0;
  const int64_t chunks = padded ? a.n * image_chunks : (m_total + kPanelRows - 1) / kPanelRows;
  const int64_t units = (blocks + 1) / 2;
  parallel_tasks(chunks * units, [&](ClaimedTasks& tasks) {
    const TileScope tiles;
    // + one step: a panel's last row reads up to a step past its end (onto zero weights), and its
    // last run's move writes up to kMoveSlackWords - 1 words past it.
    static_assert(kMoveSlackWords <= kAmxStepWords);
    std::vector<int32_t> panel(padded ? 0 : static_cast<size_t>(kPanelRows * source.stride + kAmxStepWords));
    alignas(64) int32_t start[2][kTileN];
    alignas(64) int32_t acc[2][kSubRows][kTileN];
    int64_t ms[kSubRows];
    int64_t current = -1, count = 0;
    for (int64_t task; tasks.next(task);) {
      const int64_t chunk = task / units, block = 2 * (task % units);
      const int32_t* rows = nullptr;  // the chunk's first A row
      int64_t n = 0, q_first = 0;
      if (padded) {
        n = chunk / image_chunks;
        q_first = chunk % image_chunks * kPanelRows;
        count = std::min(kPanelRows, source.rows_per_image - q_first);
        rows = x.get() + (n * hp * wp + q_first) * groups;
      } else if (signed_rows && m_total - chunk * kPanelRows >= kPanelRows) {
        count = kPanelRows;
        rows = reinterpret_cast<const int32_t*>(a.x) + chunk * kPanelRows * groups;
      } else {
        if (chunk != current) {
          count = std::min(kPanelRows, m_total - chunk * kPanelRows);
          if (signed_rows) {  // the last chunk, short of kPanelRows: its codes, zero rows to a whole tile
            const int64_t words = count * groups;
            std::memcpy(panel.data(), a.x + chunk * kPanelRows * a.c, static_cast<size_t>(words) * sizeof(int32_t));
            std::fill(panel.data() + words, panel.data() + (count + kSubRows - 1) / kSubRows * kSubRows * groups, 0);
          } else {
            build_panel(a, x.get(), hp, wp, groups, runs, chunk * kPanelRows, count, panel.data());
          }
          current = chunk;
        }
        rows = panel.data();
      }
      const int n_blocks = block + 1 < blocks ? 2 : 1;
      for (int j = 0; j < n_blocks; ++j) {
        for (int c = 0; c < kTileN; ++c) start[j][c] = signed_rows ? 0 : -correction[(block + j) * kTileN + c];
      }
      const int32_t* w = weight + block * block_words;
      for (int64_t sub = 0; sub * kSubRows < count; ++sub) {
        // Unpadded rows: the tile's first output pixel and its number of pixels.
        const int64_t m0 = chunk * kPanelRows + sub * kSubRows;
        const int valid = static_cast<int>(std::min<int64_t>(kSubRows, m_total - m0));
        if (pointwise) prefetch_residual(a, m0, valid, block * kTileN);
        const int32_t* tile_rows = rows + sub * kSubRows * source.stride;
        const auto run_tile = n_blocks == 2 ? (signed_rows ? amx_tile<2, true> : amx_tile<2, false>)
                                            : (signed_rows ? amx_tile<1, true> : amx_tile<1, false>);
        run_tile(tile_rows, source.stride, source.step_offsets, w, block_words, start, acc);
        for (int j = 0; j < n_blocks; ++j) {
          const int64_t k0 = (block + j) * kTileN;
          if (padded) {
            in_place_epilogue(a, epilogue, wp, source.rows_per_image, n, q_first + sub * kSubRows, acc[j], k0);
            continue;
          }
          for (int i = 0; i < valid; ++i) ms[i] = m0 + i;
          epilogue(a, acc[j], ms, valid, k0);
        }
      }
    }
  });
}

#else  // no AMX intrinsics, or not Linux on x86-64

bool amx_supported() { return false; }

void int8_conv2d_amx(const Int8ConvArgs&) {
  throw std::invalid_argument("tlcore int8 conv: this build has no AMX kernel");
}

#endif  // TLCORE_AMX

}  // namespace int8_cpu
}  // namespace tlcore
