// mixllm_layout.h — the MixLLM packed layout and arithmetic constants, written once (docs/DESIGN.md §9).
//
// Plain C++17, no torch: the CPU kernels (csrc/cpu/mixllm_*.cpp), the CUDA kernels (csrc/cuda/mixllm_gemm.cu: the
// CMPQ_HD helpers compile as device code too) and the bindings (mixllm_view.h) include it,
// and cmpq_kernels/mixllm_format.py mirrors it (tests unpack Python-packed nibbles through
// torch.ops.cmpq.mixllm_unpack_nibbles).
//
//   A layer W[N, K] stores its output rows in two parts, each row-major:
//     8-bit part  q8  int8  [N8, K]            codes in [-127, 127], w = q * s
//                 s8  fp16  [N8, G]            one scale per row and group
//     4-bit part  q4  uint8 [N4, K / 2]        byte j = code(2j) | code(2j + 1) << 4   (low nibble = even k)
//                 s4  fp16  [N4, G]
//                 z4  uint8 [N4, ceil(G / 2)]  zero points, packed like q4 along the groups; w = (q - z) * s
//     idx8 int32 [N8], idx4 int32 [N4]         the output row of each stored row; together 0..N-1 once each
//   Groups: G = ceil(K / 128) groups of 128 input channels along K; K % 32 == 0, and when K % 128 != 0 the
//   LAST group is partial (K - 128 (G - 1) wide). Activations are quantized per token over the same groups.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>

#include "cmpq_layout.h"

namespace cmpq {
namespace mixllm {

constexpr int kFormatVersion = 1;
constexpr int kGroup = 128;   // input channels per weight and activation scale
constexpr int kKAlign = 32;   // K must be a multiple of this: the narrowest partial group
constexpr int kActMax = 127;  // symmetric int8 range of codes and activations: [-127, 127]

CMPQ_HD int64_t groups_of(int64_t k) { return (k + kGroup - 1) / kGroup; }
CMPQ_HD int group_width(int64_t k, int g) {
  const int64_t left = k - static_cast<int64_t>(g) * kGroup;
  return static_cast<int>(left < kGroup ? left : kGroup);
}
CMPQ_HD int64_t nibble_bytes(int64_t count) { return (count + 1) / 2; }

// Element i of a nibble-packed array (q4 along K, z4 along the groups).
CMPQ_HD int nibble(const uint8_t* packed, int64_t i) { return (packed[i >> 1] >> ((i & 1) * 4)) & 15; }

// float -> IEEE binary16 bits, round to nearest even (subnormals, overflow to inf, NaN kept NaN): the rounding
// torch's .to(torch.float16) does, which the activation scale rule fp16(absmax / 127) needs on every path.
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, round(|f| * 2^24) (the scaling is exact)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(std::fabs(f) * 16777216.0f)));
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);  // round the 13 dropped mantissa bits to even
  return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
}

// The packed layer as raw pointers (checked by the bindings); passed by value to the CUDA kernels. Stored row r < n8 is 8-bit row r, else 4-bit row
// r - n8; its output row is row_index(r).
struct View {
  int n = 0, k = 0, n8 = 0, groups = 0;
  const int32_t* idx8 = nullptr;
  const int8_t* q8 = nullptr;
  const uint16_t* s8 = nullptr;
  const int32_t* idx4 = nullptr;
  const uint8_t* q4 = nullptr;
  const uint16_t* s4 = nullptr;
  const uint8_t* z4 = nullptr;

  CMPQ_HD int row_index(int r) const { return r < n8 ? idx8[r] : idx4[r - n8]; }
  CMPQ_HD const uint16_t* scales(int r) const {
    return r < n8 ? s8 + static_cast<int64_t>(r) * groups : s4 + static_cast<int64_t>(r - n8) * groups;
  }
  CMPQ_HD const int8_t* codes8(int r) const { return q8 + static_cast<int64_t>(r) * k; }
  CMPQ_HD const uint8_t* codes4(int r) const { return q4 + static_cast<int64_t>(r - n8) * (k / 2); }
  CMPQ_HD const uint8_t* zeros4(int r) const { return z4 + static_cast<int64_t>(r - n8) * nibble_bytes(groups); }
};

}  // namespace mixllm
}  // namespace cmpq
