// dequant.cu — decode a packed layer to a dense FP16/BF16 matrix in packed column order.
//
// This is the large-batch path: once a decoded weight is reused by hundreds of activation rows, cuBLAS
// on the dense matrix wins, and the result is exact up to the one rounding of W to the activation type.
//
// A block owns kDecodeRows rows. Phase 1: each thread decodes whole groups (32 codes -> 32 values,
// written as four 16-byte stores) of the block's rows, consecutive threads taking consecutive groups of
// a row so stores coalesce. Phase 2, after __syncthreads makes the block's dense writes visible to the
// block: one thread per row rewrites that row's outlier positions as codebook value + residual in FP32,
// rounded once. One thread per row keeps repeated (row, col) entries race-free and deterministic.
#include "decode.cuh"
#include "launchers.h"

namespace cmpq {
namespace cuda {
namespace decode_detail {  // named, not anonymous: the emulated build includes every kernel file in one TU

constexpr int kDecodeRows = 8;
constexpr int kDecodeThreads = 256;

template <class T>                                       // __half or __nv_bfloat16
__global__ void __launch_bounds__(kDecodeThreads)
    cmpq_decode_kernel(LayerView layer,                  // packed weights (device pointers)
                       T* __restrict__ w) {              // [n, k] dense, packed column order
  const int row0 = blockIdx.x * kDecodeRows;
  const int groups_total = layer.total_groups();
  for (int i = threadIdx.x; i < kDecodeRows * groups_total; i += kDecodeThreads) {
    const int row = row0 + i / groups_total;
    const int g = i % groups_total;
    if (row >= layer.n) break;  // i only grows, so every later i is past the last row too
    decode_row_group(layer, row, g, w + static_cast<int64_t>(row) * layer.k + g * kGroupCodes);
  }
  __syncthreads();
  const int row = row0 + static_cast<int>(threadIdx.x);
  if (threadIdx.x < kDecodeRows && row < layer.n) {
    T* dst = w + static_cast<int64_t>(row) * layer.k;
    // Recompute each outlier position from its codebook value so W = codebook + residual rounds once;
    // columns are sorted within a row, so repeated columns are adjacent and their residuals add up.
    float value = 0.f;
    for (int32_t e = layer.row_ptr[row]; e < layer.row_ptr[row + 1]; ++e) {
      const int j = layer.outlier_col(e);
      const bool repeat = e > layer.row_ptr[row] && layer.outlier_col(e - 1) == j;
      value = (repeat ? value : half_bits_to_float(layer.dense_value_bits(row, j))) + half_bits_to_float(layer.val[e]);
      dst[j] = Act<T>::from_float(value);
    }
  }
}

template <class T>
Status launch_typed(const LayerView& layer, void* w, cudaStream_t stream) {
  auto* kernel = cmpq_decode_kernel<T>;
  const dim3 grid((layer.n + kDecodeRows - 1) / kDecodeRows);
  CMPQ_LAUNCH(kernel, grid, dim3(kDecodeThreads), 0, stream, layer, static_cast<T*>(w));
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace decode_detail

Status launch_decode(const LayerView& layer, void* w, ActDtype dtype, cudaStream_t stream) {
  if (!layer.shape_ok()) return Status::kBadShape;
  return dtype == ActDtype::kHalf ? decode_detail::launch_typed<__half>(layer, w, stream)
                                  : decode_detail::launch_typed<__nv_bfloat16>(layer, w, stream);
}

}  // namespace cuda
}  // namespace cmpq
