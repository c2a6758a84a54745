// gemv.cu — fused mixed-bit GEMV for decode batches (m = 1..8) on tensor cores: all segments and outliers.
//
// Two launches. A gather kernel (tile_decode.cuh) writes x[:, perm] once per call into an fp16 workspace
// (`xw`, m x k, batch-major), each 32-column group's slice in the order the decode produces that group's
// weights (slot_code). The GEMV then reads activations contiguously and never touches perm in its hot loop.
// Products are taken in fp16 whatever the activation type (bf16 rows scaled by a power of two).
//
// The K loop is tile_decode.cuh's, shared with the GEMM: a block of 8 warps owns one 16-row tile, warps
// split K, each lane decodes packed groups straight into mma.m16n8k16 A fragments (pair tables in shared
// memory for 4 and 3 bits, register PRMT for 2 bits). Here B is one n8 tile: the activations of batch rows
// 0..7. Lanes of batch rows >= m load row m - 1 again (same addresses, no extra traffic, no zeroing): B's
// column j only reaches C's column j, which is never read. One HMMA covers 256 weights for every m <= 8, so
// the cost per weight does not grow with m.
//
// Predicted per-weight cost of the steady-state loops (PREDICTION from static SASS counts, sm_90a, every
// m <= 8; bench/sass_budget.py, bench/results/sass_budget.md): 1.27 / 1.96 / 1.46 issued instructions and
// 0.5 / 0.5 / 0 LDS per weight at 4 / 3 / 2 bits, against the 3.5 / 2.6 / 1.7 and 0.87 / 0.65 / 0.44 an
// H200 can afford at full HBM bandwidth (DESIGN.md §3.5); 2-4 KB of weights in flight per warp iteration.
// Not in those counts: the gather launch, the table fill and the epilogue below.
//
// Outliers, bias, reduction: each warp's C fragments go to shared memory; per row, a warp's lanes stride
// over the row's CSR entries (x[perm[col]] from global memory), a fixed xor butterfly reduces them, and
// lane 0 adds the warps' partial sums in warp order (scaled back by 2^-s) and the bias, and writes. No
// atomics: deterministic.
#include "tile_decode.cuh"

namespace cmpq {
namespace cuda {
namespace gemv_detail {  // named, not anonymous: the emulated build includes every kernel file in one TU

using namespace tile;
// Two resident blocks per SM, what shared memory allows with both pair tables (2 x 80 KB of 228 KB). Said
// to ptxas because without it, it trades registers for recomputing the loop's addresses in every iteration.
constexpr int kMinBlocks = 2;
constexpr int kLaneGroups = 4;  // groups per lane and row per iteration: 2-4 KB of weights in flight per warp
constexpr int kScratchBytes = kWarps * kTileRows * kGemvMaxM * 4;  // partial sums (over the tables)
static_assert(kScratchBytes <= kTable4Offset, "the partial sums fit where the 3-bit table was");

template <class T, int M>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    cmpq_gemv_kernel(LayerView layer,                   // packed weights (device pointers)
                     const __half* __restrict__ xw,     // [M, k] x[:, perm] * 2^s, groups in slot_code order
                     const T* __restrict__ x,           // [M, k] original channel order (outliers)
                     const T* __restrict__ absmax,      // [M] max |x| per row (bf16), or nullptr (fp16)
                     const int32_t* __restrict__ perm,  // [k], packed column -> original channel
                     const float* __restrict__ bias,    // [n] or nullptr
                     T* __restrict__ y) {               // [M, n]
  CMPQ_DYNAMIC_SMEM(unsigned char, smem);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int g = lane / kQuadLanes;
  const int t = lane % kQuadLanes;
  const int row0 = blockIdx.x * kTileRows;
  // Rows past n (the last tile) decode row n - 1 again; their sums are never written.
  const int row_lo = min(row0 + g, layer.n - 1);
  const int row_hi = min(row0 + g + kHiRow, layer.n - 1);

  fill_tables(layer, row0, smem);
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  __syncthreads();  // tables written
  // x is batch-major: a group's slice is kGroupVectors vectors, at row min(g, M - 1).
  const uint4* x_row = reinterpret_cast<const uint4*>(xw + static_cast<int64_t>(min(g, M - 1)) * layer.k);
  multiply_tile<1, kLaneGroups, kGroupVectors, 0>(layer, ptx::shared_address(smem), row_lo, row_hi,
                                     [&](int group) { return x_row + group * kGroupVectors; }, acc);

  // Partial sums: C fragment (row g, batch 2t, 2t + 1) and (row g + 8, ...) of every warp.
  float* partial = reinterpret_cast<float*>(smem);  // [kWarps][kTileRows][M]
  __syncthreads();  // every warp is done with the tables the partial sums overwrite
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = g + kHiRow * (i / 2);
    const int m = 2 * t + i % 2;
    if (m < M) partial[(warp * kTileRows + r) * M + m] = acc[0][i];
  }
  __syncthreads();  // partial sums written

  for (int r = warp; r < kTileRows; r += kWarps) {
    const int row = row0 + r;
    if (row >= layer.n) break;  // uniform per warp: the shuffles below stay convergent
    float sum[M];
#pragma unroll
    for (int m = 0; m < M; ++m) sum[m] = 0.f;
    for (int32_t e = layer.row_ptr[row] + lane; e < layer.row_ptr[row + 1]; e += kWarpSize) {
      const float residual = half_bits_to_float(layer.val[e]);
      const int32_t channel = perm[layer.outlier_col(e)];
#pragma unroll
      for (int m = 0; m < M; ++m)
        sum[m] = __fmaf_rn(residual, Act<T>::to_float(x[static_cast<int64_t>(m) * layer.k + channel]), sum[m]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = sum[m];
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
      if (lane == 0) {
        float dense = 0.f;
        for (int w = 0; w < kWarps; ++w) dense += partial[(w * kTileRows + r) * M + m];
        v += dense * power_of_two(-row_scale_exponent(absmax, m));
        if (bias != nullptr) v += bias[row];
        y[static_cast<int64_t>(m) * layer.n + row] = Act<T>::from_float(v);
      }
    }
  }
}

// Dynamic shared memory: the pair tables, and at least the partial sums.
inline int shared_bytes(const LayerView& layer) {
  const int tables = tables_bytes(layer);
  return tables > kScratchBytes ? tables : kScratchBytes;
}

template <class T, int M>
Status launch_for(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y,
                  const XWorkspace& workspace, cudaStream_t stream) {
  const T* absmax = static_cast<const T*>(workspace.absmax);
  __half* xw = static_cast<__half*>(workspace.x_packed);
  const XLayout layout{M, 0, layer.k, kGroupCodes};  // batch-major: x[:, perm] row after row
  if (launch_gather<T>(layer, x, perm, absmax, xw, M, M, layout, stream) != Status::kOk)
    return Status::kLaunchFailed;
  auto* kernel = cmpq_gemv_kernel<T, M>;
  const int smem = shared_bytes(layer);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return Status::kLaunchFailed;
  const dim3 grid((layer.n + kTileRows - 1) / kTileRows);
  CMPQ_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, layer, static_cast<const __half*>(xw),
              static_cast<const T*>(x), absmax, perm, static_cast<const float*>(bias), static_cast<T*>(y));
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

template <class T>
Status launch_typed(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                    const XWorkspace& workspace, cudaStream_t stream) {
  switch (m) {
    case 1: return launch_for<T, 1>(layer, x, perm, bias, y, workspace, stream);
    case 2: return launch_for<T, 2>(layer, x, perm, bias, y, workspace, stream);
    case 3: return launch_for<T, 3>(layer, x, perm, bias, y, workspace, stream);
    case 4: return launch_for<T, 4>(layer, x, perm, bias, y, workspace, stream);
    case 5: return launch_for<T, 5>(layer, x, perm, bias, y, workspace, stream);
    case 6: return launch_for<T, 6>(layer, x, perm, bias, y, workspace, stream);
    case 7: return launch_for<T, 7>(layer, x, perm, bias, y, workspace, stream);
    case 8: return launch_for<T, 8>(layer, x, perm, bias, y, workspace, stream);
    default: return Status::kBadBatch;
  }
}

}  // namespace gemv_detail

Status launch_gemv(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                   ActDtype dtype, const XWorkspace& workspace, cudaStream_t stream) {
  if (!layer.shape_ok()) return Status::kBadShape;
  return dtype == ActDtype::kHalf
             ? gemv_detail::launch_typed<__half>(layer, x, perm, bias, y, m, workspace, stream)
             : gemv_detail::launch_typed<__nv_bfloat16>(layer, x, perm, bias, y, m, workspace, stream);
}

}  // namespace cuda
}  // namespace cmpq
