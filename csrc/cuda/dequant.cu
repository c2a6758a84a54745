// dequant.cu — decode rows of a packed layer to a dense FP16/BF16 matrix in packed column order.
//
// The large-batch path (m > kGemmMaxM, gpu_ops.h) and the dequantize op. Once a decoded weight is reused by
// hundreds of activation rows, cuBLAS on the dense matrix wins; the result is exact up to the one rounding of
// W to the activation type. The large-batch path decodes a few MB of rows at a time (kDecodeTileBytes) into
// one workspace and multiplies each tile as soon as it is decoded, so the tile is still in L2 when cuBLAS
// reads it and no full dense copy of W is ever allocated.
//
// Work split and decode: tile_decode.cuh's, as in the GEMV. A block of 8 warps owns one 16-row tile and one
// K part (grid.y): a workspace tile of long rows has few 16-row tiles (18 for k = 28672), so K is split until
// the grid has about two blocks per SM; parts need no reduction, each stores its own columns. The block's
// warps split its part in iterations of 4 * kLaneGroups groups; lane (g, t) decodes rows g and g + 8 of groups t,
// t + 4, .. of each iteration through per-lane pair tables in shared memory (no bank conflicts), but instead
// of feeding mmas it stores each group as four 16-byte vectors: the A fragments of k-steps 2q and 2q + 1 hold
// codes 8q .. 8q + 7 of both rows, in order. 2-bit codes go through a 16-entry pair table too (the GEMV's
// register PRMT yields them out of order), so every width costs one LDS per two weights. The tables hold the
// output type's values (fp16 codebook entries rounded once to bf16 for a bf16 output), so the loop has no
// conversions: per two weights a PRMT (4-bit) or a SHF + LOP3 (3-, 2-bit) and an LDS, per eight weights an
// STG.128.
//
// Outliers: after a barrier (the block's dense stores are then ordered before these), one warp per row,
// lanes over the row's CSR entries in the block's K part: the first entry of each run of equal columns
// (columns are sorted, repeats adjacent) writes codebook value + the run's residuals in CSR order, summed in
// FP32 and rounded once. Every position is written by one thread, so the result is deterministic.
//
// PREDICTION (static SASS counts, sm_90a, bench/results/sass_budget.md; not a measurement): see the decode
// rows there and DESIGN.md §3.6 for what decode + cuBLAS is predicted to cost over cuBLAS alone.
#include "tile_decode.cuh"

namespace cmpq {
namespace cuda {
namespace decode_detail {  // named, not anonymous: the emulated build includes every kernel file in one TU

using namespace tile;
static_assert(kTileRows == kDecodeBlockRows, "launchers.h sizes decode workspaces in these blocks");
constexpr int kLaneGroups = 4;  // groups per lane and row per iteration: 1-2 KB of codes in flight per warp
constexpr int kMinBlocks = 2;   // two blocks per SM: what shared memory allows with every table (2 x 84 KB)
constexpr int kTargetBlocks = 2 * 132;  // blocks a launch aims for: two per SM of an H100 / H200
constexpr int kMinPartGroups = kWarps * kQuadLanes * kLaneGroups / 2;  // smallest K part (see launch_typed)
// Shared memory: pair tables [entry][row g, row g + 8][lane], smallest first so a layer without 4-bit (or
// 3-bit) codes asks for less: 2-bit (16 entries), 3-bit (64), 4-bit (256).
constexpr int kTable2Offset = 0;
constexpr int kTable3Offset = kTable2Offset + 16 * kEntryBytes;
constexpr int kTable4Offset = kTable3Offset + 64 * kEntryBytes;
constexpr int kTablesBytes = kTable4Offset + 256 * kEntryBytes;

// 4- and 3-bit: the GEMV's decoders; 2-bit: pair fields through a table, codes in order.
template <int BITS>
using DenseDecoder = std::conditional_t<BITS == 2, FieldDecoder<2>, Decoder<BITS>>;

// One warp's share of one segment: rows g and g + 8, their output rows, a pass of whole iterations.
template <int BITS, class T>
struct DecodePass {
  static constexpr int kIterGroups = kQuadLanes * kLaneGroups;
  DenseDecoder<BITS> decoder;
  const uint32_t* lo;  // row g's words of the lane's first group of the current iteration
  const uint32_t* hi;  // row g + 8's
  T* out_lo;           // row g's output at that group's first column
  T* out_hi;

  CMPQ_DEVICE_INLINE void advance(int iterations) {
    lo += iterations * kIterGroups * BITS;
    hi += iterations * kIterGroups * BITS;
    out_lo += iterations * kIterGroups * kGroupCodes;
    out_hi += iterations * kIterGroups * kGroupCodes;
  }

  // Groups t + 4j (j < kLaneGroups) of the iteration, both rows; `remaining` groups from the lane's first
  // are in the segment (kTail: the segment's last iteration; later groups are neither read nor written).
  template <bool kTail>
  CMPQ_DEVICE_INLINE void iteration(int remaining = 0) const {
    uint32_t lo_words[kLaneGroups][BITS], hi_words[kLaneGroups][BITS];
#pragma unroll
    for (int j = 0; j < kLaneGroups; ++j) {
      if (kTail && kQuadLanes * j >= remaining) break;
      load_group<BITS>(lo + kQuadLanes * j * BITS, lo_words[j]);
      load_group<BITS>(hi + kQuadLanes * j * BITS, hi_words[j]);
    }
#pragma unroll
    for (int j = 0; j < kLaneGroups; ++j) {
      if (kTail && kQuadLanes * j >= remaining) break;
      uint4* dst_lo = reinterpret_cast<uint4*>(out_lo + kQuadLanes * j * kGroupCodes);
      uint4* dst_hi = reinterpret_cast<uint4*>(out_hi + kQuadLanes * j * kGroupCodes);
#pragma unroll
      for (int q = 0; q < kGroupCodes / 8; ++q) {  // codes 8q .. 8q + 7: k-steps 2q and 2q + 1
        uint32_t a[2][4];
        decoder.fragment(lo_words[j], hi_words[j], 2 * q, a[0]);
        decoder.fragment(lo_words[j], hi_words[j], 2 * q + 1, a[1]);
        dst_lo[q] = make_uint4(a[0][0], a[0][2], a[1][0], a[1][2]);
        dst_hi[q] = make_uint4(a[0][1], a[0][3], a[1][1], a[1][3]);
      }
    }
  }
};

template <class T>                                       // __half or __nv_bfloat16
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    cmpq_decode_kernel(LayerView layer,                  // packed weights (device pointers)
                       int row_begin,                    // first layer row of w
                       int rows,                         // layer rows wanted in w (row_begin + rows <= n)
                       int part_groups,                  // packed groups per K part (grid.y parts)
                       T* __restrict__ w) {              // [decode_rows(rows), k] dense, packed column order
  CMPQ_DYNAMIC_SMEM(unsigned char, smem);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int g = lane / kQuadLanes;
  const int t = lane % kQuadLanes;
  const int tile0 = blockIdx.x * kTileRows;  // the tile's first row of w
  const int row0 = row_begin + tile0;        // .. and of the layer
  // Rows of w past `rows` are scratch: they decode row n - 1 (or a row past the range) again, never read.
  const int row_lo = min(row0 + g, layer.n - 1);
  const int row_hi = min(row0 + g + kHiRow, layer.n - 1);

  // Step 1: the tile's pair tables, in the output type.
  fill_table<T, 4>(layer, row0, smem + kTable4Offset);
  fill_table<T, 3>(layer, row0, smem + kTable3Offset);
  fill_table<T, 2>(layer, row0, smem + kTable2Offset);
  __syncthreads();  // tables written

  // Step 2: this warp's share of the block's K part, both rows, stored as decoded.
  const int group_lo = blockIdx.y * part_groups;
  const int group_hi = min(group_lo + part_groups, layer.total_groups());
  T* w_lo = w + static_cast<int64_t>(tile0 + g) * layer.k;
  T* w_hi = w + static_cast<int64_t>(tile0 + g + kHiRow) * layer.k;
  constexpr int kIterGroups = DecodePass<4, T>::kIterGroups;
  for_each_segment<kIterGroups>(layer, group_lo, group_hi, warp, kWarps, [&](auto seg, int first, int offset, int groups) {
    constexpr int kBits = decltype(seg)::kBits;
    constexpr int s = seg.kSegment;
    DecodePass<kBits, T> pass;
    pass.decoder.table = ptx::shared_address(smem) + (kBits == 4 ? kTable4Offset : kBits == 3 ? kTable3Offset : kTable2Offset);
    pass.decoder.lane4 = static_cast<uint32_t>(lane) * 4;
    pass.lo = layer.row_codes(s, row_lo) + (offset + t) * kBits;
    pass.hi = layer.row_codes(s, row_hi) + (offset + t) * kBits;
    const int column = (layer.group_begin(s) + offset + t) * kGroupCodes;
    pass.out_lo = w_lo + column;
    pass.out_hi = w_hi + column;
    run_iterations<kIterGroups>(pass, first, groups);
  });
  __syncthreads();  // the block's dense stores come before the outlier stores over them

  // Step 3: the outliers in the block's K part, one warp per row; the first entry of each run of a column
  // writes it (the part's columns are the ones this block stored).
  for (int r = warp; r < kTileRows && tile0 + r < rows; r += kWarps) {
    const int row = row0 + r;
    T* dst = w + static_cast<int64_t>(tile0 + r) * layer.k;
    const int32_t begin = layer.row_ptr[row], end = layer.row_ptr[row + 1];
    for (int32_t e = begin + lane; e < end; e += kWarpSize) {
      const int j = layer.outlier_col(e);
      if (j / kGroupCodes < group_lo || j / kGroupCodes >= group_hi) continue;  // another part's column
      if (e > begin && layer.outlier_col(e - 1) == j) continue;                // not the first of its run
      float value = half_bits_to_float(layer.dense_value_bits(row, j));
      for (int32_t f = e; f < end && layer.outlier_col(f) == j; ++f) value += half_bits_to_float(layer.val[f]);
      dst[j] = Act<T>::from_float(value);
    }
  }
}

// Dynamic shared memory: the tables up to the widest segment present (offsets are fixed, smallest first).
inline int shared_bytes(const LayerView& layer) {
  if (layer.seg_k[0] > 0) return kTablesBytes;
  return layer.seg_k[1] > 0 ? kTable4Offset : kTable3Offset;
}

template <class T>
Status launch_typed(const LayerView& layer, int row_begin, int rows, void* w, cudaStream_t stream) {
  auto* kernel = cmpq_decode_kernel<T>;
  const int smem = shared_bytes(layer);
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return Status::kLaunchFailed;
  // K parts, so that a tile of few, long rows still gives every SM blocks: at least kMinPartGroups groups
  // per part (half an iteration of every warp), parts until the grid has kTargetBlocks blocks.
  const int row_blocks = static_cast<int>(decode_rows(rows) / kTileRows);
  const int total = layer.total_groups();
  const int max_parts = total / kMinPartGroups > 1 ? total / kMinPartGroups : 1;
  const int wanted = (kTargetBlocks + row_blocks - 1) / row_blocks;
  const int parts = wanted < max_parts ? wanted : max_parts;
  const int part_groups = (total + parts - 1) / parts;
  const dim3 grid(row_blocks, (total + part_groups - 1) / part_groups);
  CMPQ_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, layer, row_begin, rows, part_groups, static_cast<T*>(w));
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace decode_detail

Status launch_decode(const LayerView& layer, int row_begin, int rows, void* w, ActDtype dtype, cudaStream_t stream) {
  if (!layer.shape_ok() || row_begin < 0 || rows < 1 || rows > layer.n - row_begin) return Status::kBadShape;
  return dtype == ActDtype::kHalf ? decode_detail::launch_typed<__half>(layer, row_begin, rows, w, stream)
                                  : decode_detail::launch_typed<__nv_bfloat16>(layer, row_begin, rows, w, stream);
}

}  // namespace cuda
}  // namespace cmpq
