// gpu_ops.h — the GPU implementations of cmpq::gemm / cmpq::dequantize, written once for two builds:
// cuda/cmpq_cuda.cpp (real CUDA, current stream) and emu/emu_ops.cpp (the same kernel sources on the host
// under the SIMT emulation, CPU tensors). Only the stream and the registration differ between them.
//
// Dispatch by batch rows m (one table; thresholds to be set from GPU measurements, see README):
//   m <= kGemvMaxM      fused GEMV (gemv.cu)
//   m <= kGemmMaxM      tensor-core GEMM (gemm_tc.cu)
//   otherwise           decode to a dense FP16/BF16 workspace (dequant.cu), then cuBLAS via at::mm
#pragma once

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

// Packed-order dense W [n, k] in `dtype` (float16 / bfloat16).
inline at::Tensor gpu_decode_packed(const LayerView& view, const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor w = new_output({view.n, view.k}, options);
  check_status(cuda::launch_decode(view, w.data_ptr(), act_dtype(options.dtype().toScalarType()), stream), "decode",
               view, 0);
  return w;
}

// The arguments as gemm_op / dequantize_op (torch_view.h) hand them over, already checked.
inline at::Tensor gpu_gemm(const at::Tensor& x, const at::Tensor& perm, const LayerView& view,
                           const std::optional<at::Tensor>& bias, cudaStream_t stream) {
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
  const at::Tensor w = gpu_decode_packed(view, x.options(), stream);
  const at::Tensor x_packed = x.index_select(1, perm.to(at::kLong));
  // cuBLAS adds bias in the activation type here: one extra rounding of bias, below the weight rounding.
  return bias.has_value() ? at::addmm(bias->to(x.scalar_type()), x_packed, w.t()) : at::mm(x_packed, w.t());
}

inline at::Tensor gpu_dequantize(const at::Tensor& perm, const LayerView& view, at::ScalarType dtype,
                                 cudaStream_t stream) {
  // Decoding in FP16 is exact for codebook values; only outlier sums round (once).
  const at::ScalarType decode_dtype = dtype == at::kBFloat16 ? at::kBFloat16 : at::kHalf;
  const at::Tensor w_packed = gpu_decode_packed(view, perm.options().dtype(decode_dtype), stream);
  return at::empty_like(w_packed).index_copy_(1, perm.to(at::kLong), w_packed).to(dtype);
}

}  // namespace cmpq
