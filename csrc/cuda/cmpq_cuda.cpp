// cmpq_cuda.cpp — CUDA implementations of the cmpq:: ops (schemas live in csrc/cmpq_ops.cpp).
//
// Host-compiled (no kernels here): device guard, current stream, then the shared dispatch in gpu_ops.h.
// No host synchronisation, so the ops are CUDA-graph capturable.
#include <Python.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gpu_ops.h"

namespace {

at::Tensor gemm_cuda(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& codes4, const at::Tensor& codes3,
                     const at::Tensor& codes2, const at::Tensor& codebook4, const at::Tensor& codebook3,
                     const at::Tensor& codebook2, const at::Tensor& row_ptr, const at::Tensor& col,
                     const at::Tensor& val, const std::optional<at::Tensor>& bias, int64_t codebook_rows,
                     int64_t format_version) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return cmpq::gpu_gemm(x, perm, codes4, codes3, codes2, codebook4, codebook3, codebook2, row_ptr, col, val, bias,
                        codebook_rows, format_version, c10::cuda::getCurrentCUDAStream());
}

at::Tensor dequantize_cuda(const at::Tensor& perm, const at::Tensor& codes4, const at::Tensor& codes3,
                           const at::Tensor& codes2, const at::Tensor& codebook4, const at::Tensor& codebook3,
                           const at::Tensor& codebook2, const at::Tensor& row_ptr, const at::Tensor& col,
                           const at::Tensor& val, int64_t codebook_rows, int64_t format_version,
                           at::ScalarType dtype) {
  const c10::cuda::OptionalCUDAGuard guard(perm.device());
  return cmpq::gpu_dequantize(perm, codes4, codes3, codes2, codebook4, codebook3, codebook2, row_ptr, col, val,
                              codebook_rows, format_version, dtype, c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(cmpq, CUDA, m) {
  m.impl("gemm", &gemm_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "cmpq CUDA ops (see torch.ops.cmpq)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
