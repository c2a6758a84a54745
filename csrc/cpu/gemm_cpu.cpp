// gemm_cpu.cpp — the CPU kernels' scalar path (any CPU; also the readable statement of what the SIMD
// paths in avx2.cpp and avx512.cpp compute) and the run-time ISA dispatch.
//
// The direct kernel walks one output row at a time: for each segment it expands the row's fp16 codebook
// into a small float table, then per group of 32 packed codes decodes indices, looks them up and FMAs
// them against up to kMaxTile activation rows, so each weight is decoded once per tile of batch rows.
// Outliers are added after the dense sum. The large-batch path (bindings) decodes blocks of rows with
// decode_rows and calls BLAS.
#include <string.h>

#include <cmath>

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

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "avx512-int8"};

int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

// Byte position of a segment's column c in the int8 activation layout (see Int8Activations).
int64_t int8_position(int bits, int c) {
  if (bits == 4) return c / 128 * 128 + (c & 1) * 64 + c % 128 / 2;
  if (bits == 2) return c / 256 * 256 + (c & 3) * 64 + c % 256 / 4;
  return c;
}

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
  if (isa == Isa::kAvx512Int8)
    return supports(Isa::kAvx512) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
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
  for (Isa candidate : kAllIsas) {
    if (strcmp(name, isa_name(candidate)) == 0) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

namespace {

// The float entry points of an ISA; the int8 mode uses the exact AVX-512 ones (decode path, m > 16).
const detail::EntryPoints& entry_points(Isa isa) {
#if CMPQ_HAVE_X86
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Int8) return detail::kAvx512;
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

void quantize_activations(const LayerView& layer, const float* x_packed, int64_t ldx, int m, Int8Activations* out) {
  out->m = m;
  out->stride = out->blocks = 0;
  for (int s = 0; s < kNumSegments; ++s) {
    const int padded = round_up(layer.seg_k[s], kInt8SegmentPad);
    out->seg_byte[s] = out->stride;
    out->seg_block[s] = out->blocks;
    out->stride += padded;
    out->blocks += padded / kInt8Block;
  }
  out->q.assign(static_cast<size_t>(m) * out->stride, 0);
  out->scale.assign(static_cast<size_t>(m) * out->blocks, 0.f);
  out->correction.assign(static_cast<size_t>(m) * kNumSegments, 0.f);
  for (int i = 0; i < m; ++i) {
    for (int s = 0, begin = 0; s < kNumSegments; begin += layer.seg_k[s], ++s) {
      const float* x = x_packed + i * ldx + begin;
      int8_t* q = out->q.data() + i * out->stride + out->seg_byte[s];
      float* scale = out->scale.data() + i * out->blocks + out->seg_block[s];
      float correction = 0.f;
      for (int b0 = 0; b0 < layer.seg_k[s]; b0 += kInt8Block) {
        const int b1 = b0 + kInt8Block < layer.seg_k[s] ? b0 + kInt8Block : layer.seg_k[s];
        float amax = 0.f;
        for (int c = b0; c < b1; ++c) amax = std::fabs(x[c]) > amax || x[c] != x[c] ? std::fabs(x[c]) : amax;
        // A NaN or infinite activation poisons its token's outputs (as in the exact kernels), no other token's.
        const float block_scale = std::isfinite(amax) ? amax / 127.f : std::nanf("");
        const float inv = std::isfinite(amax) && amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int c = b0; c < b1; ++c) {
          const int8_t v = inv > 0.f ? static_cast<int8_t>(std::nearbyint(x[c] * inv)) : 0;  // |x * inv| <= 127
          q[int8_position(segment_bits(s), c)] = v;
          sum += v;
        }
        scale[b0 / kInt8Block] = block_scale;
        correction += 128.f * block_scale * static_cast<float>(sum);
      }
      out->correction[static_cast<size_t>(i) * kNumSegments + s] = correction;
    }
  }
}

void gemm_rows_int8(const LayerView& layer, const Int8Activations& acts, const float* x_packed, int64_t ldx,
                    float* y, int64_t ldy, int row_begin, int row_end) {
#if CMPQ_HAVE_X86
  detail::gemm_rows_int8_avx512(layer, acts, x_packed, ldx, y, ldy, row_begin, row_end);
#else
  (void)layer, (void)acts, (void)x_packed, (void)ldx, (void)y, (void)ldy, (void)row_begin, (void)row_end;
#endif
}

}  // namespace cpu
}  // namespace cmpq
