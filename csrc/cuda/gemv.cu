// gemv.cu — fused mixed-bit GEMV for decode batches (m = 1..8), all segments and outliers in one launch.
//
// Work split. A block of WARPS warps owns WARPS * ROWS_PER_WARP consecutive output rows and walks the
// whole packed K axis in chunks of 32 groups (1024 packed columns). Per chunk, the block gathers x
// through perm into shared memory once (FP32, shared by all its rows), then lane l of every warp decodes
// group l of the chunk for each of its warp's rows. A row's groups are contiguous in memory, so a warp's
// 32 lanes read 32 consecutive groups: 512 / 384 / 256 contiguous bytes for 4 / 3 / 2-bit, every DRAM
// sector fully used. Lanes at a segment boundary diverge for that one chunk only.
//
// Shared-memory x layout: xs[m][group][code] with the group stride padded to 33 floats. Lane l reads
// xs[m][l][c] for fixed c (banks (l + c) % 32: all distinct), and the staging loop writes consecutive
// packed columns (consecutive addresses): both sides conflict-free.
//
// Codebooks: each warp keeps its rows' three codebooks expanded to FP32 in a 32-float shared table
// (4-bit at [0,16), 3-bit at [16,24), 2-bit at [24,28)). A lookup is one LDS; a 16-entry table spans 16
// banks, so a warp's 32 lookups never conflict (equal indices broadcast).
//
// Instruction budget per weight and batch row (m = 1): ~1 extract (shift+and), 1 LDS table, 1 LDS x,
// 1 FFMA. That is above the ~3 an H100 can afford at 2.5 bits for full DRAM bandwidth (DESIGN §3), so
// pair tables / register tables are the next step once this runs on a GPU and the SASS can be read.
//
// Outliers: after the dense loop, lanes stride over the row's CSR entries and read x[perm[col]] from
// global memory (0.5 % density: about one entry per lane). The warp then reduces its lanes with a fixed
// xor butterfly and lane 0 writes: no atomics, deterministic.
#include "decode.cuh"
#include "launchers.h"

namespace cmpq {
namespace cuda {
namespace gemv_detail {  // named, not anonymous: the emulated build includes every kernel file in one TU

constexpr int kWarpSize = 32;
constexpr int kChunkGroups = 32;                            // one group per lane per chunk
constexpr int kChunkCols = kChunkGroups * kGroupCodes;      // packed columns staged per chunk
constexpr int kGroupStride = kGroupCodes + 1;               // padded: conflict-free reads and writes
constexpr int kXPlane = kChunkGroups * kGroupStride;        // floats per batch row in shared memory
constexpr int kTableStride = 32;                            // floats per row: 16 + 8 + 4 (+4 pad)
constexpr unsigned kFullMask = 0xffffffffu;

// Where segment s's codebook starts in a row's table: the codebooks follow each other in memory order.
__host__ __device__ constexpr int table_begin(int s) {
  int begin = 0;
  for (int t = 0; t < s; ++t) begin += 1 << segment_bits(t);
  return begin;
}
static_assert(table_begin(kNumSegments) <= kTableStride, "a row's codebooks fit its table");

// acc[m] += sum_c codebook[code_c] * x[m][c] over the 32 codes of one group.
template <int BITS, int M>
CMPQ_DEVICE_INLINE void dot_group(const uint32_t* src, const float* table, const float* xs, float (&acc)[M]) {
  uint32_t words[BITS];
  load_group<BITS>(src, words);
#pragma unroll
  for (int c = 0; c < kGroupCodes; ++c) {
    const float w = table[group_code<BITS>(words, c)];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = __fmaf_rn(w, xs[m * kXPlane + c], acc[m]);
  }
}

template <class T,             // activation / output type: __half or __nv_bfloat16
          int M,               // batch rows, 1..kGemvMaxM
          int WARPS,           // warps per block
          int ROWS_PER_WARP>   // output rows each warp accumulates at once
__global__ void __launch_bounds__(WARPS * kWarpSize)
    cmpq_gemv_kernel(LayerView layer,                   // packed weights (device pointers)
                     const T* __restrict__ x,           // [M, k], original channel order
                     const int32_t* __restrict__ perm,  // [k], packed column -> original channel
                     const float* __restrict__ bias,    // [n] or nullptr
                     T* __restrict__ y) {               // [M, n]
  __shared__ float xs[M * kXPlane];
  __shared__ float tables[WARPS * ROWS_PER_WARP * kTableStride];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int row0 = (blockIdx.x * WARPS + warp) * ROWS_PER_WARP;
  float* warp_tables = tables + warp * ROWS_PER_WARP * kTableStride;

  // Expand this warp's codebooks: lanes 0-15 the 4-bit entries, 16-23 3-bit, 24-27 2-bit. The dispatches
  // return values rather than store, so they compile to selects (no branches around the loads).
  const int lane_bits = segment_bits(lane < table_begin(1) ? 0 : (lane < table_begin(2) ? 1 : 2));
  const bool loads_entry = lane < table_begin(kNumSegments) &&  // an empty segment stores no codebook
                           with_segment_bits(lane_bits, [&](auto seg) { return layer.seg_k[seg.kSegment] > 0; });
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int row = row0 + r;
    if (row >= layer.n || !loads_entry) continue;
    const uint16_t* codebook = with_segment_bits(lane_bits, [&](auto seg) {
      return layer.row_codebook(seg.kSegment, row) + (lane - table_begin(seg.kSegment));
    });
    warp_tables[r * kTableStride + lane] = half_bits_to_float(*codebook);
  }

  const int groups_total = layer.total_groups();
  float acc[ROWS_PER_WARP][M];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  for (int chunk = 0; chunk < groups_total; chunk += kChunkGroups) {
    __syncthreads();  // the previous chunk is consumed (and, the first time, the tables are written)
    for (int i = threadIdx.x; i < M * kChunkCols; i += WARPS * kWarpSize) {
      const int m = i / kChunkCols;
      const int c = i % kChunkCols;
      const int j = chunk * kGroupCodes + c;
      xs[m * kXPlane + (c / kGroupCodes) * kGroupStride + c % kGroupCodes] =
          j < layer.k ? Act<T>::to_float(x[static_cast<int64_t>(m) * layer.k + perm[j]]) : 0.f;
    }
    __syncthreads();
    const int g = chunk + lane;
    if (g < groups_total) {
      const float* xl = xs + lane * kGroupStride;
      with_segment_bits(segment_bits(layer.segment_of_group(g)), [&](auto seg) {  // once for all the warp's rows
#pragma unroll
        for (int r = 0; r < ROWS_PER_WARP; ++r) {
          const int row = row0 + r;
          if (row >= layer.n) continue;
          const float* table = warp_tables + r * kTableStride + table_begin(seg.kSegment);
          dot_group<seg.kBits, M>(layer.group_words(seg.kSegment, row, g), table, xl, acc[r]);
        }
      });
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int row = row0 + r;
    if (row >= layer.n) continue;  // uniform per warp: the shuffles below stay convergent
    for (int32_t e = layer.row_ptr[row] + lane; e < layer.row_ptr[row + 1]; e += kWarpSize) {
      const float residual = half_bits_to_float(layer.val[e]);
      const int32_t channel = perm[layer.outlier_col(e)];
#pragma unroll
      for (int m = 0; m < M; ++m)
        acc[r][m] = __fmaf_rn(residual, Act<T>::to_float(x[static_cast<int64_t>(m) * layer.k + channel]), acc[r][m]);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
      if (lane == 0) {
        if (bias != nullptr) v += bias[row];
        y[static_cast<int64_t>(m) * layer.n + row] = Act<T>::from_float(v);
      }
    }
  }
}

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 2;

template <class T, int M>
Status launch_for(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y,
                  cudaStream_t stream) {
  auto* kernel = cmpq_gemv_kernel<T, M, kWarps, kRowsPerWarp>;
  const int rows_per_block = kWarps * kRowsPerWarp;
  const dim3 grid((layer.n + rows_per_block - 1) / rows_per_block);
  const dim3 block(kWarps * kWarpSize);
  CMPQ_LAUNCH(kernel, grid, block, 0, stream, layer, static_cast<const T*>(x), perm, static_cast<const float*>(bias),
              static_cast<T*>(y));
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

template <class T>
Status launch_typed(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                    cudaStream_t stream) {
  switch (m) {
    case 1: return launch_for<T, 1>(layer, x, perm, bias, y, stream);
    case 2: return launch_for<T, 2>(layer, x, perm, bias, y, stream);
    case 3: return launch_for<T, 3>(layer, x, perm, bias, y, stream);
    case 4: return launch_for<T, 4>(layer, x, perm, bias, y, stream);
    case 5: return launch_for<T, 5>(layer, x, perm, bias, y, stream);
    case 6: return launch_for<T, 6>(layer, x, perm, bias, y, stream);
    case 7: return launch_for<T, 7>(layer, x, perm, bias, y, stream);
    case 8: return launch_for<T, 8>(layer, x, perm, bias, y, stream);
    default: return Status::kBadBatch;
  }
}

}  // namespace gemv_detail

Status launch_gemv(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                   ActDtype dtype, cudaStream_t stream) {
  if (!layer.shape_ok()) return Status::kBadShape;
  return dtype == ActDtype::kHalf ? gemv_detail::launch_typed<__half>(layer, x, perm, bias, y, m, stream)
                                  : gemv_detail::launch_typed<__nv_bfloat16>(layer, x, perm, bias, y, m, stream);
}

}  // namespace cuda
}  // namespace cmpq
