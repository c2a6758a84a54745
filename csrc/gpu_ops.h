// gpu_ops.h — the GPU implementations of cmpq::gemm / cmpq::dequantize, written once for two builds:
// cuda/cmpq_cuda.cpp (real CUDA, current stream) and emu/emu_ops.cpp (the same kernel sources on the host
// under the SIMT emulation, CPU tensors). Only the stream and the registration differ between them.
//
// Dispatch by batch rows m (one table; thresholds to be set from GPU measurements, see README):
//   m <= kGemvMaxM      fused GEMV (gemv.cu)
//   m <= kGemmMaxM      tensor-core GEMM (gemm_tc.cu)
//   otherwise           decode a tile of rows at a time to a dense FP16/BF16 workspace (dequant.cu), each
//                       tile then multiplied by cuBLAS via at::mm_out
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include <torch/torch.h>

#include "cuda/launchers.h"
#include "torch_view.h"

namespace cmpq {

// Emulated runs poison every output and workspace with NaN, so an element a kernel forgets to write
// fails the tests instead of passing on leftover memory; real GPU runs skip the fill.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(CMPQ_EMU)
  return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
#else
  return at::empty(sizes, options);
#endif
}

inline cuda::ActDtype act_dtype(at::ScalarType t) {
  return t == at::kHalf ? cuda::ActDtype::kHalf : cuda::ActDtype::kBFloat16;
}

inline void check_status(cuda::Status status, const char* kernel, const LayerView& view, int64_t m) {
  TORCH_CHECK(status == cuda::Status::kOk, "cmpq: ", kernel, " failed: ", cuda::status_message(status), " (m=", m,
              ", n=", view.n, ", k=", view.k, ")");
}

// The kernels read a 4-bit group as one 16-byte load and a 2-bit group as one 8-byte load (decode.cuh's
// load_group); rows are whole groups, so the tensors' first bytes must be aligned that far. Fresh tensors
// always are; a view at an odd storage offset is refused by name rather than faulting on the device (a copy
// per call would silently cost a full read and write of the weights).
inline void check_codes_alignment(const LayerView& view) {
  constexpr int kAlign[kNumSegments] = {16, 4, 8};  // 4-, 3-, 2-bit: the widest load of a group
  for (int s = 0; s < kNumSegments; ++s) {
    const auto address = reinterpret_cast<uintptr_t>(view.codes[s]);
    TORCH_CHECK_VALUE(view.seg_k[s] == 0 || address % kAlign[s] == 0, "cmpq: codes", segment_bits(s), " must be ",
                      kAlign[s], "-byte aligned for the GPU kernels, but its data starts ", address % kAlign[s],
                      " bytes past a boundary (a view at a storage offset?); pass a fresh copy (.clone())");
  }
}

// Rows row_begin .. + rows of W in packed column order, into w (decode_rows(rows) x k, `w`'s dtype).
inline void gpu_decode_rows(const LayerView& view, int row_begin, int rows, at::Tensor& w, cudaStream_t stream) {
  check_status(cuda::launch_decode(view, row_begin, rows, w.data_ptr(), act_dtype(w.scalar_type()), stream), "decode",
               view, 0);
}

// m > kGemmMaxM: y = x[:, perm] @ W.T a tile of rows at a time, each decoded into one reused workspace and
// multiplied by cuBLAS straight into its columns of y (a strided output; no copy).
inline at::Tensor gpu_gemm_decoded(const at::Tensor& x, const at::Tensor& perm, const LayerView& view,
                                   const std::optional<at::Tensor>& bias, cudaStream_t stream) {
  const int tile_rows = cuda::decode_tile_rows(view);
  at::Tensor workspace = new_output({cuda::decode_rows(std::min(tile_rows, view.n)), view.k}, x.options());
  at::Tensor y = new_output({x.size(0), view.n}, x.options());
  const at::Tensor x_packed = x.index_select(1, perm);  // int32 indices: no per-call conversion of perm
  // cuBLAS adds bias in the activation type here: one extra rounding of bias, below the weight rounding.
  const std::optional<at::Tensor> bias_x = bias.has_value() ? std::optional(bias->to(x.scalar_type())) : std::nullopt;
  for (int row0 = 0; row0 < view.n; row0 += tile_rows) {
    const int rows = std::min(tile_rows, view.n - row0);
    gpu_decode_rows(view, row0, rows, workspace, stream);
    at::Tensor out = y.narrow(1, row0, rows);
    const at::Tensor w_tile = workspace.narrow(0, 0, rows).t();
    if (bias_x.has_value())
      at::addmm_out(out, bias_x->narrow(0, row0, rows), x_packed, w_tile);
    else
      at::mm_out(out, x_packed, w_tile);
  }
  return y;
}

// The arguments as gemm_op / dequantize_op (torch_view.h) hand them over, already checked.
inline at::Tensor gpu_gemm(const at::Tensor& x, const at::Tensor& perm, const LayerView& view,
                           const std::optional<at::Tensor>& bias, cudaStream_t stream) {
  check_codes_alignment(view);
  const int64_t m = x.size(0);
  std::optional<at::Tensor> bias_f32;  // the kernels add bias in FP32, before the one output rounding
  if (bias.has_value()) bias_f32 = bias->to(at::kFloat).contiguous();
  if (m == 0) return at::empty({0, view.n}, x.options());
  if (m <= cuda::kGemmMaxM) {
    at::Tensor y = new_output({m, view.n}, x.options());
    const float* bias_ptr = bias_f32.has_value() ? bias_f32->data_ptr<float>() : nullptr;
    const at::Tensor x_packed =
        new_output({cuda::x_packed_elements(view, static_cast<int>(m))}, x.options().dtype(at::kHalf));
    std::optional<at::Tensor> absmax;  // bf16 rows are scaled into fp16 range by a power of two
    if (x.scalar_type() == at::kBFloat16) absmax = x.abs().amax(1);
    const cuda::XWorkspace workspace{x_packed.data_ptr(), absmax.has_value() ? absmax->data_ptr() : nullptr};
    const auto launch = m <= cuda::kGemvMaxM ? cuda::launch_gemv : cuda::launch_gemm;
    check_status(launch(view, x.data_ptr(), perm.data_ptr<int32_t>(), bias_ptr, y.data_ptr(), static_cast<int>(m),
                        act_dtype(x.scalar_type()), workspace, stream),
                 m <= cuda::kGemvMaxM ? "gemv" : "gemm", view, m);
    return y;
  }
  return gpu_gemm_decoded(x, perm, view, bias, stream);
}

inline at::Tensor gpu_dequantize(const at::Tensor& perm, const LayerView& view, at::ScalarType dtype,
                                 cudaStream_t stream) {
  check_codes_alignment(view);
  // Decoding in FP16 is exact for codebook values; only outlier sums round (once).
  const at::ScalarType decode_dtype = dtype == at::kBFloat16 ? at::kBFloat16 : at::kHalf;
  at::Tensor w_packed = new_output({cuda::decode_rows(view.n), view.k}, perm.options().dtype(decode_dtype));
  gpu_decode_rows(view, 0, view.n, w_packed, stream);
  w_packed = w_packed.narrow(0, 0, view.n);
  return at::empty_like(w_packed).index_copy_(1, perm.to(at::kLong), w_packed).to(dtype);
}

}  // namespace cmpq
