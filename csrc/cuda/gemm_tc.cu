// gemm_tc.cu — fused mixed-bit GEMM for mid-size batches (m = 9..kGemmMaxM) on tensor cores: the GEMV's
// decode (tile_decode.cuh) with every decoded weight fragment feeding the mmas of all batch tiles.
//
// Two launches, as the GEMV. The gather kernel writes x[:, perm] (bf16 rows scaled by a power of two) into
// an fp16 workspace in batch tiles of kBatchRows = 16 * MT rows, zero past m, group-major within a tile:
// xw[tile][G][b][32], the 32 activations of group G for batch row b in the group's decode order. A lane's
// slice of group G for n8 tile i then sits a compile-time distance (kGroupStride * G + kTileStride * i
// vectors) from its tile-0 slice of group 0, so every activation load of the hot loop is one LDG.128 with
// an immediate offset.
//
// Work split (tile_decode.cuh). A block of 8 warps owns one 16-row weight tile and one batch tile; its
// warps split K in iterations of 4 * kLaneGroups groups. Lane (g, t) decodes rows g, g + 8 of its groups
// into A fragments (pair tables in shared memory at 4 and 3 bits, register PRMT at 2 bits) once per k-step
// and issues NT = 2 * MT mmas with them: B of n8 tile i is the activations of batch rows 8i .. 8i + 7 (lane g
// loads row 8i + g). The FP32 accumulators are NT x 4 registers per lane. Grid: one block per 16 weight
// rows and batch tile (256 blocks for n = 4096 and m <= 64).
//
// Why this shape. Decoding is the expensive part of the GEMV's ~10 instructions per k-step (8 weights per
// lane); sharing it over NT n8 tiles adds one HMMA per tile and k-step plus one 16-byte activation load
// per tile and two k-steps: ~0.19 instructions per weight per n8 tile. Instantiations (launch_typed):
// MT = 1, 2, 4; m = 65..128 takes two 64-row batch tiles, consecutive blocks of one row tile so their
// reads of W meet in L2, each decoding W again. MT = 8 would need more than 255 registers and spill.
//
// PREDICTION (static SASS counts, sm_90a, bench/results/sass_budget.md; not a measurement): 1.45 / 2.14 /
// 1.64 issued instructions per weight at 4 / 3 / 2 bits for MT = 1 (the GEMV: 1.27 / 1.96 / 1.46), 1.91 /
// 2.61 / 2.09 for MT = 2, 2.80 / 3.48 / 2.98 for MT = 4; 0.5 / 0.5 / 0 LDS per weight throughout. Not in
// those counts: the gather launch, the table fill, the epilogue, and L2 traffic: each block reads its batch
// tile's kBatchRows * k * 2 bytes of workspace, 16 * MT / bits times the weight bytes of its 16 rows.
//
// Epilogue: each warp's C fragments go to shared memory (over the tables, after a barrier); per tile row,
// a warp's lanes take batch rows, add the warps' partial sums in warp order (scaled back by 2^-s), then the
// row's CSR outliers in CSR order (x[perm[col]] from global memory) and the bias, and write y. No atomics:
// deterministic.
#include "tile_decode.cuh"

namespace cmpq {
namespace cuda {
namespace gemm_detail {  // named, not anonymous: the emulated build includes every kernel file in one TU

using namespace tile;

// Instantiated for MT = 1, 2, 4 (launch_typed: 16, 32, 64 batch rows per block) and fp16 / bf16 outputs.
template <class T,   // __half or __nv_bfloat16 (activations and output)
          int MT>    // m16 batch tiles per block: the block covers 16 * MT batch rows
__global__ void __launch_bounds__(kThreads, MT == 1 ? 2 : 1)  // see kLaneGroups
    cmpq_gemm_kernel(LayerView layer,                   // packed weights (device pointers)
                     const __half* __restrict__ xw,     // [tiles][k / 32][16 MT][32] x[:, perm] * 2^s, see above
                     const T* __restrict__ x,           // [m, k] original channel order (outliers)
                     const T* __restrict__ absmax,      // [m] max |x| per row (bf16), or nullptr (fp16)
                     const int32_t* __restrict__ perm,  // [k], packed column -> original channel
                     const float* __restrict__ bias,    // [n] or nullptr
                     T* __restrict__ y,                 // [m, n]
                     int m) {                           // batch rows, <= 16 * MT * batch tiles
  static_assert(MT == 1 || MT == 2 || MT == 4, "kLaneGroups and the launch bounds are chosen for these");
  constexpr int kBatchRows = 16 * MT;
  constexpr int kNTiles = kBatchRows / kNTileRows;
  constexpr int kGroupStride = kBatchRows * kGroupVectors;  // vectors from one group's slices to the next
  constexpr int kTileStride = kNTileRows * kGroupVectors;   // from one n8 tile's slice to the next
  // Groups per lane and row per iteration: 4, 2, 1 for MT = 1, 2, 4. The words of LG groups, 4 * NT
  // accumulators and the activations in flight share the registers: 128 per thread with 2 blocks per SM
  // (MT = 1), 255 with 1 (MT = 2: ~180, MT = 4: ~210 with ptxas' load hoisting); more groups would spill.
  // MT = 2 with 1 group and 2 blocks per SM would keep as many weight bytes in flight per SM, for more
  // loop overhead per weight.
  constexpr int kLaneGroups = 4 / MT;
  CMPQ_DYNAMIC_SMEM(unsigned char, smem);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int g = lane / kQuadLanes;
  const int t = lane % kQuadLanes;
  // Consecutive blocks take the batch tiles of one row tile, so the tiles' reads of W meet in L2.
  const int batch_tiles = (m + kBatchRows - 1) / kBatchRows;
  const int row0 = blockIdx.x / batch_tiles * kTileRows;
  const int batch0 = blockIdx.x % batch_tiles * kBatchRows;
  // Rows past n (the last tile) decode row n - 1 again; their sums are never written.
  const int row_lo = min(row0 + g, layer.n - 1);
  const int row_hi = min(row0 + g + kHiRow, layer.n - 1);

  // Step 1: the tile's pair tables.
  fill_tables(layer, row0, smem);
  float acc[kNTiles][4];
#pragma unroll
  for (int i = 0; i < kNTiles; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;
  __syncthreads();  // tables written

  // Step 2: this warp's share of K, all n8 tiles. The batch tile's workspace starts at row batch0.
  const __half* x_tile = xw + static_cast<int64_t>(batch0) * layer.k;
  const uint4* x_lane = reinterpret_cast<const uint4*>(x_tile) + g * kGroupVectors;
  multiply_tile<kNTiles, kLaneGroups, kGroupStride, kTileStride>(
      layer, ptx::shared_address(smem), row_lo, row_hi,
      [&](int group) { return x_lane + static_cast<int64_t>(group) * kGroupStride; }, acc);

  // Step 3: partial sums, C fragment (row g, batch 8i + 2t, 8i + 2t + 1) and (row g + 8, ...) of every warp.
  float* partial = reinterpret_cast<float*>(smem);  // [kWarps][kTileRows][kBatchRows]
  __syncthreads();  // every warp is done with the tables the partial sums overwrite
#pragma unroll
  for (int i = 0; i < kNTiles; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = g + kHiRow * (c / 2);
      const int b = kNTileRows * i + 2 * t + c % 2;
      partial[(warp * kTileRows + r) * kBatchRows + b] = acc[i][c];
    }
  __syncthreads();  // partial sums written

  // Step 4: per row, lanes over batch rows: dense sum, outliers in CSR order, bias.
  for (int r = warp; r < kTileRows; r += kWarps) {
    const int row = row0 + r;
    if (row >= layer.n) break;
    const int32_t begin = layer.row_ptr[row], end = layer.row_ptr[row + 1];
    for (int b = batch0 + lane; b < min(m, batch0 + kBatchRows); b += kWarpSize) {
      float dense = 0.f;
      for (int w = 0; w < kWarps; ++w) dense += partial[(w * kTileRows + r) * kBatchRows + b - batch0];
      float v = dense * power_of_two(-row_scale_exponent(absmax, b));
      const T* x_row = x + static_cast<int64_t>(b) * layer.k;
      for (int32_t e = begin; e < end; ++e)
        v = __fmaf_rn(half_bits_to_float(layer.val[e]), Act<T>::to_float(x_row[perm[layer.outlier_col(e)]]), v);
      if (bias != nullptr) v += bias[row];
      y[static_cast<int64_t>(b) * layer.n + row] = Act<T>::from_float(v);
    }
  }
}

// Dynamic shared memory: the pair tables, and at least the partial sums that overwrite them.
template <int MT>
int shared_bytes(const LayerView& layer) {
  const int tables = tables_bytes(layer);
  const int scratch = kWarps * kTileRows * 16 * MT * static_cast<int>(sizeof(float));
  return tables > scratch ? tables : scratch;
}

template <class T, int MT>
Status launch_for(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                  const XWorkspace& workspace, cudaStream_t stream) {
  constexpr int kBatchRows = 16 * MT;
  const T* absmax = static_cast<const T*>(workspace.absmax);
  __half* xw = static_cast<__half*>(workspace.x_packed);
  const int tiles = gemm_batch_tiles(m);
  // Group-major within each batch tile: xw[tile][G][b][32].
  const XLayout layout{kBatchRows, static_cast<int64_t>(kBatchRows) * layer.k, kGroupCodes,
                       static_cast<int64_t>(kBatchRows) * kGroupCodes};
  if (launch_gather<T>(layer, x, perm, absmax, xw, m, kBatchRows * tiles, layout, stream) != Status::kOk)
    return Status::kLaunchFailed;
  auto* kernel = cmpq_gemm_kernel<T, MT>;
  const int smem = shared_bytes<MT>(layer);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return Status::kLaunchFailed;
  const dim3 grid((layer.n + kTileRows - 1) / kTileRows * tiles);
  CMPQ_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, layer, static_cast<const __half*>(xw),
              static_cast<const T*>(x), absmax, perm, static_cast<const float*>(bias), static_cast<T*>(y), m);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

// The instantiations: MT = 1, 2, 4 (batch tiles of 16, 32, 64 rows, gemm_tile_rows); m > 64 takes several
// 64-row tiles, each decoding W again (MT = 8 would need more than 255 registers per thread).
template <class T>
Status launch_typed(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                    const XWorkspace& workspace, cudaStream_t stream) {
  switch (gemm_tile_rows(m)) {
    case 16: return launch_for<T, 1>(layer, x, perm, bias, y, m, workspace, stream);
    case 32: return launch_for<T, 2>(layer, x, perm, bias, y, m, workspace, stream);
    default: return launch_for<T, 4>(layer, x, perm, bias, y, m, workspace, stream);
  }
}

}  // namespace gemm_detail

Status launch_gemm(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                   ActDtype dtype, const XWorkspace& workspace, cudaStream_t stream) {
  if (!layer.shape_ok()) return Status::kBadShape;
  if (m < 1 || m > kGemmMaxM) return Status::kBadBatch;
  return dtype == ActDtype::kHalf
             ? gemm_detail::launch_typed<__half>(layer, x, perm, bias, y, m, workspace, stream)
             : gemm_detail::launch_typed<__nv_bfloat16>(layer, x, perm, bias, y, m, workspace, stream);
}

}  // namespace cuda
}  // namespace cmpq
