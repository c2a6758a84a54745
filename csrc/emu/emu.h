// emu.h — a small SIMT emulation so CUDA kernel sources (.cu, written for nvcc) compile with g++ and run
// on the CPU. This is how CI proves kernel logic without a GPU (DESIGN.md §3 "Emulated runs").
//
// Include it through csrc/cuda/compat.cuh, never directly from a .cu file: compat.cuh picks the real
// CUDA headers under nvcc and this file under a plain C++17 compiler. No CUDA toolkit is needed here.
//
// Model
//   * One fiber per CUDA thread of a block; blocks run one after another (x fastest, then y, then z), so
//     `__shared__` (defined as `static`) is shared by exactly the fibers of the running block.
//   * A fiber runs until a switch point (__syncthreads, a warp collective) and then yields; the scheduler
//     resumes the runnable fibers in the selected order (Schedule below). Lane-level orders resume every
//     runnable fiber once per round, so all warps advance in lockstep: forward order hides a missing
//     __syncthreads between threads, reverse and random expose it. Warp-serial orders run one warp at a
//     time from one __syncthreads to the next, so a missing barrier between warps changes results.
//   * Shared-memory hazard checking (set_hazard_check, hazards.cpp) reports accesses of two warps to one
//     shared byte that no __syncthreads orders, whatever the schedule.
//   * Warp collectives (shuffles, ballot, __syncwarp, emulated mma/ldmatrix) share ONE primitive,
//     warp_collective(): every lane in `mask` deposits its input and blocks; the last arrival computes all
//     outputs at once; lanes read theirs. Lane = linear thread index % 32, warp = linear / 32, where
//     linear = x + y*blockDim.x + z*blockDim.x*blockDim.y (as on the GPU).
//   * Deadlocks (a barrier or collective that cannot complete because a thread exited or waits elsewhere)
//     and exceptions thrown by kernel code (e.g. __trap) end the launch: the stuck fibers are unwound and
//     launch() throws std::runtime_error naming the block and what every thread was doing.
//   * Random orders come from a seed (CMPQ_EMU_SCHEDULE=random:<seed> or warp-random:<seed>, default 0)
//     restarted at every launch, so a failing order replays exactly.
//   * cp.async (csrc/cuda/ptx.cuh) is deferred per thread until cp_async_wait retires its group, so a
//     missing or too-shallow wait reads the 0xFF poison of dynamic shared memory.
//   * Half-precision types and intrinsics round exactly like the GPU (RNE, subnormals, canonical NaN
//     0x7fff). Intentionally there are no implicit float conversions or operators on __half: torch builds
//     CUDA code with __CUDA_NO_HALF_OPERATORS__/__CUDA_NO_HALF_CONVERSIONS__, so kernels must use intrinsics.
//
// Build: g++ -std=c++17 with emu.cpp and hazards.cpp; add -Wno-unknown-pragmas under -Wall (kernels'
// `#pragma unroll`; a #pragma GCC diagnostic in this header cannot silence it before GCC 13). Compile the
// translation unit that includes the kernels with -fsanitize=thread (and link without it): hazards.cpp
// provides the memory-access hooks that flag calls, and must be linked into the same module as the kernels.
//
// Limits: launch() is neither reentrant nor concurrent — a mutex serializes host threads (torch may call
// from several), a launch from inside a kernel throws. Fibers share the launching thread's floating-point
// environment: MXCSR and the x87 control word are neither saved nor restored on a switch (kernels do not
// change rounding modes, and every fiber starts from the launching thread's settings). Static __shared__
// memory keeps its contents across blocks; only dynamic shared memory is re-poisoned (0xFF) per block. The
// hazard checker sees only code compiled with -fsanitize=thread, checks shared memory between warps of a
// block (not global memory, not lanes of one warp), and names static arrays only when their symbols are
// exported (templates' static locals in a shared library; -rdynamic for an executable).
#pragma once

#if defined(__CUDACC__)
#error "emu.h emulates CUDA for a plain C++ compiler; under nvcc include csrc/cuda/compat.cuh instead"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

#define CMPQ_EMU 1

// ---- keywords --------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
// No __noinline__: as a macro it breaks libstdc++'s own __attribute__((__noinline__)) (shared_ptr_base.h).
#define __launch_bounds__(...)
#define __restrict__ __restrict
// The GNU attribute, not alignas: CUDA code writes `__shared__ __align__(16) T x[N]`, and a standard
// attribute may not follow `static` inside the decl-specifiers.
#define __align__(n) __attribute__((aligned(n)))
// `static` so one array is shared by all fibers of the running block; cuda_fp16.h-style blanking would put
// a private copy on every fiber's stack and silently break every shared-memory algorithm.
#define __shared__ static

// ---- vector types and launch types (layout and alignment as in CUDA's vector_types.h) ---------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
// Launch failures throw from launch(), so the error-query functions only ever see success.
enum cudaError { cudaSuccess = 0 };
typedef cudaError cudaError_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
// Launchers raise the dynamic shared-memory limit before large launches; the emulation has no limit.
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

constexpr int warpSize = 32;

namespace cmpq {
namespace emu {

// Fiber order within a block.
//   Lane-level: a round resumes every runnable fiber once — kForward by ascending thread, kReverse
//   descending, kRandom in a fresh permutation per round. Catches ordering bugs between threads that meet
//   at the same switch points (within a warp, or a barrier missing where every warp yields anyway).
//   Warp-serial: each warp runs alone from one block-wide barrier to the next (its lanes still meet at
//   their collectives); warps in ascending order (kWarpForward), descending with lanes descending too
//   (kWarpReverse), or in a fresh permutation per barrier interval (kWarpRandom). A warp then finishes a
//   whole barrier interval before the next one starts it, so any cross-warp hazard changes the result.
enum class Schedule { kForward, kReverse, kRandom, kWarpForward, kWarpReverse, kWarpRandom };
// Schedule for later launches. Without a call, the first launch reads CMPQ_EMU_SCHEDULE (a name below;
// random ones may add :<seed>), default forward.
void set_schedule(Schedule schedule, uint64_t seed = 0);
Schedule get_schedule(uint64_t* seed = nullptr);
// Schedule by name: forward, reverse, random, warp-forward, warp-reverse, warp-random. False if unknown.
bool parse_schedule(const std::string& name, Schedule* schedule);
constexpr const char* kScheduleNames = "forward, reverse, random, warp-forward, warp-reverse or warp-random";

// Shared-memory hazard checking for later launches (default off: it costs time; see hazards.cpp).
void set_hazard_check(bool on);

// Runs body once per thread of every block. Not reentrant; host threads are serialized by a mutex.
// Throws std::runtime_error on invalid dimensions, deadlock, a shared-memory hazard, or an exception
// escaping the kernel. `kernel` (the __global__ function) only names the kernel in hazard reports.
void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, cudaStream_t stream, std::function<void()> body,
            const void* kernel);
// The running block's dynamic shared memory: 16-byte aligned, filled with 0xFF before each block.
void* dynamic_smem();

namespace detail {
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
// Updated by the scheduler before it resumes a fiber: all fibers share one OS thread, so thread_local
// storage cannot tell them apart.
extern Builtins g_builtins;

// The collective primitive, type-erased. `in`/`out` point into the arriving fiber's stack, which stays
// alive while it waits; the last arrival calls run(ins, outs, ctx) with nullptr for lanes not in mask.
using CollectiveFn = void (*)(const void* const* ins, void* const* outs, void* ctx);
void collective(unsigned mask, const void* tag, const void* in, void* out, CollectiveFn run, void* ctx);
template <class In, class Out, class F>
struct CollectiveTag { static constexpr char id = 0; };  // one address per kind of collective

void sync_threads();
[[noreturn]] void trap();

// Deferred cp.async of the calling fiber: copies happen at cp_async_wait, so a missing wait shows up.
void cp_async(void* dst, const void* src, size_t bytes, bool zero_fill);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// Round v + tail to a 16-bit float format (RNE; `tail` only breaks exact ties, see emu.cpp).
uint16_t round_to_f16(double v, double tail = 0.0);
uint16_t round_to_bf16(double v, double tail = 0.0);
}  // namespace detail

// All lanes of `mask` (which must contain the caller) meet here; the last arrival runs
// compute(const In* in, Out* out) with in[l]/out[l] for every lane l (entries of lanes outside mask are
// value-initialised and ignored), then each lane returns its out[lane]. compute runs on whichever lane
// arrives last, so anything it captures must be warp-uniform; per-lane data belongs in In. All lanes of
// one meeting must use the same In/Out/F, otherwise launch() reports mismatched collectives.
template <class In, class Out, class F>
Out warp_collective(unsigned mask, const In& mine, F compute) {
  Out result{};
  detail::collective(
      mask, &detail::CollectiveTag<In, Out, F>::id, &mine, &result,
      [](const void* const* ins, void* const* outs, void* ctx) {
        In in[32] = {};
        Out out[32] = {};
        for (int l = 0; l < 32; ++l)
          if (ins[l]) in[l] = *static_cast<const In*>(ins[l]);
        (*static_cast<F*>(ctx))(static_cast<const In*>(in), static_cast<Out*>(out));
        for (int l = 0; l < 32; ++l)
          if (outs[l]) *static_cast<Out*>(outs[l]) = out[l];
      },
      &compute);
  return result;
}

}  // namespace emu
}  // namespace cmpq

// ---- built-in variables (read-only views of the running fiber) --------------------------------------
#define threadIdx (static_cast<const ::uint3&>(::cmpq::emu::detail::g_builtins.thread_idx))
#define blockIdx (static_cast<const ::uint3&>(::cmpq::emu::detail::g_builtins.block_idx))
#define blockDim (static_cast<const ::dim3&>(::cmpq::emu::detail::g_builtins.block_dim))
#define gridDim (static_cast<const ::dim3&>(::cmpq::emu::detail::g_builtins.grid_dim))

// ---- synchronisation ----------------------------------------------------------------------------------
inline void __syncthreads() { ::cmpq::emu::detail::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cmpq::emu::warp_collective<char, char>(mask, 0, [](const char*, char*) {});
}
inline void __threadfence() {}  // fibers run one at a time: every store is already visible
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { ::cmpq::emu::detail::trap(); }

// ---- warp shuffles, vote --------------------------------------------------------------------------------
namespace cmpq {
namespace emu {
namespace detail {
enum class ShflMode { kIdx, kUp, kDown, kBfly };
// Source lane by the PTX shfl.sync rule; c packs the segment mask (bits 12:8) and clamp lane (4:0) the way
// CUDA's __shfl*_sync derive it from width, so width < 32 behaves exactly as on the GPU.
inline int shfl_source(ShflMode mode, int lane, int b, int c) {
  const int seg = (c >> 8) & 0x1f, max_lane = (lane & seg) | (c & 0x1f & ~seg), min_lane = lane & seg;
  int j = lane;
  bool ok = false;
  switch (mode) {
    case ShflMode::kUp: j = lane - (b & 0x1f); ok = j >= max_lane; break;
    case ShflMode::kDown: j = lane + (b & 0x1f); ok = j <= max_lane; break;
    case ShflMode::kBfly: j = lane ^ (b & 0x1f); ok = j <= max_lane; break;
    case ShflMode::kIdx: j = min_lane | (b & 0x1f & ~seg); ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}
template <class T>
T shfl(unsigned mask, T var, int b, int width, ShflMode mode) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    throw std::runtime_error("warp shuffle: width must be a power of two in 1..32");
  struct In { T v; int b; };
  const int c = ((32 - width) << 8) | (mode == ShflMode::kUp ? 0 : 0x1f);
  return warp_collective<In, T>(mask, In{var, b}, [mask, c, mode](const In* in, T* out) {
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      const int j = shfl_source(mode, l, in[l].b, c);
      if ((mask >> j) & 1u) out[l] = in[j].v;
      else std::memset(&out[l], 0xff, sizeof(T));  // reading a lane outside mask is undefined: poison it
    }
  });
}
}  // namespace detail
}  // namespace emu
}  // namespace cmpq

// One template covers int, unsigned, float, 64-bit types, __half, __half2 ... (any trivially copyable T).
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return ::cmpq::emu::detail::shfl(mask, var, src_lane, width, ::cmpq::emu::detail::ShflMode::kIdx);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::cmpq::emu::detail::shfl(mask, var, static_cast<int>(delta), width, ::cmpq::emu::detail::ShflMode::kUp);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::cmpq::emu::detail::shfl(mask, var, static_cast<int>(delta), width, ::cmpq::emu::detail::ShflMode::kDown);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return ::cmpq::emu::detail::shfl(mask, var, lane_mask, width, ::cmpq::emu::detail::ShflMode::kBfly);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::cmpq::emu::warp_collective<int, unsigned>(mask, predicate != 0, [mask](const int* in, unsigned* out) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (in[l] && ((mask >> l) & 1u)) ? 1u << l : 0u;
    for (int l = 0; l < 32; ++l) out[l] = bits;
  });
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// ---- half precision (bit-compatible with cuda_fp16.h / cuda_bf16.h; .x is the low half) -------------
struct alignas(2) __half { unsigned short __x; };
struct alignas(4) __half2 { __half x, y; };
struct alignas(2) __nv_bfloat16 { unsigned short __x; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

inline float __half2float(__half h) {  // exact for every input
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
  uint32_t bits;
  if (e == 0) {
    const float mag = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    std::memcpy(&bits, &mag, 4);
    bits |= sign;
  } else {
    bits = sign | (e == 0x1fu ? 0x7f800000u : (e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.__x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __half __float2half_rn(float f) { return __half{::cmpq::emu::detail::round_to_f16(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{::cmpq::emu::detail::round_to_bf16(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

inline __half2 __halves2half2(__half lo, __half hi) { return {lo, hi}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return {lo, hi}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

// Arithmetic: one rounding of the exact result, as add/mul/fma.rn.f16 and .bf16 do. Products of two
// halves are exact in double; the sum is formed by TwoSum so its tail can break an exact tie.
namespace cmpq {
namespace emu {
namespace detail {
inline double two_sum(double a, double b, double* tail) {
  const double s = a + b, bb = s - a;
  *tail = std::isfinite(s) ? (a - (s - bb)) + (b - bb) : 0.0;
  return s;
}
inline __half h_fma(__half a, __half b, __half c) {
  double tail;
  const double s = two_sum(static_cast<double>(__half2float(a)) * __half2float(b), __half2float(c), &tail);
  return __half{round_to_f16(s, tail)};
}
inline __nv_bfloat16 h_fma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  double tail;
  const double s = two_sum(static_cast<double>(__bfloat162float(a)) * __bfloat162float(b), __bfloat162float(c), &tail);
  return __nv_bfloat16{round_to_bf16(s, tail)};
}
}  // namespace detail
}  // namespace emu
}  // namespace cmpq

inline __half __hfma(__half a, __half b, __half c) { return ::cmpq::emu::detail::h_fma(a, b, c); }
inline __half __hadd(__half a, __half b) { return __hfma(a, __ushort_as_half(0x3c00), b); }  // a*1 + b: exact
inline __half __hmul(__half a, __half b) { return __hfma(a, b, __ushort_as_half(0x8000)); }  // + (-0) keeps -0
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) { return ::cmpq::emu::detail::h_fma(a, b, c); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __hfma(a, __ushort_as_bfloat16(0x3f80), b); }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __hfma(a, b, __ushort_as_bfloat16(0x8000)); }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }

// ---- loads, math, bit tricks ------------------------------------------------------------------------------
// Read-only-cache load; any trivially copyable type (CUDA restricts __ldg to its scalar/vector types).
template <class T>
inline T __ldg(const T* p) { return *p; }

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }  // as CUDA: unsigned wins
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
// Byte i of the result = byte (s >> 4i) & 7 of {y:x}; CUDA documents that the selector's 4th bit is
// ignored (unlike PTX prmt's default mode, which sign-replicates).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>((((static_cast<uint64_t>(hi) << 32) | lo) << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>((((static_cast<uint64_t>(hi) << 32) | lo) >> (shift & 31)));
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
  return shift >= 32 ? lo : __funnelshift_l(lo, hi, shift);
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
  return shift >= 32 ? hi : __funnelshift_r(lo, hi, shift);
}
