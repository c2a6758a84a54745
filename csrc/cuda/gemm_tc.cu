// gemm_tc.cu — tensor-core GEMM for mid-size batches (m = 9..kGemmMaxM): decode to FP16/BF16 tiles in
// shared memory, feed mma.sync m16n8k16 with FP32 accumulation, add outliers in the epilogue.
//
// Tiling. A block of 4 warps owns kBlockN = 64 weight rows (output features) and MT * 16 batch rows; it
// walks K in steps of kBlockK = 64 packed columns (two 32-code groups). Per step:
//   1. stage x[m, perm[j]] for the tile into shared memory (the permutation gather happens here, once),
//   2. decode the 64 x 2 groups of the weight tile: one group per thread, codebook lookups into 32
//      values written as four 16-byte stores; a step may straddle a segment boundary, so each thread
//      picks its group's bit width,
//   3. each warp multiplies the x tile by its 16 weight rows (two n8 tiles) with ldmatrix + mma.
// Both tiles are [rows][kBlockK + 8]: the 8-element pad shifts consecutive rows by 16 bytes, so the
// eight 16-byte row reads of each ldmatrix phase hit distinct banks.
//
// Operand mapping (PTX m16n8k16, "row.col"): A = x tile (m x k, row-major), B = W tile read as k x n
// column-major, which is exactly W[n][k] row-major — ldmatrix without .trans yields B fragments.
//
// Epilogue: accumulators go to a shared FP32 tile (aliasing the operand tiles), then one thread per
// weight row adds that row's CSR residuals for every batch row in CSR order (deterministic, no atomics),
// then the tile is written out with bias in the activation type.
#include <type_traits>

#include "decode.cuh"
#include "launchers.h"
#include "ptx.cuh"

namespace cmpq {
namespace cuda {
namespace gemm_detail {  // named, not anonymous: the emulated build includes every kernel file in one TU

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kBlockN = 16 * kWarps;         // weight rows per block: 16 per warp
constexpr int kBlockK = 2 * kGroupCodes;     // packed columns per step
constexpr int kTileStride = kBlockK + 8;     // elements per shared row (16-byte pad)
constexpr int kAccStride = kBlockN + 4;      // floats per row of the epilogue tile
static_assert(kBlockN * (kBlockK / kGroupCodes) == kThreads, "one weight group per thread per step");

template <class T>
CMPQ_DEVICE_INLINE void mma(float* d, const uint32_t* a, const uint32_t* b) {
  if constexpr (std::is_same_v<T, __half>)
    ptx::mma_m16n8k16_f16f32(d, a, b, d);
  else
    ptx::mma_m16n8k16_bf16f32(d, a, b, d);
}

template <class T,   // __half or __nv_bfloat16 (activations, decoded weights, output)
          int MT>    // m16 tiles per block: the block covers 16 * MT batch rows
__global__ void __launch_bounds__(kThreads)
    cmpq_gemm_kernel(LayerView layer,                   // packed weights (device pointers)
                     const T* __restrict__ x,           // [m, k], original channel order
                     const int32_t* __restrict__ perm,  // [k]
                     const float* __restrict__ bias,    // [n] or nullptr
                     T* __restrict__ y,                 // [m, n]
                     int m) {                           // batch rows
  constexpr int kBlockM = 16 * MT;
  constexpr int kOperandBytes = (kBlockM + kBlockN) * kTileStride * static_cast<int>(sizeof(T));
  constexpr int kAccBytes = kBlockM * kAccStride * static_cast<int>(sizeof(float));
  __shared__ __align__(16) unsigned char smem[kOperandBytes > kAccBytes ? kOperandBytes : kAccBytes];
  T* x_tile = reinterpret_cast<T*>(smem);           // [kBlockM][kTileStride]
  T* w_tile = x_tile + kBlockM * kTileStride;       // [kBlockN][kTileStride]
  float* acc_tile = reinterpret_cast<float*>(smem);  // [kBlockM][kAccStride], after the main loop

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n0 = blockIdx.x * kBlockN;
  const int m0 = blockIdx.y * kBlockM;
  const int groups_total = layer.total_groups();

  float acc[MT][2][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  for (int k0 = 0; k0 < layer.k; k0 += kBlockK) {
    for (int i = threadIdx.x; i < kBlockM * kBlockK; i += kThreads) {
      const int r = i / kBlockK, c = i % kBlockK;
      const int row = m0 + r, col = k0 + c;
      x_tile[r * kTileStride + c] = row < m && col < layer.k ? x[static_cast<int64_t>(row) * layer.k + perm[col]]
                                                              : Act<T>::from_float(0.f);
    }
    {
      const int r = threadIdx.x / 2;
      const int g = k0 / kGroupCodes + threadIdx.x % 2;
      const int row = n0 + r;
      T* dst = w_tile + r * kTileStride + (threadIdx.x % 2) * kGroupCodes;
      if (row < layer.n && g < groups_total)
        decode_row_group(layer, row, g, dst);
      else
        for (int c = 0; c < kGroupCodes; ++c) dst[c] = Act<T>::from_float(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      // B fragments for this warp's two n8 tiles: matrices (n0-7,k0-7), (n0-7,k8-15), (n8-15,k0-7), (n8-15,k8-15).
      uint32_t b[4];
      const int b_row = warp * 16 + (lane % 8) + (lane / 16) * 8;
      const int b_col = kk + ((lane / 8) % 2) * 8;
      ptx::ldmatrix_x4(b, w_tile + b_row * kTileStride + b_col);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        // A fragments: matrices (m0-7,k0-7), (m8-15,k0-7), (m0-7,k8-15), (m8-15,k8-15).
        uint32_t a[4];
        ptx::ldmatrix_x4(a, x_tile + (i * 16 + lane % 16) * kTileStride + kk + (lane / 16) * 8);
        mma<T>(acc[i][0], a, b);
        mma<T>(acc[i][1], a, b + 2);
      }
    }
    __syncthreads();  // operands consumed before the next step overwrites them
  }

  // Fragment -> tile: c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1].
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = warp * 16 + j * 8 + 2 * t;
      float* top = acc_tile + (i * 16 + g) * kAccStride + col;
      float* bottom = top + 8 * kAccStride;
      top[0] = acc[i][j][0], top[1] = acc[i][j][1], bottom[0] = acc[i][j][2], bottom[1] = acc[i][j][3];
    }
  __syncthreads();
  if (threadIdx.x < kBlockN && n0 + static_cast<int>(threadIdx.x) < layer.n) {
    const int row = n0 + threadIdx.x;
    for (int32_t e = layer.row_ptr[row]; e < layer.row_ptr[row + 1]; ++e) {
      const float residual = half_bits_to_float(layer.val[e]);
      const int32_t channel = perm[layer.outlier_col(e)];
      for (int r = 0; r < kBlockM && m0 + r < m; ++r)
        acc_tile[r * kAccStride + threadIdx.x] += residual * Act<T>::to_float(x[static_cast<int64_t>(m0 + r) * layer.k + channel]);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kBlockM * kBlockN; i += kThreads) {
    const int r = i / kBlockN, c = i % kBlockN;
    if (m0 + r >= m || n0 + c >= layer.n) continue;
    float v = acc_tile[r * kAccStride + c];
    if (bias != nullptr) v += bias[n0 + c];
    y[static_cast<int64_t>(m0 + r) * layer.n + n0 + c] = Act<T>::from_float(v);
  }
}

template <class T, int MT>
Status launch_for(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                  cudaStream_t stream) {
  auto* kernel = cmpq_gemm_kernel<T, MT>;
  const dim3 grid((layer.n + kBlockN - 1) / kBlockN, (m + 16 * MT - 1) / (16 * MT));
  CMPQ_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, layer, static_cast<const T*>(x), perm,
              static_cast<const float*>(bias), static_cast<T*>(y), m);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

template <class T>
Status launch_typed(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                    cudaStream_t stream) {
  if (m <= 16) return launch_for<T, 1>(layer, x, perm, bias, y, m, stream);
  if (m <= 32) return launch_for<T, 2>(layer, x, perm, bias, y, m, stream);
  if (m <= 64) return launch_for<T, 4>(layer, x, perm, bias, y, m, stream);
  return launch_for<T, 8>(layer, x, perm, bias, y, m, stream);
}

}  // namespace gemm_detail

Status launch_gemm(const LayerView& layer, const void* x, const int32_t* perm, const float* bias, void* y, int m,
                   ActDtype dtype, cudaStream_t stream) {
  if (!layer.shape_ok()) return Status::kBadShape;
  if (m < 1 || m > kGemmMaxM) return Status::kBadBatch;
  return dtype == ActDtype::kHalf ? gemm_detail::launch_typed<__half>(layer, x, perm, bias, y, m, stream)
                                  : gemm_detail::launch_typed<__nv_bfloat16>(layer, x, perm, bias, y, m, stream);
}

}  // namespace cuda
}  // namespace cmpq
