// cmpq_ops.cpp — the cmpq:: op library (schemas; the layer ops' signature is written once in
// torch_view.h, shared with the CUDA and emulated builds) and its CPU implementations. CUDA
// implementations register against these schemas from cuda/cmpq_cuda.cpp. Input checks (torch_view.h)
// print the offending values; cmpq_kernels/ops.py repeats the shape and dtype rules in the fake (meta)
// implementations so torch.compile sees the same contract.
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "cmpq_layout.h"
#include "cpu/gemm_cpu.h"
#include "cpu_isa_env.h"
#include "torch_view.h"

namespace cmpq {
namespace {

// Batch rows above which the CPU op decodes blocks of weights and calls BLAS instead of the direct
// kernel (measured in bench/bench_cpu.py; see README "CPU kernel").
constexpr int64_t kCpuDirectMaxM = 16;
// Rows decoded per BLAS call in the large-batch path: bounds the float workspace to a few MiB.
constexpr int64_t kDecodeBlockRows = 256;

// Decodes blocks of rows to float and multiplies them with BLAS: exact up to summation order, and fast
// once a decoded weight is reused by many activation rows.
void gemm_decode_blas(const LayerView& view, const at::Tensor& x_packed, at::Tensor& y, cpu::Isa isa) {
  const int64_t block = std::min<int64_t>(kDecodeBlockRows, view.n);
  at::Tensor w = at::empty({block, view.k}, x_packed.options());
  for (int64_t r0 = 0; r0 < view.n; r0 += block) {
    const int64_t rows = std::min<int64_t>(block, view.n - r0);
    at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
      cpu::decode_rows(view, w.data_ptr<float>() + b * view.k, view.k, static_cast<int>(r0 + b),
                       static_cast<int>(r0 + e), isa);
    });
    y.narrow(1, r0, rows).copy_(at::mm(x_packed, w.narrow(0, 0, rows).t()));
  }
}

at::Tensor gemm_cpu(const at::Tensor& x, const at::Tensor& perm, const LayerView& view,
                    const std::optional<at::Tensor>& bias) {
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, view.n}, x.options().dtype(at::kFloat));
  if (m > 0) {
    // Gathering x into packed column order once makes every kernel read activations contiguously.
    const at::Tensor x_packed = x.to(at::kFloat).index_select(1, perm.to(at::kLong)).contiguous();
    const cpu::Isa isa = cpu_isa_for_call();
    if (m > kCpuDirectMaxM) {
      gemm_decode_blas(view, x_packed, y, isa);
    } else {
      const float* xp = x_packed.data_ptr<float>();
      float* yp = y.data_ptr<float>();
      // The int8 kernel's activations are quantized once per call, before the threads split the rows.
      const bool int8 = isa == cpu::Isa::kAvx512Int8;
      cpu::Int8Activations acts;
      if (int8) cpu::quantize_activations(view, xp, view.k, static_cast<int>(m), &acts);
      at::parallel_for(0, view.n, 16, [&](int64_t b, int64_t e) {
        if (int8)
          cpu::gemm_rows_int8(view, acts, xp, view.k, yp, view.n, static_cast<int>(b), static_cast<int>(e));
        else
          cpu::gemm_rows(view, xp, view.k, static_cast<int>(m), yp, view.n, static_cast<int>(b), static_cast<int>(e),
                         isa);
      });
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

at::Tensor dequantize_cpu(const at::Tensor& perm, const LayerView& view, at::ScalarType dtype) {
  at::Tensor w_packed = at::empty({view.n, view.k}, perm.options().dtype(at::kFloat));
  const cpu::Isa isa = cpu_isa_for_call();
  at::parallel_for(0, view.n, 8, [&](int64_t b, int64_t e) {
    cpu::decode_rows(view, w_packed.data_ptr<float>() + b * view.k, view.k, static_cast<int>(b),
                     static_cast<int>(e), isa);
  });
  at::Tensor w = at::empty_like(w_packed);
  w.index_copy_(1, perm.to(at::kLong), w_packed);
  return w.to(dtype);
}

at::Tensor unpack_codes_cpu(const at::Tensor& words, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4, "cmpq.unpack_codes: bits must be 2, 3 or 4, got ", bits);
  check_tensor(words, at::kInt, words.device(), "words");
  TORCH_CHECK_VALUE(words.dim() == 2 && whole_groups(words.size(1), bits),
                    "cmpq.unpack_codes: words must be [rows, groups*", bits, "], got ", words.sizes());
  const int64_t groups = words.size(1) / bits;
  at::Tensor codes =
      at::empty({words.size(0), channels_in_words(words.size(1), bits)}, words.options().dtype(at::kByte));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  uint8_t* dst = codes.data_ptr<uint8_t>();
  with_segment_bits(static_cast<int>(bits), [&](auto seg) {
    for (int64_t g = 0; g < words.size(0) * groups; ++g)
      unpack_group<seg.kBits>(src + g * seg.kWordsPerGroup, dst + g * kGroupCodes);
  });
  return codes;
}

std::string cpu_isa() { return cpu::isa_name(cpu_isa_for_call()); }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (cpu::Isa isa : cpu::kAllIsas)
    if (cpu::supports(isa)) names.push_back(cpu::isa_name(isa));
  return names;
}

std::vector<std::string> layer_fields() {
#define CMPQ_NAME(name) #name,
  return {CMPQ_LAYER_TENSORS(CMPQ_NAME)};
#undef CMPQ_NAME
}

}  // namespace
}  // namespace cmpq

TORCH_LIBRARY(cmpq, m) {
  m.def(cmpq::kGemmSchema);  // schemas shared with cmpq_emu: torch_view.h
  m.def(cmpq::kDequantizeSchema);
  // Names of the layer's tensor arguments of gemm/dequantize, in order (for Python: one source of truth).
  m.def("layer_fields() -> str[]", &cmpq::layer_fields);
  // uint8 codes [rows, groups * 32] from packed int32 words [rows, groups * bits] (layout tests).
  m.def("unpack_codes(Tensor words, int bits) -> Tensor");
  // Instruction set the CPU kernels use for the next call ("avx512", "avx2", "scalar" or the opt-in
  // "avx512-int8"; CMPQ_CPU_SIMD).
  m.def("cpu_isa() -> str", &cmpq::cpu_isa);
  // Every instruction set this CPU can run: scalar first, then the exact ones, then "avx512-int8".
  m.def("cpu_isas() -> str[]", &cmpq::cpu_isas);
}

TORCH_LIBRARY_IMPL(cmpq, CPU, m) {
  m.impl("gemm", &cmpq::gemm_op<cmpq::gemm_cpu, /*kAllowFloat32=*/true>);
  m.impl("dequantize", &cmpq::dequantize_op<cmpq::dequantize_cpu>);
  m.impl("unpack_codes", &cmpq::unpack_codes_cpu);
}

// An importable module so `import cmpq_kernels._C` loads the library and runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cmpq CPU ops (see torch.ops.cmpq)", -1, nullptr};
  return PyModule_Create(&module);
}
