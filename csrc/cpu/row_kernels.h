// row_kernels.h — what the per-ISA CPU kernels share (internal to csrc/cpu/).
//
// Each ISA lives in its own file (gemm_cpu.cpp: scalar and dispatch; avx2.cpp; avx512.cpp) and provides
// a Kernel type with
//   template <int TILE> static void row(layer, row, x, ldx, out)   // out[i] = row . x[i], i < TILE
//   static void decode_row(layer, row, out)                        // dense part of one row
// compiled for its own target; gemm_rows_tiled below turns a row kernel into a row-range GEMM.
#pragma once

#include <stdint.h>

#include <array>
#include <utility>

#include "gemm_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#define CMPQ_HAVE_X86 1
#else
#define CMPQ_HAVE_X86 0
#endif

namespace cmpq {
namespace cpu {
namespace detail {

// Expand one row's fp16 codebook of segment s into floats.
inline void load_table(const LayerView& layer, int s, int row, float* table) {
  const uint16_t* cb = layer.row_codebook(s, row);
  for (int c = 0; c < (1 << segment_bits(s)); ++c) table[c] = half_bits_to_float(cb[c]);
}

// Residual outliers of one row, added to acc[i] for i < tile (after the dense sum, in CSR order).
inline void add_outliers(const LayerView& layer, int row, const float* x, int64_t ldx, int tile, float* acc) {
  for (int32_t e = layer.row_ptr[row]; e < layer.row_ptr[row + 1]; ++e) {
    const int j = layer.outlier_col(e);
    const float r = half_bits_to_float(layer.val[e]);
    for (int i = 0; i < tile; ++i) acc[i] += x[i * ldx + j] * r;
  }
}

// Outlier residuals of one row added into its decoded dense values.
inline void add_outliers_to_row(const LayerView& layer, int row, float* out) {
  for (int32_t e = layer.row_ptr[row]; e < layer.row_ptr[row + 1]; ++e)
    out[layer.outlier_col(e)] += half_bits_to_float(layer.val[e]);
}

// One tile of TILE activation rows over a row range.
template <class Kernel, int TILE>
void tile_rows(const LayerView& layer, const float* x, int64_t ldx, float* y, int64_t ldy, int row_begin,
               int row_end) {
  float out[TILE];
  for (int row = row_begin; row < row_end; ++row) {
    Kernel::template row<TILE>(layer, row, x, ldx, out);
    for (int i = 0; i < TILE; ++i) y[i * ldy + row] = out[i];
  }
}

using TileFn = void (*)(const LayerView&, const float*, int64_t, float*, int64_t, int, int);

template <class Kernel, int... kTileMinusOne>
constexpr auto tile_table(std::integer_sequence<int, kTileMinusOne...>) {
  return std::array<TileFn, sizeof...(kTileMinusOne)>{&tile_rows<Kernel, kTileMinusOne + 1>...};
}

// gemm_rows for one ISA: the batch is cut into tiles of at most Kernel::kMaxTile activation rows, and each
// weight is decoded once per tile.
template <class Kernel>
void gemm_rows_tiled(const LayerView& layer, const float* x, int64_t ldx, int m, float* y, int64_t ldy,
                     int row_begin, int row_end) {
  static constexpr auto kTiles = tile_table<Kernel>(std::make_integer_sequence<int, Kernel::kMaxTile>{});
  for (int i0 = 0; i0 < m; i0 += Kernel::kMaxTile) {
    const int tile = m - i0 < Kernel::kMaxTile ? m - i0 : Kernel::kMaxTile;
    kTiles[tile - 1](layer, x + i0 * ldx, ldx, y + i0 * ldy, ldy, row_begin, row_end);
  }
}

template <class Kernel>
void decode_rows_with(const LayerView& layer, float* w, int64_t ldw, int row_begin, int row_end) {
  for (int row = row_begin; row < row_end; ++row) {
    float* out = w + static_cast<int64_t>(row - row_begin) * ldw;
    Kernel::decode_row(layer, row, out);
    add_outliers_to_row(layer, row, out);
  }
}

// One ISA's kernels as gemm_rows / decode_rows (without the isa argument). Defined by avx2.cpp and
// avx512.cpp (x86 only; used only when supports(isa)) and by gemm_cpu.cpp for scalar.
struct EntryPoints {
  void (*gemm_rows)(const LayerView& layer, const float* x, int64_t ldx, int m, float* y, int64_t ldy, int row_begin,
                    int row_end);
  void (*decode_rows)(const LayerView& layer, float* w, int64_t ldw, int row_begin, int row_end);
};
extern const EntryPoints kScalar, kAvx2, kAvx512;

// The int8 kernel (avx512_int8.cpp).
void gemm_rows_int8_avx512(const LayerView& layer, const Int8Activations& acts, const float* x, int64_t ldx,
                           float* y, int64_t ldy, int row_begin, int row_end);

}  // namespace detail
}  // namespace cpu
}  // namespace cmpq
