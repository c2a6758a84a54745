// gemm_cpu.cpp — the CPU kernels' scalar path (any CPU; also the readable statement of what the SIMD
// paths in avx2.cpp and avx512.cpp compute) and the run-time ISA dispatch.
//
// The direct kernel walks one output row at a time: for each segment it expands the row's fp16 codebook
// into a small float table, then per group of 32 packed codes decodes indices, looks them up and FMAs
// them against up to kMaxTile activation rows, so each weight is decoded once per tile of batch rows.
// Outliers are added after the dense sum. The large-batch path (bindings) decodes blocks of rows with
// decode_rows and calls BLAS.
#include <string.h>

#include "row_kernels.h"

namespace cmpq {
namespace cpu {
namespace {

using detail::load_table;

template <int BITS, int TILE>
void segment_scalar(const uint32_t* words, int groups, const float* table, const float* x, int64_t ldx,
                    float* acc) {
  uint8_t codes[kGroupCodes];
  for (int g = 0; g < groups; ++g) {
    unpack_group<BITS>(words + g * BITS, codes);
    const float* xg = x + g * kGroupCodes;
    for (int j = 0; j < kGroupCodes; ++j) {
      const float w = table[codes[j]];
      for (int i = 0; i < TILE; ++i) acc[i] += w * xg[i * ldx + j];
    }
  }
}

struct ScalarKernel {
  static constexpr int kMaxTile = 8;

  template <int TILE>
  static void row(const LayerView& layer, int row, const float* x, int64_t ldx, float* acc) {
    float table[1 << kMaxBits];
    for (int i = 0; i < TILE; ++i) acc[i] = 0.f;
    for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
      if (layer.seg_k[s] == 0) continue;
      load_table(layer, s, row, table);
      const uint32_t* words = layer.row_codes(s, row);
      with_segment_bits(segment_bits(s), [&](auto seg) {
        segment_scalar<seg.kBits, TILE>(words, layer.groups(s), table, x + begin, ldx, acc);
      });
    }
    detail::add_outliers(layer, row, x, ldx, TILE, acc);
  }

  static void decode_row(const LayerView& layer, int row, float* out) {
    float table[1 << kMaxBits];
    uint8_t codes[kGroupCodes];
    for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
      if (layer.seg_k[s] == 0) continue;
      load_table(layer, s, row, table);
      const uint32_t* words = layer.row_codes(s, row);
      with_segment_bits(segment_bits(s), [&](auto seg) {
        for (int g = 0; g < layer.groups(s); ++g) {
          unpack_group<seg.kBits>(words + g * seg.kWordsPerGroup, codes);
          for (int j = 0; j < kGroupCodes; ++j) out[begin + g * kGroupCodes + j] = table[codes[j]];
        }
      });
    }
  }
};

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

}  // namespace

namespace detail {
const EntryPoints kScalar = {gemm_rows_tiled<ScalarKernel>, decode_rows_with<ScalarKernel>};
}  // namespace detail

bool supports(Isa isa) {
  if (isa == Isa::kScalar) return true;
#if CMPQ_HAVE_X86
  __builtin_cpu_init();
  if (isa == Isa::kAvx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == Isa::kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#endif
  return false;
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (supports(isa)) return isa;
  return Isa::kScalar;
}

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

bool isa_from_name(const char* name, Isa* isa) {
  for (Isa candidate : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (strcmp(name, isa_name(candidate)) == 0) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

namespace {

const detail::EntryPoints& entry_points(Isa isa) {
#if CMPQ_HAVE_X86
  if (isa == Isa::kAvx512) return detail::kAvx512;
  if (isa == Isa::kAvx2) return detail::kAvx2;
#endif
  (void)isa;
  return detail::kScalar;
}

}  // namespace

void gemm_rows(const LayerView& layer, const float* x_packed, int64_t ldx, int m, float* y, int64_t ldy,
               int row_begin, int row_end, Isa isa) {
  entry_points(isa).gemm_rows(layer, x_packed, ldx, m, y, ldy, row_begin, row_end);
}

void decode_rows(const LayerView& layer, float* w, int64_t ldw, int row_begin, int row_end, Isa isa) {
  entry_points(isa).decode_rows(layer, w, ldw, row_begin, row_end);
}

}  // namespace cpu
}  // namespace cmpq
