// mixllm_cpu.h — torch-free CPU kernels of the MixLLM W8/W4 x A8 product (see mixllm_layout.h for the layout).
//
// One call: quantize_activations once (per token and 128-wide group, the reference's rule), then gemm_rows over
// ranges of stored rows that the caller hands to its thread pool. Each output element is computed by one thread
// in a fixed order (groups in order), so results do not depend on the thread count. The integer part of every
// group is exact on every ISA; ISAs differ only in how the FP32 products are formed (a fused multiply-add or
// not), well inside the stated tolerance.
#pragma once

#include <stdint.h>

#include <vector>

#include "../mixllm_layout.h"
#include "gemm_cpu.h"

namespace cmpq {
namespace cpu {
namespace mixllm {

// Activations of one call. Every token has G groups of 128 bytes in two layouts (a partial last group is zero
// padded): `natural` (column order, for the 8-bit rows) and `split` (per group the even columns in bytes 0-63 and
// the odd ones in 64-127: the order in which the low and high nibbles of 64 packed 4-bit bytes meet them).
// Whole groups of zero bytes after the last token in `natural` and `split`, so a kernel may load a fixed block of
// groups past a row's end (meeting zero weights there) without a bounds check.
constexpr int kPadGroups = 3;

struct Activations {
  int m = 0, k = 0, groups = 0;
  int64_t stride = 0;                 // bytes per token in each layout: 128 * groups
  std::vector<int8_t> natural, split;  // [m, stride] + kPadGroups * 128 zero bytes
  std::vector<int32_t> sum;           // [m, groups]: sum of the group's codes (offset corrections)
  std::vector<float> scale;           // [m, groups]: float(fp16 scale), NaN for a poisoned group
  std::vector<uint16_t> scale_bits;   // [m, groups]: the fp16 scales
};

// Quantizes x (float [m, k], row stride ldx; k % 32 == 0) by the rule of mixllm_reference.py.
void quantize_activations(const float* x, int64_t ldx, int m, int k, Activations* out);

// y[i, row_index(r)] = sum_g float(acc_g) * (s_w * s_x) for stored rows r in [r_begin, r_end) and every token i;
// y float [m, n], row stride ldy. `isa` must be supported (an AVX-512 name needs avx512vnni, see isa_supported).
void gemm_rows(const ::cmpq::mixllm::View& layer, const Activations& acts, float* y, int64_t ldy, int r_begin,
               int r_end, Isa isa);

// Whether `isa` can run the MixLLM kernel: scalar and avx2 as for CMPQ; avx512 and avx512-int8 both run the
// VNNI kernel (exact: the arithmetic is integer) and so also need avx512vnni.
bool isa_supported(Isa isa);

// w[r - r_begin, :] = (q - z) * s (exact in FP32) for stored rows [r_begin, r_end), in stored order (the caller
// scatters rows to row_index); w float, row stride ldw >= k.
void dequantize_rows(const ::cmpq::mixllm::View& layer, float* w, int64_t ldw, int r_begin, int r_end);

namespace detail {
// One ISA's gemm_rows (scalar in mixllm_cpu.cpp, mixllm_avx2.cpp, mixllm_avx512.cpp).
using GemmRows = void (*)(const ::cmpq::mixllm::View&, const Activations&, float*, int64_t, int, int);
void gemm_rows_scalar(const ::cmpq::mixllm::View&, const Activations&, float*, int64_t, int, int);
void gemm_rows_avx2(const ::cmpq::mixllm::View&, const Activations&, float*, int64_t, int, int);
void gemm_rows_avx512(const ::cmpq::mixllm::View&, const Activations&, float*, int64_t, int, int);
}  // namespace detail

}  // namespace mixllm
}  // namespace cpu
}  // namespace cmpq
