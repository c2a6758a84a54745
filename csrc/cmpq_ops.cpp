// cmpq_ops.cpp — all cmpq:: op schemas, their input checks, and the CPU implementations.
//
// Schemas live here and only here (CUDA implementations register against them from their own
// translation unit). Every check prints the offending values; cmpq_kernels/ops.py repeats the shape
// and dtype rules in the fake (meta) implementations so torch.compile sees the same contract.
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "cmpq_layout.h"
#include "cpu/gemm_cpu.h"

namespace cmpq {
namespace {

// Batch rows above which the CPU op decodes blocks of weights and calls BLAS instead of the direct
// kernel (measured in bench/bench_cpu.py; see README "CPU kernel").
constexpr int64_t kCpuDirectMaxM = 16;
// Rows decoded per BLAS call in the large-batch path: bounds the float workspace to a few MiB.
constexpr int64_t kDecodeBlockRows = 256;

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "cmpq: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, "cmpq: ", name, " is on ", t.device(), " but x is on ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), "cmpq: ", name, " must be contiguous (call .contiguous())");
}

// Validates the packed tensors against each other (not their values: CMPQLayer.validate does that once
// at load time, so the hot path stays free of host syncs) and returns raw pointers.
LayerView make_view(const at::Tensor& perm, const at::Tensor& codes4, const at::Tensor& codes3,
                    const at::Tensor& codes2, const at::Tensor& codebook4, const at::Tensor& codebook3,
                    const at::Tensor& codebook2, const at::Tensor& row_ptr, const at::Tensor& col,
                    const at::Tensor& val, int64_t codebook_rows, int64_t format_version,
                    const at::Device& device) {
  TORCH_CHECK_VALUE(format_version == kFormatVersion, "cmpq: format_version ", format_version,
                    " is not supported by this build (expects ", kFormatVersion, ")");
  TORCH_CHECK_VALUE(codebook_rows >= 1, "cmpq: codebook_rows must be >= 1, got ", codebook_rows);
  check_tensor(perm, "perm", at::kInt, device);
  check_tensor(row_ptr, "row_ptr", at::kInt, device);
  check_tensor(val, "val", at::kHalf, device);
  TORCH_CHECK_TYPE(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt,
                   "cmpq: col must be int16 or int32, got ", col.scalar_type());
  check_tensor(col, "col", col.scalar_type(), device);
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
    check_tensor(c, bits == 4 ? "codes4" : bits == 3 ? "codes3" : "codes2", at::kInt, device);
    check_tensor(cb, bits == 4 ? "codebook4" : bits == 3 ? "codebook3" : "codebook2", at::kHalf, device);
    TORCH_CHECK_VALUE(c.dim() == 2 && c.size(0) == view.n && c.size(1) % bits == 0, "cmpq: ", bits,
                      "-bit codes must be [n=", view.n, ", groups*", bits, "], got ", c.sizes());
    TORCH_CHECK_VALUE(cb.dim() == 2 && cb.size(0) == codebook_count && cb.size(1) == (1 << bits), "cmpq: ", bits,
                      "-bit codebook must be [", codebook_count, ", ", (1 << bits), "], got ", cb.sizes());
    view.seg_k[s] = static_cast<int>(c.size(1) / bits * kGroupCodes);
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

cpu::Isa cpu_isa_for_call() {
  // CMPQ_CPU_SIMD=0 forces the scalar path (tests run both; it also helps bisect a suspected SIMD bug).
  const char* env = getenv("CMPQ_CPU_SIMD");
  if (env != nullptr && strcmp(env, "0") == 0) return cpu::Isa::kScalar;
  static const cpu::Isa best = cpu::best_isa();
  return best;
}

// Decodes blocks of rows to float and multiplies them with BLAS: exact up to summation order, and fast
// once a decoded weight is reused by many activation rows.
void gemm_decode_blas(const LayerView& view, const at::Tensor& x_packed, at::Tensor& y) {
  const int64_t block = std::min<int64_t>(kDecodeBlockRows, view.n);
  at::Tensor w = at::empty({block, view.k}, x_packed.options());
  for (int64_t r0 = 0; r0 < view.n; r0 += block) {
    const int64_t rows = std::min<int64_t>(block, view.n - r0);
    at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
      cpu::decode_rows(view, w.data_ptr<float>() + b * view.k, view.k, static_cast<int>(r0 + b),
                       static_cast<int>(r0 + e));
    });
    y.narrow(1, r0, rows).copy_(at::mm(x_packed, w.narrow(0, 0, rows).t()));
  }
}

at::Tensor gemm_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& codes4, const at::Tensor& codes3,
                    const at::Tensor& codes2, const at::Tensor& codebook4, const at::Tensor& codebook3,
                    const at::Tensor& codebook2, const at::Tensor& row_ptr, const at::Tensor& col,
                    const at::Tensor& val, const std::optional<at::Tensor>& bias, int64_t codebook_rows,
                    int64_t format_version) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "cmpq.gemm: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "cmpq.gemm: x must be 2-D [m, k], got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "cmpq.gemm: x must be contiguous (call .contiguous())");
  const LayerView view = make_view(perm, codes4, codes3, codes2, codebook4, codebook3, codebook2, row_ptr, col, val,
                                   codebook_rows, format_version, x.device());
  TORCH_CHECK_VALUE(x.size(1) == view.k, "cmpq.gemm: x has ", x.size(1), " features but the layer has k=", view.k);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == view.n, "cmpq.gemm: bias must be [", view.n, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "cmpq.gemm: bias is on ", bias->device(), " but x is on ",
                      x.device());
  }
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, view.n}, x.options().dtype(at::kFloat));
  if (m > 0) {
    // Gathering x into packed column order once makes every kernel read activations contiguously.
    const at::Tensor x_packed = x.to(at::kFloat).index_select(1, perm.to(at::kLong)).contiguous();
    if (m > kCpuDirectMaxM) {
      gemm_decode_blas(view, x_packed, y);
    } else {
      const cpu::Isa isa = cpu_isa_for_call();
      const float* xp = x_packed.data_ptr<float>();
      float* yp = y.data_ptr<float>();
      at::parallel_for(0, view.n, 16, [&](int64_t b, int64_t e) {
        cpu::gemm_rows(view, xp, view.k, static_cast<int>(m), yp, view.n, static_cast<int>(b), static_cast<int>(e),
                       isa);
      });
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

at::Tensor dequantize_cpu(const at::Tensor& perm, const at::Tensor& codes4, const at::Tensor& codes3,
                          const at::Tensor& codes2, const at::Tensor& codebook4, const at::Tensor& codebook3,
                          const at::Tensor& codebook2, const at::Tensor& row_ptr, const at::Tensor& col,
                          const at::Tensor& val, int64_t codebook_rows, int64_t format_version,
                          at::ScalarType dtype) {
  const LayerView view = make_view(perm, codes4, codes3, codes2, codebook4, codebook3, codebook2, row_ptr, col, val,
                                   codebook_rows, format_version, perm.device());
  at::Tensor w_packed = at::empty({view.n, view.k}, perm.options().dtype(at::kFloat));
  at::parallel_for(0, view.n, 8, [&](int64_t b, int64_t e) {
    cpu::decode_rows(view, w_packed.data_ptr<float>() + b * view.k, view.k, static_cast<int>(b),
                     static_cast<int>(e));
  });
  at::Tensor w = at::empty_like(w_packed);
  w.index_copy_(1, perm.to(at::kLong), w_packed);
  return w.to(dtype);
}

at::Tensor unpack_codes_cpu(const at::Tensor& words, int64_t bits) {
  TORCH_CHECK_VALUE(bits == 2 || bits == 3 || bits == 4, "cmpq.unpack_codes: bits must be 2, 3 or 4, got ", bits);
  check_tensor(words, "words", at::kInt, words.device());
  TORCH_CHECK_VALUE(words.dim() == 2 && words.size(1) % bits == 0, "cmpq.unpack_codes: words must be [rows, groups*",
                    bits, "], got ", words.sizes());
  const int64_t groups = words.size(1) / bits;
  at::Tensor codes = at::empty({words.size(0), groups * kGroupCodes}, words.options().dtype(at::kByte));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  uint8_t* dst = codes.data_ptr<uint8_t>();
  for (int64_t g = 0; g < words.size(0) * groups; ++g) {
    switch (bits) {
      case 4: unpack_group<4>(src + g * 4, dst + g * kGroupCodes); break;
      case 3: unpack_group<3>(src + g * 3, dst + g * kGroupCodes); break;
      default: unpack_group<2>(src + g * 2, dst + g * kGroupCodes); break;
    }
  }
  return codes;
}

std::string cpu_isa() { return cpu::isa_name(cpu_isa_for_call()); }

}  // namespace
}  // namespace cmpq

TORCH_LIBRARY(cmpq, m) {
  // y[m, n] = x[m, k] @ W.T (+ bias), W decoded from the packed layer; output dtype = x dtype.
  m.def(
      "gemm(Tensor x, Tensor perm, Tensor codes4, Tensor codes3, Tensor codes2, Tensor codebook4, "
      "Tensor codebook3, Tensor codebook2, Tensor row_ptr, Tensor col, Tensor val, Tensor? bias, "
      "int codebook_rows, int format_version) -> Tensor");
  // W[n, k] in original channel order, as dtype.
  m.def(
      "dequantize(Tensor perm, Tensor codes4, Tensor codes3, Tensor codes2, Tensor codebook4, "
      "Tensor codebook3, Tensor codebook2, Tensor row_ptr, Tensor col, Tensor val, int codebook_rows, "
      "int format_version, ScalarType dtype) -> Tensor");
  // uint8 codes [rows, groups * 32] from packed int32 words [rows, groups * bits] (layout tests).
  m.def("unpack_codes(Tensor words, int bits) -> Tensor");
  // Instruction set the CPU kernel uses in this process ("avx2" or "scalar").
  m.def("cpu_isa() -> str", &cmpq::cpu_isa);
}

TORCH_LIBRARY_IMPL(cmpq, CPU, m) {
  m.impl("gemm", &cmpq::gemm_cpu);
  m.impl("dequantize", &cmpq::dequantize_cpu);
  m.impl("unpack_codes", &cmpq::unpack_codes_cpu);
}

// An importable module so `import cmpq_kernels._C` loads the library and runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cmpq CPU ops (see torch.ops.cmpq)", -1, nullptr};
  return PyModule_Create(&module);
}
