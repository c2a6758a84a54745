// gemm_cpu.h — torch-free CPU kernels over a packed CMPQ layer (see cmpq_layout.h for the layout).
//
// Both entry points work on a range of output rows so the caller can hand row ranges to its own thread
// pool (the bindings use at::parallel_for, which honours torch.set_num_threads); each row is computed
// by exactly one thread in a fixed order, so results are deterministic for any thread count.
#pragma once

#include <stdint.h>

#include <vector>

#include "../cmpq_layout.h"

namespace cmpq {
namespace cpu {

// Which instruction set the kernels use. The exact ISAs compute the same products; they differ only in the
// order a row's FP32 sum is taken, so results agree to rounding (tested path against path).
// kAvx512Int8 ("avx512-int8") is opt-in and approximate: for m <= 16 it multiplies int8 activations (one
// scale per token and 128 packed columns) with each row's codebook rounded to int8 (one scale per row and
// segment) on vpdpbusd; outliers stay exact. Larger batches run the exact AVX-512 decode.
enum class Isa { kScalar, kAvx2, kAvx512, kAvx512Int8 };
inline constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Int8};

// Whether this CPU can run `isa` (scalar: always; avx2: avx2+fma+f16c; avx512: avx512f+avx512vl+avx512bw;
// avx512-int8: avx512 plus avx512vnni and avx512vbmi).
bool supports(Isa isa);
// Best exact ISA this CPU can run: avx512, else avx2, else scalar (never the approximate int8 mode).
Isa best_isa();
const char* isa_name(Isa isa);
// The ISA named `name` ("scalar", "avx2", "avx512"); false if the name is unknown.
bool isa_from_name(const char* name, Isa* isa);

// y[i, row] = sum_j x_packed[i, j] * W_packed[row, j] for rows in [row_begin, row_end), i < m.
//   x_packed: float [m, layer.k], row stride ldx, already gathered into packed column order (x[:, perm]).
//   y:        float [m, layer.n], row stride ldy.
// Dense codes and CSR outliers are fused; FP32 accumulation. `isa` must be supported.
void gemm_rows(const LayerView& layer, const float* x_packed, int64_t ldx, int m, float* y, int64_t ldy,
               int row_begin, int row_end, Isa isa);

// w[row - row_begin, j] = W_packed[row, j] (codebook value plus outlier residual) for rows in
// [row_begin, row_end); w has row stride ldw >= layer.k.
void decode_rows(const LayerView& layer, float* w, int64_t ldw, int row_begin, int row_end, Isa isa);

// ---- int8 mode (Isa::kAvx512Int8) -------------------------------------------------------------------

constexpr int kInt8Block = 128;     // packed columns per activation scale
constexpr int kInt8SegmentPad = 256;  // each segment's activations are padded with zeros to a multiple

// Activations of one call, quantized for the int8 kernel. Per token, each segment's columns are padded to
// a multiple of kInt8SegmentPad and stored in the order the kernel's byte decode produces weights (4-bit:
// per 128 columns, the even columns then the odd ones; 2-bit: per 256 columns, four planes of every 4th
// column; 3-bit: as packed).
struct Int8Activations {
  int m = 0;
  int64_t stride = 0;                    // bytes of q per token
  int64_t blocks = 0;                    // scales per token
  int64_t seg_byte[kNumSegments] = {};   // offset of segment s in a token's q
  int64_t seg_block[kNumSegments] = {};  // index of segment s's first block
  std::vector<int8_t> q;                 // [m, stride]
  std::vector<float> scale;              // [m, blocks]: q * scale ~ x
  std::vector<float> correction;         // [m, kNumSegments]: 128 * sum over blocks of scale * sum(q)
};

// Quantizes x_packed (float [m, layer.k], row stride ldx) for gemm_rows_int8 (portable C++).
void quantize_activations(const LayerView& layer, const float* x_packed, int64_t ldx, int m, Int8Activations* out);

// gemm_rows for Isa::kAvx512Int8 (requires supports(Isa::kAvx512Int8)); x_packed is still read for the
// outliers, which are added exactly.
void gemm_rows_int8(const LayerView& layer, const Int8Activations& acts, const float* x_packed, int64_t ldx,
                    float* y, int64_t ldy, int row_begin, int row_end);

}  // namespace cpu
}  // namespace cmpq
