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
// bytes meet zero-padded activations.
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

constexpr int kTile = 8;  // tokens per pass over a row

MIXLLM_VNNI __mmask64 first_bytes(int count) {
  return count >= 64 ? ~0ull : (count <= 0 ? 0ull : (1ull << count) - 1);
}

}  // namespace

MIXLLM_VNNI_TARGET __attribute__((flatten)) void gemm_rows_avx512(const View& layer, const Activations& acts,
                                                                  float* y, int64_t ldy, int r_begin, int r_end) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i low = _mm512_set1_epi8(15);
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
        __m512i w0, w1;
        int offset;  // subtracted per unit of sum(q_x)
        if (eight) {
          const int8_t* q = layer.codes8(r) + g * kGroup;
          w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(first_bytes(width), q), sign);
          w1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(first_bytes(width - 64), q + 64), sign);
          offset = 128;
        } else {
          const __m512i packed = _mm512_maskz_loadu_epi8(first_bytes(width / 2), layer.codes4(r) + g * (kGroup / 2));
          w0 = _mm512_and_si512(packed, low);
          w1 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
          offset = ::cmpq::mixllm::nibble(layer.zeros4(r), g);
        }
        const float s = half_bits_to_float(sw[g]);
        for (int t = 0; t < tile; ++t) {
          const int i = i0 + t;
          const int8_t* x = xs + i * acts.stride + g * kGroup;
          __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x));
          d = _mm512_dpbusd_epi32(d, w1, _mm512_loadu_si512(x + 64));
          const size_t cell = static_cast<size_t>(i) * acts.groups + g;
          const int32_t acc = _mm512_reduce_add_epi32(d) - offset * acts.sum[cell];
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
