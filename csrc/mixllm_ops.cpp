// mixllm_ops.cpp — the MixLLM ops of the cmpq:: library (a fragment: the library itself is defined in
// cmpq_ops.cpp) and their CPU implementations. Bad input raises TypeError/ValueError naming the argument;
// cmpq_kernels/ops.py repeats the shape and dtype rules in the fake (meta) implementations.
//
// Unlike the CMPQ ops, these also check values the kernels depend on for memory safety and meaning: the row
// indices (every output row written exactly once, no write out of bounds) and the scales (finite, >= 0). Both
// are O(n * G) host reads, negligible next to the O(n * k) product on a CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <vector>

#include "cpu/mixllm_cpu.h"
#include "cpu_isa_env.h"
#include "mixllm_layout.h"
#include "torch_view.h"

namespace cmpq {
namespace {

namespace mx = ::cmpq::mixllm;
using cpu::mixllm::Activations;

// Stored rows dequantized per BLAS call in the W*A16 path: bounds the float workspace.
constexpr int64_t kDequantBlockRows = 256;

// The packed layer's tensors in op-argument order (mixllm_format.LAYER_FIELDS).
#define MIXLLM_TENSORS(X) X(idx8) X(q8) X(s8) X(idx4) X(q4) X(s4) X(z4)
#define MIXLLM_SCHEMA(name) "Tensor " #name ", "
#define MIXLLM_PARAM(name) const at::Tensor& name,
#define MIXLLM_ARG(name) name,

struct Args {
#define MIXLLM_MEMBER(name) const at::Tensor& name;
  MIXLLM_TENSORS(MIXLLM_MEMBER)
#undef MIXLLM_MEMBER
};

// Every stored scale finite and >= 0 (fp16 bits: exponent 31 is Inf/NaN; a set sign bit on a nonzero is < 0).
void check_scales(const at::Tensor& s, const char* name) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  for (int64_t i = 0; i < s.numel(); ++i) {
    TORCH_CHECK_VALUE((bits[i] & 0x7c00u) != 0x7c00u, "cmpq.mixllm: ", name, " holds a NaN or Inf scale at flat index ", i);
    TORCH_CHECK_VALUE((bits[i] & 0x8000u) == 0 || (bits[i] & 0x7fffu) == 0, "cmpq.mixllm: ", name,
                      " holds a negative scale at flat index ", i);
  }
}

// idx8 and idx4 together hold 0..n-1 exactly once: the kernels write y[:, idx] without bounds checks.
void check_rows(const mx::View& view) {
  std::vector<char> seen(static_cast<size_t>(view.n), 0);
  for (int r = 0; r < view.n; ++r) {
    const int32_t row = view.row_index(r);
    TORCH_CHECK_VALUE(row >= 0 && row < view.n && !seen[row], "cmpq.mixllm: idx8/idx4 must together hold 0..",
                      view.n - 1, " exactly once; stored row ", r, " maps to ", row);
    seen[row] = 1;
  }
}

mx::View make_view(const Args& a, const at::Device& device) {
  check_tensor(a.idx8, at::kInt, device, "idx8");
  check_tensor(a.q8, at::kChar, device, "q8");
  check_tensor(a.s8, at::kHalf, device, "s8");
  check_tensor(a.idx4, at::kInt, device, "idx4");
  check_tensor(a.q4, at::kByte, device, "q4");
  check_tensor(a.s4, at::kHalf, device, "s4");
  check_tensor(a.z4, at::kByte, device, "z4");
  TORCH_CHECK_VALUE(a.idx8.dim() == 1 && a.idx4.dim() == 1, "cmpq.mixllm: idx8 and idx4 must be 1-D");
  const int64_t n8 = a.idx8.size(0), n4 = a.idx4.size(0), n = n8 + n4;
  TORCH_CHECK_VALUE(a.q8.dim() == 2 && a.q8.size(0) == n8, "cmpq.mixllm: q8 must be [n8=", n8, ", k], got ", a.q8.sizes());
  const int64_t k = a.q8.size(1);
  TORCH_CHECK_VALUE(k > 0 && k % mx::kKAlign == 0 && k <= (1 << 30), "cmpq.mixllm: k (q8.size(1)) must be a positive multiple of ",
                    mx::kKAlign, ", got ", k);
  TORCH_CHECK_VALUE(n >= 1 && n <= (1 << 30), "cmpq.mixllm: the layer needs 1..2^30 rows, got ", n);
  const int64_t groups = mx::groups_of(k);
  TORCH_CHECK_VALUE(a.q4.dim() == 2 && a.q4.size(0) == n4 && a.q4.size(1) * 2 == k, "cmpq.mixllm: q4 must be [n4=", n4,
                    ", k/2=", k / 2, "], got ", a.q4.sizes());
  TORCH_CHECK_VALUE(a.s8.dim() == 2 && a.s8.size(0) == n8 && a.s8.size(1) == groups, "cmpq.mixllm: s8 must be [", n8,
                    ", ", groups, "], got ", a.s8.sizes());
  TORCH_CHECK_VALUE(a.s4.dim() == 2 && a.s4.size(0) == n4 && a.s4.size(1) == groups, "cmpq.mixllm: s4 must be [", n4,
                    ", ", groups, "], got ", a.s4.sizes());
  TORCH_CHECK_VALUE(a.z4.dim() == 2 && a.z4.size(0) == n4 && a.z4.size(1) == mx::nibble_bytes(groups),
                    "cmpq.mixllm: z4 must be [", n4, ", ", mx::nibble_bytes(groups), "], got ", a.z4.sizes());
  mx::View view;
  view.n = static_cast<int>(n), view.k = static_cast<int>(k), view.n8 = static_cast<int>(n8);
  view.groups = static_cast<int>(groups);
  view.idx8 = a.idx8.data_ptr<int32_t>(), view.q8 = a.q8.data_ptr<int8_t>();
  view.s8 = reinterpret_cast<const uint16_t*>(a.s8.data_ptr<at::Half>());
  view.idx4 = a.idx4.data_ptr<int32_t>(), view.q4 = a.q4.data_ptr<uint8_t>();
  view.s4 = reinterpret_cast<const uint16_t*>(a.s4.data_ptr<at::Half>()), view.z4 = a.z4.data_ptr<uint8_t>();
  check_rows(view);
  check_scales(a.s8, "s8");
  check_scales(a.s4, "s4");
  return view;
}

void check_version(int64_t format_version) {
  TORCH_CHECK_VALUE(format_version == mx::kFormatVersion, "cmpq.mixllm: format_version ", format_version,
                    " is not supported by this build (expects ", mx::kFormatVersion, ")");
}

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
  check_version(format_version);
  TORCH_CHECK_VALUE(act_bits == 8 || act_bits == 16, "cmpq.mixllm_gemm: act_bits must be 8 or 16, got ", act_bits);
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "cmpq.mixllm_gemm: x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(x.dim() == 2, "cmpq.mixllm_gemm: x must be 2-D [m, k], got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "cmpq.mixllm_gemm: x must be contiguous (call .contiguous())");
  const mx::View view = make_view(Args{MIXLLM_TENSORS(MIXLLM_ARG)}, x.device());
  TORCH_CHECK_VALUE(x.size(1) == view.k, "cmpq.mixllm_gemm: x has ", x.size(1), " features but the layer has k=", view.k);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kHalf ||
                         bias->scalar_type() == at::kBFloat16,
                     "cmpq.mixllm_gemm: bias must be float32, float16 or bfloat16, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == view.n, "cmpq.mixllm_gemm: bias must be [", view.n,
                      "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "cmpq.mixllm_gemm: bias is on ", bias->device(), " but x is on ",
                      x.device());
  }
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, view.n}, x.options().dtype(at::kFloat));
  if (m > 0) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    if (act_bits == 8) {
      const cpu::Isa isa = mixllm_isa();
      Activations acts;  // once per call, before the threads split the rows
      TORCH_CHECK_VALUE(m <= (1 << 30), "cmpq.mixllm_gemm: too many tokens (", m, ")");
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
  check_version(format_version);
  const mx::View view = make_view(Args{MIXLLM_TENSORS(MIXLLM_ARG)}, idx8.device());
  at::Tensor stored = at::empty({view.n, view.k}, idx8.options().dtype(at::kFloat));
  dequantize_block(view, stored, 0, view.n);
  at::Tensor w = at::empty_like(stored);
  w.index_copy_(0, stored_to_output_rows(idx8, idx4), stored);
  return w.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> mixllm_quantize_activations_cpu(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "cmpq.mixllm_quantize_activations: x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.size(1) % mx::kKAlign == 0 && x.size(1) <= (1 << 30) &&
                        x.size(0) <= (1 << 30),
                    "cmpq.mixllm_quantize_activations: x must be [m, k] with k a positive multiple of ", mx::kKAlign,
                    ", got ", x.sizes());
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

constexpr const char* kMixllmGemmSchema = "mixllm_gemm(Tensor x, " MIXLLM_TENSORS(MIXLLM_SCHEMA)
    "Tensor? bias, int act_bits, int format_version) -> Tensor";
constexpr const char* kMixllmDequantizeSchema = "mixllm_dequantize(" MIXLLM_TENSORS(MIXLLM_SCHEMA)
    "int format_version, ScalarType dtype) -> Tensor";

}  // namespace
}  // namespace cmpq

TORCH_LIBRARY_FRAGMENT(cmpq, m) {
  // y[m, n] = x[m, k] @ W.T (+ bias) of a MixLLM layer; act_bits 8 quantizes x per token and 128-wide group
  // (exact integer group sums), 16 multiplies x by the exactly dequantized W. Output dtype = x dtype.
  m.def(cmpq::kMixllmGemmSchema);
  // W[n, k] in output-row order, as dtype.
  m.def(cmpq::kMixllmDequantizeSchema);
  // (q int8 [m, k], scale fp16 [m, G]): the kernels' activation quantizer, for tests against the reference.
  m.def("mixllm_quantize_activations(Tensor x) -> (Tensor, Tensor)");
  // uint8 [rows, count] from nibble-packed uint8 [rows, ceil(count/2)] (layout tests).
  m.def("mixllm_unpack_nibbles(Tensor packed, int count) -> Tensor");
}

TORCH_LIBRARY_IMPL(cmpq, CPU, m) {
  m.impl("mixllm_gemm", &cmpq::mixllm_gemm_cpu);
  m.impl("mixllm_dequantize", &cmpq::mixllm_dequantize_cpu);
  m.impl("mixllm_quantize_activations", &cmpq::mixllm_quantize_activations_cpu);
  m.impl("mixllm_unpack_nibbles", &cmpq::mixllm_unpack_nibbles_cpu);
}
