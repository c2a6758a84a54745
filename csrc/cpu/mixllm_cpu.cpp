// mixllm_cpu.cpp — MixLLM CPU: the activation quantizer, the scalar kernel (any CPU; the readable statement of
// what mixllm_avx2.cpp and mixllm_avx512.cpp compute), ISA dispatch and dequantization (the W*A16 path).
#include "mixllm_cpu.h"

#include <cmath>
#include <limits>

#include "row_kernels.h"

namespace cmpq {
namespace cpu {
namespace mixllm {

using ::cmpq::mixllm::View;
using ::cmpq::mixllm::kActMax;
using ::cmpq::mixllm::kGroup;

void quantize_activations(const float* x, int64_t ldx, int m, int k, Activations* out) {
  const int groups = static_cast<int>(::cmpq::mixllm::groups_of(k));
  out->m = m, out->k = k, out->groups = groups, out->stride = static_cast<int64_t>(groups) * kGroup;
  const size_t cells = static_cast<size_t>(m) * groups;
  const size_t bytes = static_cast<size_t>(m) * out->stride + static_cast<size_t>(kPadGroups) * kGroup;
  out->natural.assign(bytes, 0);
  out->split.assign(bytes, 0);
  out->sum.assign(cells, 0);
  out->scale.assign(cells, 0.f);
  out->scale_bits.assign(cells, 0);
  for (int i = 0; i < m; ++i) {
    for (int g = 0; g < groups; ++g) {
      const float* xg = x + i * ldx + static_cast<int64_t>(g) * kGroup;
      const int width = ::cmpq::mixllm::group_width(k, g);
      float amax = 0.f;
      for (int c = 0; c < width; ++c) amax = (std::fabs(xg[c]) > amax || xg[c] != xg[c]) ? std::fabs(xg[c]) : amax;
      uint16_t bits = ::cmpq::mixllm::float_to_half_bits(amax / 127.f);
      float scale = half_bits_to_float(bits);
      if (!std::isfinite(scale)) {  // NaN/Inf input or beyond fp16: this token's outputs become NaN
        bits = 0x7e00u;
        scale = std::numeric_limits<float>::quiet_NaN();
      }
      const size_t cell = static_cast<size_t>(i) * groups + g;
      out->scale[cell] = scale;
      out->scale_bits[cell] = bits;
      if (!(scale > 0.f)) continue;  // zero or NaN scale: codes stay 0
      int8_t* natural = out->natural.data() + i * out->stride + static_cast<int64_t>(g) * kGroup;
      int8_t* split = out->split.data() + i * out->stride + static_cast<int64_t>(g) * kGroup;
      int32_t sum = 0;
      for (int c = 0; c < width; ++c) {
        float v = std::nearbyint(xg[c] / scale);  // division, not a reciprocal product: the reference's rounding
        v = v > kActMax ? kActMax : (v < -kActMax ? -kActMax : v);
        const int8_t q = static_cast<int8_t>(v);
        natural[c] = q;
        split[(c & 1) * 64 + c / 2] = q;
        sum += q;
      }
      out->sum[cell] = sum;
    }
  }
}

namespace detail {

// The exact arithmetic, directly: acc = sum q_x (q_w - z) per group in int32.
void gemm_rows_scalar(const View& layer, const Activations& acts, float* y, int64_t ldy, int r_begin, int r_end) {
  for (int r = r_begin; r < r_end; ++r) {
    const bool eight = r < layer.n8;
    const uint16_t* sw = layer.scales(r);
    const int out = layer.row_index(r);
    for (int i = 0; i < acts.m; ++i) {
      const int8_t* qx = acts.natural.data() + i * acts.stride;
      float total = 0.f;
      for (int g = 0; g < layer.groups; ++g) {
        const int begin = g * kGroup, end = begin + ::cmpq::mixllm::group_width(layer.k, g);
        int32_t acc = 0;
        if (eight) {
          const int8_t* q = layer.codes8(r);
          for (int c = begin; c < end; ++c) acc += qx[c] * q[c];
        } else {
          const uint8_t* q = layer.codes4(r);
          const int z = ::cmpq::mixllm::nibble(layer.zeros4(r), g);
          for (int c = begin; c < end; ++c) acc += qx[c] * (::cmpq::mixllm::nibble(q, c) - z);
        }
        const float product = half_bits_to_float(sw[g]) * acts.scale[static_cast<size_t>(i) * acts.groups + g];
        total += static_cast<float>(acc) * product;
      }
      y[i * ldy + out] = total;
    }
  }
}

}  // namespace detail

bool isa_supported(Isa isa) {
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Int8) {
#if CMPQ_HAVE_X86
    __builtin_cpu_init();
    return supports(isa) && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
  }
  return supports(isa);
}

void gemm_rows(const View& layer, const Activations& acts, float* y, int64_t ldy, int r_begin, int r_end, Isa isa) {
  detail::GemmRows kernel = detail::gemm_rows_scalar;
#if CMPQ_HAVE_X86
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Int8) kernel = detail::gemm_rows_avx512;
  else if (isa == Isa::kAvx2) kernel = detail::gemm_rows_avx2;
#endif
  kernel(layer, acts, y, ldy, r_begin, r_end);
}

void dequantize_rows(const View& layer, float* w, int64_t ldw, int r_begin, int r_end) {
  for (int r = r_begin; r < r_end; ++r) {
    const uint16_t* sw = layer.scales(r);
    float* out = w + static_cast<int64_t>(r - r_begin) * ldw;
    for (int c = 0; c < layer.k; ++c) {
      const int g = c / kGroup;
      const int centred = r < layer.n8 ? layer.codes8(r)[c]
                                       : ::cmpq::mixllm::nibble(layer.codes4(r), c) -
                                             ::cmpq::mixllm::nibble(layer.zeros4(r), g);
      out[c] = static_cast<float>(centred) * half_bits_to_float(sw[g]);
    }
  }
}

}  // namespace mixllm
}  // namespace cpu
}  // namespace cmpq
