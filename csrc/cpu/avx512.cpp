// avx512.cpp — the AVX-512 CPU kernels (avx512f + avx512vl + avx512bw; the default wherever the CPU has them).
//
// Decode, per 16 weights (half a 32-code group):
//   1. spread: one 16-lane vector holding, in each lane, the packed word its code sits in — a broadcast
//      of one word, with one or two more merged into a lane range by masked broadcasts (the 3-bit
//      spare field goes to lanes 14-15 of the second half);
//   2. shift: one variable shift (vpsrlvd) brings each lane's code to bits 0..b-1;
//   3. lookup: one vpermps into a 16-entry table.
// The table holds the 2^b codebook values repeated 16 / 2^b times. vpermps reads only the low 4 index
// bits, and with the repeats the bits above the code do not matter, so no AND is needed for any width.
// Each weight then costs 1 FMA per activation row; with 32 zmm registers a tile is 16 activation rows.
#include "row_kernels.h"

#if CMPQ_HAVE_X86
#include <type_traits>

#include "avx512_common.h"

namespace cmpq {
namespace cpu {
namespace detail {
namespace {

// Per-row entry points; flatten inlines the with_segment_bits bodies (see avx2.cpp).
#define CMPQ_AVX512_ROW CMPQ_AVX512_TARGET __attribute__((flatten))

// The 16-entry lookup table of one row's b-bit codebook (fp16 -> fp32 with the F16C/AVX-512 converts,
// exact for every fp16 value), repeated to fill 16 lanes. Reads exactly 2^b halves.
template <int BITS>
CMPQ_AVX512 __m512 load_table16(const uint16_t* codebook) {
  if constexpr (BITS == 4) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codebook)));
  } else if constexpr (BITS == 3) {
    const __m512 t = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codebook))));
    return _mm512_shuffle_f32x4(t, t, 0x44);  // 128-bit lanes 0,1,0,1
  } else {
    return _mm512_broadcast_f32x4(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codebook))));
  }
}

CMPQ_AVX512 __m512i word(const uint32_t* words, int w) { return _mm512_set1_epi32(static_cast<int>(words[w])); }
CMPQ_AVX512 __m512i merge_word(__m512i v, __mmask16 lanes, uint32_t value) {
  return _mm512_mask_set1_epi32(v, lanes, static_cast<int>(value));
}

// Index vectors of one group: idx[0] for codes 0-15, idx[1] for codes 16-31; lane l's code is in bits
// 0..b-1 (bits above it are the neighbouring code's, ignored by the repeated table). `spare` points at
// the group's 3-bit spare field (codes 30, 31), precomputed; unused for 2 and 4 bits.
template <int BITS>
CMPQ_AVX512 void decode_group(const uint32_t* words, const uint32_t* spare, __m512i* idx) {
  if constexpr (BITS == 2) {  // word h holds codes 16h .. 16h+15
    (void)spare;
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    idx[0] = _mm512_srlv_epi32(word(words, 0), shifts);
    idx[1] = _mm512_srlv_epi32(word(words, 1), shifts);
  } else if constexpr (BITS == 4) {  // word w holds codes 8w .. 8w+7
    (void)spare;
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    idx[0] = _mm512_srlv_epi32(merge_word(word(words, 0), 0xFF00, words[1]), shifts);
    idx[1] = _mm512_srlv_epi32(merge_word(word(words, 2), 0xFF00, words[3]), shifts);
  } else {  // word w holds codes 10w .. 10w+9; codes 30, 31 are the spare field
    const __m512i shifts0 = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 0, 3, 6, 9, 12, 15);
    const __m512i shifts1 = _mm512_setr_epi32(18, 21, 24, 27, 0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 0, 3);
    // w1 feeds both halves: broadcast it once from memory and blend, rather than let the compiler keep it
    // in a general register and broadcast it from there twice (two shuffle-port instructions).
    const __m512i w1 = word(words, 1);
    idx[0] = _mm512_srlv_epi32(_mm512_mask_mov_epi32(word(words, 0), 0xFC00, w1), shifts0);
    idx[1] = _mm512_srlv_epi32(merge_word(merge_word(w1, 0x3FF0, words[2]), 0xC000, *spare), shifts1);
  }
}

// Groups decoded per chunk; for 3 bits a chunk's spare fields are gathered first by scalar code, so the
// vector loop broadcasts them from memory instead of moving each through a general register (an extra
// shuffle-port instruction per group).
constexpr int kChunkGroups = 64;
// Software prefetch distance in a segment's code stream (it runs on into the next row's codes).
constexpr int kPrefetchBytes = 1024;

// Runs body(g, idx, parity) for every group g of a segment row, parity = g % 2 as a compile-time constant
// (two groups per step, so a single activation row can spread its FMAs over four accumulators).
template <int BITS, class Body>
CMPQ_AVX512 void for_each_group(const uint32_t* words, int groups, Body&& body) {
  uint32_t spare[kChunkGroups];
  __m512i idx[2];
  for (int c0 = 0; c0 < groups; c0 += kChunkGroups) {
    const int count = groups - c0 < kChunkGroups ? groups - c0 : kChunkGroups;
    const uint32_t* chunk = words + c0 * BITS;
    if constexpr (BITS == 3)
      for (int g = 0; g < count; ++g) spare[g] = spare_field_3bit(chunk + 3 * g);
    int g = 0;
    for (; g + 2 <= count; g += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(chunk + g * BITS) + kPrefetchBytes, _MM_HINT_T0);
      decode_group<BITS>(chunk + g * BITS, spare + g, idx);
      body(c0 + g, idx, std::integral_constant<int, 0>{});
      decode_group<BITS>(chunk + (g + 1) * BITS, spare + g + 1, idx);
      body(c0 + g + 1, idx, std::integral_constant<int, 1>{});
    }
    if (g < count) {
      decode_group<BITS>(chunk + g * BITS, spare + g, idx);
      body(c0 + g, idx, std::integral_constant<int, 0>{});
    }
  }
}

// Independent accumulators per activation row: 4 for a single row hide the FMA latency (two groups per
// step, two halves per group), fewer when several rows already interleave.
template <int TILE>
constexpr int kChains = TILE == 1 ? 4 : (TILE == 2 ? 2 : 1);

template <int BITS, int TILE>
CMPQ_AVX512 void segment(const uint32_t* words, int groups, __m512 table, const float* x, int64_t ldx,
                         __m512 (*acc)[kChains<TILE>]) {
  for_each_group<BITS>(words, groups, [&](int g, const __m512i* idx, auto parity) CMPQ_AVX512_TARGET {
    const float* xg = x + g * kGroupCodes;
    for (int h = 0; h < 2; ++h) {
      const __m512 w = _mm512_permutexvar_ps(idx[h], table);
      for (int i = 0; i < TILE; ++i) {
        __m512& a = acc[i][(2 * parity.value + h) % kChains<TILE>];
        a = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + i * ldx + 16 * h), a);
      }
    }
  });
}

template <int BITS>
CMPQ_AVX512 void decode_segment(const uint32_t* words, int groups, __m512 table, float* out) {
  for_each_group<BITS>(words, groups, [&](int g, const __m512i* idx, auto) CMPQ_AVX512_TARGET {
    for (int h = 0; h < 2; ++h) _mm512_storeu_ps(out + g * kGroupCodes + 16 * h, _mm512_permutexvar_ps(idx[h], table));
  });
}

struct Avx512Kernel {
  static constexpr int kMaxTile = 16;

  template <int TILE>
  CMPQ_AVX512_ROW static void row(const LayerView& layer, int row, const float* x, int64_t ldx, float* out) {
    __m512 acc[TILE][kChains<TILE>];
    for (int i = 0; i < TILE; ++i)
      for (int c = 0; c < kChains<TILE>; ++c) acc[i][c] = _mm512_setzero_ps();
    const int cb_row = row / layer.codebook_rows;
    for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
      if (layer.seg_k[s] == 0) continue;
      with_segment_bits(segment_bits(s), [&](auto seg) CMPQ_AVX512_TARGET {
        const __m512 table = load_table16<seg.kBits>(layer.codebook_row(seg.kSegment, cb_row));
        segment<seg.kBits, TILE>(layer.row_codes(seg.kSegment, row), layer.groups(seg.kSegment), table, x + begin,
                                 ldx, acc);
      });
    }
    add_outliers16<TILE>(layer, row, x, ldx, [&](int i) -> __m512& { return acc[i][0]; });
    for (int i = 0; i < TILE; ++i) {
      __m512 total = acc[i][0];
      for (int c = 1; c < kChains<TILE>; ++c) total = _mm512_add_ps(total, acc[i][c]);
      out[i] = _mm512_reduce_add_ps(total);  // a fixed instruction sequence: deterministic
    }
  }

  CMPQ_AVX512_ROW static void decode_row(const LayerView& layer, int row, float* out) {
    const int cb_row = row / layer.codebook_rows;
    for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
      if (layer.seg_k[s] == 0) continue;
      with_segment_bits(segment_bits(s), [&](auto seg) CMPQ_AVX512_TARGET {
        const __m512 table = load_table16<seg.kBits>(layer.codebook_row(seg.kSegment, cb_row));
        decode_segment<seg.kBits>(layer.row_codes(seg.kSegment, row), layer.groups(seg.kSegment), table, out + begin);
      });
    }
  }
};

}  // namespace

const EntryPoints kAvx512 = {gemm_rows_tiled<Avx512Kernel>, decode_rows_with<Avx512Kernel>};

}  // namespace detail
}  // namespace cpu
}  // namespace cmpq
#endif  // CMPQ_HAVE_X86
