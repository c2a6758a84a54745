// avx512_common.h — what the two AVX-512 kernel files share (internal to csrc/cpu/, x86 only).
#pragma once

#include <immintrin.h>

#include "row_kernels.h"

// GCC 12's AVX-512 intrinsics build their "undefined" pass-through operand as `__m512 __Y = __Y;`, which
// -Wuninitialized reports at every inlined call (a known false positive); nothing here reads it.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// The base AVX-512 target. A helper compiled for it inlines into the int8 kernel, whose target adds to it.
#define CMPQ_AVX512_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,fma,f16c")))
#define CMPQ_AVX512 CMPQ_AVX512_TARGET __attribute__((always_inline)) inline

namespace cmpq {
namespace cpu {
namespace detail {

// A row's outliers, 16 at a time: columns widened to int32, x gathered, fp16 residuals converted, one FMA
// per activation row into acc_of(i) (its accumulator in output units, reduced later with the dense sum).
template <int TILE, class AccOf>
CMPQ_AVX512 void add_outliers16(const LayerView& layer, int row, const float* x, int64_t ldx, AccOf&& acc_of) {
  const int32_t end = layer.row_ptr[row + 1];
  for (int32_t e = layer.row_ptr[row]; e < end; e += 16) {
    const __mmask16 live = end - e >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (end - e)) - 1);
    const __m512i cols =
        layer.col_is_int32
            ? _mm512_maskz_loadu_epi32(live, static_cast<const int32_t*>(layer.col) + e)
            : _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(live, static_cast<const int16_t*>(layer.col) + e));
    const __m512 vals = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, layer.val + e));
    for (int i = 0; i < TILE; ++i) {
      __m512& acc = acc_of(i);
      acc = _mm512_fmadd_ps(vals, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, cols, x + i * ldx, 4), acc);
    }
  }
}

}  // namespace detail
}  // namespace cpu
}  // namespace cmpq
