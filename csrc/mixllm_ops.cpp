// mixllm_ops.cpp — the MixLLM ops of the cmpq:: library (a fragment: the library itself is defined in
// cmpq_ops.cpp) and their CPU implementations. Bad input raises TypeError/ValueError naming the argument
// (the checks, shared with the CUDA and emulated ops, are in mixllm_view.h; the CPU ops also check values);
// cmpq_kernels/ops.py repeats the shape and dtype rules in the fake (meta) implementations.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "cpu/mixllm_cpu.h"
#include "cpu_isa_env.h"
#include "mixllm_view.h"

namespace cmpq {
namespace {

namespace mx = ::cmpq::mixllm;
using cpu::mixllm::Activations;

// Stored rows dequantized per BLAS call in the W*A16 path: bounds the float workspace.
constexpr int64_t kDequantBlockRows = 256;

// The ISA for this call: CMPQ_CPU_SIMD's rule; an automatic pick of avx512 on a CPU without VNNI runs avx2,
// an explicit one is an error (never a silent fallback from a named ISA).
cpu::Isa mixllm_isa() {
  const cpu::Isa isa = cpu_isa_for_call();
  if (cpu::mixllm::isa_supported(isa)) return isa;
  const char* env = getenv("CMPQ_CPU_SIMD");
  const bool automatic = env == nullptr || *env == '\0' || strcmp(env, "auto") == 0 || strcmp(env, "1") == 0;
  TORCH_CHECK_VALUE(automatic, "CMPQ_CPU_SIMD=", env, ": the MixLLM kernel for it needs avx512vnni, which this CPU ",
                    "lacks; use avx2");
  return cpu::Isa::kAvx2;
}

// Stored rows [r0, r0 + rows) dequantized into w (float [rows, k]).
void dequantize_block(const mx::View& view, at::Tensor& w, int64_t r0, int64_t rows) {
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    cpu::mixllm::dequantize_rows(view, w.data_ptr<float>() + b * view.k, view.k, static_cast<int>(r0 + b),
                                 static_cast<int>(r0 + e));
  });
}

at::Tensor stored_to_output_rows(const at::Tensor& idx8, const at::Tensor& idx4) {
  return at::cat({idx8, idx4}).to(at::kLong);
}

at::Tensor mixllm_gemm_cpu(const at::Tensor& x, MIXLLM_TENSORS(MIXLLM_PARAM) const std::optional<at::Tensor>& bias,
                           int64_t act_bits, int64_t format_version) {
  const mx::View view = mx::check_gemm_args(x, mx::Args{MIXLLM_TENSORS(MIXLLM_ARG)}, bias, act_bits, format_version);
  const at::ScalarType t = x.scalar_type();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, view.n}, x.options().dtype(at::kFloat));
  if (m > 0) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    if (act_bits == 8) {
      const cpu::Isa isa = mixllm_isa();
      Activations acts;  // once per call, before the threads split the rows
      cpu::mixllm::quantize_activations(xf.data_ptr<float>(), view.k, static_cast<int>(m), view.k, &acts);
      at::parallel_for(0, view.n, 16, [&](int64_t b, int64_t e) {
        cpu::mixllm::gemm_rows(view, acts, y.data_ptr<float>(), view.n, static_cast<int>(b), static_cast<int>(e), isa);
      });
    } else {
      const at::Tensor rows = stored_to_output_rows(idx8, idx4);
      const int64_t block = std::min<int64_t>(kDequantBlockRows, view.n);
      at::Tensor w = at::empty({block, view.k}, xf.options());
      for (int64_t r0 = 0; r0 < view.n; r0 += block) {
        const int64_t count = std::min<int64_t>(block, view.n - r0);
        dequantize_block(view, w, r0, count);
        y.index_copy_(1, rows.narrow(0, r0, count), at::mm(xf, w.narrow(0, 0, count).t()));
      }
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(t);
}

at::Tensor mixllm_dequantize_cpu(MIXLLM_TENSORS(MIXLLM_PARAM) int64_t format_version, at::ScalarType dtype) {
  mx::check_version(format_version);
  const mx::View view = mx::make_view(mx::Args{MIXLLM_TENSORS(MIXLLM_ARG)}, idx8.device());
  at::Tensor stored = at::empty({view.n, view.k}, idx8.options().dtype(at::kFloat));
  dequantize_block(view, stored, 0, view.n);
  at::Tensor w = at::empty_like(stored);
  w.index_copy_(0, stored_to_output_rows(idx8, idx4), stored);
  return w.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> mixllm_quantize_activations_cpu(const at::Tensor& x) {
  mx::check_quantize_input(x);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int m = static_cast<int>(x.size(0)), k = static_cast<int>(x.size(1));
  Activations acts;
  cpu::mixllm::quantize_activations(xf.data_ptr<float>(), k, m, k, &acts);
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m, acts.groups}, x.options().dtype(at::kHalf));
  for (int i = 0; i < m; ++i)
    memcpy(q.data_ptr<int8_t>() + static_cast<int64_t>(i) * k, acts.natural.data() + i * acts.stride, k);
  if (!acts.scale_bits.empty()) memcpy(scale.data_ptr<at::Half>(), acts.scale_bits.data(), acts.scale_bits.size() * 2);
  return {q, scale};
}

at::Tensor mixllm_unpack_nibbles_cpu(const at::Tensor& packed, int64_t count) {
  check_tensor(packed, at::kByte, packed.device(), "packed");
  TORCH_CHECK_VALUE(count >= 0 && packed.dim() == 2 && packed.size(1) == mx::nibble_bytes(count),
                    "cmpq.mixllm_unpack_nibbles: packed must be [rows, ceil(count/2)] with count >= 0, got ",
                    packed.sizes(), " for count ", count);
  at::Tensor out = at::empty({packed.size(0), count}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t r = 0; r < packed.size(0); ++r)
    for (int64_t i = 0; i < count; ++i)
      dst[r * count + i] = static_cast<uint8_t>(mx::nibble(src + r * packed.size(1), i));
  return out;
}

}  // namespace
}  // namespace cmpq

TORCH_LIBRARY_FRAGMENT(cmpq, m) {
  // y[m, n] = x[m, k] @ W.T (+ bias) of a MixLLM layer; act_bits 8 quantizes x per token and 128-wide group
  // (exact integer group sums), 16 multiplies x by the exactly dequantized W. Output dtype = x dtype.
  m.def(cmpq::mixllm::kGemmSchema);
  // W[n, k] in output-row order, as dtype.
  m.def(cmpq::mixllm::kDequantizeSchema);
  // (q int8 [m, k], scale fp16 [m, G]): the kernels' activation quantizer, for tests against the reference.
  m.def(cmpq::mixllm::kQuantizeActivationsSchema);
  // uint8 [rows, count] from nibble-packed uint8 [rows, ceil(count/2)] (layout tests).
  m.def("mixllm_unpack_nibbles(Tensor packed, int count) -> Tensor");
}

TORCH_LIBRARY_IMPL(cmpq, CPU, m) {
  m.impl("mixllm_gemm", &cmpq::mixllm_gemm_cpu);
  m.impl("mixllm_dequantize", &cmpq::mixllm_dequantize_cpu);
  m.impl("mixllm_quantize_activations", &cmpq::mixllm_quantize_activations_cpu);
  m.impl("mixllm_unpack_nibbles", &cmpq::mixllm_unpack_nibbles_cpu);
}
