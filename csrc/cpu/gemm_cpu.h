// gemm_cpu.h — torch-free CPU kernels over a packed CMPQ layer (see cmpq_layout.h for the layout).
//
// Both entry points work on a range of output rows so the caller can hand row ranges to its own thread
// pool (the bindings use at::parallel_for, which honours torch.set_num_threads); each row is computed
// by exactly one thread in a fixed order, so results are deterministic for any thread count.
#pragma once

#include <stdint.h>

#include "../cmpq_layout.h"

namespace cmpq {
namespace cpu {

// Which instruction set the kernels use. Every ISA computes the same products; they differ only in the
// order a row's FP32 sum is taken, so results agree to rounding (tested path against path).
enum class Isa { kScalar, kAvx2, kAvx512 };

// Whether this CPU can run `isa` (scalar: always; avx2: avx2+fma+f16c; avx512: avx512f+avx512vl+avx512bw).
bool supports(Isa isa);
// Best ISA this CPU can run: avx512, else avx2, else scalar.
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

}  // namespace cpu
}  // namespace cmpq
