// avx512_int8.cpp — the opt-in int8 CPU kernel (CMPQ_CPU_SIMD=avx512-int8; avx512 + vnni + vbmi), m <= 16.
//
// The exact kernels spend 3-4.5 vector instructions per 16 weights (spread, shift, vpermps, FMA), which
// keeps them from streaming weights as fast as DRAM delivers them. Here weights and activations are
// bytes, so one instruction handles 64 of them:
//   * each row's codebook (per segment) is rounded to int8 with one scale, T ~ (t - 128) * scale_w, and
//     stored offset by 128 as 64 unsigned bytes (the 2^b entries repeated: vpermb reads 6 index bits, so
//     the bits above a code never matter);
//   * activations are rounded to int8 per token and block of 128 packed columns (quantize_activations),
//     laid out in the order the byte decode below produces weights;
//   * decode -> lookup (vpermb, 64 codes) -> vpdpbusd (64 unsigned x signed byte products into 16 int32
//     lanes), then per block one int32->float convert and one FMA with the block's activation scale.
// The +128 offset of the weight bytes adds 128 * sum(q) per block; quantize_activations precomputes that
// sum (scaled) per token and segment and it is subtracted once per row. Outliers are added in FP32 from
// the unquantized activations. Byte decode per width, 64 bytes of codes or 2 groups at a time:
//   4-bit: low nibbles are the even columns, vpsrlw 4 gives the odd ones;
//   2-bit: vpsrlw 0/2/4/6 gives every 4th column;
//   3-bit: vpermt2d places words (w0 w1 | w0 w1 | w1 w2 | w2 s) per group, s the precomputed spare field,
//          and vpmultishiftqb pulls each code's byte out of its 64-bit pair.
#include "row_kernels.h"

#if CMPQ_HAVE_X86
#include <stdint.h>

#include "avx512_common.h"

namespace cmpq {
namespace cpu {
namespace detail {
namespace {

#define CMPQ_INT8_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,fma,f16c")))
#define CMPQ_INT8 CMPQ_INT8_TARGET __attribute__((always_inline)) inline
#define CMPQ_INT8_ROW CMPQ_INT8_TARGET __attribute__((flatten))

constexpr int kMaxTile = 8;  // tokens per pass: an int32 and a float accumulator each
constexpr int kPrefetchBytes = 1024;

// One row's b-bit codebook as 64 bytes t = round(T / scale) + 128, repeated; returns scale.
template <int BITS>
CMPQ_INT8 __m512i int8_table(const uint16_t* codebook, float* scale) {
  constexpr __mmask16 kLive = static_cast<__mmask16>((1u << (1 << BITS)) - 1);
  const __m512 t = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kLive, codebook));
  const float amax = _mm512_mask_reduce_max_ps(kLive, _mm512_abs_ps(t));
  *scale = amax / 127.f;
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(t, inv)), _mm512_set1_epi32(128));
  const __m128i bytes = _mm512_cvtepi32_epi8(q);  // 1 .. 255
  if constexpr (BITS == 4) return _mm512_broadcast_i32x4(bytes);
  else if constexpr (BITS == 3) return _mm512_set1_epi64(_mm_cvtsi128_si64(bytes));
  else return _mm512_set1_epi32(_mm_cvtsi128_si32(bytes));
}

CMPQ_INT8 __mmask64 first_bytes(int count) { return count >= 64 ? ~0ull : (1ull << count) - 1; }

// Activation scales of blocks b and b + 1 in lanes 0-7 and 8-15 (a 2-bit chunk spans two blocks).
CMPQ_INT8 __m512 two_scales(const float* scale) {
  return _mm512_mask_mov_ps(_mm512_set1_ps(scale[0]), 0xFF00, _mm512_set1_ps(scale[1]));
}

// vpmultishiftqb controls: byte k of a qword takes the 8 bits at the k-th offset. Per group the qwords are
// (w1:w0) codes 0-7, (w1:w0) codes 8-15, (w2:w1) codes 16-23, (s:w2) codes 24-31 with s the spare field.
constexpr uint64_t offsets(int a, int b, int c, int d, int e, int f, int g, int h) {
  return uint64_t(a) | uint64_t(b) << 8 | uint64_t(c) << 16 | uint64_t(d) << 24 | uint64_t(e) << 32 |
         uint64_t(f) << 40 | uint64_t(g) << 48 | uint64_t(h) << 56;
}
constexpr uint64_t kShift0 = offsets(0, 3, 6, 9, 12, 15, 18, 21), kShift1 = offsets(24, 27, 32, 35, 38, 41, 44, 47);
constexpr uint64_t kShift2 = offsets(18, 21, 24, 27, 32, 35, 38, 41), kShift3 = offsets(12, 15, 18, 21, 24, 27, 32, 35);
// Groups per 3-bit chunk: their spare fields are computed first, so the decode loop can take them from memory.
constexpr int kChunkGroups = 64;

// spare[g] = spare field of group g for 16 consecutive 3-bit groups (count <= 16 of them valid). The 48
// words are three vectors; word j contributes (j-th word >> 30) << 2 * (j % 3) to group j / 3, and the three
// contributions of each group are brought together by two-source permutes (scalar code would spend ~8
// ALU instructions per group, as much as the whole vector decode).
CMPQ_INT8 void spare_fields16(const uint32_t* words, int count, uint32_t* spare) {
  __m512i t[3];
  for (int v = 0; v < 3; ++v) {
    const int left = 3 * count - 16 * v;
    const __mmask16 live = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1));
    const __m512i lane = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(16 * v));
    const __m512i shift = _mm512_slli_epi32(_mm512_sub_epi32(lane, _mm512_mullo_epi32(
        _mm512_srli_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(0xAAAB)), 17), _mm512_set1_epi32(3))), 1);
    t[v] = _mm512_sllv_epi32(_mm512_srli_epi32(_mm512_maskz_loadu_epi32(live, words + 16 * v), 30), shift);
  }
  __m512i fields = _mm512_setzero_si512();
  for (int o = 0; o < 3; ++o) {  // element 3g + o of the 48, for g = 0..15
    const __m512i element = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                                   11, 12, 13, 14, 15),
                                                                 _mm512_set1_epi32(3)),
                                             _mm512_set1_epi32(o));
    const __m512i low = _mm512_permutex2var_epi32(t[0], element, t[1]);  // elements < 32
    const __mmask16 high = _mm512_cmpge_epi32_mask(element, _mm512_set1_epi32(32));
    const __m512i from_t2 = _mm512_permutexvar_epi32(_mm512_sub_epi32(element, _mm512_set1_epi32(32)), t[2]);
    fields = _mm512_or_si512(fields, _mm512_mask_mov_epi32(low, high, from_t2));
  }
  _mm512_storeu_si512(spare, fields);
}

// acc[i] += sum over the segment of (weight byte - 128-offset) * q, per block scaled; see the file comment.
template <int BITS, int TILE>
CMPQ_INT8 void segment(const uint32_t* words, int seg_k, __m512i table, const int8_t* q, int64_t stride,
                       const float* scale, int64_t blocks, __m512* acc) {
  const uint8_t* codes = reinterpret_cast<const uint8_t*>(words);
  if constexpr (BITS == 4 || BITS == 2) {
    constexpr int kColumns = 64 * 8 / BITS;  // columns per 64 bytes of codes: 128 or 256
    const int bytes = seg_k * BITS / 8;
    for (int c = 0; c * 64 < bytes; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + 64 * c) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i v = _mm512_maskz_loadu_epi8(first_bytes(bytes - 64 * c), codes + 64 * c);
      __m512i w[8 / BITS];
      for (int p = 0; p < 8 / BITS; ++p)
        w[p] = _mm512_permutexvar_epi8(p == 0 ? v : _mm512_srli_epi16(v, BITS * p), table);
      for (int i = 0; i < TILE; ++i) {
        const int8_t* qi = q + i * stride + c * kColumns;
        __m512i d = _mm512_setzero_si512();
        for (int p = 0; p < 8 / BITS; ++p) d = _mm512_dpbusd_epi32(d, w[p], _mm512_loadu_si512(qi + 64 * p));
        const float* si = scale + i * blocks + c * kColumns / kInt8Block;
        const __m512 s = BITS == 4 ? _mm512_set1_ps(si[0]) : two_scales(si);
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i]);
      }
    }
  } else {
    // dwords of two groups (w0..w5) and their spare fields (s0, s1) -> w0 w1 w0 w1 w1 w2 w2 s0 | w3 .. s1
    const __m512i spread = _mm512_setr_epi32(0, 1, 0, 1, 1, 2, 2, 16, 3, 4, 3, 4, 4, 5, 5, 17);
    const __m512i shifts = _mm512_setr_epi64(kShift0, kShift1, kShift2, kShift3, kShift0, kShift1, kShift2, kShift3);
    const int groups = seg_k / kGroupCodes;
    alignas(64) uint32_t spare[kChunkGroups + 16];  // whole vectors of 16
    // Bytes of one pair of groups (64 codes) in column order; `have` groups exist (0, 1 or 2).
    auto decode_pair = [&](const uint32_t* group, const uint32_t* pair_spare, int have) CMPQ_INT8_TARGET {
      const __mmask16 live = have >= 2 ? 0x3F : (have == 1 ? 0x07 : 0);
      const __m512i dwords = _mm512_maskz_loadu_epi32(live, group);
      const __m512i spares = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pair_spare)));
      const __m512i v = _mm512_multishift_epi64_epi8(shifts, _mm512_permutex2var_epi32(dwords, spread, spares));
      return _mm512_permutexvar_epi8(v, table);
    };
    for (int g0 = 0; g0 < groups; g0 += kChunkGroups) {
      const int count = groups - g0 < kChunkGroups ? groups - g0 : kChunkGroups;
      for (int g = 0; g < count; g += 16) spare_fields16(words + 3 * (g0 + g), count - g < 16 ? count - g : 16, spare + g);
      for (int g = 0; g < count; g += 4) {  // 4 groups = 128 columns = one activation block; no branches
        const uint32_t* group = words + 3 * (g0 + g);
        const int left = count - g;
        _mm_prefetch(reinterpret_cast<const char*>(group) + kPrefetchBytes, _MM_HINT_T0);
        const __m512i w0 = decode_pair(group, spare + g, left);
        const __m512i w1 = decode_pair(group + 6, spare + g + 2, left - 2);
        const int block = (g0 + g) / 4;
        for (int i = 0; i < TILE; ++i) {
          const int8_t* qi = q + i * stride + 128 * block;
          const __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(qi));
          const __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(qi + 64));
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)),
                                   _mm512_set1_ps(scale[i * blocks + block]), acc[i]);
        }
      }
    }
  }
}

template <int TILE>
CMPQ_INT8_ROW void row(const LayerView& layer, const Int8Activations& acts, int i0, int row, const float* x,
                       int64_t ldx, float* out) {
  // Per segment, the block-scaled sums are weighted by the row's codebook scale into one vector per token,
  // reduced once; the 128-offset corrections are subtracted in the same units.
  __m512 total[TILE];
  float correction[TILE] = {};
  for (int i = 0; i < TILE; ++i) total[i] = _mm512_setzero_ps();
  const int cb_row = row / layer.codebook_rows;
  for (int s = 0; s < kNumSegments; ++s) {
    if (layer.seg_k[s] == 0) continue;
    with_segment_bits(segment_bits(s), [&](auto seg) CMPQ_INT8_TARGET {
      float weight_scale;
      const __m512i table = int8_table<seg.kBits>(layer.codebook_row(seg.kSegment, cb_row), &weight_scale);
      __m512 acc[TILE];
      for (int i = 0; i < TILE; ++i) acc[i] = _mm512_setzero_ps();
      segment<seg.kBits, TILE>(layer.row_codes(seg.kSegment, row), layer.seg_k[seg.kSegment], table,
                               acts.q.data() + i0 * acts.stride + acts.seg_byte[seg.kSegment], acts.stride,
                               acts.scale.data() + i0 * acts.blocks + acts.seg_block[seg.kSegment], acts.blocks, acc);
      for (int i = 0; i < TILE; ++i) {
        total[i] = _mm512_fmadd_ps(acc[i], _mm512_set1_ps(weight_scale), total[i]);
        correction[i] += weight_scale * acts.correction[(i0 + i) * kNumSegments + seg.kSegment];
      }
    });
  }
  add_outliers16<TILE>(layer, row, x, ldx, [&](int i) -> __m512& { return total[i]; });
  for (int i = 0; i < TILE; ++i) out[i] = _mm512_reduce_add_ps(total[i]) - correction[i];
}

template <int TILE>
void tile_rows_int8(const LayerView& layer, const Int8Activations& acts, int i0, const float* x, int64_t ldx, float* y,
                    int64_t ldy, int row_begin, int row_end) {
  float out[TILE];
  for (int r = row_begin; r < row_end; ++r) {
    row<TILE>(layer, acts, i0, r, x, ldx, out);
    for (int i = 0; i < TILE; ++i) y[i * ldy + r] = out[i];
  }
}

using Int8TileFn = void (*)(const LayerView&, const Int8Activations&, int, const float*, int64_t, float*, int64_t, int,
                            int);
constexpr Int8TileFn kTiles[kMaxTile] = {tile_rows_int8<1>, tile_rows_int8<2>, tile_rows_int8<3>, tile_rows_int8<4>,
                                         tile_rows_int8<5>, tile_rows_int8<6>, tile_rows_int8<7>, tile_rows_int8<8>};

}  // namespace

void gemm_rows_int8_avx512(const LayerView& layer, const Int8Activations& acts, const float* x, int64_t ldx,
                           float* y, int64_t ldy, int row_begin, int row_end) {
  for (int i0 = 0; i0 < acts.m; i0 += kMaxTile) {
    const int tile = acts.m - i0 < kMaxTile ? acts.m - i0 : kMaxTile;
    kTiles[tile - 1](layer, acts, i0, x + i0 * ldx, ldx, y + i0 * ldy, ldy, row_begin, row_end);
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace cmpq
#endif  // CMPQ_HAVE_X86
