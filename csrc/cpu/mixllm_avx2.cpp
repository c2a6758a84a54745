// mixllm_avx2.cpp — the MixLLM kernel for AVX2 (no VNNI): int8 x int8 products through vpmaddwd on int16.
//
// Per stored row and group, the weights are widened to int16 once (8-bit: sign-extended codes; 4-bit: the low
// and high nibbles of 16 packed bytes, i.e. 16 even and 16 odd columns) and reused for every token of the tile.
// vpmaddwd sums pairs of int16 products into int32 exactly (|q_x q_w| <= 127 * 127), so every group sum is the
// exact integer; a 4-bit row's zero point is applied once per group as z * sum(q_x).
#include "mixllm_cpu.h"
#include "row_kernels.h"

#if CMPQ_HAVE_X86
#include <immintrin.h>

namespace cmpq {
namespace cpu {
namespace mixllm {
namespace detail {
namespace {

#define MIXLLM_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define MIXLLM_AVX2 MIXLLM_AVX2_TARGET __attribute__((always_inline)) inline

using ::cmpq::mixllm::kGroup;
using ::cmpq::mixllm::View;

constexpr int kTile = 8;        // tokens per pass over a row
constexpr int kMaxVectors = 8;  // int16 weight vectors per group: 128 columns / 16

MIXLLM_AVX2 int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Widened weights of one group; `count` vectors, and the activation byte offset each one meets (within a
// token's group, in the natural or split layout).
struct Group {
  __m256i w[kMaxVectors];
  int offset[kMaxVectors];
  int count;
};

MIXLLM_AVX2 void load_group8(const int8_t* q, int width, Group* grp) {
  grp->count = width / 16;
  for (int v = 0; v < grp->count; ++v) {
    grp->w[v] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * v)));
    grp->offset[v] = 16 * v;
  }
}

MIXLLM_AVX2 void load_group4(const uint8_t* q, int width, Group* grp) {
  const __m128i low = _mm_set1_epi8(15);
  grp->count = width / 16;
  for (int c = 0; c < width / 32; ++c) {  // 16 bytes = 16 even + 16 odd columns
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * c));
    grp->w[2 * c] = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));
    grp->w[2 * c + 1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));
    grp->offset[2 * c] = 16 * c;
    grp->offset[2 * c + 1] = 64 + 16 * c;
  }
}

MIXLLM_AVX2 int32_t dot(const Group& grp, const int8_t* x) {
  __m256i d = _mm256_setzero_si256();
  for (int v = 0; v < grp.count; ++v) {
    const __m256i xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + grp.offset[v])));
    d = _mm256_add_epi32(d, _mm256_madd_epi16(grp.w[v], xv));
  }
  return hsum(d);
}

}  // namespace

MIXLLM_AVX2_TARGET __attribute__((flatten)) void gemm_rows_avx2(const View& layer, const Activations& acts, float* y,
                                                                int64_t ldy, int r_begin, int r_end) {
  Group grp;
  for (int r = r_begin; r < r_end; ++r) {
    const bool eight = r < layer.n8;
    const uint16_t* sw = layer.scales(r);
    const int out = layer.row_index(r);
    const int8_t* xs = eight ? acts.natural.data() : acts.split.data();
    for (int i0 = 0; i0 < acts.m; i0 += kTile) {
      const int tile = acts.m - i0 < kTile ? acts.m - i0 : kTile;
      float total[kTile] = {};
      for (int g = 0; g < layer.groups; ++g) {
        const int width = ::cmpq::mixllm::group_width(layer.k, g);
        int z = 0;
        if (eight) {
          load_group8(layer.codes8(r) + g * kGroup, width, &grp);
        } else {
          load_group4(layer.codes4(r) + g * (kGroup / 2), width, &grp);
          z = ::cmpq::mixllm::nibble(layer.zeros4(r), g);
        }
        const float s = half_bits_to_float(sw[g]);
        for (int t = 0; t < tile; ++t) {
          const int i = i0 + t;
          const size_t cell = static_cast<size_t>(i) * acts.groups + g;
          const int32_t acc = dot(grp, xs + i * acts.stride + g * kGroup) - z * acts.sum[cell];
          total[t] += static_cast<float>(acc) * (s * acts.scale[cell]);
        }
      }
      for (int t = 0; t < tile; ++t) y[(i0 + t) * ldy + out] = total[t];
    }
  }
}

}  // namespace detail
}  // namespace mixllm
}  // namespace cpu
}  // namespace cmpq
#endif  // CMPQ_HAVE_X86
