// gemm_cpu.cpp — CPU kernels for CMPQ layers: direct fused GEMV/GEMM for small batches, and row decode
// for the large-batch path (decode a block of rows, then a BLAS GEMM in the bindings).
//
// The direct kernel walks one output row at a time: for each segment it expands the row's fp16 codebook
// into a small float table, then per group of 32 packed codes decodes indices, looks them up and FMAs
// them against up to kMaxTile activation rows, so each weight is decoded once per kMaxTile batch rows.
// The AVX2 path decodes 8 codes with one variable shift and one AND, and does the codebook lookup as an
// in-register permute (vpermps): a 2/3-bit codebook fits one ymm register, a 4-bit one two plus a blend.
// That keeps decode near 1 instruction per weight, so batch 1 is bounded by reading the packed bytes.
#include "gemm_cpu.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define CMPQ_HAVE_X86 1
#include <immintrin.h>
#endif

namespace cmpq {
namespace cpu {
namespace {

constexpr int kMaxTile = 8;  // activation rows sharing one decode of the weights

// Expand one row's fp16 codebook of segment s into floats.
inline void load_table(const LayerView& layer, int s, int row, float* table) {
  const uint16_t* cb = layer.row_codebook(s, row);
  for (int c = 0; c < (1 << segment_bits(s)); ++c) table[c] = half_bits_to_float(cb[c]);
}

// Residual outliers of one row, added to acc[i] for i < tile.
inline void add_outliers(const LayerView& layer, int row, const float* x, int64_t ldx, int tile, float* acc) {
  for (int32_t e = layer.row_ptr[row]; e < layer.row_ptr[row + 1]; ++e) {
    const int j = layer.outlier_col(e);
    const float r = half_bits_to_float(layer.val[e]);
    for (int i = 0; i < tile; ++i) acc[i] += x[i * ldx + j] * r;
  }
}

// ---- scalar path (any CPU; also the readable statement of what the SIMD path computes) -----------------

template <int BITS, int TILE>
void segment_scalar(const uint32_t* words, int groups, const float* table, const float* x, int64_t ldx,
                    float* acc) {
  uint8_t codes[kGroupCodes];
  for (int g = 0; g < groups; ++g) {
    unpack_group<BITS>(words + g * BITS, codes);
    const float* xg = x + g * kGroupCodes;
    for (int j = 0; j < kGroupCodes; ++j) {
      const float w = table[codes[j]];
      for (int i = 0; i < TILE; ++i) acc[i] += w * xg[i * ldx + j];
    }
  }
}

template <int TILE>
void row_scalar(const LayerView& layer, int row, const float* x, int64_t ldx, float* acc) {
  float table[1 << kMaxBits];
  for (int i = 0; i < TILE; ++i) acc[i] = 0.f;
  int begin = 0;
  for (int s = 0; s < kNumSegments; ++s) {
    if (layer.seg_k[s] != 0) {
      load_table(layer, s, row, table);
      const uint32_t* words = layer.row_codes(s, row);
      const float* xs = x + begin;
      with_segment_bits(segment_bits(s), [&](auto seg) {
        segment_scalar<seg.kBits, TILE>(words, layer.groups(s), table, xs, ldx, acc);
      });
    }
    begin += layer.seg_k[s];
  }
  add_outliers(layer, row, x, ldx, TILE, acc);
}

// Dense part of one row (codebook values, no outliers) in packed column order.
void decode_row_scalar(const LayerView& layer, int row, float* out) {
  float table[1 << kMaxBits];
  uint8_t codes[kGroupCodes];
  for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
    if (layer.seg_k[s] == 0) continue;
    load_table(layer, s, row, table);
    const uint32_t* words = layer.row_codes(s, row);
    with_segment_bits(segment_bits(s), [&](auto seg) {
      for (int g = 0; g < layer.groups(s); ++g) {
        unpack_group<seg.kBits>(words + g * seg.kWordsPerGroup, codes);
        for (int j = 0; j < kGroupCodes; ++j) out[begin + g * kGroupCodes + j] = table[codes[j]];
      }
    });
  }
}

// ---- AVX2 path --------------------------------------------------------------------------------------

#if CMPQ_HAVE_X86
#define CMPQ_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define CMPQ_AVX2 CMPQ_AVX2_TARGET __attribute__((always_inline)) inline
// Per-row entry points. GCC does not inline a with_segment_bits body (an AVX2 lambda) across the
// dispatcher's target boundary by itself; flatten does, which keeps the accumulators in registers.
#define CMPQ_AVX2_ROW CMPQ_AVX2_TARGET __attribute__((flatten))

// The four index vectors (codes 0-7, 8-15, 16-23, 24-31) of one group.
template <int BITS>
CMPQ_AVX2 void decode_group_avx2(const uint32_t* words, __m256i* idx) {
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  if constexpr (BITS == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (int v = 0; v < 4; ++v)
      idx[v] = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(words[v])), shifts), mask);
  } else if constexpr (BITS == 2) {
    const __m256i lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    for (int w = 0; w < 2; ++w) {
      const __m256i word = _mm256_set1_epi32(static_cast<int>(words[w]));
      idx[2 * w] = _mm256_and_si256(_mm256_srlv_epi32(word, lo), mask);
      idx[2 * w + 1] = _mm256_and_si256(_mm256_srlv_epi32(word, hi), mask);
    }
  } else {
    // Each vector of 8 codes spans at most two sources (a word, or the spare field for codes 30-31):
    // blend the two broadcasts lane-wise, then one variable shift places every code at bit 0.
    const __m256i w0 = _mm256_set1_epi32(static_cast<int>(words[0]));
    const __m256i w1 = _mm256_set1_epi32(static_cast<int>(words[1]));
    const __m256i w2 = _mm256_set1_epi32(static_cast<int>(words[2]));
    const __m256i spare = _mm256_set1_epi32(static_cast<int>(spare_field_3bit(words)));
    idx[0] = _mm256_srlv_epi32(w0, _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21));
    idx[1] = _mm256_srlv_epi32(_mm256_blend_epi32(w0, w1, 0xFC), _mm256_setr_epi32(24, 27, 0, 3, 6, 9, 12, 15));
    idx[2] = _mm256_srlv_epi32(_mm256_blend_epi32(w1, w2, 0xF0), _mm256_setr_epi32(18, 21, 24, 27, 0, 3, 6, 9));
    idx[3] = _mm256_srlv_epi32(_mm256_blend_epi32(w2, spare, 0xC0), _mm256_setr_epi32(12, 15, 18, 21, 24, 27, 0, 3));
    for (int v = 0; v < 4; ++v) idx[v] = _mm256_and_si256(idx[v], mask);
  }
}

// Codebook lookup of 8 indices: vpermps uses the low 3 index bits; for 4-bit, bit 3 picks the upper half.
template <int BITS>
CMPQ_AVX2 __m256 lookup_avx2(__m256 table_lo, __m256 table_hi, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx);
  if constexpr (BITS < 4) {
    (void)table_hi;
    return lo;
  } else {
    const __m256 hi = _mm256_permutevar8x32_ps(table_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
}

// Fixed-order horizontal sum (deterministic).
CMPQ_AVX2 float hsum_avx2(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// Independent accumulators per activation row: enough to hide FMA latency when the tile is small.
template <int TILE>
constexpr int kChains = TILE == 1 ? 4 : (TILE == 2 ? 2 : 1);

template <int BITS, int TILE>
CMPQ_AVX2 void segment_avx2(const uint32_t* words, int groups, const float* table, const float* x, int64_t ldx,
                            __m256 (*acc)[kChains<TILE>]) {
  const __m256 table_lo = _mm256_loadu_ps(table);
  const __m256 table_hi = BITS == 4 ? _mm256_loadu_ps(table + 8) : table_lo;
  __m256i idx[4];
  for (int g = 0; g < groups; ++g) {
    decode_group_avx2<BITS>(words + g * BITS, idx);
    const float* xg = x + g * kGroupCodes;
    for (int v = 0; v < 4; ++v) {
      const __m256 w = lookup_avx2<BITS>(table_lo, table_hi, idx[v]);
      for (int i = 0; i < TILE; ++i) {
        __m256& a = acc[i][v % kChains<TILE>];
        a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + i * ldx + 8 * v), a);
      }
    }
  }
}

template <int BITS>
CMPQ_AVX2 void decode_segment_avx2(const uint32_t* words, int groups, const float* table, float* out) {
  const __m256 table_lo = _mm256_loadu_ps(table);
  const __m256 table_hi = BITS == 4 ? _mm256_loadu_ps(table + 8) : table_lo;
  __m256i idx[4];
  for (int g = 0; g < groups; ++g) {
    decode_group_avx2<BITS>(words + g * BITS, idx);
    for (int v = 0; v < 4; ++v)
      _mm256_storeu_ps(out + g * kGroupCodes + 8 * v, lookup_avx2<BITS>(table_lo, table_hi, idx[v]));
  }
}

CMPQ_AVX2_ROW void decode_row_avx2(const LayerView& layer, int row, float* out) {
  alignas(32) float table[1 << kMaxBits];
  for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
    if (layer.seg_k[s] == 0) continue;
    load_table(layer, s, row, table);
    const uint32_t* words = layer.row_codes(s, row);
    with_segment_bits(segment_bits(s), [&](auto seg) CMPQ_AVX2_TARGET {
      decode_segment_avx2<seg.kBits>(words, layer.groups(s), table, out + begin);
    });
  }
}

template <int TILE>
CMPQ_AVX2_ROW void row_avx2(const LayerView& layer, int row, const float* x, int64_t ldx, float* out) {
  alignas(32) float table[1 << kMaxBits];
  __m256 acc[TILE][kChains<TILE>];
  for (int i = 0; i < TILE; ++i)
    for (int c = 0; c < kChains<TILE>; ++c) acc[i][c] = _mm256_setzero_ps();
  int begin = 0;
  for (int s = 0; s < kNumSegments; ++s) {
    if (layer.seg_k[s] != 0) {
      load_table(layer, s, row, table);
      const uint32_t* words = layer.row_codes(s, row);
      const float* xs = x + begin;
      with_segment_bits(segment_bits(s), [&](auto seg) CMPQ_AVX2_TARGET {
        segment_avx2<seg.kBits, TILE>(words, layer.groups(s), table, xs, ldx, acc);
      });
    }
    begin += layer.seg_k[s];
  }
  for (int i = 0; i < TILE; ++i) {
    __m256 total = acc[i][0];
    for (int c = 1; c < kChains<TILE>; ++c) total = _mm256_add_ps(total, acc[i][c]);
    out[i] = hsum_avx2(total);
  }
  add_outliers(layer, row, x, ldx, TILE, out);
}
#endif  // CMPQ_HAVE_X86

// One tile of up to kMaxTile activation rows over a row range.
template <int TILE>
void tile_rows(const LayerView& layer, const float* x, int64_t ldx, float* y, int64_t ldy, int row_begin,
               int row_end, Isa isa) {
  float out[TILE];
  for (int row = row_begin; row < row_end; ++row) {
#if CMPQ_HAVE_X86
    if (isa == Isa::kAvx2)
      row_avx2<TILE>(layer, row, x, ldx, out);
    else
#endif
      row_scalar<TILE>(layer, row, x, ldx, out);
    for (int i = 0; i < TILE; ++i) y[i * ldy + row] = out[i];
  }
}

using TileFn = void (*)(const LayerView&, const float*, int64_t, float*, int64_t, int, int, Isa);
constexpr TileFn kTileFns[kMaxTile] = {tile_rows<1>, tile_rows<2>, tile_rows<3>, tile_rows<4>,
                                       tile_rows<5>, tile_rows<6>, tile_rows<7>, tile_rows<8>};

}  // namespace

Isa best_isa() {
#if CMPQ_HAVE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

void gemm_rows(const LayerView& layer, const float* x_packed, int64_t ldx, int m, float* y, int64_t ldy,
               int row_begin, int row_end, Isa isa) {
  for (int i0 = 0; i0 < m; i0 += kMaxTile) {
    const int tile = m - i0 < kMaxTile ? m - i0 : kMaxTile;
    kTileFns[tile - 1](layer, x_packed + i0 * ldx, ldx, y + i0 * ldy, ldy, row_begin, row_end, isa);
  }
}

void decode_rows(const LayerView& layer, float* w, int64_t ldw, int row_begin, int row_end, Isa isa) {
  for (int row = row_begin; row < row_end; ++row) {
    float* out = w + static_cast<int64_t>(row - row_begin) * ldw;
#if CMPQ_HAVE_X86
    if (isa == Isa::kAvx2)
      decode_row_avx2(layer, row, out);
    else
#endif
      decode_row_scalar(layer, row, out);
    for (int32_t e = layer.row_ptr[row]; e < layer.row_ptr[row + 1]; ++e)
      out[layer.outlier_col(e)] += half_bits_to_float(layer.val[e]);
  }
}

}  // namespace cpu
}  // namespace cmpq
