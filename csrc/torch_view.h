// torch_view.h — checks packed-layer tensors against each other and wraps them in a LayerView.
//
// Shared by every binding (CPU ops, CUDA ops, emulated CUDA ops) so all backends reject bad input with
// the same messages. Checks are on shapes, dtypes, devices and contiguity only: value checks (perm is a
// permutation, CSR monotone, finite codebooks) run once in CMPQLayer.validate at load time, which keeps
// the hot path free of host synchronisation.
#pragma once

#include <optional>

#include <torch/torch.h>

#include "cmpq_layout.h"

namespace cmpq {

// Schemas of the layer ops, shared by torch.ops.cmpq (cmpq_ops.cpp) and torch.ops.cmpq_emu (emu_ops.cpp).
// y[m, n] = x[m, k] @ W.T (+ bias), W decoded from the packed layer; output dtype = x dtype.
constexpr const char* kGemmSchema =
    "gemm(Tensor x, Tensor perm, Tensor codes4, Tensor codes3, Tensor codes2, Tensor codebook4, "
    "Tensor codebook3, Tensor codebook2, Tensor row_ptr, Tensor col, Tensor val, Tensor? bias, "
    "int codebook_rows, int format_version) -> Tensor";
// W[n, k] in original channel order, as dtype.
constexpr const char* kDequantizeSchema =
    "dequantize(Tensor perm, Tensor codes4, Tensor codes3, Tensor codes2, Tensor codebook4, "
    "Tensor codebook3, Tensor codebook2, Tensor row_ptr, Tensor col, Tensor val, int codebook_rows, "
    "int format_version, ScalarType dtype) -> Tensor";

// `name` is streamed into the message ("codes", 4 -> codes4), so a check builds no string unless it fails.
template <class... Name>
void check_tensor(const at::Tensor& t, at::ScalarType dtype, const at::Device& device, const Name&... name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "cmpq: ", name..., " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, "cmpq: ", name..., " is on ", t.device(), " but x is on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "cmpq: ", name..., " must be contiguous (call .contiguous())");
}

inline LayerView make_view(const at::Tensor& perm, const at::Tensor& codes4, const at::Tensor& codes3,
                           const at::Tensor& codes2, const at::Tensor& codebook4, const at::Tensor& codebook3,
                           const at::Tensor& codebook2, const at::Tensor& row_ptr, const at::Tensor& col,
                           const at::Tensor& val, int64_t codebook_rows, int64_t format_version,
                           const at::Device& device) {
  TORCH_CHECK_VALUE(format_version == kFormatVersion, "cmpq: format_version ", format_version,
                    " is not supported by this build (expects ", kFormatVersion, ")");
  TORCH_CHECK_VALUE(codebook_rows >= 1, "cmpq: codebook_rows must be >= 1, got ", codebook_rows);
  check_tensor(perm, at::kInt, device, "perm");
  check_tensor(row_ptr, at::kInt, device, "row_ptr");
  check_tensor(val, at::kHalf, device, "val");
  TORCH_CHECK_TYPE(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt,
                   "cmpq: col must be int16 or int32, got ", col.scalar_type());
  check_tensor(col, col.scalar_type(), device, "col");
  TORCH_CHECK_VALUE(perm.dim() == 1 && row_ptr.dim() == 1 && col.dim() == 1 && val.dim() == 1,
                    "cmpq: perm, row_ptr, col and val must be 1-D");
  TORCH_CHECK_VALUE(row_ptr.size(0) >= 2, "cmpq: row_ptr must have n + 1 >= 2 entries, got ", row_ptr.size(0));
  TORCH_CHECK_VALUE(col.size(0) == val.size(0), "cmpq: col has ", col.size(0), " entries but val has ",
                    val.size(0));

  LayerView view;
  view.n = static_cast<int>(row_ptr.size(0) - 1);
  view.k = static_cast<int>(perm.size(0));
  view.codebook_rows = static_cast<int>(codebook_rows);
  const at::Tensor* codes[kNumSegments] = {&codes4, &codes3, &codes2};
  const at::Tensor* codebooks[kNumSegments] = {&codebook4, &codebook3, &codebook2};
  const int64_t codebook_count = (view.n + codebook_rows - 1) / codebook_rows;
  int64_t k_total = 0;
  for (int s = 0; s < kNumSegments; ++s) {
    const int bits = segment_bits(s);
    const at::Tensor& c = *codes[s];
    const at::Tensor& cb = *codebooks[s];
    check_tensor(c, at::kInt, device, "codes", bits);
    check_tensor(cb, at::kHalf, device, "codebook", bits);
    TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == view.n && whole_groups(c.size(1), bits), "cmpq: ", bits,
                      "-bit codes must be [n=", view.n, ", groups*", bits, "], got ", c.sizes());
    view.seg_k[s] = static_cast<int>(channels_in_words(c.size(1), bits));
    const int64_t width = view.seg_k[s] > 0 ? (1 << bits) : 0;  // an empty segment stores no codebook
    TORCH_CHECK_VALUE(cb.dim() == 2 && cb.size(0) == codebook_count && cb.size(1) == width, "cmpq: ", bits,
                      "-bit codebook must be [", codebook_count, ", ", width, "], got ", cb.sizes());
    view.codes[s] = reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>());
    view.codebook[s] = reinterpret_cast<const uint16_t*>(cb.data_ptr<at::Half>());
    k_total += view.seg_k[s];
  }
  TORCH_CHECK_VALUE(k_total == view.k, "cmpq: segments hold ", k_total, " channels but perm has k=", view.k);
  view.row_ptr = row_ptr.data_ptr<int32_t>();
  view.col = col.data_ptr();
  view.col_is_int32 = col.scalar_type() == at::kInt;
  view.val = reinterpret_cast<const uint16_t*>(val.data_ptr<at::Half>());
  return view;
}

// x [m, k] contiguous, and bias [n] on x's device; float32 x only where the backend computes in FP32.
inline void check_gemm_inputs(const at::Tensor& x, const LayerView& view, const std::optional<at::Tensor>& bias,
                              bool allow_float32) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || (allow_float32 && t == at::kFloat), "cmpq.gemm: x must be ",
                   allow_float32 ? "float32, float16 or bfloat16" : "float16 or bfloat16 on this device", ", got ", t);
  TORCH_CHECK_VALUE(x.dim() == 2, "cmpq.gemm: x must be 2-D [m, k], got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "cmpq.gemm: x must be contiguous (call .contiguous())");
  TORCH_CHECK_VALUE(x.size(1) == view.k, "cmpq.gemm: x has ", x.size(1), " features but the layer has k=", view.k);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == view.n, "cmpq.gemm: bias must be [", view.n, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "cmpq.gemm: bias is on ", bias->device(), " but x is on ",
                      x.device());
  }
}

}  // namespace cmpq
