// mixllm_view.h — the MixLLM ops' arguments, written once: the packed layer's tensors in op-argument order, the
// schemas, and the checks that turn the tensors into a mixllm::View. Every backend includes it (the CPU ops in
// mixllm_ops.cpp, the CUDA ops in cuda/cmpq_cuda.cpp and the emulated ones in emu_ops.cpp, the last two through
// mixllm_gpu_ops.h), so all take the same arguments and reject bad input with the same exceptions.
//
// Unlike the CMPQ ops, these can also check values the kernels depend on for memory safety and meaning: the row
// indices (every output row written exactly once) and the scales (finite, >= 0). Both are O(n * G) host reads,
// negligible next to the O(n * k) product on a CPU. On a GPU they would cost a device-to-host copy and a
// synchronisation per call, so the CUDA ops skip them (check_values = false; MixLLMLayer.validate checks the
// same at load time, and the kernels bounds-check every output index).
#pragma once

#include <optional>
#include <vector>

#include <torch/torch.h>

#include "mixllm_layout.h"
#include "torch_view.h"

namespace cmpq {
namespace mixllm {

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
inline void check_scales(const at::Tensor& s, const char* name) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  for (int64_t i = 0; i < s.numel(); ++i) {
    TORCH_CHECK_VALUE((bits[i] & 0x7c00u) != 0x7c00u, "cmpq.mixllm: ", name, " holds a NaN or Inf scale at flat index ", i);
    TORCH_CHECK_VALUE((bits[i] & 0x8000u) == 0 || (bits[i] & 0x7fffu) == 0, "cmpq.mixllm: ", name,
                      " holds a negative scale at flat index ", i);
  }
}

// idx8 and idx4 together hold 0..n-1 exactly once: the kernels write y[:, idx] without bounds checks.
inline void check_rows(const View& view) {
  std::vector<char> seen(static_cast<size_t>(view.n), 0);
  for (int r = 0; r < view.n; ++r) {
    const int32_t row = view.row_index(r);
    TORCH_CHECK_VALUE(row >= 0 && row < view.n && !seen[row], "cmpq.mixllm: idx8/idx4 must together hold 0..",
                      view.n - 1, " exactly once; stored row ", r, " maps to ", row);
    seen[row] = 1;
  }
}

// check_values: also the O(n * G) host reads of check_rows and check_scales (see the file comment).
inline View make_view(const Args& a, const at::Device& device, bool check_values = true) {
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
  TORCH_CHECK_VALUE(k > 0 && k % kKAlign == 0 && k <= (1 << 30), "cmpq.mixllm: k (q8.size(1)) must be a positive multiple of ",
                    kKAlign, ", got ", k);
  TORCH_CHECK_VALUE(n >= 1 && n <= (1 << 30), "cmpq.mixllm: the layer needs 1..2^30 rows, got ", n);
  const int64_t groups = groups_of(k);
  TORCH_CHECK_VALUE(a.q4.dim() == 2 && a.q4.size(0) == n4 && a.q4.size(1) * 2 == k, "cmpq.mixllm: q4 must be [n4=", n4,
                    ", k/2=", k / 2, "], got ", a.q4.sizes());
  TORCH_CHECK_VALUE(a.s8.dim() == 2 && a.s8.size(0) == n8 && a.s8.size(1) == groups, "cmpq.mixllm: s8 must be [", n8,
                    ", ", groups, "], got ", a.s8.sizes());
  TORCH_CHECK_VALUE(a.s4.dim() == 2 && a.s4.size(0) == n4 && a.s4.size(1) == groups, "cmpq.mixllm: s4 must be [", n4,
                    ", ", groups, "], got ", a.s4.sizes());
  TORCH_CHECK_VALUE(a.z4.dim() == 2 && a.z4.size(0) == n4 && a.z4.size(1) == nibble_bytes(groups),
                    "cmpq.mixllm: z4 must be [", n4, ", ", nibble_bytes(groups), "], got ", a.z4.sizes());
  View view;
  view.n = static_cast<int>(n), view.k = static_cast<int>(k), view.n8 = static_cast<int>(n8);
  view.groups = static_cast<int>(groups);
  view.idx8 = a.idx8.data_ptr<int32_t>(), view.q8 = a.q8.data_ptr<int8_t>();
  view.s8 = reinterpret_cast<const uint16_t*>(a.s8.data_ptr<at::Half>());
  view.idx4 = a.idx4.data_ptr<int32_t>(), view.q4 = a.q4.data_ptr<uint8_t>();
  view.s4 = reinterpret_cast<const uint16_t*>(a.s4.data_ptr<at::Half>()), view.z4 = a.z4.data_ptr<uint8_t>();
  if (check_values) {
    check_rows(view);
    check_scales(a.s8, "s8");
    check_scales(a.s4, "s4");
  }
  return view;
}

inline void check_version(int64_t format_version) {
  TORCH_CHECK_VALUE(format_version == kFormatVersion, "cmpq.mixllm: format_version ", format_version,
                    " is not supported by this build (expects ", kFormatVersion, ")");
}

// The checks of mixllm_gemm, in the order the CPU op always made them; returns the layer's view.
inline View check_gemm_args(const at::Tensor& x, const Args& a, const std::optional<at::Tensor>& bias,
                            int64_t act_bits, int64_t format_version, bool check_values = true) {
  check_version(format_version);
  TORCH_CHECK_VALUE(act_bits == 8 || act_bits == 16, "cmpq.mixllm_gemm: act_bits must be 8 or 16, got ", act_bits);
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "cmpq.mixllm_gemm: x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(x.dim() == 2, "cmpq.mixllm_gemm: x must be 2-D [m, k], got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "cmpq.mixllm_gemm: x must be contiguous (call .contiguous())");
  const View view = make_view(a, x.device(), check_values);
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
  TORCH_CHECK_VALUE(x.size(0) <= (1 << 30), "cmpq.mixllm_gemm: too many tokens (", x.size(0), ")");
  return view;
}

inline void check_quantize_input(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "cmpq.mixllm_quantize_activations: x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.size(1) % kKAlign == 0 && x.size(1) <= (1 << 30) &&
                        x.size(0) <= (1 << 30),
                    "cmpq.mixllm_quantize_activations: x must be [m, k] with k a positive multiple of ", kKAlign,
                    ", got ", x.sizes());
}

// The op schemas, shared by torch.ops.cmpq (mixllm_ops.cpp) and torch.ops.cmpq_emu (emu_ops.cpp).
constexpr const char* kGemmSchema = "mixllm_gemm(Tensor x, " MIXLLM_TENSORS(MIXLLM_SCHEMA)
    "Tensor? bias, int act_bits, int format_version) -> Tensor";
constexpr const char* kDequantizeSchema = "mixllm_dequantize(" MIXLLM_TENSORS(MIXLLM_SCHEMA)
    "int format_version, ScalarType dtype) -> Tensor";
constexpr const char* kQuantizeActivationsSchema = "mixllm_quantize_activations(Tensor x) -> (Tensor, Tensor)";

}  // namespace mixllm
}  // namespace cmpq
