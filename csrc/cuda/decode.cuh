// decode.cuh — device decode primitives shared by the CUDA kernels: activation-type traits, group loads,
// and whole-group decode to 16-bit values. The bit layout itself is in ../cmpq_layout.h.
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

// The 32 values of one group, looked up in its fp16 codebook and rounded once to T, written to dst with
// four 16-byte stores (dst must be 16-byte aligned).
template <int BITS, class T>
CMPQ_DEVICE_INLINE void decode_group_store(const uint32_t* src, const uint16_t* codebook, T* dst) {
  uint32_t words[BITS];
  load_group<BITS>(src, words);
#pragma unroll
  for (int q = 0; q < kGroupCodes / 8; ++q) {
    // Pack pairs with shifts rather than through a T[8] array, which would live in local memory.
    uint32_t pairs[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const int c = 8 * q + 2 * p;
      const float lo = half_bits_to_float(__ldg(codebook + group_code<BITS>(words, c)));
      const float hi = half_bits_to_float(__ldg(codebook + group_code<BITS>(words, c + 1)));
      pairs[p] = Act<T>::bits_from_float(lo) | (Act<T>::bits_from_float(hi) << 16);
    }
    reinterpret_cast<uint4*>(dst)[q] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
  }
}

// Decode group g (index over all packed groups, segments in memory order) of one row into dst.
template <class T>
CMPQ_DEVICE_INLINE void decode_row_group(const LayerView& layer, int row, int g, T* dst) {
  with_segment_bits(segment_bits(layer.segment_of_group(g)), [&](auto seg) {
    decode_group_store<seg.kBits>(layer.group_words(seg.kSegment, row, g), layer.row_codebook(seg.kSegment, row), dst);
  });
}

}  // namespace cuda
}  // namespace cmpq
