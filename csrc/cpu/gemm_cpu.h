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

// Which instruction set the direct kernel uses.
enum class Isa { kScalar, kAvx2 };

// Best ISA this process can run (AVX2+FMA+F16C when the CPU has them, else scalar).
Isa best_isa();
const char* isa_name(Isa isa);

// y[i, row] = sum_j x_packed[i, j] * W_packed[row, j] for rows in [row_begin, row_end), i < m.
//   x_packed: float [m, layer.k], row stride ldx, already gathered into packed column order (x[:, perm]).
//   y:        float [m, layer.n], row stride ldy.
// Dense codes and CSR outliers are fused; FP32 accumulation.
void gemm_rows(const LayerView& layer, const float* x_packed, int64_t ldx, int m, float* y, int64_t ldy,
               int row_begin, int row_end, Isa isa);

// w[row - row_begin, j] = W_packed[row, j] (codebook value plus outlier residual) for rows in
// [row_begin, row_end); w has row stride ldw >= layer.k.
void decode_rows(const LayerView& layer, float* w, int64_t ldw, int row_begin, int row_end, Isa isa);

}  // namespace cpu
}  // namespace cmpq
