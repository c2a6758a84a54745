// launchers.h — torch-free launchers of the CMPQ CUDA kernels.
//
// Each launcher takes raw pointers, sizes and a stream, launches one kernel and returns an error code;
// the bindings (cmpq_cuda.cpp on a GPU, emu_ops.cpp under the host SIMT emulation) turn codes into
// exceptions that carry the offending values. The same kernel source builds with nvcc and with g++.
#pragma once

#include <stdint.h>

#include "../cmpq_layout.h"
#include "../mixllm_layout.h"
#if defined(__CUDACC__) || defined(CMPQ_EMU)
#include "compat.cuh"  // kernel sources, and every file of the emulated build
#else
#include <cuda_runtime_api.h>  // the real CUDA build's host-compiled bindings only need cudaStream_t
#endif

namespace cmpq {
namespace cuda {

// Activation/output element type; the CMPQ kernels are instantiated for the 16-bit types, the MixLLM kernels
// (whose op accepts float32 x like its CPU twin) for all three.
enum class ActDtype { kHalf, kBFloat16, kFloat };

enum class Status {
  kOk = 0,
  kBadBatch,       // m outside the kernel's supported range
  kBadShape,       // n, k or segment sizes not representable
  kLaunchFailed,   // the runtime refused the launch (see cudaGetLastError)
};

// For the bindings' exception text.
inline const char* status_message(Status status) {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kBadBatch: return "batch size outside the kernel's range";
    case Status::kBadShape: return "layer shape not supported (n, k must be positive, k a multiple of 32)";
    case Status::kLaunchFailed: return "kernel launch failed";
  }
  return "unknown status";
}

// Batch ranges of the three paths (the dispatch table; see gpu_ops.h):
constexpr int kGemvMaxM = 8;    // m <= 8: fused GEMV
constexpr int kGemmMaxM = 128;  // m <= 128: tensor-core GEMM; larger m: decode + cuBLAS

// The fp16 activation workspace both kernels read: x[:, perm] in decode order, written by a gather launch.
struct XWorkspace {
  void* x_packed = nullptr;      // x_packed_elements(layer, m) fp16 elements, 16-byte aligned
  const void* absmax = nullptr;  // bf16 only: [m] max |x| of each row, in `dtype`; unused for fp16
};
// The GEMM's batch tiles for m: 16, 32 or 64 rows (whole m16 tiles), as many as m needs.
inline int gemm_tile_rows(int m) { return m <= 16 ? 16 : m <= 32 ? 32 : 64; }
inline int gemm_batch_tiles(int m) { return (m + gemm_tile_rows(m) - 1) / gemm_tile_rows(m); }
inline int64_t x_packed_elements(const LayerView& layer, int m) {
  const int rows = m <= kGemvMaxM ? m : gemm_tile_rows(m) * gemm_batch_tiles(m);
  return static_cast<int64_t>(rows) * layer.k;
}

// y[m, n] = x[m, :] @ W.T (+ bias[n]), for 1 <= m <= kGemvMaxM.
//   x:    [m, k] in original channel order, dtype `dtype`.
//   perm: [k] int32.   bias: [n] float32 or nullptr (added in FP32).   y: [m, n] of `dtype`.
// Two launches: x[:, perm] goes to workspace.x_packed as fp16 (bf16 rows scaled by a power of two chosen
// from workspace.absmax), then the fused kernel multiplies it with the fp16 codebook values on tensor
// cores (exact products, FP32 accumulation), decodes all segments and adds the CSR outliers in FP32. No
// atomics, so the result is deterministic.
Status launch_gemv(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                   ActDtype dtype, const XWorkspace& workspace, cudaStream_t stream);

// Same contract for 1 <= m <= kGemmMaxM: the same gather and decode, each decoded weight fragment feeding
// the mmas of every n8 batch tile (gemm_tc.cu); deterministic too.
Status launch_gemm(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                   ActDtype dtype, const XWorkspace& workspace, cudaStream_t stream);

// The large-batch path multiplies W through cuBLAS a tile of rows at a time: each tile is decoded into one
// reused workspace of about kDecodeTileBytes, small enough to still sit in L2 when cuBLAS reads it (50 MB
// on an H100/H200), large enough that each cuBLAS call is a real GEMM. The emulated build uses 16 KiB so
// that the test suite's small layers cross tile boundaries.
#if defined(CMPQ_EMU)
constexpr int64_t kDecodeTileBytes = 16 << 10;
#else
constexpr int64_t kDecodeTileBytes = 16 << 20;
#endif
constexpr int kDecodeBlockRows = 16;  // rows per decode block (tile_decode.cuh's kTileRows)
// Rows of a decode workspace for `rows` layer rows: whole blocks; rows past `rows` are scratch.
inline int64_t decode_rows(int64_t rows) { return (rows + kDecodeBlockRows - 1) / kDecodeBlockRows * kDecodeBlockRows; }
// Layer rows per tile of the large-batch path: whole blocks, at least one.
inline int decode_tile_rows(const LayerView& layer) {
  const int64_t fit = kDecodeTileBytes / (2 * static_cast<int64_t>(layer.k)) / kDecodeBlockRows * kDecodeBlockRows;
  return static_cast<int>(fit > kDecodeBlockRows ? fit : kDecodeBlockRows);
}

// w[decode_rows(rows), k] = layer rows row_begin .. row_begin + rows - 1 in packed column order (codebook value
// + outlier residual), rounded once to `dtype`; 16-byte aligned. Rows of w past `rows` are scratch.
Status launch_decode(const LayerView& layer, int row_begin, int rows, void* w, ActDtype dtype, cudaStream_t stream);

// ---- MixLLM (mixllm_gemm.cu; layout in ../mixllm_layout.h, arithmetic in cmpq_kernels/mixllm_reference.py) ----

// Token blocks of the MixLLM GEMM's grid.y: at most 65535 blocks of kMixllmMaxTokenTile tokens.
constexpr int kMixllmMaxTokenTile = 32;
constexpr int64_t kMixllmMaxM = 65535LL * kMixllmMaxTokenTile;

// W*A8 step 1: per token and 128-wide group, scale[i, g] = fp16 bits of fp16(absmax / 127) (0x7e00 when not
// finite) and q[i, c] = clamp(rint(x / scale), -127, 127) (0 where the scale is 0 or NaN): bit for bit the CPU
// op's quantizer. x [m, k] of `dtype`, q int8 [m, k] (4-byte aligned), scale [m, G].
Status launch_mixllm_quantize(const void* x, int m, int k, ActDtype dtype, int8_t* q, uint16_t* scale,
                              cudaStream_t stream);

// W*A8 step 2: y[i, row_index(r)] = sum_g float(acc_g) * (s_w * s_x) (+ bias) for every stored row r, from the
// codes of launch_mixllm_quantize; acc_g exact in int32 on tensor cores (mma m16n8k32 s8). y [m, n] of `dtype`,
// bias [n] float32 or nullptr. q8 must be 8-byte aligned and q4 4-byte aligned (vector loads; the bindings
// copy a misaligned view). Rows whose row_index is outside [0, n) are skipped, never written out of bounds.
Status launch_mixllm_gemm(const ::cmpq::mixllm::View& layer, const int8_t* q, const uint16_t* scale,
                          const float* bias, void* y, int m, ActDtype dtype, cudaStream_t stream);

// W*A16 (and the dequantize op): w[row_index(r), :] = (q - z) * s in float32 [n, k] (exact), output-row order.
Status launch_mixllm_dequantize(const ::cmpq::mixllm::View& layer, float* w, cudaStream_t stream);

}  // namespace cuda
}  // namespace cmpq
