// torch_view.h — the layer ops' signature, written once, and the checks that turn their tensors into a
// LayerView.
//
// Shared by every binding (CPU ops, CUDA ops, emulated CUDA ops) so all backends take the same arguments
// and reject bad input with the same messages. Checks are on shapes, dtypes, devices and contiguity only:
// value checks (perm is a permutation, CSR monotone, finite codebooks) run once in CMPQLayer.validate at
// load time, which keeps the hot path free of host synchronisation.
#pragma once

#include <optional>

#include <torch/torch.h>

#include "cmpq_layout.h"

// ---- the packed layer as op arguments ----------------------------------------------------------------
// Its tensors and ints in op-argument order. The schemas, the ops' C++ parameter lists and LayerArgs are
// all expanded from these two lists, so adding a field is one edit here plus the code that reads it.
#define CMPQ_LAYER_TENSORS(X) \
  X(perm) X(codes4) X(codes3) X(codes2) X(codebook4) X(codebook3) X(codebook2) X(row_ptr) X(col) X(val)
#define CMPQ_LAYER_INTS(X) X(codebook_rows) X(format_version)

// Expansions. The tensors are always followed by another argument, so they carry a trailing comma; the
// ints end gemm's list but not dequantize's, so each op picks the side of the comma it needs.
#define CMPQ_TENSOR_SCHEMA(name) "Tensor " #name ", "
#define CMPQ_INT_SCHEMA(name) "int " #name ", "
#define CMPQ_COMMA_INT_SCHEMA(name) ", int " #name
#define CMPQ_TENSOR_PARAM(name) const at::Tensor& name,
#define CMPQ_INT_PARAM(name) int64_t name,
#define CMPQ_COMMA_INT_PARAM(name) , int64_t name
#define CMPQ_ARG(name) name,

namespace cmpq {

// Schemas of the layer ops, shared by torch.ops.cmpq (cmpq_ops.cpp) and torch.ops.cmpq_emu (emu_ops.cpp).
// y[m, n] = x[m, k] @ W.T (+ bias), W decoded from the packed layer; output dtype = x dtype.
constexpr const char* kGemmSchema = "gemm(Tensor x, " CMPQ_LAYER_TENSORS(CMPQ_TENSOR_SCHEMA) "Tensor? bias"
    CMPQ_LAYER_INTS(CMPQ_COMMA_INT_SCHEMA) ") -> Tensor";
// W[n, k] in original channel order, as dtype.
constexpr const char* kDequantizeSchema = "dequantize(" CMPQ_LAYER_TENSORS(CMPQ_TENSOR_SCHEMA)
    CMPQ_LAYER_INTS(CMPQ_INT_SCHEMA) "ScalarType dtype) -> Tensor";

// One layer's op arguments, as passed (the tensors are not copied).
struct LayerArgs {
#define CMPQ_TENSOR_MEMBER(name) const at::Tensor& name;
#define CMPQ_INT_MEMBER(name) int64_t name;
  CMPQ_LAYER_TENSORS(CMPQ_TENSOR_MEMBER)
  CMPQ_LAYER_INTS(CMPQ_INT_MEMBER)
#undef CMPQ_TENSOR_MEMBER
#undef CMPQ_INT_MEMBER
};

// `name` is streamed into the message ("codes", 4 -> codes4), so a check builds no string unless it fails.
template <class... Name>
void check_tensor(const at::Tensor& t, at::ScalarType dtype, const at::Device& device, const Name&... name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "cmpq: ", name..., " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, "cmpq: ", name..., " is on ", t.device(), " but x is on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "cmpq: ", name..., " must be contiguous (call .contiguous())");
}

// format_version, codebook_rows, perm and the outlier CSR: everything but the segments.
inline void check_layer_args(const LayerArgs& layer, const at::Device& device) {
  const at::Tensor &perm = layer.perm, &row_ptr = layer.row_ptr, &col = layer.col, &val = layer.val;
  TORCH_CHECK_VALUE(layer.format_version == kFormatVersion, "cmpq: format_version ", layer.format_version,
                    " is not supported by this build (expects ", kFormatVersion, ")");
  TORCH_CHECK_VALUE(layer.codebook_rows >= 1, "cmpq: codebook_rows must be >= 1, got ", layer.codebook_rows);
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
}

// Segment s's codes and codebook, checked against the view's n and the codebook row count, into the view.
inline void view_segment(LayerView& view, int s, const at::Tensor& codes, const at::Tensor& codebook,
                         int64_t codebook_count, const at::Device& device) {
  const int bits = segment_bits(s);
  check_tensor(codes, at::kInt, device, "codes", bits);
  check_tensor(codebook, at::kHalf, device, "codebook", bits);
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(0) == view.n && whole_groups(codes.size(1), bits), "cmpq: ",
                    bits, "-bit codes must be [n=", view.n, ", groups*", bits, "], got ", codes.sizes());
  view.seg_k[s] = static_cast<int>(channels_in_words(codes.size(1), bits));
  const int64_t width = view.seg_k[s] > 0 ? (1 << bits) : 0;  // an empty segment stores no codebook
  TORCH_CHECK_VALUE(codebook.dim() == 2 && codebook.size(0) == codebook_count && codebook.size(1) == width,
                    "cmpq: ", bits, "-bit codebook must be [", codebook_count, ", ", width, "], got ",
                    codebook.sizes());
  view.codes[s] = reinterpret_cast<const uint32_t*>(codes.data_ptr<int32_t>());
  view.codebook[s] = reinterpret_cast<const uint16_t*>(codebook.data_ptr<at::Half>());
}

// The checked view of one layer's op arguments; device is where x (or, without x, perm) lives.
inline LayerView make_view(const LayerArgs& layer, const at::Device& device) {
  check_layer_args(layer, device);
  LayerView view;
  view.n = static_cast<int>(layer.row_ptr.size(0) - 1);
  view.k = static_cast<int>(layer.perm.size(0));
  view.codebook_rows = static_cast<int>(layer.codebook_rows);
  const int64_t codebook_count = (view.n + layer.codebook_rows - 1) / layer.codebook_rows;
  view_segment(view, 0, layer.codes4, layer.codebook4, codebook_count, device);
  view_segment(view, 1, layer.codes3, layer.codebook3, codebook_count, device);
  view_segment(view, 2, layer.codes2, layer.codebook2, codebook_count, device);
  const int64_t k_total = static_cast<int64_t>(view.seg_k[0]) + view.seg_k[1] + view.seg_k[2];
  TORCH_CHECK_VALUE(k_total == view.k, "cmpq: segments hold ", k_total, " channels but perm has k=", view.k);
  view.row_ptr = layer.row_ptr.data_ptr<int32_t>();
  view.col = layer.col.data_ptr();
  view.col_is_int32 = layer.col.scalar_type() == at::kInt;
  view.val = reinterpret_cast<const uint16_t*>(layer.val.data_ptr<at::Half>());
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

// ---- the op entry points every backend registers ----------------------------------------------------
// Each takes the flat op arguments, checks them (the one check path of every binding) and hands the
// backend the validated view; perm stays a tensor for the gathers. kAllowFloat32: the backend computes
// in FP32 and so accepts float32 x.
using GemmImpl = at::Tensor (*)(const at::Tensor& x, const at::Tensor& perm, const LayerView& view,
                                const std::optional<at::Tensor>& bias);
template <GemmImpl kImpl, bool kAllowFloat32>
at::Tensor gemm_op(const at::Tensor& x, CMPQ_LAYER_TENSORS(CMPQ_TENSOR_PARAM) const std::optional<at::Tensor>& bias
                       CMPQ_LAYER_INTS(CMPQ_COMMA_INT_PARAM)) {
  const LayerView view = make_view(LayerArgs{CMPQ_LAYER_TENSORS(CMPQ_ARG) CMPQ_LAYER_INTS(CMPQ_ARG)}, x.device());
  check_gemm_inputs(x, view, bias, kAllowFloat32);
  return kImpl(x, perm, view, bias);
}

using DequantizeImpl = at::Tensor (*)(const at::Tensor& perm, const LayerView& view, at::ScalarType dtype);
template <DequantizeImpl kImpl>
at::Tensor dequantize_op(CMPQ_LAYER_TENSORS(CMPQ_TENSOR_PARAM) CMPQ_LAYER_INTS(CMPQ_INT_PARAM) at::ScalarType dtype) {
  return kImpl(perm, make_view(LayerArgs{CMPQ_LAYER_TENSORS(CMPQ_ARG) CMPQ_LAYER_INTS(CMPQ_ARG)}, perm.device()),
               dtype);
}

}  // namespace cmpq
