// decode.cuh — device primitives shared by the CUDA kernels: activation-type traits and packed-group loads.
// The bit layout itself is in ../cmpq_layout.h.
#pragma once

#include "../cmpq_layout.h"
#include "compat.cuh"

namespace cmpq {
namespace cuda {

// Activation / weight-tile element type: __half or __nv_bfloat16 (and float, below).
template <class T>
struct Act;
template <>
struct Act<__half> {
  static CMPQ_DEVICE_INLINE float to_float(__half v) { return __half2float(v); }
  static CMPQ_DEVICE_INLINE __half from_float(float v) { return __float2half_rn(v); }
  static CMPQ_DEVICE_INLINE uint32_t bits_from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <>
struct Act<__nv_bfloat16> {
  static CMPQ_DEVICE_INLINE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static CMPQ_DEVICE_INLINE __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static CMPQ_DEVICE_INLINE uint32_t bits_from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
// float32 activations: only the MixLLM kernels (mixllm_gemm.cu) take them, and only read and write them.
template <>
struct Act<float> {
  static CMPQ_DEVICE_INLINE float to_float(float v) { return v; }
  static CMPQ_DEVICE_INLINE float from_float(float v) { return v; }
};

// One group's BITS words with the widest load its alignment allows (group offsets are BITS words).
template <int BITS>
CMPQ_DEVICE_INLINE void load_group(const uint32_t* src, uint32_t (&words)[BITS]) {
  if constexpr (BITS == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
    words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
  } else if constexpr (BITS == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
    words[0] = v.x, words[1] = v.y;
  } else {
    words[0] = __ldg(src), words[1] = __ldg(src + 1), words[2] = __ldg(src + 2);
  }
}

}  // namespace cuda
}  // namespace cmpq
