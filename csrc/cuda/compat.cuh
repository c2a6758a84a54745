// compat.cuh — the first include of every kernel .cu: one source builds with nvcc (real CUDA) and with a
// plain C++17 compiler (the CPU emulation in csrc/emu/, used by the CPU test suite; DESIGN.md §3).
//
//   #include "cuda/compat.cuh"   // with -Icsrc; then "cuda/ptx.cuh" for the cmpq::ptx inline-PTX helpers
//
//   template <int BITS> __global__ void gemv(const float* x, float* y, int n) {
//     CMPQ_DYNAMIC_SMEM(float, xs);              // dynamic shared memory, 16-byte aligned
//     __shared__ float partial[32];              // static shared memory works unchanged
//     ...
//   }
//   cudaError_t launch_gemv(const float* x, float* y, int n, cudaStream_t stream) {
//     auto* kernel = gemv<4>;                    // a plain identifier: no template commas in the macro
//     CMPQ_LAUNCH(kernel, dim3(blocks), dim3(128), smem_bytes, stream, x, y, n);
//     return cudaGetLastError();                 // emulation: errors throw std::runtime_error instead
//   }
//
// Under the emulation the kernel arguments are evaluated once per emulated thread (so keep them free of
// side effects), and CMPQ_EMU is defined for the rare test-only difference.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define CMPQ_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
// `extern __shared__` names one per-block array; the element type only fixes how the kernel views it.
#define CMPQ_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#else
#include "../emu/emu.h"

// The lambda runs once per emulated thread; arguments are captured by reference from the launcher. The
// kernel's address lets hazard reports name it.
#define CMPQ_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                    \
  ::cmpq::emu::launch((grid), (block), (smem_bytes), (stream), [&] { kernel(__VA_ARGS__); }, \
                      reinterpret_cast<const void*>(kernel))
// `extern static` is not C++, so the emulation hands out its per-block buffer through a pointer.
#define CMPQ_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::cmpq::emu::dynamic_smem())
#endif

// Small device helpers: force inlining so register allocation sees the whole kernel.
#define CMPQ_DEVICE_INLINE __device__ __forceinline__
