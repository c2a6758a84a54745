// avx2.cpp — the AVX2 CPU kernels (avx2 + fma + f16c; used when the CPU lacks AVX-512).
//
// A 32-code group decodes as four 8-lane index vectors: one variable shift and one AND each (3-bit
// blends two word broadcasts first, since 8 codes can span two words or the spare field). The codebook
// lookup is an in-register permute (vpermps): a 2/3-bit codebook fits one ymm register, a 4-bit one two
// plus a blend on index bit 3. That keeps decode near 1 instruction per weight.
#include "row_kernels.h"

#if CMPQ_HAVE_X86
#include <immintrin.h>

namespace cmpq {
namespace cpu {
namespace detail {
namespace {

#define CMPQ_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define CMPQ_AVX2 CMPQ_AVX2_TARGET __attribute__((always_inline)) inline
// Per-row entry points. GCC does not inline a with_segment_bits body (an AVX2 lambda) across the
// dispatcher's target boundary by itself; flatten does, which keeps the accumulators in registers.
#define CMPQ_AVX2_ROW CMPQ_AVX2_TARGET __attribute__((flatten))

// The four index vectors (codes 0-7, 8-15, 16-23, 24-31) of one group.
template <int BITS>
CMPQ_AVX2 void decode_group(const uint32_t* words, __m256i* idx) {
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
CMPQ_AVX2 __m256 lookup(__m256 table_lo, __m256 table_hi, __m256i idx) {
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
CMPQ_AVX2 float hsum(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// Independent accumulators per activation row: enough to hide FMA latency when the tile is small.
template <int TILE>
constexpr int kChains = TILE == 1 ? 4 : (TILE == 2 ? 2 : 1);

template <int BITS, int TILE>
CMPQ_AVX2 void segment(const uint32_t* words, int groups, const float* table, const float* x, int64_t ldx,
                       __m256 (*acc)[kChains<TILE>]) {
  const __m256 table_lo = _mm256_loadu_ps(table);
  const __m256 table_hi = BITS == 4 ? _mm256_loadu_ps(table + 8) : table_lo;
  __m256i idx[4];
  for (int g = 0; g < groups; ++g) {
    decode_group<BITS>(words + g * BITS, idx);
    const float* xg = x + g * kGroupCodes;
    for (int v = 0; v < 4; ++v) {
      const __m256 w = lookup<BITS>(table_lo, table_hi, idx[v]);
      for (int i = 0; i < TILE; ++i) {
        __m256& a = acc[i][v % kChains<TILE>];
        a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + i * ldx + 8 * v), a);
      }
    }
  }
}

template <int BITS>
CMPQ_AVX2 void decode_segment(const uint32_t* words, int groups, const float* table, float* out) {
  const __m256 table_lo = _mm256_loadu_ps(table);
  const __m256 table_hi = BITS == 4 ? _mm256_loadu_ps(table + 8) : table_lo;
  __m256i idx[4];
  for (int g = 0; g < groups; ++g) {
    decode_group<BITS>(words + g * BITS, idx);
    for (int v = 0; v < 4; ++v)
      _mm256_storeu_ps(out + g * kGroupCodes + 8 * v, lookup<BITS>(table_lo, table_hi, idx[v]));
  }
}

struct Avx2Kernel {
  static constexpr int kMaxTile = 8;

  template <int TILE>
  CMPQ_AVX2_ROW static void row(const LayerView& layer, int row, const float* x, int64_t ldx, float* out) {
    alignas(32) float table[1 << kMaxBits];
    __m256 acc[TILE][kChains<TILE>];
    for (int i = 0; i < TILE; ++i)
      for (int c = 0; c < kChains<TILE>; ++c) acc[i][c] = _mm256_setzero_ps();
    for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
      if (layer.seg_k[s] == 0) continue;
      load_table(layer, s, row, table);
      const uint32_t* words = layer.row_codes(s, row);
      with_segment_bits(segment_bits(s), [&](auto seg) CMPQ_AVX2_TARGET {
        segment<seg.kBits, TILE>(words, layer.groups(s), table, x + begin, ldx, acc);
      });
    }
    for (int i = 0; i < TILE; ++i) {
      __m256 total = acc[i][0];
      for (int c = 1; c < kChains<TILE>; ++c) total = _mm256_add_ps(total, acc[i][c]);
      out[i] = hsum(total);
    }
    add_outliers(layer, row, x, ldx, TILE, out);
  }

  CMPQ_AVX2_ROW static void decode_row(const LayerView& layer, int row, float* out) {
    alignas(32) float table[1 << kMaxBits];
    for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
      if (layer.seg_k[s] == 0) continue;
      load_table(layer, s, row, table);
      const uint32_t* words = layer.row_codes(s, row);
      with_segment_bits(segment_bits(s), [&](auto seg) CMPQ_AVX2_TARGET {
        decode_segment<seg.kBits>(words, layer.groups(s), table, out + begin);
      });
    }
  }
};

}  // namespace

const EntryPoints kAvx2 = {gemm_rows_tiled<Avx2Kernel>, decode_rows_with<Avx2Kernel>};

}  // namespace detail
}  // namespace cpu
}  // namespace cmpq
#endif  // CMPQ_HAVE_X86
