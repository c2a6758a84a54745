// tile_decode.cuh — the pieces the GEMV (gemv.cu, m <= 8) and the GEMM (gemm_tc.cu, m <= 128) share: the
// gather of x[:, perm] into an fp16 workspace, the per-lane pair tables, the decode of packed groups
// straight into mma.m16n8k16 A fragments, the K split and the K loop of one 16-row tile. Written once here;
// each kernel file adds its own workspace layout, batch tiling and epilogue. The dense decode (dequant.cu)
// uses the tables, the decoders and the K split, and stores the fragments instead of multiplying them.
//
// Work split. A block of kWarps = 8 warps owns one 16-row tile (kTileRows, the mma's M). Its warps share
// the tile's rows and split K: per segment, an iteration covers 4 * LG consecutive groups of both of a
// lane's rows (LG: groups per lane and row, the kernel's choice: 4 for the GEMV, fewer where the GEMM's
// accumulators need the registers), and warps take iterations round-robin, numbered across the segments so
// that every warp gets work. Lane (g = lane / 4, t = lane % 4) decodes rows g and g + 8 of groups t, t + 4,
// .., t + 4 (LG - 1) of the iteration: per load instruction a quad reads 4 consecutive groups of one row
// (64 / 48 / 32 contiguous bytes for 4 / 3 / 2 bits), so every DRAM sector it touches is fully used.
//
// Tensor cores. Each group is 8 k-steps of mma.m16n8k16 (FP32 accumulation): A is the 16 rows' decoded
// weights, B the activations of 8 batch rows (one n8 tile), C 4 registers per lane and n8 tile. K is a
// dummy index of the mma, so lane t's k slots carry four codes of its own group per step, in whatever order
// its decode yields them, and the workspace is laid out to match (slot_code). One decoded A fragment feeds
// the mmas of every n8 tile the kernel carries (NT: 1 for the GEMV, 2, 4 or 8 for the GEMM), so the decode
// cost per weight does not grow with m; each further n8 tile costs one HMMA per k-step and one 16-byte
// activation load per two k-steps.
//
// Decode to the A fragment (fp16 pairs):
//   4-bit  a pair of codes is one byte; a 256-entry pair table sits in shared memory, and one PRMT builds
//          the table address straight from the byte (entry * 256 + lane * 4): PRMT + LDS per 2 weights.
//   3-bit  a 64-entry pair table; the 6-bit pair field takes SHF + LOP3 (+ LDS) per 2 weights.
//   2-bit  no memory: the row's four codebook values are two registers and PRMT selects a pair from them.
//          LOP3 (after a SHF for 3 of 4 shifts) spreads four codes into bytes, one IMAD.WIDE makes two PRMT
//          selectors of them (x * 0x220022 + 0x101000001010), two PRMTs: ~4.75 instructions per 4 weights.
// Pair tables hold one copy per lane ([entry][row g, row g + 8][lane] words), so the 32 lanes of a lookup
// read 32 different banks whatever their codes: no bank conflicts, for 80 KB of shared memory per block
// when the layer has 4-bit and 3-bit segments (16 KB with 3-bit only, none otherwise; tables_bytes).
// The block fills them once (each 16-byte store writes one entry for the four lanes that look it up).
//
// Products are taken in fp16 whatever the activation type: the fp16 codebook values stay exact, and so are
// the products; a bf16 row is first scaled by a power of two (scale_exponent, undone in FP32 by the
// kernel's epilogue).
#pragma once

#include <type_traits>

#include "decode.cuh"
#include "launchers.h"
#include "ptx.cuh"

namespace cmpq {
namespace cuda {
namespace tile {  // named, not anonymous: the emulated build includes every kernel file in one TU

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;                                  // warps per block, splitting K
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTileRows = 16;                              // rows per block: the mma's M
constexpr int kQuadLanes = 4;                              // lanes t = 0..3 share a row (fragment layout)
constexpr int kLaneRows = kTileRows * kQuadLanes / kWarpSize;  // rows g and g + 8 of the tile
constexpr int kHiRow = kTileRows / kLaneRows;              // the second row's offset
constexpr int kStepCodes = 4;                              // codes of one row a lane feeds one mma
constexpr int kGroupSteps = kGroupCodes / kStepCodes;      // mma k-steps per group
constexpr int kNTileRows = 8;                              // batch rows per n8 tile (the mma's N)
constexpr int kGroupVectors = kGroupSteps / 2;             // 16-byte (8 x fp16) slices of x per group and row
constexpr unsigned kFullMask = 0xffffffffu;

// Shared memory: pair tables [entry][row g, row g + 8][lane] of 32-bit words, 3-bit first.
constexpr int kEntryBytes = 2 * kWarpSize * 4;             // one entry for both rows of every lane
constexpr int kHiRowBytes = kWarpSize * 4;                 // row g + 8's copy follows row g's
constexpr int kTable3Offset = 0;
constexpr int kTable4Offset = 64 * kEntryBytes;            // 64 three-bit pair entries
constexpr int kTablesBytes = kTable4Offset + 256 * kEntryBytes;

// Position p (0..31) of a group's slice of the x workspace holds the activation of this code of the
// group: the order the decode of a `bits`-wide group feeds the mma (4-bit and 3-bit pair tables yield
// codes in order; the 2-bit byte spread yields codes s, s+4, s+8, s+12 of a word per step s).
CMPQ_HD constexpr int slot_code(int bits, int p) {
  return bits == 2 ? 16 * (p / 16) + (p / 4) % 4 + 4 * (p % 4) : p;
}

// x is multiplied in fp16 whatever its type: fp16 codebook values are then exact, so are the products,
// and the tensor cores accumulate them in FP32. A bf16 row first gets a power-of-two scale 2^s that puts its
// largest |x| in [2^14, 2^15): every value within 2^29 of it converts to fp16 without loss (bf16 has 8
// significant bits, fp16 11), smaller ones round among fp16 subnormals, and nothing overflows. The
// epilogue multiplies the row's dense sum by 2^-s. s is 0 for fp16 and for rows whose max is 0, inf or NaN.
CMPQ_DEVICE_INLINE int scale_exponent(float absmax) {
  const int exponent = static_cast<int>((__float_as_uint(absmax) >> 23) & 0xffu);  // biased; 0: zero/subnormal
  if (!(absmax > 0.f) || exponent == 0xff) return 0;
  return min(max(14 - (exponent - 127), -126), 126);
}
CMPQ_DEVICE_INLINE float power_of_two(int s) { return __uint_as_float(static_cast<uint32_t>(s + 127) << 23); }
template <class T>
CMPQ_DEVICE_INLINE int row_scale_exponent(const T* absmax, int batch_row) {
  if constexpr (std::is_same_v<T, __half>)
    return 0;
  else
    return scale_exponent(Act<T>::to_float(absmax[batch_row]));
}

// The A fragment of k-step e (0..7) of one group, from row g's words `lo` and row g + 8's words `hi`:
// a[0], a[2] = row g's pairs 2e, 2e + 1; a[1], a[3] = row g + 8's (PTX m16n8k16 layout). Bit positions
// come from cmpq_layout.h (code_word, code_shift, spare_field_3bit), fused into the table addresses.
template <int BITS>
struct Decoder;

template <>
struct Decoder<4> {
  ptx::SharedAddress table;  // smem + kTable4Offset
  uint32_t lane4;            // lane * 4: this lane's column of every entry
  // Pair i is a whole byte; PRMT puts it in byte 1 over lane4 in byte 0: entry * 256 + lane * 4.
  CMPQ_DEVICE_INLINE uint32_t lookup(const uint32_t* words, int i, int row_offset) const {
    static_assert(code_shift<4>(2) == 8 && code_shift<4>(8) == 0, "4-bit pairs are bytes");
    const uint32_t byte = code_shift<4>(2 * i) / 8;
    return ptx::ld_shared_u32(table + row_offset, ptx::prmt(words[code_word<4>(2 * i)], lane4, 0x5504u | byte << 4));
  }
  CMPQ_DEVICE_INLINE void fragment(const uint32_t* lo, const uint32_t* hi, int e, uint32_t (&a)[4]) const {
    a[0] = lookup(lo, 2 * e, 0);
    a[1] = lookup(hi, 2 * e, kHiRowBytes);
    a[2] = lookup(lo, 2 * e + 1, 0);
    a[3] = lookup(hi, 2 * e + 1, kHiRowBytes);
  }
};

// Pair i of a BITS-bit group through a table of 2^(2 BITS) entries: the 2·BITS-bit pair field from code 2i's
// position, moved to bits 8.. (entry * 256) by one shift and masked in by one LOP3 with lane4. At 3 bits, pair
// 15 is the spare field (spare_field_3bit), its three 2-bit pieces moved to bits 8, 10, 12. The GEMV and GEMM
// use it for 3 bits; the dense decode (dequant.cu) also for 2 bits, whose codes it needs in order.
template <int BITS>
struct FieldDecoder {
  static constexpr uint32_t kFieldMask = ((1u << (2 * BITS)) - 1u) << 8;
  ptx::SharedAddress table;  // this width's table in shared memory
  uint32_t lane4;
  CMPQ_DEVICE_INLINE uint32_t address(const uint32_t* words, int i) const {
    if constexpr (BITS == 3) {
      if (i == SegmentTraits<3>::kPairsPerGroup - 1) {
        const uint32_t a = ptx::lop3<0xea>(words[0] >> (kSpareShift3 - 8), 0x300u, lane4);
        const uint32_t b = ptx::lop3<0xea>(words[1] >> (kSpareShift3 - 10), 0xc00u, a);
        return ptx::lop3<0xea>(words[2] >> (kSpareShift3 - 12), 0x3000u, b);
      }
    }
    const int shift = code_shift<BITS>(2 * i) - 8;
    const uint32_t w = words[code_word<BITS>(2 * i)];
    return ptx::lop3<0xea>(shift >= 0 ? w >> shift : w << -shift, kFieldMask, lane4);  // (w' & mask) | lane4
  }
  CMPQ_DEVICE_INLINE void fragment(const uint32_t* lo, const uint32_t* hi, int e, uint32_t (&a)[4]) const {
    a[0] = ptx::ld_shared_u32(table, address(lo, 2 * e));
    a[1] = ptx::ld_shared_u32(table + kHiRowBytes, address(hi, 2 * e));
    a[2] = ptx::ld_shared_u32(table, address(lo, 2 * e + 1));
    a[3] = ptx::ld_shared_u32(table + kHiRowBytes, address(hi, 2 * e + 1));
  }
};

template <>
struct Decoder<3> : FieldDecoder<3> {};

// 2-bit step s of word w spreads codes 16w + s + 4b (b = 0..3) into bytes: they sit at bits 2s + 8b.
static_assert(code_shift<2>(1) == 2 && code_shift<2>(4) == 8 && code_word<2>(16) == 1, "2-bit codes by position");

template <>
struct Decoder<2> {
  uint32_t lo01, lo23, hi01, hi23;  // rows g and g + 8: codebook values {0, 1} and {2, 3} as fp16 pairs
  // Four codes in bytes 0..3; times 0x22 each byte holds nibbles 2c, 2c: +0x10 makes them the PRMT
  // selector nibbles 2c, 2c+1 of value c in {v23 : v01}. The high 32 bits of the product receive bytes
  // 2..3 (0x220022 = 0x22 + 0x22 << 16; no carries, every byte is <= 0x66 + 0x10).
  static CMPQ_DEVICE_INLINE uint64_t selectors(const uint32_t* words, int e) {
    const int first = 16 * (e / 4) + e % 4;  // step e spreads codes first + 4b (slot_code)
    const uint32_t spread = (words[code_word<2>(first)] >> code_shift<2>(first)) & 0x03030303u;
    return static_cast<uint64_t>(spread) * 0x220022u + 0x0000101000001010ull;
  }
  CMPQ_DEVICE_INLINE void fragment(const uint32_t* lo, const uint32_t* hi, int e, uint32_t (&a)[4]) const {
    const uint64_t sel_lo = selectors(lo, e);
    const uint64_t sel_hi = selectors(hi, e);
    a[0] = ptx::prmt(lo01, lo23, static_cast<uint32_t>(sel_lo));
    a[1] = ptx::prmt(hi01, hi23, static_cast<uint32_t>(sel_hi));
    a[2] = ptx::prmt(lo01, lo23, static_cast<uint32_t>(sel_lo >> 32));
    a[3] = ptx::prmt(hi01, hi23, static_cast<uint32_t>(sel_hi >> 32));
  }
};

// One 16-byte activation load through the read-only path (LDG.128.CONSTANT, as __ldg). A volatile asm, so
// the compiler keeps it in program order with the (volatile) mmas: with many n8 tiles, hoisting every
// tile's loads of a group ahead of the mmas would need 4 registers per load and spill.
CMPQ_DEVICE_INLINE uint4 load_x(const uint4* p) {
#if defined(__CUDA_ARCH__)
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
#else
  return __ldg(p);
#endif
}

// One warp's share of one segment: rows g and g + 8 of the tile, and the lane's slices of x for NT n8
// tiles. The workspace layout is the kernel's: a group's slice for the lane's batch row of tile i starts
// kGroupStride * group + kTileStride * i sixteen-byte vectors from `xs` of group 0, tile 0 (both compile-
// time constants, so every activation load is one instruction with an immediate offset). The pointers walk
// the segment an iteration at a time (pointer increments, not offsets recomputed from the row index: the
// loop then holds only loads, decode and mma).
template <int BITS, int NT, int LG, int kGroupStride, int kTileStride>
struct SegmentPass {
  static constexpr int kIterGroups = kQuadLanes * LG;  // groups of each row per warp iteration
  Decoder<BITS> decoder;
  const uint32_t* lo;  // row g's words of the lane's first group of the current iteration
  const uint32_t* hi;  // row g + 8's
  const uint4* xs;     // the lane's slice of the same group, tile 0

  CMPQ_DEVICE_INLINE void advance(int iterations) {
    lo += iterations * kIterGroups * BITS;
    hi += iterations * kIterGroups * BITS;
    xs += iterations * kIterGroups * kGroupStride;
  }

  // Groups t + 4j (j < LG) of the iteration, both rows, every n8 tile. kTail masks groups past
  // the segment's end, `remaining` groups from the lane's first (zero words and activations: a finite
  // codebook value times zero).
  template <bool kTail>
  CMPQ_DEVICE_INLINE void iteration(float (&acc)[NT][4], int remaining = 0) const {
    uint32_t lo_words[LG][BITS], hi_words[LG][BITS];
#pragma unroll
    for (int j = 0; j < LG; ++j) {
      if (kTail && kQuadLanes * j >= remaining) {
#pragma unroll
        for (int w = 0; w < BITS; ++w) lo_words[j][w] = hi_words[j][w] = 0;
        continue;
      }
      load_group<BITS>(lo + kQuadLanes * j * BITS, lo_words[j]);
      load_group<BITS>(hi + kQuadLanes * j * BITS, hi_words[j]);
    }
#pragma unroll
    for (int j = 0; j < LG; ++j) {
      const bool past_end = kTail && kQuadLanes * j >= remaining;
#pragma unroll
      for (int q = 0; q < kGroupVectors; ++q) {
        uint32_t a[2][4];  // k-steps 2q and 2q + 1
        decoder.fragment(lo_words[j], hi_words[j], 2 * q, a[0]);
        decoder.fragment(lo_words[j], hi_words[j], 2 * q + 1, a[1]);
#pragma unroll
        for (int i = 0; i < NT; ++i) {  // one 16-byte load per n8 tile: its activations of both k-steps
          const uint4 v =
              past_end ? make_uint4(0, 0, 0, 0) : load_x(xs + kQuadLanes * j * kGroupStride + i * kTileStride + q);
          const uint32_t b0[2] = {v.x, v.y}, b1[2] = {v.z, v.w};
          ptx::mma_m16n8k16_f16f32(acc[i], a[0], b0, acc[i]);
          ptx::mma_m16n8k16_f16f32(acc[i], a[1], b1, acc[i]);
        }
      }
    }
  }
};

// The 16-bit value a pair table holds for codebook entry h (fp16 bits): h itself for fp16 (the GEMV and the
// GEMM multiply in fp16), h rounded once to bf16 for the dense decode's bf16 output (dequant.cu).
template <class V>
CMPQ_DEVICE_INLINE uint32_t value_bits(uint16_t h) {
  if constexpr (std::is_same_v<V, __half>)
    return h;
  else
    return Act<V>::bits_from_float(half_bits_to_float(h));
}

// The BITS-bit pair table of the tile's rows (from row0) at `table`, in shared memory, values of type V.
// Thread i fills entries of tile row i % 16; each 16-byte store writes that entry for the four lanes
// (t = 0..3) that look it up. Rows past n repeat row n - 1. A barrier must follow before any lookup.
template <class V, int BITS>
CMPQ_DEVICE_INLINE void fill_table(const LayerView& layer, int row0, unsigned char* table) {
  constexpr int kPerThread = (1 << (2 * BITS)) * kTileRows / kThreads;
  static_assert(kPerThread >= 1 && (1 << (2 * BITS)) * kTileRows % kThreads == 0, "whole entries per thread");
  if (layer.seg_k[SegmentTraits<BITS>::kSegment] == 0) return;
  const int r = threadIdx.x % kTileRows;
  const uint16_t* codebook = layer.row_codebook(SegmentTraits<BITS>::kSegment, min(row0 + r, layer.n - 1));
  const int entry0 = threadIdx.x / kTileRows * kPerThread;
  unsigned char* column = table + (r / kHiRow) * kHiRowBytes + (r % kHiRow) * kQuadLanes * 4;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int entry = entry0 + i;  // = even code | odd code << BITS
    const uint32_t pair = value_bits<V>(codebook[entry & ((1 << BITS) - 1)]) | value_bits<V>(codebook[entry >> BITS]) << 16;
    *reinterpret_cast<uint4*>(column + entry * kEntryBytes) = make_uint4(pair, pair, pair, pair);
  }
}

// The GEMV's and GEMM's fp16 tables for the 4-bit and 3-bit segments.
CMPQ_DEVICE_INLINE void fill_tables(const LayerView& layer, int row0, unsigned char* smem) {
  fill_table<__half, 4>(layer, row0, smem + kTable4Offset);
  fill_table<__half, 3>(layer, row0, smem + kTable3Offset);
}

// The K split of a tile: the packed groups [group_lo, group_hi) (all segments, memory order) go to `warps`
// warps in iterations of kIterGroups groups of each row, warp w taking iterations w, w + warps, .. numbered
// across the segments (segment s's iterations follow those of the segments before it), so every warp gets
// work however the segments divide. For each segment with groups in the range, visit(seg, first, offset,
// groups) gets the segment's traits, this warp's first iteration in it, the range's first group in the
// segment (counted from the segment's start) and how many groups of the segment the range holds.
template <int kIterGroups, class Visit>
CMPQ_DEVICE_INLINE void for_each_segment(const LayerView& layer, int group_lo, int group_hi, int warp, int warps,
                                         Visit visit) {
  int iterations_before = 0;
  auto run = [&](auto seg) {
    const int start = layer.group_begin(seg.kSegment);
    const int begin = max(start, group_lo);
    const int groups = min(start + layer.groups(seg.kSegment), group_hi) - begin;
    if (groups <= 0) return;  // an empty segment has no codes and a codebook of 0 columns: read nothing
    visit(seg, ((warp - iterations_before) % warps + warps) % warps, begin - start, groups);
    iterations_before += (groups + kIterGroups - 1) / kIterGroups;
  };
  run(SegmentTraits<4>{});
  run(SegmentTraits<3>{});
  run(SegmentTraits<2>{});
}

// One warp's iterations of one segment (`first` and `groups` from for_each_segment): every kWarps-th whole
// iteration from `first`, then the partial last one if it is this warp's. `pass` (SegmentPass, or the dense
// decode's DecodePass) walks its pointers with advance(iterations) and runs iteration<kTail>(args..., remaining).
template <int kIterGroups, class Pass, class... Args>
CMPQ_DEVICE_INLINE void run_iterations(Pass& pass, int first, int groups, Args&... args) {
  const int t = threadIdx.x % kWarpSize % kQuadLanes;
  const int full = groups / kIterGroups;
  const int iterations = (groups + kIterGroups - 1) / kIterGroups;
  int it = first;
  pass.advance(it);
  for (; it < full; it += kWarps) {
    pass.template iteration<false>(args...);
    pass.advance(kWarps);
  }
  if (it < iterations) pass.template iteration<true>(args..., groups - t - it * kIterGroups);
}

// Every segment of the tile at rows row_lo (g) and row_hi (g + 8) into acc, this warp's share of K.
// x_slice(group) is the lane's tile-0 slice of a group in the kernel's workspace layout. The tables must be
// filled and published (fill_tables, then a barrier) before the call.
template <int NT, int LG, int kGroupStride, int kTileStride, class XSlice>
CMPQ_DEVICE_INLINE void multiply_tile(const LayerView& layer, ptx::SharedAddress tables, int row_lo, int row_hi,
                                      XSlice x_slice, float (&acc)[NT][4]) {
  const int lane = threadIdx.x % kWarpSize;
  const int t = lane % kQuadLanes;
  constexpr int kIterGroups = kQuadLanes * LG;
  const int warp = threadIdx.x / kWarpSize;
  for_each_segment<kIterGroups>(layer, 0, layer.total_groups(), warp, kWarps, [&](auto seg, int first, int, int groups) {
    constexpr int kBits = decltype(seg)::kBits;
    constexpr int s = seg.kSegment;
    SegmentPass<kBits, NT, LG, kGroupStride, kTileStride> pass;
    if constexpr (kBits == 2) {
      const uint16_t* cb_lo = layer.row_codebook(s, row_lo);
      const uint16_t* cb_hi = layer.row_codebook(s, row_hi);
      pass.decoder.lo01 = cb_lo[0] | static_cast<uint32_t>(cb_lo[1]) << 16;
      pass.decoder.lo23 = cb_lo[2] | static_cast<uint32_t>(cb_lo[3]) << 16;
      pass.decoder.hi01 = cb_hi[0] | static_cast<uint32_t>(cb_hi[1]) << 16;
      pass.decoder.hi23 = cb_hi[2] | static_cast<uint32_t>(cb_hi[3]) << 16;
    } else {
      pass.decoder.table = tables + (kBits == 4 ? kTable4Offset : kTable3Offset);
      pass.decoder.lane4 = static_cast<uint32_t>(lane) * 4;
    }
    pass.lo = layer.row_codes(s, row_lo) + t * kBits;
    pass.hi = layer.row_codes(s, row_hi) + t * kBits;
    pass.xs = x_slice(layer.group_begin(s) + t);
    run_iterations<kIterGroups>(pass, first, groups, acc);
  });
}

// Dynamic shared memory for the tables: both when there is a 4-bit segment (the 4-bit table's offset is
// fixed, so loop addresses are immediates), the 3-bit table alone, or none.
inline int tables_bytes(const LayerView& layer) {
  if (layer.seg_k[0] > 0) return kTablesBytes;
  return layer.seg_k[1] > 0 ? kTable4Offset : 0;
}

// The x workspace: position p of group G's slice for batch row b holds fp16(x[b][perm[32 G + slot_code(bits
// of group G, p)]] * 2^s(b)), for batch rows b < rows; rows b >= m (the GEMM's padding to whole m16 tiles)
// are zero. The kernel picks the layout: batch rows come in tiles of tile_rows, and the slice sits at
// (b / tile_rows) * tile_stride + (b % tile_rows) * batch_stride + G * group_stride. The GEMV lays x out
// batch-major (one tile; x rows in packed order), the GEMM group-major within each batch tile (a group's
// slices of the tile's rows together). Eight positions per thread, one 16-byte store.
struct XLayout {
  int tile_rows;
  int64_t tile_stride, batch_stride, group_stride;  // fp16 elements
};

template <class T>
__global__ void __launch_bounds__(kThreads)
    cmpq_gather_kernel(LayerView layer, const T* __restrict__ x, const int32_t* __restrict__ perm,
                       const T* __restrict__ absmax, __half* __restrict__ xw, int m, int rows, XLayout layout) {
  constexpr int kPerThread = sizeof(uint4) / sizeof(__half);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int per_row = layer.k / kPerThread;
  if (i >= static_cast<int64_t>(rows) * per_row) return;
  const int batch = static_cast<int>(i / per_row);
  const int column0 = static_cast<int>(i % per_row) * kPerThread;
  const int group = column0 / kGroupCodes;
  uint32_t packed[kPerThread / 2] = {0, 0, 0, 0};
  if (batch < m) {
    const int bits = segment_bits(layer.segment_of_group(group));
    const int32_t* group_perm = perm + group * kGroupCodes;
    const T* x_row = x + static_cast<int64_t>(batch) * layer.k;
    const float scale = power_of_two(row_scale_exponent(absmax, batch));
    auto value = [&](int q) -> uint32_t {
      const T v = x_row[group_perm[slot_code(bits, column0 % kGroupCodes + q)]];
      if constexpr (std::is_same_v<T, __half>)
        return __half_as_ushort(v);
      else
        return __half_as_ushort(__float2half_rn(Act<T>::to_float(v) * scale));  // exact: see scale_exponent
    };
#pragma unroll
    for (int q = 0; q < kPerThread; q += 2) packed[q / 2] = value(q) | value(q + 1) << 16;
  }
  const int64_t at = batch / layout.tile_rows * layout.tile_stride + batch % layout.tile_rows * layout.batch_stride +
                     group * layout.group_stride + column0 % kGroupCodes;
  *reinterpret_cast<uint4*>(xw + at) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
}

template <class T>
Status launch_gather(const LayerView& layer, const void* x, const int32_t* perm, const void* absmax, __half* xw,
                     int m, int rows, const XLayout& layout, cudaStream_t stream) {
  auto* gather = cmpq_gather_kernel<T>;
  const int64_t threads = static_cast<int64_t>(rows) * layer.k / (sizeof(uint4) / sizeof(__half));
  CMPQ_LAUNCH(gather, dim3(static_cast<unsigned>((threads + kThreads - 1) / kThreads)), dim3(kThreads), 0, stream,
              layer, static_cast<const T*>(x), perm, static_cast<const T*>(absmax), xw, m, rows, layout);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kLaunchFailed;
}

}  // namespace tile
}  // namespace cuda
}  // namespace cmpq
