// emu_ops.cpp — the CUDA kernels' exact sources, compiled for the host under the SIMT emulation
// (csrc/emu/kernels.cpp), exposed as torch.ops.cmpq_emu.* on CPU tensors with the schemas of cmpq::gemm,
// cmpq::dequantize and the three cmpq::mixllm_* ops (the latter with the CPU ops' value checks, so bad input
// raises exactly as there). This is how CI, which has no GPU, tests the kernel logic. Keep shapes small: an
// emulated launch runs every CUDA thread as a fiber.
#include <Python.h>

#include <torch/library.h>
#include <torch/torch.h>

// Torch first: the emulation defines CUDA keywords (__shared__, threadIdx, ...) as macros.
#define CMPQ_EMU 1
#include "gpu_ops.h"
#include "mixllm_gpu_ops.h"

namespace {

at::Tensor gemm_emu(const at::Tensor& x, const at::Tensor& perm, const cmpq::LayerView& view,
                    const std::optional<at::Tensor>& bias) {
  return cmpq::gpu_gemm(x, perm, view, bias, nullptr);
}

at::Tensor dequantize_emu(const at::Tensor& perm, const cmpq::LayerView& view, at::ScalarType dtype) {
  return cmpq::gpu_dequantize(perm, view, dtype, nullptr);
}

at::Tensor mixllm_gemm_emu(const at::Tensor& x, MIXLLM_TENSORS(MIXLLM_PARAM) const std::optional<at::Tensor>& bias,
                           int64_t act_bits, int64_t format_version) {
  return cmpq::mixllm::gpu_gemm(x, MIXLLM_TENSORS(MIXLLM_ARG) bias, act_bits, format_version, /*check_values=*/true,
                                nullptr);
}

at::Tensor mixllm_dequantize_emu(MIXLLM_TENSORS(MIXLLM_PARAM) int64_t format_version, at::ScalarType dtype) {
  return cmpq::mixllm::gpu_dequantize(MIXLLM_TENSORS(MIXLLM_ARG) format_version, dtype, /*check_values=*/true,
                                      nullptr);
}

std::tuple<at::Tensor, at::Tensor> mixllm_quantize_activations_emu(const at::Tensor& x) {
  return cmpq::mixllm::gpu_quantize_activations_op(x, nullptr);
}

// Fiber order inside each emulated block (csrc/emu/emu.h, Schedule): lane-level "forward", "reverse",
// "random" and warp-serial "warp-forward", "warp-reverse", "warp-random"; `seed` drives the random ones.
void set_schedule(const std::string& order, int64_t seed) {
  cmpq::emu::Schedule schedule;
  TORCH_CHECK_VALUE(cmpq::emu::parse_schedule(order, &schedule), "cmpq_emu.set_schedule: order must be ",
                    cmpq::emu::kScheduleNames, ", got ", order);
  cmpq::emu::set_schedule(schedule, static_cast<uint64_t>(seed));
}

}  // namespace

TORCH_LIBRARY(cmpq_emu, m) {
  m.def(cmpq::kGemmSchema);
  m.def(cmpq::kDequantizeSchema);
  m.def(cmpq::mixllm::kGemmSchema);
  m.def(cmpq::mixllm::kDequantizeSchema);
  m.def(cmpq::mixllm::kQuantizeActivationsSchema);
  m.def("set_schedule(str order, int seed) -> ()", &set_schedule);
  m.def("set_hazard_check(bool on) -> ()", &cmpq::emu::set_hazard_check);  // shared-memory hazards (hazards.cpp)
}

TORCH_LIBRARY_IMPL(cmpq_emu, CPU, m) {
  m.impl("gemm", &cmpq::gemm_op<gemm_emu, /*kAllowFloat32=*/false>);
  m.impl("dequantize", &cmpq::dequantize_op<dequantize_emu>);
  m.impl("mixllm_gemm", &mixllm_gemm_emu);
  m.impl("mixllm_dequantize", &mixllm_dequantize_emu);
  m.impl("mixllm_quantize_activations", &mixllm_quantize_activations_emu);
}

PyMODINIT_FUNC PyInit__C_emu(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_emu",
                                      "CUDA kernels run on the CPU under SIMT emulation (tests)", -1, nullptr};
  return PyModule_Create(&module);
}
