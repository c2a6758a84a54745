// mixllm_gpu_ops.h — the GPU implementations of cmpq::mixllm_gemm / mixllm_dequantize /
// mixllm_quantize_activations, written once for two builds, like gpu_ops.h for the CMPQ ops: cuda/cmpq_cuda.cpp
// (real CUDA, current stream, no value checks: see mixllm_view.h) and emu_ops.cpp (the same kernel sources on the
// host under the SIMT emulation, CPU tensors, value checks on, so bad input raises exactly as on the CPU).
//
//   act_bits 8:  mixllm_quantize (activation codes + scales) then mixllm_gemm (int8 tensor cores), two launches.
//   act_bits 16: mixllm_dequantize to a float32 W [n, k], then at::mm in FP32 (cuBLAS on a GPU): exact weights,
//                FP32 products as on the CPU, at the cost of an n * k * 4-byte workspace per call.
#pragma once

#include <optional>

#include <torch/torch.h>

#include "cuda/launchers.h"
#include "gpu_ops.h"
#include "mixllm_view.h"

namespace cmpq {
namespace mixllm {

inline cuda::ActDtype mixllm_act_dtype(at::ScalarType t) {
  return t == at::kFloat ? cuda::ActDtype::kFloat : act_dtype(t);
}

inline void check_mixllm_status(cuda::Status status, const char* kernel, const View& view, int64_t m) {
  TORCH_CHECK(status == cuda::Status::kOk, "cmpq.mixllm: ", kernel, " failed: ", cuda::status_message(status),
              " (m=", m, ", n=", view.n, ", k=", view.k, ")");
}

// The kernels read q8 8 bytes and q4 4 bytes at a time; a contiguous tensor viewed at an odd offset gets an
// aligned copy (fresh allocations are always aligned, so this costs nothing in practice). Anything else goes to
// the checks unchanged, which reject it as the CPU op does.
inline at::Tensor aligned(const at::Tensor& t, int64_t bytes) {
  const bool misaligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes != 0;
  return misaligned && t.is_contiguous() ? t.clone() : t;
}

// (q int8 [m, k], scale fp16 [m, G]) of x [m, k], already checked. Emulated runs poison both first (gpu_ops.h's
// new_output for the scales; -128, a code the quantizer never writes, for the codes).
inline std::tuple<at::Tensor, at::Tensor> gpu_quantize_activations(const at::Tensor& x, cudaStream_t stream) {
  const int64_t m = x.size(0), k = x.size(1);
#if defined(CMPQ_EMU)
  at::Tensor q = at::full({m, k}, -128, x.options().dtype(at::kChar));
#else
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
#endif
  at::Tensor scale = new_output({m, groups_of(k)}, x.options().dtype(at::kHalf));
  if (m > 0) {
    const at::Tensor xc = x.contiguous();
    const cuda::Status status =
        cuda::launch_mixllm_quantize(xc.data_ptr(), static_cast<int>(m), static_cast<int>(k),
                                     mixllm_act_dtype(x.scalar_type()), q.data_ptr<int8_t>(),
                                     reinterpret_cast<uint16_t*>(scale.data_ptr<at::Half>()), stream);
    TORCH_CHECK(status == cuda::Status::kOk, "cmpq.mixllm: quantize failed: ", cuda::status_message(status), " (m=",
                m, ", k=", k, ")");
  }
  return {q, scale};
}

// W [n, k] float32 in output-row order.
inline at::Tensor gpu_dequantize_f32(const View& view, const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor w = new_output({view.n, view.k}, options.dtype(at::kFloat));
  check_mixllm_status(cuda::launch_mixllm_dequantize(view, w.data_ptr<float>(), stream), "dequantize", view, 0);
  return w;
}

// Backend-specific entry points call these with the flat op arguments. check_values: see mixllm_view.h.
inline at::Tensor gpu_gemm(const at::Tensor& x, MIXLLM_TENSORS(MIXLLM_PARAM) const std::optional<at::Tensor>& bias,
                           int64_t act_bits, int64_t format_version, bool check_values, cudaStream_t stream) {
  const at::Tensor q8a = aligned(q8, 8), q4a = aligned(q4, 4);
  const View view = check_gemm_args(x, Args{idx8, q8a, s8, idx4, q4a, s4, z4}, bias, act_bits, format_version,
                                    check_values);
  const int64_t m = x.size(0);
  std::optional<at::Tensor> bias_f32;  // added in FP32 before the one output rounding, as on the CPU
  if (bias.has_value()) bias_f32 = bias->to(at::kFloat).contiguous();
  if (m == 0) return at::empty({0, view.n}, x.options());
  if (act_bits == 16) {
    at::Tensor y = at::mm(x.to(at::kFloat), gpu_dequantize_f32(view, x.options(), stream).t());
    if (bias_f32.has_value()) y.add_(*bias_f32);
    return y.to(x.scalar_type());
  }
  const auto [q, scale] = gpu_quantize_activations(x, stream);
  at::Tensor y = new_output({m, view.n}, x.options());
  check_mixllm_status(cuda::launch_mixllm_gemm(view, q.data_ptr<int8_t>(),
                                               reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                                               bias_f32.has_value() ? bias_f32->data_ptr<float>() : nullptr,
                                               y.data_ptr(), static_cast<int>(m), mixllm_act_dtype(x.scalar_type()),
                                               stream),
                      "gemm", view, m);
  return y;
}

inline at::Tensor gpu_dequantize(MIXLLM_TENSORS(MIXLLM_PARAM) int64_t format_version, at::ScalarType dtype,
                                 bool check_values, cudaStream_t stream) {
  check_version(format_version);
  const View view = make_view(Args{MIXLLM_TENSORS(MIXLLM_ARG)}, idx8.device(), check_values);
  return gpu_dequantize_f32(view, idx8.options(), stream).to(dtype);  // exact in FP32, rounded once
}

inline std::tuple<at::Tensor, at::Tensor> gpu_quantize_activations_op(const at::Tensor& x, cudaStream_t stream) {
  check_quantize_input(x);
  return gpu_quantize_activations(x, stream);
}

}  // namespace mixllm
}  // namespace cmpq
