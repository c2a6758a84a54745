// mixllm_gemm.cu — the MixLLM W8/W4 x A8 product on integer tensor cores, plus its dequantizer (the W*A16 path).
// Layout: ../mixllm_layout.h; arithmetic: cmpq_kernels/mixllm_reference.py; design: docs/DESIGN.md §9.6.
//
// A call is two launches:
//   Step 1 (mixllm_quantize_kernel): one warp per (token, 128-wide group) quantizes x to int8 codes and an fp16
//     scale, with the CPU op's exact rule, so the integer part below matches the CPU bit for bit.
//   Step 2 (mixllm_gemm_kernel): Y^T = W X^T on mma.m16n8k32 s8 ("swapped" operands: the weights are the 16-row
//     A operand and 8 tokens the B operand, so a decode step with m = 1 wastes 7/8 of the MMA, not 15/16).
//     A block is 4 warps; each warp owns 16 stored rows of ONE part (blockIdx.x first covers the 8-bit rows,
//     then the 4-bit rows: the branch is block-uniform) and NT x 8 tokens (blockIdx.y). Per group:
//       a. the accumulators start at the magic bits 0x4B400000 (see kMagicBits),
//       b. per 32-column step, each lane loads its fragment straight from global memory (no shared memory: a
//          weight is read once per block and used by one MMA, so staging would only add a round trip), a 4-bit
//          row is unpacked to bytes and centred, q - z in [-15, 15] (dequantization step one, integer), and
//          one int8 MMA per 8 tokens adds the exact products,
//       c. after the group's last step (4 steps, fewer in a partial last group: its width is a multiple of 32),
//          acc - magic is converted to float by one FADD and scaled by s_w * s_x into the FP32 output
//          accumulator (dequantization step two, per group),
//     then the epilogue adds bias and scatters each stored row to its output column y[:, row_index(r)].
//
// Fragment map (the PTX m16n8k32 .s8 layout is in ptx.cuh; g = lane >> 2, t = lane & 3). The dot product over a
// 32-column step does not depend on which physical column each of its 32 positions holds, as long as A and B
// agree; a lane with quad index t holds positions {4t..4t+3} (register a0/a1, b0) and {16+4t..16+4t+3}
// (a2/a3, b1) of every row, so this kernel gives it the 8 CONSECUTIVE columns 8t..8t+7 of the step instead:
//   a0/a1 = W[row g / g+8][8t .. 8t+3],  a2/a3 = W[row g / g+8][8t+4 .. 8t+7],
//   b0    = Xq[token g][8t .. 8t+3],     b1    = Xq[token g][8t+4 .. 8t+7].
// One 64-bit load then fills a0/a2 of an 8-bit row and b0/b1, and one 32-bit load holds a 4-bit row's 8 codes.
//
// Accuracy: every group sum is exact (int32, and exactly converted); the FP32 part is per group one product
// s_w * s_x, one fused multiply-add into the row's accumulator, groups in order — the CPU kernels' order, so
// outputs agree with the reference within (G + 2) 2^-23 of sum_g |term| (python_tests/test_mixllm_gemm.py).
#include "decode.cuh"
#include "launchers.h"
#include "ptx.cuh"

namespace cmpq {
namespace cuda {
namespace mixllm_detail {  // named, not anonymous: the emulated build includes every kernel file in one TU

namespace mx = ::cmpq::mixllm;

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kWarpRows = 16;                  // stored rows per warp: the M of the MMA
constexpr int kBlockRows = kWarps * kWarpRows;  // stored rows per block
constexpr int kStepK = 32;                     // the K of the MMA
constexpr int kTokens = 8;                     // tokens per MMA: its N
constexpr uint32_t kFullMask = 0xffffffffu;

// Magic-number conversion: the int32 accumulator starts at the bits of 1.5 * 2^23 = 12582912.0f. A float in
// [2^23, 2^24) has ulp 1, so adding an integer a with |a| < 2^22 to those bits gives the float 12582912 + a
// exactly, and subtracting 12582912.0f (exact too) leaves float(a): one FADD instead of an I2F.
constexpr int32_t kMagicBits = 0x4B400000;
constexpr float kMagic = 12582912.0f;
static_assert(static_cast<int64_t>(mx::kGroup) * mx::kActMax * mx::kActMax < (1 << 22),
              "a group sum of 128 products of codes in [-127, 127] must stay below 2^22 for the magic conversion");
static_assert(mx::kGroup % kStepK == 0 && mx::kKAlign % kStepK == 0,
              "every group, the partial last one included, is a whole number of MMA steps");
static_assert(mx::kGroup == 4 * kWarpSize, "step 1: one warp quantizes a group, 4 columns per lane");

// ---- Step 1: activation quantization ---------------------------------------------------------------------

// max(a, |v|) that keeps a NaN once seen: the CPU quantizer's running maximum, order-independent.
CMPQ_DEVICE_INLINE float nan_sticky_max(float a, float b) { return (b > a || b != b) ? b : a; }

template <class T>  // float, __half or __nv_bfloat16
__global__ void __launch_bounds__(kThreads)
    mixllm_quantize_kernel(const T* __restrict__ x,      // [m, k]
                           int m, int k,
                           int8_t* __restrict__ q,       // [m, k] codes
                           uint16_t* __restrict__ scale) {  // [m, G] fp16 bits
  const int lane = threadIdx.x % kWarpSize;
  const int groups = static_cast<int>(mx::groups_of(k));
  const int64_t cell = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;  // token * G + group
  if (cell >= static_cast<int64_t>(m) * groups) return;  // the whole warp leaves: its shuffles stay complete
  const int64_t token = cell / groups;
  const int g = static_cast<int>(cell % groups);
  const int c = g * mx::kGroup + 4 * lane;
  const bool active = 4 * lane < mx::group_width(k, g);  // a partial group: the lanes past its width idle
  const T* src = x + token * k + c;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (active) v[i] = Act<T>::to_float(src[i]);
    amax = nan_sticky_max(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    amax = nan_sticky_max(amax, __shfl_xor_sync(kFullMask, amax, offset));
  // IEEE division and round-to-nearest-even conversion, as the CPU (nvcc divides correctly rounded unless
  // fast-math flags are given, which this project never passes).
  uint16_t bits = __half_as_ushort(__float2half_rn(amax / static_cast<float>(mx::kActMax)));
  if ((bits & 0x7c00u) == 0x7c00u) bits = 0x7e00u;  // NaN/Inf input or beyond fp16: NaN scale, codes 0
  const float s = __half2float(__ushort_as_half(bits));
  if (active) {
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float r = 0.f;
      if (s > 0.f) r = fminf(fmaxf(rintf(v[i] / s), -static_cast<float>(mx::kActMax)), static_cast<float>(mx::kActMax));
      packed |= static_cast<uint32_t>(static_cast<uint8_t>(static_cast<int8_t>(r))) << (8 * i);
    }
    *reinterpret_cast<uint32_t*>(q + token * k + c) = packed;
  }
  if (lane == 0) scale[token * groups + g] = bits;
}

// ---- Step 2: the GEMM ---------------------------------------------------------------------------------------

// A 4-bit row's 8 codes (one 32-bit word, code i in bits 4i..4i+3) as two registers of centred signed bytes:
// lo = codes 0..3, hi = codes 4..7, each q - z. prmt interleaves bytes of w and w >> 4 so every code lands in
// the low nibble of its own byte; then (byte + 0x80 - z) stays inside its byte (0x71..0x8F, no carry), and
// flipping bit 7 turns it into the two's complement of q - z. `bias4` = 0x80808080 - z * 0x01010101.
CMPQ_DEVICE_INLINE void centre_nibbles(uint32_t w, uint32_t bias4, uint32_t& lo, uint32_t& hi) {
  const uint32_t shifted = w >> 4;
  lo = ((ptx::prmt(w, shifted, 0x5140u) & 0x0f0f0f0fu) + bias4) ^ 0x80808080u;
  hi = ((ptx::prmt(w, shifted, 0x7362u) & 0x0f0f0f0fu) + bias4) ^ 0x80808080u;
}

// One stored row's A registers for one step: lo (the lane's columns 8t..8t+3 of the step) and hi (8t+4..8t+7).
// `row` points at the row's codes of the lane's first column in the step's group; `step` is the step in it.
template <int BITS>
CMPQ_DEVICE_INLINE void load_row(const unsigned char* row, int step, uint32_t bias4, uint32_t& lo, uint32_t& hi) {
  if constexpr (BITS == 8) {
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(row + step * kStepK));
    lo = w.x, hi = w.y;
  } else {
    centre_nibbles(__ldg(reinterpret_cast<const uint32_t*>(row + step * kStepK / 2)), bias4, lo, hi);
  }
}

CMPQ_DEVICE_INLINE float half_bits_value(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// Stored row r's packed codes from the lane's first column (8t), formed once per warp tile so the hot loop only
// adds constant offsets.
template <int BITS>
CMPQ_DEVICE_INLINE const unsigned char* row_codes(const mx::View& layer, int r, int t) {
  if constexpr (BITS == 8) return reinterpret_cast<const unsigned char*>(layer.codes8(r)) + 8 * t;
  else return layer.codes4(r) + 4 * t;
}

// One warp's 16 stored rows [r0, r0 + 16) of one part (rows from r_end on are padding) times tokens
// [tok0, tok0 + 8 * NT), accumulated over every group, then written to y. Padding rows and tokens past m read
// the last real row / token instead of branching around the loads: an MMA output element depends on one A row
// and one B column only, so their results are simply never stored.
template <int BITS, class T, int NT>
CMPQ_DEVICE_INLINE void warp_tile(const mx::View& layer, const int8_t* __restrict__ qx, const uint16_t* __restrict__ sx,
                                  const float* __restrict__ bias, T* __restrict__ y, int m, int r0, int r_end,
                                  int tok0) {
  if (r0 >= r_end) return;  // a warp past the part's end (no block-wide barrier waits for it)
  const int lane = threadIdx.x % kWarpSize, g = lane >> 2, t = lane & 3;
  const int ra = r0 + g, rb = r0 + g + 8;  // the lane's A rows g and g + 8
  const int ra_read = min(ra, r_end - 1), rb_read = min(rb, r_end - 1);
  const unsigned char* const wa = row_codes<BITS>(layer, ra_read, t);
  const unsigned char* const wb = row_codes<BITS>(layer, rb_read, t);
  const uint16_t* const swa = layer.scales(ra_read);
  const uint16_t* const swb = layer.scales(rb_read);
  // Per token tile j: this lane's B token (8j + g) codes from column 8t, and its D tokens' (8j + 2t, + 1) scales.
  const int8_t* xrow[NT];
  const uint16_t* sx0[NT];
  const uint16_t* sx1[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int tb = min(tok0 + j * kTokens + g, m - 1), td = tok0 + j * kTokens + 2 * t;
    xrow[j] = qx + static_cast<int64_t>(tb) * layer.k + 8 * t;
    sx0[j] = sx + static_cast<int64_t>(min(td, m - 1)) * layer.groups;
    sx1[j] = sx + static_cast<int64_t>(min(td + 1, m - 1)) * layer.groups;
  }
  float out[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) out[j][c] = 0.f;

  for (int grp = 0; grp < layer.groups; ++grp) {
    // a. magic start
    int32_t acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[j][c] = kMagicBits;
    uint32_t bias_a = 0, bias_b = 0;  // 4-bit rows: the zero points of this group, as centring constants
    if constexpr (BITS == 4) {
      bias_a = 0x80808080u - static_cast<uint32_t>(mx::nibble(layer.zeros4(ra_read), grp)) * 0x01010101u;
      bias_b = 0x80808080u - static_cast<uint32_t>(mx::nibble(layer.zeros4(rb_read), grp)) * 0x01010101u;
    }
    // b. the group's MMA steps (fewer than 4 only in a partial last group)
    const int steps = mx::group_width(layer.k, grp) / kStepK;
    const int64_t column = static_cast<int64_t>(grp) * mx::kGroup;
    const unsigned char* const ga = wa + column * BITS / 8;
    const unsigned char* const gb = wb + column * BITS / 8;
#pragma unroll
    for (int s = 0; s < mx::kGroup / kStepK; ++s) {
      if (s >= steps) break;
      uint32_t a[4];
      load_row<BITS>(ga, s, bias_a, a[0], a[2]);
      load_row<BITS>(gb, s, bias_b, a[1], a[3]);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint2 xb = __ldg(reinterpret_cast<const uint2*>(xrow[j] + column + s * kStepK));
        const uint32_t b[2] = {xb.x, xb.y};
        ptx::mma_m16n8k32_s8s32(acc[j], a, b, acc[j]);
      }
    }
    // c. exact conversion and the per-group scales: D fragment c0/c1 = row g, tokens 2t, 2t+1; c2/c3 = row g+8
    const float sw_a = half_bits_value(swa[grp]), sw_b = half_bits_value(swb[grp]);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float s0 = half_bits_value(sx0[j][grp]), s1 = half_bits_value(sx1[j][grp]);
      const float sw[4] = {sw_a, sw_a, sw_b, sw_b}, sxx[4] = {s0, s1, s0, s1};
#pragma unroll
      for (int c = 0; c < 4; ++c)
        out[j][c] = __fmaf_rn(__int_as_float(acc[j][c]) - kMagic, sw[c] * sxx[c], out[j][c]);
    }
  }

  // Epilogue: bias in FP32, one rounding to T, scattered to the stored rows' output columns. The bounds check
  // keeps a corrupt index (the CUDA op leaves value checks to load time) from writing outside y.
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int r = c < 2 ? ra : rb;
    if (r >= r_end) continue;
    const int col = layer.row_index(r);
    if (static_cast<unsigned>(col) >= static_cast<unsigned>(layer.n)) continue;
    const float b = bias != nullptr ? bias[col] : 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int token = tok0 + j * kTokens + 2 * t + (c & 1);
      if (token < m) y[static_cast<int64_t>(token) * layer.n + col] = Act<T>::from_float(out[j][c] + b);
    }
  }
}

template <class T, int NT>  // output type; 8-token MMA tiles per warp
__global__ void __launch_bounds__(kThreads)
    mixllm_gemm_kernel(mx::View layer,                     // packed weights (device pointers)
                       const int8_t* __restrict__ qx,      // [m, k] activation codes (step 1)
                       const uint16_t* __restrict__ sx,    // [m, G] activation scales, fp16 bits
                       const float* __restrict__ bias,     // [n] or nullptr
                       T* __restrict__ y,                  // [m, n]
                       int m, int blocks8) {               // blocks of 8-bit rows: they come first in x
  const int warp = threadIdx.x / kWarpSize;
  const int tok0 = blockIdx.y * NT * kTokens;
  if (static_cast<int>(blockIdx.x) < blocks8) {
    warp_tile<8, T, NT>(layer, qx, sx, bias, y, m, blockIdx.x * kBlockRows + warp * kWarpRows, layer.n8, tok0);
  } else {
    const int r0 = layer.n8 + (blockIdx.x - blocks8) * kBlockRows + warp * kWarpRows;
    warp_tile<4, T, NT>(layer, qx, sx, bias, y, m, r0, layer.n, tok0);
  }
}

// ---- Dequantization (W*A16 and the dequantize op) -----------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    mixllm_dequantize_kernel(mx::View layer,          // packed weights (device pointers)
                             float* __restrict__ w) {  // [n, k], output-row order
  const int r = blockIdx.x;  // one stored row per block
  const int col = layer.row_index(r);
  if (static_cast<unsigned>(col) >= static_cast<unsigned>(layer.n)) return;
  const uint16_t* s = layer.scales(r);
  float* dst = w + static_cast<int64_t>(col) * layer.k;
  for (int c = threadIdx.x; c < layer.k; c += kThreads) {
    const int grp = c / mx::kGroup;
    const int centred = r < layer.n8 ? layer.codes8(r)[c]
                                     : mx::nibble(layer.codes4(r), c) - mx::nibble(layer.zeros4(r), grp);
    dst[c] = static_cast<float>(centred) * half_bits_value(s[grp]);  // exact: |centred| <= 127, 11-bit scale
  }
}

// ---- launchers: the whitelist of instantiations ---------------------------------------------------------------

inline int blocks_of(int rows) { return (rows + kBlockRows - 1) / kBlockRows; }

template <class T, int NT>
Status launch_gemm_for(const mx::View& layer, const int8_t* q, const uint16_t* scale, const float* bias, void* y,
                       int m, cudaStream_t stream) {
  auto* kernel = mixllm_gemm_kernel<T, NT>;
  const int blocks8 = blocks_of(layer.n8);
  const dim3 grid(blocks8 + blocks_of(layer.n - layer.n8), (m + NT * kTokens - 1) / (NT * kTokens));
  CMPQ_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, layer, q, scale, bias, static_cast<T*>(y), m, blocks8);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

// Token tiles per warp: 1 for decode (m <= 8), 2 up to 16, else 4 (kMixllmMaxTokenTile tokens per block row).
template <class T>
Status launch_gemm_typed(const mx::View& layer, const int8_t* q, const uint16_t* scale, const float* bias, void* y,
                         int m, cudaStream_t stream) {
  static_assert(4 * kTokens == kMixllmMaxTokenTile, "launchers.h's batch limit assumes 32-token block rows");
  if (m <= kTokens) return launch_gemm_for<T, 1>(layer, q, scale, bias, y, m, stream);
  if (m <= 2 * kTokens) return launch_gemm_for<T, 2>(layer, q, scale, bias, y, m, stream);
  return launch_gemm_for<T, 4>(layer, q, scale, bias, y, m, stream);
}

template <class T>
Status launch_quantize_typed(const void* x, int m, int k, int8_t* q, uint16_t* scale, cudaStream_t stream) {
  auto* kernel = mixllm_quantize_kernel<T>;
  const int64_t cells = static_cast<int64_t>(m) * mx::groups_of(k);
  const int64_t blocks = (cells + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) return Status::kBadBatch;
  CMPQ_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, static_cast<const T*>(x), m, k,
              q, scale);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

inline bool shape_ok(const mx::View& layer) {
  return layer.n >= 1 && layer.n8 >= 0 && layer.n8 <= layer.n && layer.k > 0 && layer.k % mx::kKAlign == 0 &&
         layer.groups == mx::groups_of(layer.k);
}

}  // namespace mixllm_detail

Status launch_mixllm_quantize(const void* x, int m, int k, ActDtype dtype, int8_t* q, uint16_t* scale,
                              cudaStream_t stream) {
  if (k <= 0 || k % ::cmpq::mixllm::kKAlign != 0) return Status::kBadShape;
  if (m < 1) return Status::kBadBatch;
  switch (dtype) {
    case ActDtype::kHalf: return mixllm_detail::launch_quantize_typed<__half>(x, m, k, q, scale, stream);
    case ActDtype::kBFloat16: return mixllm_detail::launch_quantize_typed<__nv_bfloat16>(x, m, k, q, scale, stream);
    case ActDtype::kFloat: return mixllm_detail::launch_quantize_typed<float>(x, m, k, q, scale, stream);
  }
  return Status::kBadShape;
}

Status launch_mixllm_gemm(const ::cmpq::mixllm::View& layer, const int8_t* q, const uint16_t* scale,
                          const float* bias, void* y, int m, ActDtype dtype, cudaStream_t stream) {
  if (!mixllm_detail::shape_ok(layer)) return Status::kBadShape;
  if (m < 1 || m > kMixllmMaxM) return Status::kBadBatch;
  switch (dtype) {
    case ActDtype::kHalf: return mixllm_detail::launch_gemm_typed<__half>(layer, q, scale, bias, y, m, stream);
    case ActDtype::kBFloat16:
      return mixllm_detail::launch_gemm_typed<__nv_bfloat16>(layer, q, scale, bias, y, m, stream);
    case ActDtype::kFloat: return mixllm_detail::launch_gemm_typed<float>(layer, q, scale, bias, y, m, stream);
  }
  return Status::kBadShape;
}

Status launch_mixllm_dequantize(const ::cmpq::mixllm::View& layer, float* w, cudaStream_t stream) {
  if (!mixllm_detail::shape_ok(layer)) return Status::kBadShape;
  auto* kernel = mixllm_detail::mixllm_dequantize_kernel;
  CMPQ_LAUNCH(kernel, dim3(layer.n), dim3(mixllm_detail::kThreads), 0, stream, layer, w);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace cuda
}  // namespace cmpq
