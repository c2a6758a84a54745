// ptx.cuh — the inline-PTX instructions the kernels use (mma.sync fp16/bf16 and int8, ldmatrix, prmt, lop3,
// ld.shared), plus the cp.async copies the pipelined kernels are built on next, each with a C++ twin for the CPU
// emulation.
// Everything lives in cmpq::ptx (kernels inside namespace cmpq write ptx::mma_m16n8k16_f16f32(...)).
//
// Every helper has three branches: real asm when compiling device code (__CUDA_ARCH__); the emulation under
// a plain C++ compiler (!__CUDACC__; collective instructions go through emu's warp_collective); and an
// empty body for nvcc's host pass, which compiles device function bodies without __CUDA_ARCH__ and never
// runs them. The emulation follows the PTX ISA; where the GPU's result is not bit-defined (mma summation
// order) the twin documents its choice and tests compare with tolerances.
#pragma once

#include <stdint.h>

#include "compat.cuh"

#if !defined(__CUDACC__)
#include <string>
#endif

namespace cmpq {
namespace ptx {

// ---- tensor cores ----------------------------------------------------------------------------------------

#if !defined(__CUDACC__)
namespace emu_ptx {
// Fragment layout of mma.m16n8k16 (PTX ISA), g = lane >> 2, t = lane & 3, low half = first element:
//   A 16x16 row-major: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16x8 (K x N):    b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C/D 16x8 fp32:     c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// D[i][j] = C[i][j] + A[i][0]*B[0][j] + ... + A[i][15]*B[15][j], added left to right in fp32. Every product
// of two fp16/bf16 values is exact in fp32, so only the additions round; the GPU's order and internal
// precision differ, so results agree within a few fp32 ulps of the sum's magnitude, not bit for bit.
struct MmaIn { uint32_t a[4], b[2]; float c[4]; };
struct MmaOut { float d[4]; };
template <bool BF16>
inline float mma_elem(uint32_t word, int hi) {
  const auto bits = static_cast<unsigned short>(word >> (16 * hi));
  return BF16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
}
template <bool BF16>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  const MmaIn mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  const MmaOut out = emu::warp_collective<MmaIn, MmaOut>(0xffffffffu, mine, [](const MmaIn* in, MmaOut* o) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = mma_elem<BF16>(in[l].a[0], h);
        A[g + 8][2 * t + h] = mma_elem<BF16>(in[l].a[1], h);
        A[g][2 * t + 8 + h] = mma_elem<BF16>(in[l].a[2], h);
        A[g + 8][2 * t + 8 + h] = mma_elem<BF16>(in[l].a[3], h);
        B[2 * t + h][g] = mma_elem<BF16>(in[l].b[0], h);
        B[2 * t + 8 + h][g] = mma_elem<BF16>(in[l].b[1], h);
        C[g][2 * t + h] = in[l].c[h];
        C[g + 8][2 * t + h] = in[l].c[2 + h];
      }
    }
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j)
        for (int k = 0; k < 16; ++k) C[i][j] += A[i][k] * B[k][j];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      o[l] = MmaOut{{C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1]}};
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = out.d[i];
}
}  // namespace emu_ptx
#endif

// D = A * B + C on one 16x8x16 tile, fp16 inputs, fp32 accumulate; the whole warp participates (layout above).
CMPQ_DEVICE_INLINE void mma_m16n8k16_f16f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif !defined(__CUDACC__)
  emu_ptx::mma_m16n8k16<false>(d, a, b, c);
#else
  (void)d, (void)a, (void)b, (void)c;
#endif
}

// The bf16 twin: same fragment layout, bf16 inputs (the format of BF16 activations), fp32 accumulate.
CMPQ_DEVICE_INLINE void mma_m16n8k16_bf16f32(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif !defined(__CUDACC__)
  emu_ptx::mma_m16n8k16<true>(d, a, b, c);
#else
  (void)d, (void)a, (void)b, (void)c;
#endif
}

// ---- integer tensor cores: int8 x int8 -> int32 (MixLLM, mixllm_gemm.cu) -----------------------------------

#if !defined(__CUDACC__)
namespace emu_ptx {
// Fragment layout of mma.m16n8k32 with .s8 operands (PTX ISA, "Matrix Fragments for mma.m16n8k32"),
// g = lane >> 2, t = lane & 3, byte 0 of a register = the lowest column (A) or row (B) index:
//   A 16x32 row-major: a0 = A[g][4t..4t+3], a1 = A[g+8][4t..4t+3], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
//   B 32x8 (K x N):    b0 = B[4t..4t+3][g], b1 = B[16+4t..16+4t+3][g]
//   C/D 16x8 s32:      c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// Integer products and sums are exact (no .satfinite: the sum wraps mod 2^32, which the kernels never reach),
// so unlike the fp16 twin this one is bit-exact: D = C + A * B in int32.
struct MmaS8In { uint32_t a[4], b[2]; int32_t c[4]; };
struct MmaS8Out { int32_t d[4]; };
inline int32_t s8_byte(uint32_t word, int i) { return static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * i))); }
inline void mma_m16n8k32_s8(int32_t d[4], const uint32_t a[4], const uint32_t b[2], const int32_t c[4]) {
  const MmaS8In mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  const MmaS8Out out = emu::warp_collective<MmaS8In, MmaS8Out>(0xffffffffu, mine, [](const MmaS8In* in, MmaS8Out* o) {
    int32_t A[16][32], B[32][8];
    uint32_t C[16][8];  // unsigned: the wrap-around of s32 addition without undefined behaviour
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < 4; ++i) {
        A[g][4 * t + i] = s8_byte(in[l].a[0], i);
        A[g + 8][4 * t + i] = s8_byte(in[l].a[1], i);
        A[g][16 + 4 * t + i] = s8_byte(in[l].a[2], i);
        A[g + 8][16 + 4 * t + i] = s8_byte(in[l].a[3], i);
        B[4 * t + i][g] = s8_byte(in[l].b[0], i);
        B[16 + 4 * t + i][g] = s8_byte(in[l].b[1], i);
      }
      C[g][2 * t] = static_cast<uint32_t>(in[l].c[0]), C[g][2 * t + 1] = static_cast<uint32_t>(in[l].c[1]);
      C[g + 8][2 * t] = static_cast<uint32_t>(in[l].c[2]), C[g + 8][2 * t + 1] = static_cast<uint32_t>(in[l].c[3]);
    }
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j)
        for (int k = 0; k < 32; ++k) C[i][j] += static_cast<uint32_t>(A[i][k] * B[k][j]);
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      o[l] = MmaS8Out{{static_cast<int32_t>(C[g][2 * t]), static_cast<int32_t>(C[g][2 * t + 1]),
                       static_cast<int32_t>(C[g + 8][2 * t]), static_cast<int32_t>(C[g + 8][2 * t + 1])}};
    }
  });
  for (int i = 0; i < 4; ++i) d[i] = out.d[i];
}
}  // namespace emu_ptx
#endif

// D = A * B + C on one 16x8x32 tile of signed bytes, exact int32 accumulate; the whole warp participates
// (layout above).
CMPQ_DEVICE_INLINE void mma_m16n8k32_s8s32(int32_t d[4], const uint32_t a[4], const uint32_t b[2], const int32_t c[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
#elif !defined(__CUDACC__)
  emu_ptx::mma_m16n8k32_s8(d, a, b, c);
#else
  (void)d, (void)a, (void)b, (void)c;
#endif
}

// ---- ldmatrix: 8x8 b16 tiles from shared memory straight into mma fragments ------------------------------

#if !defined(__CUDACC__)
namespace emu_ptx {
// Lanes 8i..8i+7 give the 16-byte row addresses of matrix i; lane l receives in r[i] the elements
// (row l>>2, columns 2(l&3), 2(l&3)+1) of matrix i.
inline void ldmatrix_x4(uint32_t r[4], const void* row) {
  struct Out { uint32_t r[4]; };
  const Out out = emu::warp_collective<const void*, Out>(0xffffffffu, row, [](const void* const* rows, Out* o) {
    for (int i = 0; i < 32; ++i)
      if (reinterpret_cast<uintptr_t>(rows[i]) % 16 != 0)
        throw std::runtime_error("ldmatrix: row address of lane " + std::to_string(i) + " is not 16-byte aligned");
    auto elem = [&](int m, int r_, int c_) {
      uint16_t v;
      std::memcpy(&v, static_cast<const char*>(rows[8 * m + r_]) + 2 * c_, 2);
      return static_cast<uint32_t>(v);
    };
    for (int l = 0; l < 32; ++l)
      for (int m = 0; m < 4; ++m) o[l].r[m] = elem(m, l >> 2, 2 * (l & 3)) | elem(m, l >> 2, 2 * (l & 3) + 1) << 16;
  });
  for (int m = 0; m < 4; ++m) r[m] = out.r[m];
}
}  // namespace emu_ptx
#endif

// No "memory" clobber, as in CUTLASS: the __syncthreads / cp_async_wait that must precede a read of data
// other threads wrote already order it, and a clobber would force reloads of unrelated registers.
CMPQ_DEVICE_INLINE void ldmatrix_x4(uint32_t r[4], const void* smem_row_ptr) {
#if defined(__CUDA_ARCH__)
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
#elif !defined(__CUDACC__)
  emu_ptx::ldmatrix_x4(r, smem_row_ptr);
#else
  (void)r, (void)smem_row_ptr;
#endif
}

// ---- byte permute and shared loads for table lookups ---------------------------------------------------

// PTX prmt.b32 (default mode): byte i of the result is byte (sel >> 4i) & 7 of {b : a}, replaced by the
// sign of that byte (0x00 / 0xff) when bit 3 of the nibble is set; sel's upper 16 bits are ignored. CUDA's
// __byte_perm masks the selector to 3 bits per nibble first, an extra LOP3 per call for runtime selectors.
CMPQ_DEVICE_INLINE uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#elif !defined(__CUDACC__)
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nibble = (sel >> (4 * i)) & 0xfu;
    uint32_t byte = static_cast<uint32_t>(v >> (8 * (nibble & 7u))) & 0xffu;
    if (nibble & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    d |= byte << (8 * i);
  }
  return d;
#else
  (void)a, (void)b, (void)sel;
  return 0;
#endif
}

// PTX lop3.b32: any bitwise function of three words, given as the truth table kLut over the operands'
// canonical patterns a = 0xf0, b = 0xcc, c = 0xaa (e.g. (a & b) | c is 0xea). Written out because the
// compiler splits (x & mask) | y into two LOP3 when it knows which bits y can have.
template <uint32_t kLut>
CMPQ_DEVICE_INLINE uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(kLut <= 0xff, "lop3 takes an 8-bit truth table");
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return d;
#elif !defined(__CUDACC__)
  uint32_t d = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t index = ((a >> i) & 1u) << 2 | ((b >> i) & 1u) << 1 | ((c >> i) & 1u);
    d |= ((kLut >> index) & 1u) << i;
  }
  return d;
#else
  (void)a, (void)b, (void)c;
  return 0;
#endif
}

// A shared-memory location for ld_shared_u32: the 32-bit shared-window address on the GPU, a pointer under
// the emulation. A table lookup then costs the load alone: ptxas folds the base into it (LDS [R+UR+imm] on
// sm_90, LDS [R+imm] before), where through a generic pointer it adds the base before every load.
#if defined(__CUDACC__)
using SharedAddress = uint32_t;
#else
using SharedAddress = const unsigned char*;
#endif

CMPQ_DEVICE_INLINE SharedAddress shared_address(const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // sm_90's shared window holds the CTA's cluster rank: the address is a run-time value. Computed in a
  // volatile asm, it is computed once, in a uniform register; through __cvta_generic_to_shared ptxas may
  // recompute it inside a loop in an ordinary register and add it before every load.
  uint32_t address;
  asm volatile("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }\n" : "=r"(address) : "l"(smem));
  return address;
#elif defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem));  // a link-time constant: folds into the load
#elif !defined(__CUDACC__)
  return static_cast<const unsigned char*>(smem);
#else
  (void)smem;
  return 0;
#endif
}

// The 32-bit word at `base` + `offset` bytes of shared memory. volatile: it must not move across the
// __syncthreads that publishes the data.
CMPQ_DEVICE_INLINE uint32_t ld_shared_u32(SharedAddress base, uint32_t offset) {
#if defined(__CUDA_ARCH__)
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(base + offset));
  return v;
#elif !defined(__CUDACC__)
  uint32_t v;
  std::memcpy(&v, base + offset, sizeof(v));
  return v;
#else
  (void)base, (void)offset;
  return 0;
#endif
}

// ---- cp.async: global -> shared copies that bypass registers and overlap with compute ---------------------
// The emulation defers each copy until a cp_async_wait<N> retires its group, so a missing wait (or a
// wait<N> that leaves the needed group in flight) shows up as poisoned shared memory, as it would on a GPU.

// 16 bytes, both addresses 16-byte aligned; .cg caches in L2 only (streamed weights do not pollute L1).
CMPQ_DEVICE_INLINE void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__)
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#elif !defined(__CUDACC__)
  if ((reinterpret_cast<uintptr_t>(smem) | reinterpret_cast<uintptr_t>(gmem)) % 16 != 0)
    throw std::runtime_error("cp_async_16: addresses must be 16-byte aligned");
  emu::detail::cp_async(smem, gmem, 16, false);
#else
  (void)smem, (void)gmem;
#endif
}

// As cp_async_16, but writes 16 zero bytes and reads nothing from gmem when pred is false (tile edges).
CMPQ_DEVICE_INLINE void cp_async_16_pred(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__)
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
#elif !defined(__CUDACC__)
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || (pred && reinterpret_cast<uintptr_t>(gmem) % 16 != 0))
    throw std::runtime_error("cp_async_16_pred: addresses must be 16-byte aligned");
  emu::detail::cp_async(smem, gmem, 16, !pred);
#else
  (void)smem, (void)gmem, (void)pred;
#endif
}

// Closes the current group of cp.async operations (the unit cp_async_wait counts).
CMPQ_DEVICE_INLINE void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif !defined(__CUDACC__)
  emu::detail::cp_async_commit();
#endif
}

// Waits until at most N committed groups are in flight (N = pipeline depth - 1 in a multi-stage loop). The
// copies are visible to the calling thread only: a __syncthreads must follow before others read them.
template <int N>
CMPQ_DEVICE_INLINE void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif !defined(__CUDACC__)
  emu::detail::cp_async_wait(N);
#endif
}

}  // namespace ptx
}  // namespace cmpq
