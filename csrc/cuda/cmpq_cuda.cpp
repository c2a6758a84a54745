// cmpq_cuda.cpp — CUDA implementations of the cmpq:: ops (schemas live in csrc/cmpq_ops.cpp and
// csrc/mixllm_ops.cpp).
//
// Host-compiled (no kernels here): the shared checks (torch_view.h, mixllm_view.h), device guard, current
// stream, then the shared dispatch in gpu_ops.h and mixllm_gpu_ops.h. No host synchronisation, so the ops are
// CUDA-graph capturable: the MixLLM ops therefore skip the CPU ops' value checks of idx and scales (a
// device-to-host copy each call); MixLLMLayer.validate makes them at load time.
#include <Python.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gpu_ops.h"
#include "../mixllm_gpu_ops.h"

namespace {

at::Tensor gemm_cuda(const at::Tensor& x, const at::Tensor& perm, const cmpq::LayerView& view,
                     const std::optional<at::Tensor>& bias) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return cmpq::gpu_gemm(x, perm, view, bias, c10::cuda::getCurrentCUDAStream());
}

at::Tensor dequantize_cuda(const at::Tensor& perm, const cmpq::LayerView& view, at::ScalarType dtype) {
  const c10::cuda::OptionalCUDAGuard guard(perm.device());
  return cmpq::gpu_dequantize(perm, view, dtype, c10::cuda::getCurrentCUDAStream());
}

at::Tensor mixllm_gemm_cuda(const at::Tensor& x, MIXLLM_TENSORS(MIXLLM_PARAM) const std::optional<at::Tensor>& bias,
                            int64_t act_bits, int64_t format_version) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return cmpq::mixllm::gpu_gemm(x, MIXLLM_TENSORS(MIXLLM_ARG) bias, act_bits, format_version, /*check_values=*/false,
                                c10::cuda::getCurrentCUDAStream());
}

at::Tensor mixllm_dequantize_cuda(MIXLLM_TENSORS(MIXLLM_PARAM) int64_t format_version, at::ScalarType dtype) {
  const c10::cuda::OptionalCUDAGuard guard(idx8.device());
  return cmpq::mixllm::gpu_dequantize(MIXLLM_TENSORS(MIXLLM_ARG) format_version, dtype, /*check_values=*/false,
                                      c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor> mixllm_quantize_activations_cuda(const at::Tensor& x) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return cmpq::mixllm::gpu_quantize_activations_op(x, c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(cmpq, CUDA, m) {
  m.impl("gemm", &cmpq::gemm_op<gemm_cuda, /*kAllowFloat32=*/false>);
  m.impl("dequantize", &cmpq::dequantize_op<dequantize_cuda>);
  m.impl("mixllm_gemm", &mixllm_gemm_cuda);
  m.impl("mixllm_dequantize", &mixllm_dequantize_cuda);
  m.impl("mixllm_quantize_activations", &mixllm_quantize_activations_cuda);
}

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "cmpq CUDA ops (see torch.ops.cmpq)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
