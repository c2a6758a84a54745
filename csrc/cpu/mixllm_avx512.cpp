// mixllm_avx512.cpp — the MixLLM kernel for AVX-512 VNNI (avx512f/bw + avx512vnni).
//
// vpdpbusd multiplies unsigned bytes by signed bytes, 64 products into 16 int32 lanes. Activations are the signed
// operand; weights are made unsigned:
//   * 4-bit codes are already in [0, 15]: acc = sum q_x q - z * sum(q_x);
//   * 8-bit codes get +128 (an xor of the sign bit, q + 128 in [1, 255]): acc = sum q_x (q + 128) - 128 * sum(q_x).
// Both corrections use the per-token group sums of quantize_activations, and every lane sum stays far below 2^31
// (128 * 255 * 127), so acc is the exact integer. A group is two 64-byte vectors: the 8-bit row's 128 codes
// against the natural activation layout, or one 64-byte load of packed nibbles split into low (even columns) and
// high (odd columns) against the split layout. A partial last group loads with a byte mask; the masked weight
// bytes meet zero-padded activations. Four groups are reduced together (reduce4: 11 instructions instead of
// four horizontal sums), and the four FP32 products accumulate in four lanes summed once per output.
#include "mixllm_cpu.h"
#include "row_kernels.h"

#if CMPQ_HAVE_X86
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics trip -Wuninitialized on their own pass-through operands (see avx512_common.h).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace cmpq {
namespace cpu {
namespace mixllm {
namespace detail {
namespace {

#define MIXLLM_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#define MIXLLM_VNNI MIXLLM_VNNI_TARGET __attribute__((always_inline)) inline

using ::cmpq::mixllm::kGroup;
using ::cmpq::mixllm::View;

constexpr int kTile = 8;          // tokens per pass over a row
constexpr int kBlock = 4;         // groups reduced together
static_assert(kBlock - 1 <= ::cmpq::cpu::mixllm::kPadGroups, "the activation buffers must cover a partial block");

MIXLLM_VNNI __mmask64 first_bytes(int count) {
  return count >= 64 ? ~0ull : (count <= 0 ? 0ull : (1ull << count) - 1);
}

// The int32 sums of four 16-lane vectors, as the four lanes of one vector (exact: integer adds).
MIXLLM_VNNI __m128i reduce4(__m512i d0, __m512i d1, __m512i d2, __m512i d3) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(d0, d1), _mm512_unpackhi_epi32(d0, d1));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(d2, d3), _mm512_unpackhi_epi32(d2, d3));
  const __m512i c = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// One block of up to four groups of a stored row, as unsigned weight bytes, with the per-unit-of-sum(q_x)
// correction of each group and its weight scale. Groups past `count` are zero.
struct Block {
  __m512i w[kBlock][2];
  __m128i offset;
  __m128 scale;
};

MIXLLM_VNNI void load_block(const View& layer, int r, int g0, int count, Block* b) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i low = _mm512_set1_epi8(15);
  alignas(16) int32_t offset[kBlock] = {};
  for (int j = 0; j < kBlock; ++j) {
    if (j >= count) {
      b->w[j][0] = b->w[j][1] = _mm512_setzero_si512();
      continue;
    }
    const int g = g0 + j, width = ::cmpq::mixllm::group_width(layer.k, g);
    if (r < layer.n8) {
      const int8_t* q = layer.codes8(r) + g * kGroup;
      b->w[j][0] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(first_bytes(width), q), sign);
      b->w[j][1] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(first_bytes(width - 64), q + 64), sign);
      offset[j] = 128;
    } else {
      const __m512i packed = _mm512_maskz_loadu_epi8(first_bytes(width / 2), layer.codes4(r) + g * (kGroup / 2));
      b->w[j][0] = _mm512_and_si512(packed, low);
      b->w[j][1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      offset[j] = ::cmpq::mixllm::nibble(layer.zeros4(r), g);
    }
  }
  const __mmask8 live = static_cast<__mmask8>((1u << count) - 1);
  b->offset = _mm_load_si128(reinterpret_cast<const __m128i*>(offset));
  b->scale = _mm_cvtph_ps(_mm_maskz_loadu_epi16(live, layer.scales(r) + g0));
}

}  // namespace

MIXLLM_VNNI_TARGET __attribute__((flatten)) void gemm_rows_avx512(const View& layer, const Activations& acts,
                                                                  float* y, int64_t ldy, int r_begin, int r_end) {
  Block b;
  for (int r = r_begin; r < r_end; ++r) {
    const int8_t* xs = r < layer.n8 ? acts.natural.data() : acts.split.data();
    const int out = layer.row_index(r);
    for (int i0 = 0; i0 < acts.m; i0 += kTile) {
      const int tile = acts.m - i0 < kTile ? acts.m - i0 : kTile;
      __m128 total[kTile];
      for (int t = 0; t < kTile; ++t) total[t] = _mm_setzero_ps();
      for (int g0 = 0; g0 < layer.groups; g0 += kBlock) {
        const int count = layer.groups - g0 < kBlock ? layer.groups - g0 : kBlock;
        const __mmask8 live = static_cast<__mmask8>((1u << count) - 1);
        load_block(layer, r, g0, count, &b);
        for (int t = 0; t < tile; ++t) {
          const int i = i0 + t;
          // Groups past `count` read the activation padding (or the next token): their weights are zero.
          const int8_t* x = xs + i * acts.stride + g0 * kGroup;
          __m512i d[kBlock];
          for (int j = 0; j < kBlock; ++j) {
            d[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), b.w[j][0], _mm512_loadu_si512(x + j * kGroup));
            d[j] = _mm512_dpbusd_epi32(d[j], b.w[j][1], _mm512_loadu_si512(x + j * kGroup + 64));
          }
          const size_t cell = static_cast<size_t>(i) * acts.groups + g0;
          const __m128i sum = _mm_maskz_loadu_epi32(live, acts.sum.data() + cell);
          const __m128i acc = _mm_sub_epi32(reduce4(d[0], d[1], d[2], d[3]), _mm_mullo_epi32(b.offset, sum));
          const __m128 product = _mm_mul_ps(b.scale, _mm_maskz_loadu_ps(live, acts.scale.data() + cell));
          total[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(acc), product, total[t]);
        }
      }
      for (int t = 0; t < tile; ++t) {
        __m128 v = _mm_add_ps(total[t], _mm_movehl_ps(total[t], total[t]));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        y[(i0 + t) * ldy + out] = _mm_cvtss_f32(v);
      }
    }
  }
}

}  // namespace detail
}  // namespace mixllm
}  // namespace cpu
}  // namespace cmpq
#endif  // CMPQ_HAVE_X86
