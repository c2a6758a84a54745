// cmpq_layout.h — the CMPQ packed bit layout, written once.
//
// This header is the only definition of how codes sit in memory. It is plain C++17 with no torch and no
// CUDA runtime dependency, so the CPU kernel, the CUDA kernels and the host-emulated kernel runs all
// include the same functions. `cmpq_kernels/format.py` mirrors it in NumPy, and the test suite proves
// the two agree bit for bit by unpacking Python-packed words through `cmpq::unpack_codes`.
//
// ---------------------------------------------------------------------------------------------------
// Packed format, version 1 (see DESIGN.md §2)
//
//   A layer W[N, K] is stored with its input channels permuted so that each bit width is one contiguous
//   segment, in the order [4-bit | 3-bit | 2-bit]; perm[j] is the original channel at packed column j.
//   Every segment width is a multiple of kGroupCodes (32) channels: the packing granule.
//
//   codes_b    uint32 [N, (seg_k_b / 32) * b]   row-major; a row's groups of 32 codes follow each other,
//                                               each group is exactly b words, so no bit is wasted.
//   codebook_b fp16   [ceil(N / codebook_rows), 2^b]   row n uses codebook row n / codebook_rows;
//                                               0 columns when the segment is empty (never read then).
//   outliers   CSR over packed columns: row_ptr int32 [N+1], col int16|int32 [nnz], val fp16 [nnz]
//              holding the residual W - Q(W), so the dense path stays uniform. Columns are sorted
//              within a row; repeated columns are legal, adjacent, and add up.
//
// Why row-major groups of b words: a warp that owns a row reads consecutive groups, so every DRAM sector
// it touches is fully used; a group never straddles a word, so decode needs no cross-word funnel shifts
// except the two 3-bit spare codes below.
//
// Bit diagram of one group (code j = j-th packed column of the group, bit 0 = least significant):
//
//   4-bit  (4 words)  word j/8,  bits 4*(j%8) .. +3
//   2-bit  (2 words)  word j/16, bits 2*(j%16) .. +1
//   3-bit  (3 words)  j < 30:   word j/10, bits 3*(j%10) .. +2        (bits 0..29 of each word)
//                     j = 30,31: the spare bits 30..31 of the three words form one 6-bit field
//                                s = w0[31:30] | w1[31:30] << 2 | w2[31:30] << 4,
//                                code30 = s[2:0], code31 = s[5:3]
//
// Pair view: for every width, codes (2i, 2i+1) sit next to each other as one 2b-bit field with the even
// code in the low bits (for 3-bit, pair 15 is exactly the spare field s). A kernel can therefore index
// a 2^(2b)-entry table of half2 pairs with one shift-and-mask per two weights (FLUTE's pair tables).
// ---------------------------------------------------------------------------------------------------
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define CMPQ_HD __host__ __device__ __forceinline__
#else
#define CMPQ_HD inline
#endif

namespace cmpq {

constexpr int kFormatVersion = 1;
constexpr int kGroupCodes = 32;          // channels per packing group (the segment granule)
constexpr int kNumSegments = 3;          // segments in memory order: 4-bit, 3-bit, 2-bit
constexpr int kMaxBits = 4;

// Bit width of segment s in memory order.
CMPQ_HD constexpr int segment_bits(int s) { return 4 - s; }

// Trait table per bit width: everything a kernel needs to know about one segment's storage.
template <int BITS>
struct SegmentTraits {
  static_assert(BITS >= 2 && BITS <= 4, "CMPQ stores 2-, 3- and 4-bit segments only");
  static constexpr int kBits = BITS;
  static constexpr int kSegment = kMaxBits - BITS;       // index in memory order
  static_assert(segment_bits(kSegment) == BITS, "kSegment inverts segment_bits");
  static constexpr int kWordsPerGroup = BITS;            // 32 codes * BITS bits / 32 bits per word
  static constexpr int kCodebookSize = 1 << BITS;
  static constexpr int kPairsPerGroup = kGroupCodes / 2;
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
};
static_assert(SegmentTraits<3>::kWordsPerGroup * 32 == kGroupCodes * 3, "3-bit groups must pack without waste");

// The one segment dispatch: runs f(SegmentTraits<bits>{}) for a runtime bit width (4, 3, otherwise 2) and
// returns its result. The body is compiled once per width with its traits as constants, so decode loops
// unroll, and LayerView's per-segment arrays are indexed by constants: a runtime index into a kernel
// parameter array would force a local-memory copy of the whole view. Bodies read seg.kBits, seg.kSegment.
template <class F>
CMPQ_HD auto with_segment_bits(int bits, F&& f) -> decltype(f(SegmentTraits<2>{})) {
  if (bits == 4) return f(SegmentTraits<4>{});
  if (bits == 3) return f(SegmentTraits<3>{});
  return f(SegmentTraits<2>{});
}

// A row of b-bit codes for a runtime b (the bindings' shape checks): whole groups of b words each.
CMPQ_HD constexpr bool whole_groups(int64_t words, int bits) { return words % bits == 0; }
CMPQ_HD constexpr int64_t channels_in_words(int64_t words, int bits) { return words / bits * kGroupCodes; }

// ---- decode -----------------------------------------------------------------------------------------

// The 6-bit spare field of a 3-bit group: codes 30 and 31, two bits at kSpareShift3 of each word.
constexpr int kSpareShift3 = 30;
CMPQ_HD uint32_t spare_field_3bit(const uint32_t* words) {
  return (words[0] >> kSpareShift3) | ((words[1] >> kSpareShift3) << 2) | ((words[2] >> kSpareShift3) << 4);
}

// Where code j (0..31) of a group sits: bits code_shift .. + BITS - 1 of word code_word. For 3-bit, codes 30
// and 31 are the spare field instead (spare_field_3bit), and code_word / code_shift do not apply to them.
template <int BITS>
CMPQ_HD constexpr int code_word(int j) {
  return BITS == 3 ? j / 10 : j / (32 / BITS);
}
template <int BITS>
CMPQ_HD constexpr int code_shift(int j) {
  return BITS == 3 ? 3 * (j % 10) : BITS * (j % (32 / BITS));
}

// Code j (0..31) of one packed group.
template <int BITS>
CMPQ_HD uint32_t group_code(const uint32_t* words, int j) {
  using T = SegmentTraits<BITS>;
  if constexpr (BITS == 3) {
    if (j >= 30) return (spare_field_3bit(words) >> (3 * (j - 30))) & T::kMask;
  }
  return (words[code_word<BITS>(j)] >> code_shift<BITS>(j)) & T::kMask;
}

// Pair field i (0..15) = code(2i) | code(2i+1) << BITS: the 2·BITS bits from code 2i's position on, one shift
// and mask per two weights (for 3-bit, pair 15 is the spare field).
template <int BITS>
CMPQ_HD uint32_t group_pair(const uint32_t* words, int i) {
  constexpr uint32_t kPairMask = (1u << (2 * BITS)) - 1u;
  if constexpr (BITS == 3) {
    if (i == 15) return spare_field_3bit(words);
  }
  return (words[code_word<BITS>(2 * i)] >> code_shift<BITS>(2 * i)) & kPairMask;
}

// All 32 codes of a group.
template <int BITS>
CMPQ_HD void unpack_group(const uint32_t* words, uint8_t* codes) {
  for (int j = 0; j < kGroupCodes; ++j) codes[j] = static_cast<uint8_t>(group_code<BITS>(words, j));
}

// ---- encode (host packer twin of format.py; used by tests and by on-device repacking) ---------------

template <int BITS>
CMPQ_HD void pack_group(const uint8_t* codes, uint32_t* words) {
  using T = SegmentTraits<BITS>;
  for (int w = 0; w < T::kWordsPerGroup; ++w) words[w] = 0;
  const int in_words = BITS == 3 ? 30 : kGroupCodes;  // 3-bit codes 30 and 31 go to the spare field
  for (int j = 0; j < in_words; ++j) words[code_word<BITS>(j)] |= (codes[j] & T::kMask) << code_shift<BITS>(j);
  if constexpr (BITS == 3) {
    const uint32_t spare = (codes[30] & T::kMask) | ((codes[31] & T::kMask) << 3);
    for (int w = 0; w < 3; ++w) words[w] |= ((spare >> (2 * w)) & 3u) << kSpareShift3;
  }
}

// ---- fp16 ------------------------------------------------------------------------------------------

// IEEE binary16 bits -> float, exact for every input (subnormals, inf, NaN). Codebooks and outlier values
// are stored as raw fp16 bits so this header needs neither cuda_fp16.h nor a host half type.
CMPQ_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  union {
    uint32_t u;
    float f;
  } pun{bits};
  return pun.f;
}

// ---- whole-layer view --------------------------------------------------------------------------------

// Raw pointers to one packed layer, filled by the bindings from validated tensors. Kernels take this and
// nothing else, so they never see torch.
struct LayerView {
  int n = 0;                                  // out_features (rows)
  int k = 0;                                  // in_features (packed columns)
  int seg_k[kNumSegments] = {0, 0, 0};        // channels per segment, memory order 4/3/2-bit
  const uint32_t* codes[kNumSegments] = {};   // [n, seg_k[s] / 32 * bits]
  const uint16_t* codebook[kNumSegments] = {};// fp16 bits, [ceil(n / codebook_rows), 2^bits]
  int codebook_rows = 1;                      // output rows sharing one codebook row
  const int32_t* row_ptr = nullptr;           // [n + 1]
  const void* col = nullptr;                  // [nnz], int16 or int32 by col_is_int32
  bool col_is_int32 = false;
  const uint16_t* val = nullptr;              // fp16 bits, [nnz]

  // What every kernel needs: rows, and columns that are whole packing groups.
  CMPQ_HD bool shape_ok() const { return n > 0 && k > 0 && k % kGroupCodes == 0; }
  CMPQ_HD int total_groups() const { return k / kGroupCodes; }
  CMPQ_HD int groups(int s) const { return seg_k[s] / kGroupCodes; }
  // Packed groups are numbered over all segments in memory order; group_begin(s) is segment s's first.
  CMPQ_HD int group_begin(int s) const { return (s > 0 ? groups(0) : 0) + (s > 1 ? groups(1) : 0); }
  CMPQ_HD int segment_of_group(int g) const { return g < group_begin(1) ? 0 : (g < group_begin(2) ? 1 : 2); }
  CMPQ_HD const uint32_t* row_codes(int s, int row) const {
    return codes[s] + static_cast<int64_t>(row) * groups(s) * segment_bits(s);
  }
  // The words of packed group g of a row; g lies in segment s.
  CMPQ_HD const uint32_t* group_words(int s, int row, int g) const {
    return row_codes(s, row) + (g - group_begin(s)) * segment_bits(s);
  }
  // Codebook row cb_row of segment s; output row `row` uses codebook row row / codebook_rows.
  CMPQ_HD const uint16_t* codebook_row(int s, int cb_row) const {
    return codebook[s] + static_cast<int64_t>(cb_row) * (1 << segment_bits(s));
  }
  CMPQ_HD const uint16_t* row_codebook(int s, int row) const { return codebook_row(s, row / codebook_rows); }
  // fp16 bits of the codebook value at packed column j of row (the dense part, without outliers).
  CMPQ_HD uint16_t dense_value_bits(int row, int j) const {
    const int g = j / kGroupCodes;
    return with_segment_bits(segment_bits(segment_of_group(g)), [&](auto seg) {
      const uint32_t* words = group_words(seg.kSegment, row, g);
      return row_codebook(seg.kSegment, row)[group_code<seg.kBits>(words, j % kGroupCodes)];
    });
  }
  CMPQ_HD int outlier_col(int32_t i) const {
    return col_is_int32 ? static_cast<const int32_t*>(col)[i] : static_cast<const int16_t*>(col)[i];
  }
};

}  // namespace cmpq
