// selftest.cpp — checks the SIMT emulation (csrc/emu) and the emulated PTX twins (csrc/cuda/ptx.cuh)
// against straightforward references. Kernels here are written exactly as in a .cu file.
//
//   g++ -O2 -std=c++17 -Icsrc -fsanitize=thread -c csrc/emu/selftest.cpp          (the kernels: instrumented)
//   g++ -O2 -std=c++17 -Icsrc -rdynamic selftest.o csrc/emu/emu.cpp csrc/emu/hazards.cpp -o selftest
//   CMPQ_EMU_SCHEDULE=<schedule> ./selftest      (exit status 0 = every check passed)
//
// -rdynamic exports the race kernels' symbols, so hazard reports can name them. python_tests/test_emu.py
// builds it and runs it in every schedule.
#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

#include <chrono>
#include <functional>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

using cmpq::emu::Schedule;

// ================================ shared-memory races ====================================================
// Two warps each (64 threads); `sync` restores the barrier the race is about. Templates in a named namespace:
// their static locals are exported symbols (with -rdynamic), so hazard reports can name them.
namespace races {

// Read-after-write: warp 1 produces, warp 0 consumes.
template <int kLanes>
__global__ void produce_consume(int* out, bool sync) {
  __shared__ int box[kLanes];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 1) box[lane] = 100 + lane;
  if (sync) __syncthreads();
  if (warp == 0) out[lane] = box[lane];
}

// Write-after-read: warp 0 reads what it staged, then warp 1 overwrites it (dynamic shared memory).
template <int kLanes>
__global__ void read_then_overwrite(int* out, bool sync) {
  CMPQ_DYNAMIC_SMEM(int, box);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 0) box[lane] = lane;
  __syncthreads();
  if (warp == 0) out[lane] = box[lane];
  if (sync) __syncthreads();
  if (warp == 1) box[lane] = -1;
}

// Write-after-write: both warps write every word; warp 1's value must win.
template <int kLanes>
__global__ void both_write(int* out, bool sync) {
  __shared__ int box[kLanes];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 0) box[lane] = 0;
  if (sync) __syncthreads();
  if (warp == 1) box[lane] = 1;
  __syncthreads();
  out[threadIdx.x] = box[lane];
}

// Wide accesses count every byte: a 16-byte store of warp 0 into row 5 against warp 1's ldmatrix of all 32
// rows (16 bytes each).
template <int kRows>
__global__ void wide_accesses(uint32_t* out, bool sync) {
  __shared__ uint4 tile[kRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 0 && lane == 0) tile[5] = make_uint4(1, 2, 3, 4);
  if (sync) __syncthreads();
  if (warp == 1) {
    uint32_t r[4];
    cmpq::ptx::ldmatrix_x4(r, &tile[lane]);
    out[lane] = r[0] ^ r[1] ^ r[2] ^ r[3];
  }
}

// A cp.async's bytes may not be read before the wait that completes it; threads read another warp's copy.
template <int kThreads>
__global__ void early_read(const uint4* src, uint4* out, bool wait_first) {
  CMPQ_DYNAMIC_SMEM(uint4, slot);
  const unsigned t = threadIdx.x;
  cmpq::ptx::cp_async_16(&slot[t], &src[t]);
  cmpq::ptx::cp_async_commit();
  if (wait_first) cmpq::ptx::cp_async_wait<0>();
  __syncthreads();
  out[t] = slot[(t + 32) % kThreads];
  cmpq::ptx::cp_async_wait<0>();
}

// The bug warp-serial schedules exist for: each step, every warp reads another warp's slot and meets its
// lanes at a shuffle; the next step overwrites the slots. Lane-level schedules keep warps in lockstep, so
// all reads of a step happen before any overwrite and a missing end-of-step barrier changes nothing.
template <int kThreads>
__global__ void ring(int steps, int* out, bool end_barrier) {
  __shared__ int slot[kThreads];
  const int t = threadIdx.x;
  int acc = 0;
  for (int k = 0; k < steps; ++k) {
    slot[t] = k * kThreads + t;
    __syncthreads();
    acc += __shfl_xor_sync(0xffffffffu, slot[(t + 32) % kThreads], 1);
    if (end_barrier) __syncthreads();
  }
  out[t] = acc;
}

// Not a race: lanes of one warp exchange through shared memory, ordered by __syncwarp.
template <int kThreads>
__global__ void lane_exchange(int* out) {
  __shared__ int box[kThreads];
  const int t = threadIdx.x;
  box[t] = t;
  __syncwarp();
  out[t] = box[t ^ 1];
}

}  // namespace races

namespace {

int g_checks = 0, g_failures = 0;
#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    ++g_checks;                                                           \
    if (!(cond)) {                                                        \
      if (++g_failures <= 40) {                                           \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);       \
        std::printf(__VA_ARGS__);                                         \
        std::printf("\n");                                                \
      }                                                                   \
    }                                                                     \
  } while (0)

Schedule g_base = Schedule::kForward;  // the schedule chosen by CMPQ_EMU_SCHEDULE for this run
uint64_t g_base_seed = 0;
const Schedule kAll[] = {Schedule::kForward,     Schedule::kReverse,     Schedule::kRandom,
                         Schedule::kWarpForward, Schedule::kWarpReverse, Schedule::kWarpRandom};
const char* const kNames[] = {"forward", "reverse", "random", "warp-forward", "warp-reverse", "warp-random"};
const char* name(Schedule s) { return kNames[static_cast<int>(s)]; }
bool warp_serial(Schedule s) { return static_cast<int>(s) >= static_cast<int>(Schedule::kWarpForward); }
void restore_schedule() { cmpq::emu::set_schedule(g_base, g_base_seed); }

// Runs f and returns the message of the std::runtime_error it throws ("" when it does not throw).
template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}
bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// ================================ kernels ===============================================================

__global__ void builtins_kernel(unsigned* out) {
  const unsigned lin = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
  const unsigned block = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
  const unsigned n = blockDim.x * blockDim.y * blockDim.z, warp = lin / 32, lanes = min(32u, n - warp * 32);
  const unsigned mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
  const unsigned ballot = __ballot_sync(mask, 1);  // partial last warp: only existing lanes take part
  out[block * n + lin] = (ballot == mask ? 1u << 31 : 0u) | (block << 16) | lin;
}

__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float buf[256];
  CMPQ_DYNAMIC_SMEM(float, warp_sums);
  const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
  const float v = in[blockIdx.x * blockDim.x + t];
  buf[t] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {  // tree through static shared memory
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  float w = v;  // second route: warp shuffles, then dynamic shared memory
  for (int off = 16; off > 0; off >>= 1) w += __shfl_down_sync(0xffffffffu, w, off);
  if (lane == 0) warp_sums[warp] = w;
  __syncthreads();
  if (t == 0) {
    float total = 0;
    for (unsigned i = 0; i < blockDim.x / 32; ++i) total += warp_sums[i];
    out[2 * blockIdx.x] = buf[0];
    out[2 * blockIdx.x + 1] = total;
  }
}

__global__ void neighbour_kernel(int* out, bool sync) {
  CMPQ_DYNAMIC_SMEM(int, s);
  const int t = threadIdx.x;
  s[t] = t;
  if (sync) __syncthreads();
  out[t] = t == 0 ? 0 : s[t - 1];  // reads what the previous thread wrote
}

__global__ void early_return_kernel(int* out) {
  if (threadIdx.x == 0) return;  // bug under test: thread 0 skips the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void lane_exits_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void barrier_vs_shuffle_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();  // bug under test: half the warp waits here, half in the shuffle
  else out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}

__global__ void mixed_collectives_kernel(int* out) {
  const int t = threadIdx.x;
  out[t] = t < 16 ? __shfl_sync(0xffffffffu, t, 0) : static_cast<int>(__ballot_sync(0xffffffffu, 1));
}

int g_constructed = 0, g_destroyed = 0;
struct CountsDestruction {
  CountsDestruction() { ++g_constructed; }
  ~CountsDestruction() { ++g_destroyed; }
};
__global__ void trap_kernel(int* out) {
  CountsDestruction guard;  // must be destroyed in every thread: stuck fibers are unwound
  if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

__global__ void throw_kernel() {
  if (threadIdx.x == 3) throw std::out_of_range("index 99 out of range");
}

__global__ void bad_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000fffeu, 1, 0);  // lane 0 is not in its own mask
}

// Shuffle of every mode for one width; each lane passes its own argument (idx) or a uniform one.
template <class T>
__global__ void shuffle_kernel(T* out, int mode, int arg, int width) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T v = static_cast<T>(lane * 10 + warp * 1000);
  T r{};
  if (mode == 0) r = __shfl_sync(0xffffffffu, v, (lane * 7 + arg) % 45, width);
  if (mode == 1) r = __shfl_up_sync(0xffffffffu, v, arg, width);
  if (mode == 2) r = __shfl_down_sync(0xffffffffu, v, arg, width);
  if (mode == 3) r = __shfl_xor_sync(0xffffffffu, v, arg, width);
  out[threadIdx.x] = r;
}

__global__ void vote_kernel(unsigned* out, int* poison) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int pred = (lane * 37 + warp) % 3 == 0;
  out[4 * threadIdx.x] = __ballot_sync(0xffffffffu, pred);
  out[4 * threadIdx.x + 1] = __any_sync(0xffffffffu, pred);
  out[4 * threadIdx.x + 2] = __all_sync(0xffffffffu, lane < 40);
  // Divergent half-warps with disjoint masks meet separately; lanes 0-15 also read a lane outside their mask.
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  __syncwarp();
  out[4 * threadIdx.x + 3] = __shfl_xor_sync(half, static_cast<unsigned>(lane), 1);
  if (lane < 16) poison[threadIdx.x] = __shfl_sync(half, lane, 20);
}

__global__ void half_shuffle_kernel(__half2* out) {
  const unsigned lane = threadIdx.x;
  const __half2 v = __floats2half2_rn(static_cast<float>(lane), -static_cast<float>(lane));
  out[lane] = __shfl_xor_sync(0xffffffffu, v, 3);
}

// One warp: fragments gathered straight from global (the documented layout), and through ldmatrix.
template <bool BF16>
__global__ void mma_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D, float* D2) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto pair = [](const uint16_t* p, int stride) { return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[stride]) << 16; };
  const uint32_t a[4] = {pair(&A[g * 16 + 2 * t], 1), pair(&A[(g + 8) * 16 + 2 * t], 1), pair(&A[g * 16 + 2 * t + 8], 1),
                         pair(&A[(g + 8) * 16 + 2 * t + 8], 1)};
  const uint32_t b[2] = {pair(&B[(2 * t) * 8 + g], 8), pair(&B[(2 * t + 8) * 8 + g], 8)};
  const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  float d[4];
  if (BF16) cmpq::ptx::mma_m16n8k16_bf16f32(d, a, b, c);
  else cmpq::ptx::mma_m16n8k16_f16f32(d, a, b, c);
  D[g * 8 + 2 * t] = d[0], D[g * 8 + 2 * t + 1] = d[1], D[(g + 8) * 8 + 2 * t] = d[2], D[(g + 8) * 8 + 2 * t + 1] = d[3];

  // A row-major; B stored as W[n][k] (its transpose), as a GEMM staging weight tiles would, so ldmatrix without
  // .trans yields B fragments: matrices (n0-7, k0-7) and (n0-7, k8-15); lanes 16-31 repeat them.
  __shared__ __align__(16) uint16_t As[16][16];
  __shared__ __align__(16) uint16_t Ws[8][16];
  for (int i = lane; i < 256; i += 32) As[i / 16][i % 16] = A[i];
  for (int i = lane; i < 128; i += 32) Ws[i % 8][i / 8] = B[i];
  __syncthreads();
  uint32_t a2[4], w2[4];
  cmpq::ptx::ldmatrix_x4(a2, &As[lane % 16][(lane / 16) * 8]);
  cmpq::ptx::ldmatrix_x4(w2, &Ws[lane % 8][((lane / 8) % 2) * 8]);
  const uint32_t b2[2] = {w2[0], w2[1]};
  if (BF16) cmpq::ptx::mma_m16n8k16_bf16f32(d, a2, b2, c);
  else cmpq::ptx::mma_m16n8k16_f16f32(d, a2, b2, c);
  D2[g * 8 + 2 * t] = d[0], D2[g * 8 + 2 * t + 1] = d[1], D2[(g + 8) * 8 + 2 * t] = d[2], D2[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// One warp: int8 fragments gathered from global memory in the documented m16n8k32 layout. kLaneSwap is the
// mutant the test must catch: lanes t and t ^ 1 of each quad exchange their A columns (a plausible slip when
// writing the map), which an exact-integer comparison has to reject.
template <bool kLaneSwap>
__global__ void mma_s8_kernel(const int8_t* A, const int8_t* B, const int32_t* C, int32_t* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3, ta = kLaneSwap ? t ^ 1 : t;
  auto bytes = [](const int8_t* p, int stride) {
    uint32_t w = 0;
    for (int i = 0; i < 4; ++i) w |= static_cast<uint32_t>(static_cast<uint8_t>(p[i * stride])) << (8 * i);
    return w;
  };
  const uint32_t a[4] = {bytes(&A[g * 32 + 4 * ta], 1), bytes(&A[(g + 8) * 32 + 4 * ta], 1),
                         bytes(&A[g * 32 + 16 + 4 * ta], 1), bytes(&A[(g + 8) * 32 + 16 + 4 * ta], 1)};
  const uint32_t b[2] = {bytes(&B[(4 * t) * 8 + g], 8), bytes(&B[(16 + 4 * t) * 8 + g], 8)};
  const int32_t c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  int32_t d[4];
  cmpq::ptx::mma_m16n8k32_s8s32(d, a, b, c);
  D[g * 8 + 2 * t] = d[0], D[g * 8 + 2 * t + 1] = d[1], D[(g + 8) * 8 + 2 * t] = d[2], D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// Every lane points at a scrambled 16-byte row of a 64x16 b16 tile.
__device__ int ld_row(int lane) { return (lane * 13 + 5) % 64; }
__global__ void ldmatrix_kernel(uint32_t* out, bool misaligned) {
  __shared__ __align__(16) uint16_t tile[64][16];
  const int lane = threadIdx.x;
  for (int i = lane; i < 64 * 16; i += 32) tile[i / 16][i % 16] = static_cast<uint16_t>(0x1000 + i);
  __syncthreads();
  const void* p = &tile[ld_row(lane)][8 * (lane & 1)];
  uint32_t r[4] = {0, 0, 0, 0};
  cmpq::ptx::ldmatrix_x4(r, misaligned ? reinterpret_cast<const char*>(&tile[0][0]) + 2 : p);  // misaligned: throws
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

__global__ void cp_async_kernel(const uint4* src, uint4* out) {
  CMPQ_DYNAMIC_SMEM(uint4, s);  // 4 slots per thread
  const unsigned t = threadIdx.x, n = blockDim.x;
  cmpq::ptx::cp_async_16(&s[t], &src[t]);
  cmpq::ptx::cp_async_commit();
  cmpq::ptx::cp_async_16_pred(&s[n + t], &src[t], false);  // zero-fill
  cmpq::ptx::cp_async_16_pred(&s[2 * n + t], &src[n + t], true);
  cmpq::ptx::cp_async_commit();
  cmpq::ptx::cp_async_16(&s[3 * n + t], &src[t]);  // never committed: wait_group does not cover it
  cmpq::ptx::cp_async_wait<1>();
  out[t] = s[t];                      // group 0 done
  out[n + t] = s[n + t];              // group 1 still in flight: poison
  cmpq::ptx::cp_async_wait<0>();
  __syncthreads();
  out[2 * n + t] = s[n + (t + 1) % n];   // zero-filled by a neighbour
  out[3 * n + t] = s[2 * n + (t + 1) % n];
  out[4 * n + t] = s[3 * n + t];      // uncommitted: poison
}

__global__ void sync_loop_kernel(int iters, int* out) {
  int acc = 0;
  for (int i = 0; i < iters; ++i) {
    __syncthreads();
    acc += i;
  }
  out[threadIdx.x] = acc;
}

__global__ void shfl_loop_kernel(int iters, int* out) {
  int v = threadIdx.x;
  for (int i = 0; i < iters; ++i) v = __shfl_xor_sync(0xffffffffu, v, 1) + 1;
  out[threadIdx.x] = v;
}

// ================================ tests ==================================================================

void test_builtins() {
  const dim3 grid(3, 2, 2), block(5, 4, 3);  // 60 threads: the second warp has 28 lanes
  std::vector<unsigned> out(12 * 60, 0);
  unsigned* p = out.data();
  auto* kernel = builtins_kernel;
  CMPQ_LAUNCH(kernel, grid, block, 0, nullptr, p);
  for (unsigned i = 0; i < out.size(); ++i)
    CHECK(out[i] == ((1u << 31) | ((i / 60) << 16) | (i % 60)), "slot %u holds 0x%08x", i, out[i]);
}

void test_reduction() {
  const int blocks = 5, threads = 256;
  std::vector<float> in(blocks * threads), out(2 * blocks);
  std::mt19937 rng(1);
  for (float& v : in) v = static_cast<float>(rng() % 100);  // integers: every sum order is exact
  const float* pin = in.data();
  float* pout = out.data();
  auto* kernel = block_sum_kernel;
  for (Schedule s : kAll) {
    cmpq::emu::set_schedule(s, 7);
    std::fill(out.begin(), out.end(), -1.0f);
    CMPQ_LAUNCH(kernel, dim3(blocks), dim3(threads), threads / 32 * sizeof(float), nullptr, pin, pout);
    for (int b = 0; b < blocks; ++b) {
      float ref = 0;
      for (int i = 0; i < threads; ++i) ref += in[b * threads + i];
      CHECK(out[2 * b] == ref && out[2 * b + 1] == ref, "%s block %d: %g %g vs %g", name(s), b, out[2 * b], out[2 * b + 1], ref);
    }
  }
  restore_schedule();
}

void test_missing_sync() {
  const int n = 128;
  std::vector<int> out(n);
  int* p = out.data();
  auto* kernel = neighbour_kernel;
  auto wrong = [&](Schedule s, bool sync) {
    cmpq::emu::set_schedule(s, 3);
    CMPQ_LAUNCH(kernel, dim3(1), dim3(n), n * sizeof(int), nullptr, p, sync);
    int bad = 0;
    for (int t = 1; t < n; ++t) bad += out[t] != t - 1;
    return bad;
  };
  for (Schedule s : kAll) CHECK(wrong(s, true) == 0, "with __syncthreads, %s order must be right", name(s));
  CHECK(wrong(Schedule::kForward, false) == 0, "forward order hides the missing __syncthreads");
  const int bad_rev = wrong(Schedule::kReverse, false), bad_rand = wrong(Schedule::kRandom, false);
  CHECK(bad_rev == n - 1, "reverse order must expose the missing __syncthreads (%d wrong)", bad_rev);
  CHECK(bad_rand > 0, "random order must expose the missing __syncthreads");
  std::printf("missing __syncthreads: wrong outputs forward 0, reverse %d, random %d of %d\n", bad_rev, bad_rand, n - 1);
  restore_schedule();
}

void test_errors() {
  std::vector<int> out(512, 0);
  int* p = out.data();
  {
    auto* kernel = early_return_kernel;
    const std::string e = error_of([&] { CMPQ_LAUNCH(kernel, dim3(2), dim3(128), 0, nullptr, p); });
    CHECK(has(e, "deadlock") && has(e, "block (0,0,0)") && has(e, "a thread exited while others wait at __syncthreads") &&
              has(e, "threads 0: exited") && has(e, "threads 1-127: wait at __syncthreads"),
          "early return: '%s'", e.c_str());
    std::printf("deadlock report:\n%s\n", e.c_str());
  }
  {
    auto* kernel = lane_exits_kernel;
    const std::string e = error_of([&] { CMPQ_LAUNCH(kernel, dim3(1), dim3(64), 0, nullptr, p); });
    CHECK(has(e, "deadlock") && has(e, "threads 0-30: wait at a warp collective of warp 0, mask 0xffffffff, lanes missing 0x80000000") &&
              has(e, "threads 31-63: exited"),
          "lane exits before a shuffle: '%s'", e.c_str());
  }
  {
    auto* kernel = barrier_vs_shuffle_kernel;
    const std::string e = error_of([&] { CMPQ_LAUNCH(kernel, dim3(1), dim3(32), 0, nullptr, p); });
    CHECK(has(e, "deadlock") && has(e, "threads 0-15: wait at __syncthreads") &&
              has(e, "threads 16-31: wait at a warp collective of warp 0, mask 0xffffffff, lanes missing 0x0000ffff"),
          "barrier against shuffle: '%s'", e.c_str());
  }
  {
    auto* kernel = mixed_collectives_kernel;
    const std::string e = error_of([&] { CMPQ_LAUNCH(kernel, dim3(1), dim3(32), 0, nullptr, p); });
    CHECK(has(e, "different kinds of warp collective"), "mixed collectives: '%s'", e.c_str());
  }
  {
    auto* kernel = trap_kernel;
    g_constructed = g_destroyed = 0;
    const std::string e = error_of([&] { CMPQ_LAUNCH(kernel, dim3(3), dim3(64), 0, nullptr, p); });
    CHECK(has(e, "block (1,0,0) thread (5,0,0): __trap() called"), "trap: '%s'", e.c_str());
    CHECK(g_destroyed == g_constructed && g_constructed > 64, "stuck fibers are unwound: %d of %d objects destroyed",
          g_destroyed, g_constructed);
  }
  {
    auto* kernel = throw_kernel;
    const std::string e = error_of([&] { CMPQ_LAUNCH(kernel, dim3(1), dim3(8), 0, nullptr); });
    CHECK(has(e, "thread (3,0,0): index 99 out of range"), "kernel exception: '%s'", e.c_str());
  }
  {
    auto* kernel = bad_mask_kernel;
    const std::string e = error_of([&] { CMPQ_LAUNCH(kernel, dim3(1), dim3(32), 0, nullptr, p); });
    CHECK(has(e, "excludes the calling lane"), "mask without caller: '%s'", e.c_str());
  }
  {
    auto* kernel = early_return_kernel;
    CHECK(has(error_of([&] { CMPQ_LAUNCH(kernel, dim3(1), dim3(2048), 0, nullptr, p); }), "invalid block"), "block too big");
    CHECK(has(error_of([&] { CMPQ_LAUNCH(kernel, dim3(0), dim3(32), 0, nullptr, p); }), "invalid grid"), "empty grid");
    CHECK(has(error_of([] { __syncthreads(); }), "outside a kernel"), "__syncthreads on the host");
  }
  {  // the emulator is usable after every failure above
    auto* kernel = neighbour_kernel;
    CMPQ_LAUNCH(kernel, dim3(1), dim3(64), 64 * sizeof(int), nullptr, p, true);
    CHECK(out[63] == 62, "launch after errors");
  }
}

int ref_shfl_src(int mode, int lane, int arg, int width) {  // CUDA programming guide wording
  const int base = lane / width * width, pos = lane % width;
  if (mode == 0) return base + arg % width;
  if (mode == 1) return pos >= arg ? lane - arg : lane;
  if (mode == 2) return pos + arg < width ? lane + arg : lane;
  const int j = lane ^ arg;  // xor: may read earlier groups, never later ones
  return j >= base + width ? lane : j;
}

template <class T>
void check_shuffles(const char* type, std::initializer_list<int> modes) {
  std::vector<T> out(64);
  T* p = out.data();
  auto* kernel = shuffle_kernel<T>;
  for (int mode : modes)
    for (int width = 1; width <= 32; width *= 2)
      for (int arg : {0, 1, 3, 5, 17, 31}) {
        CMPQ_LAUNCH(kernel, dim3(1), dim3(64), 0, nullptr, p, mode, arg, width);
        for (int t = 0; t < 64; ++t) {
          const int lane = t % 32, warp = t / 32;
          const int src = ref_shfl_src(mode, lane, mode == 0 ? (lane * 7 + arg) % 45 : arg, width);
          CHECK(out[t] == static_cast<T>(src * 10 + warp * 1000), "%s mode %d width %d arg %d lane %d: got %g", type, mode,
                width, arg, lane, static_cast<double>(out[t]));
        }
      }
}

void test_shuffles_and_votes() {
  check_shuffles<int>("int", {0, 1, 2, 3});
  check_shuffles<double>("double", {0, 3});
  check_shuffles<unsigned long long>("u64", {2});
  std::vector<unsigned> out(4 * 64);
  std::vector<int> poison(64, 0);
  unsigned* p = out.data();
  int* pp = poison.data();
  auto* kernel = vote_kernel;
  CMPQ_LAUNCH(kernel, dim3(1), dim3(64), 0, nullptr, p, pp);
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, warp = t / 32;
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) ballot |= ((l * 37 + warp) % 3 == 0) ? 1u << l : 0;
    CHECK(out[4 * t] == ballot && out[4 * t + 1] == 1 && out[4 * t + 2] == 1, "vote thread %d", t);
    CHECK(out[4 * t + 3] == static_cast<unsigned>(lane ^ 1), "half-warp xor thread %d: %u", t, out[4 * t + 3]);
    if (lane < 16) CHECK(poison[t] == -1, "lane outside the mask reads poison, thread %d: %d", t, poison[t]);
  }
  std::vector<__half2> h(32);
  __half2* ph = h.data();
  auto* hk = half_shuffle_kernel;
  CMPQ_LAUNCH(hk, dim3(1), dim3(32), 0, nullptr, ph);
  for (int l = 0; l < 32; ++l)
    CHECK(__low2float(h[l]) == (l ^ 3) && __high2float(h[l]) == -(l ^ 3), "half2 shuffle lane %d", l);
}

void test_bits() {
  std::mt19937 rng(2);
  for (int it = 0; it < 20000; ++it) {
    const uint32_t a = rng(), b = rng(), sel = rng(), sh = rng() % 40;
    const int shift = static_cast<int>(rng() % 32);
    const uint32_t x = it < 64 ? (it < 32 ? 1u << it : 0u) : a >> shift;  // include 0 and single bits
    int pop = 0, clz = 32, ffs = 0;
    uint32_t brev = 0;
    for (int i = 0; i < 32; ++i) {
      pop += (x >> i) & 1;
      if ((x >> (31 - i)) & 1 && clz == 32) clz = i;
      if ((x >> i) & 1 && ffs == 0) ffs = i + 1;
      brev |= ((x >> i) & 1u) << (31 - i);
    }
    CHECK(__popc(x) == pop && __clz(static_cast<int>(x)) == clz && __ffs(static_cast<int>(x)) == ffs && __brev(x) == brev,
          "bit counts of 0x%08x", x);
    uint32_t perm = 0;
    for (int i = 0; i < 4; ++i) {
      const uint32_t k = (sel >> (4 * i)) & 7;
      perm |= ((k < 4 ? a >> (8 * k) : b >> (8 * (k - 4))) & 0xff) << (8 * i);
    }
    CHECK(__byte_perm(a, b, sel) == perm, "__byte_perm(0x%08x, 0x%08x, 0x%08x)", a, b, sel);
    const uint64_t hl = (static_cast<uint64_t>(b) << 32) | a;
    CHECK(__funnelshift_l(a, b, sh) == static_cast<uint32_t>((hl << (sh & 31)) >> 32) &&
              __funnelshift_r(a, b, sh) == static_cast<uint32_t>(hl >> (sh & 31)) &&
              __funnelshift_lc(a, b, sh) == (sh >= 32 ? a : static_cast<uint32_t>((hl << sh) >> 32)) &&
              __funnelshift_rc(a, b, sh) == (sh >= 32 ? b : static_cast<uint32_t>(hl >> sh)),
          "funnel shifts by %u", sh);
  }
}

// ---- fp16 / bf16 -------------------------------------------------------------------------------------------
float bits_f(uint32_t u) { return __uint_as_float(u); }
uint16_t h(float f) { return __half_as_ushort(__float2half_rn(f)); }
uint16_t bf(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
float hf(uint16_t u) { return __half2float(__ushort_as_half(u)); }
float bff(uint16_t u) { return __bfloat162float(__ushort_as_bfloat16(u)); }

// Exact check of a rounded a*b+c: r must be a nearest value of the format to the exact result, ties to even.
// a and b are integers in units of 2^-unit, so the exact result is an integer in units of 2^-2unit (and so
// is every candidate near it); a key orders bit patterns by value to find r's neighbours.
template <bool BF16>
bool fma_is_correctly_rounded(uint16_t a, uint16_t b, uint16_t c, uint16_t r, int unit) {
  auto val = [](uint16_t u) { return BF16 ? bff(u) : hf(u); };
  auto fixed = [&](uint16_t u, int e) { return static_cast<__int128>(std::ldexp(static_cast<double>(val(u)), e)); };
  if (!std::isfinite(val(r))) return false;
  const __int128 exact = fixed(a, unit) * fixed(b, unit) + fixed(c, 2 * unit);
  auto key_to_bits = [](int k) { return static_cast<uint16_t>(k < 0 ? 0x8000 | -k : k); };
  const int key = (r & 0x8000) ? -(r & 0x7fff) : (r & 0x7fff);
  auto dist = [&](uint16_t u) { const __int128 d = fixed(u, 2 * unit) - exact; return d < 0 ? -d : d; };
  const __int128 d = dist(r);
  for (int nk : {key - 1, key + 1}) {
    const uint16_t n = key_to_bits(nk);
    if (!std::isfinite(val(n))) continue;
    if (dist(n) < d || (dist(n) == d && (r & 1))) return false;
  }
  return true;
}
// fp16 a*b+c: infinity exactly when the exact result reaches 65520 (the tie above 65504 rounds to "even" inf).
bool fp16_fma_ok(uint16_t a, uint16_t b, uint16_t c, uint16_t r) {
  const double exact = static_cast<double>(hf(a)) * hf(b) + hf(c);  // exact: spans < 53 bits near 65520
  if (std::fabs(exact) >= 65520.0) return r == (exact > 0 ? 0x7c00 : 0xfc00);
  return fma_is_correctly_rounded<false>(a, b, c, r, 24);
}

void test_half() {
  const struct { float f; uint16_t h; } f16[] = {
      {1.0f, 0x3c00}, {-2.0f, 0xc000}, {65504.0f, 0x7bff}, {65520.0f, 0x7c00}, {std::nextafter(65520.0f, 0.0f), 0x7bff},
      {1e10f, 0x7c00}, {-1e10f, 0xfc00}, {INFINITY, 0x7c00}, {-INFINITY, 0xfc00}, {NAN, 0x7fff}, {-0.0f, 0x8000},
      {0.0f, 0x0000}, {std::ldexp(1.0f, -24), 0x0001}, {std::ldexp(1.0f, -25), 0x0000}, {std::ldexp(3.0f, -26), 0x0001},
      {std::ldexp(3.0f, -25), 0x0002}, {std::ldexp(1.0f, -14), 0x0400}, {std::ldexp(1023.0f, -24), 0x03ff},
      {1.0f + std::ldexp(1.0f, -11), 0x3c00}, {1.0f + std::ldexp(3.0f, -11), 0x3c02}, {1.0f / 3.0f, 0x3555}, {0.1f, 0x2e66},
      {-std::ldexp(1.0f, -26), 0x8000}};
  for (const auto& e : f16) CHECK(h(e.f) == e.h, "__float2half(%a) = 0x%04x, want 0x%04x", e.f, h(e.f), e.h);
  CHECK(__half_as_ushort(__float2half(0.1f)) == 0x2e66, "__float2half");
  CHECK(hf(0x3555) == 0.333251953125f && hf(0x0001) == std::ldexp(1.0f, -24) && hf(0x03ff) == std::ldexp(1023.0f, -24) &&
            hf(0x7c00) == INFINITY && hf(0xfc00) == -INFINITY && std::isnan(hf(0x7e00)) && std::signbit(hf(0x8000)),
        "__half2float known values");
  const struct { float f; uint16_t b; } b16[] = {
      {1.0f, 0x3f80}, {1.0f + std::ldexp(1.0f, -8), 0x3f80}, {1.0f + std::ldexp(3.0f, -8), 0x3f82},
      {1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20), 0x3f81}, {3.4028235e38f, 0x7f80}, {-INFINITY, 0xff80},
      {NAN, 0x7fff}, {bits_f(0x00000001), 0x0000}, {bits_f(0x00008000), 0x0000}, {bits_f(0x00018000), 0x0002},
      {bits_f(0x00010001), 0x0001}, {0.1f, 0x3dcd}, {-0.0f, 0x8000}};
  for (const auto& e : b16) CHECK(bf(e.f) == e.b, "__float2bfloat16(%a) = 0x%04x, want 0x%04x", e.f, bf(e.f), e.b);
  CHECK(__bfloat16_as_ushort(__float2bfloat16(1.0f)) == 0x3f80 && bff(0x3f81) == 1.0078125f, "bf16 known values");

  // Every finite value round-trips; every midpoint rounds to even, and one float either side goes its way.
  for (uint32_t u = 0; u < 0x7c00; ++u) {
    CHECK(h(hf(u)) == u && h(hf(u | 0x8000)) == (u | 0x8000), "fp16 round trip 0x%04x", u);
    const float lo = hf(u), hi = u == 0x7bff ? 65536.0f : hf(u + 1), mid = (lo + hi) / 2;
    const uint16_t even = (u & 1) ? u + 1 : u;
    CHECK(h(mid) == even && h(std::nextafter(mid, 0.0f)) == u && h(std::nextafter(mid, INFINITY)) == u + 1 &&
              h(-mid) == (even | 0x8000),
          "fp16 midpoint above 0x%04x", u);
  }
  for (uint32_t u = 0; u < 0x7f80; ++u) {
    CHECK(bf(bff(u)) == u && bf(bff(u | 0x8000)) == (u | 0x8000), "bf16 round trip 0x%04x", u);
    const float lo = bff(u), hi = u == 0x7f7f ? std::ldexp(1.0f, 127) * 2.0f : bff(u + 1), mid = lo / 2 + hi / 2;
    if (u == 0x7f7f) continue;  // the midpoint to 2^128 is not a float
    const uint16_t even = (u & 1) ? u + 1 : u;
    CHECK(bf(mid) == even && bf(std::nextafter(mid, 0.0f)) == u && bf(std::nextafter(mid, INFINITY)) == u + 1,
          "bf16 midpoint above 0x%04x", u);
  }
  // Pair types: .x is the low half of the 32-bit word, as in cuda_fp16.h.
  const __half2 p = __floats2half2_rn(1.0f, 2.0f);
  uint32_t w;
  std::memcpy(&w, &p, 4);
  CHECK(w == 0x40003c00u && sizeof(__half2) == 4 && alignof(__half2) == 4 && sizeof(__half) == 2, "__half2 layout");
  const __nv_bfloat162 q = __floats2bfloat162_rn(1.0f, -2.0f);
  std::memcpy(&w, &q, 4);
  CHECK(w == 0xc0003f80u && __low2float(q) == 1.0f && __high2float(q) == -2.0f, "__nv_bfloat162 layout");
  const float2 f2 = __half22float2(__halves2half2(__ushort_as_half(0x3800), __ushort_as_half(0xbc00)));
  CHECK(f2.x == 0.5f && f2.y == -1.0f && __high2float(__float22half2_rn(make_float2(3.0f, 4.0f))) == 4.0f, "half2 <-> float2");
  CHECK(__bfloat1622float2(__float22bfloat162_rn(make_float2(3.0f, 4.0f))).y == 4.0f, "bf162 <-> float2");

  // Arithmetic special cases.
  auto H = [](uint16_t u) { return __ushort_as_half(u); };
  auto B = [](uint16_t u) { return __ushort_as_bfloat16(u); };
  CHECK(__half_as_ushort(__hadd(H(0x7c00), H(0xfc00))) == 0x7fff && __half_as_ushort(__hmul(H(0), H(0x7c00))) == 0x7fff,
        "NaN results are canonical");
  CHECK(__half_as_ushort(__hadd(H(0x7bff), H(0x4c00))) == 0x7c00, "65504 + 16 ties to infinity");
  CHECK(__half_as_ushort(__hmul(H(0x8000), H(0x4500))) == 0x8000 && __half_as_ushort(__hadd(H(0x8000), H(0x8000))) == 0x8000 &&
            __half_as_ushort(__hadd(H(0x0000), H(0x8000))) == 0x0000,
        "signed zeros");
  CHECK(__half_as_ushort(__hfma(H(0x0001), H(0x3800), H(0))) == 0x0000 &&
            __half_as_ushort(__hfma(H(0x0003), H(0x3800), H(0))) == 0x0002,
        "subnormal products round to even");
  // bf16 tie that only the exact sum can break: 1.5 * (1 + 2^-7) is a bf16 midpoint, c = +-2^-80 decides.
  CHECK(__bfloat16_as_ushort(__hfma(B(0x3fc0), B(0x3f81), B(0x9780))) == 0x3fc1 &&
            __bfloat16_as_ushort(__hfma(B(0x3fc0), B(0x3f81), B(0x1780))) == 0x3fc2 &&
            __bfloat16_as_ushort(__hfma(B(0x3fc0), B(0x3f81), B(0x0000))) == 0x3fc2,
        "bf16 fma ties broken by a tiny addend");
  const __half2 h2 = __hfma2(__floats2half2_rn(1.5f, 2.0f), __floats2half2_rn(2.0f, -0.25f), __floats2half2_rn(0.25f, 1.0f));
  const __half2 a2 = __hadd2(__floats2half2_rn(1, 2), __floats2half2_rn(3, 4)), m2 = __hmul2(__floats2half2_rn(1, 2), __floats2half2_rn(3, 4));
  CHECK(__low2float(h2) == 3.25f && __high2float(h2) == 0.5f && __low2float(a2) == 4 && __high2float(a2) == 6 &&
            __low2float(m2) == 3 && __high2float(m2) == 8,
        "half2 arithmetic");
  const __nv_bfloat162 b2 = __hfma2(__floats2bfloat162_rn(1.5f, 2.0f), __floats2bfloat162_rn(2.0f, -0.25f), __floats2bfloat162_rn(0.25f, 1.0f));
  CHECK(__low2float(b2) == 3.25f && __high2float(b2) == 0.5f &&
            __low2float(__hadd2(__floats2bfloat162_rn(1, 2), __floats2bfloat162_rn(3, 4))) == 4 &&
            __high2float(__hmul2(__floats2bfloat162_rn(1, 2), __floats2bfloat162_rn(3, 4))) == 8,
        "bf162 arithmetic");

  // Random fma/add/mul against the exact integer reference.
  std::mt19937 rng(3);
  int fma_checked = 0;
  for (int it = 0; it < 200000; ++it) {
    const uint16_t a = rng() & 0xffff, b = rng() & 0xffff, c = rng() & 0xffff;
    if ((a & 0x7c00) == 0x7c00 || (b & 0x7c00) == 0x7c00 || (c & 0x7c00) == 0x7c00) continue;
    const uint16_t r = __half_as_ushort(__hfma(H(a), H(b), H(c)));
    fma_checked += std::fabs(static_cast<double>(hf(a)) * hf(b) + hf(c)) < 65520.0;
    CHECK(fp16_fma_ok(a, b, c, r), "fp16 fma(0x%04x, 0x%04x, 0x%04x) = 0x%04x", a, b, c, r);
    const uint16_t s = __half_as_ushort(__hadd(H(a), H(c))), m = __half_as_ushort(__hmul(H(a), H(b)));
    CHECK(fp16_fma_ok(a, 0x3c00, c, s), "fp16 add 0x%04x + 0x%04x = 0x%04x", a, c, s);
    CHECK(fp16_fma_ok(a, b, 0, m), "fp16 mul 0x%04x * 0x%04x = 0x%04x", a, b, m);
  }
  for (int it = 0; it < 100000; ++it) {  // bf16 with exponents in [-20, 20] so the exact sum fits in 128 bits
    auto rnd = [&] { return static_cast<uint16_t>((rng() & 0x8000) | ((107 + rng() % 41) << 7) | (rng() & 0x7f)); };
    const uint16_t a = rnd(), b = rnd(), c = rnd();
    const uint16_t r = __bfloat16_as_ushort(__hfma(B(a), B(b), B(c)));
    CHECK(fma_is_correctly_rounded<true>(a, b, c, r, 27), "bf16 fma(0x%04x, 0x%04x, 0x%04x) = 0x%04x", a, b, c, r);
  }
  CHECK(fma_checked > 100000, "enough finite fp16 fma samples (%d)", fma_checked);
}

// ---- PTX twins in kernels ------------------------------------------------------------------------------------
template <bool BF16>
void check_mma() {
  std::mt19937 rng(BF16 ? 5 : 4);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<uint16_t> A(256), B(128);
  std::vector<float> C(128), D(128), D2(128);
  auto enc = [](float f) { return BF16 ? bf(f) : h(f); };
  auto dec = [](uint16_t u) { return BF16 ? bff(u) : hf(u); };
  for (auto& v : A) v = enc(dist(rng));
  for (auto& v : B) v = enc(dist(rng));
  for (auto& v : C) v = dist(rng);
  const uint16_t *pa = A.data(), *pb = B.data();
  const float* pc = C.data();
  float *pd = D.data(), *pd2 = D2.data();
  auto* kernel = mma_kernel<BF16>;
  CMPQ_LAUNCH(kernel, dim3(1), dim3(32), 0, nullptr, pa, pb, pc, pd, pd2);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double ref = C[i * 8 + j], mag = std::fabs(ref);
      for (int k = 0; k < 16; ++k) {
        const double p = static_cast<double>(dec(A[i * 16 + k])) * dec(B[k * 8 + j]);
        ref += p, mag += std::fabs(p);
      }
      CHECK(std::fabs(D[i * 8 + j] - ref) <= 2e-6 * mag, "%s mma D[%d][%d] = %.8g, reference %.8g", BF16 ? "bf16" : "fp16", i,
            j, D[i * 8 + j], ref);
      CHECK(D2[i * 8 + j] == D[i * 8 + j], "%s mma through ldmatrix D[%d][%d]", BF16 ? "bf16" : "fp16", i, j);
    }
}

// The int8 twin is exact: D must equal C + A B bit for bit, over the full int8 range (extremes included), and
// the lane-swapped mutant must not.
void check_mma_s8() {
  std::mt19937 rng(6);
  std::uniform_int_distribution<int> code(-128, 127), init(-1000000, 1000000);
  std::vector<int8_t> A(16 * 32), B(32 * 8);
  std::vector<int32_t> C(128), D(128), M(128), ref(128);
  for (auto& v : A) v = static_cast<int8_t>(code(rng));
  for (auto& v : B) v = static_cast<int8_t>(code(rng));
  for (auto& v : C) v = init(rng);
  A[0] = -128, B[0] = -128, A[1] = 127, B[8] = 127;  // the extreme products
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      int32_t r = C[i * 8 + j];
      for (int k = 0; k < 32; ++k) r += static_cast<int32_t>(A[i * 32 + k]) * B[k * 8 + j];
      ref[i * 8 + j] = r;
    }
  const int8_t *pa = A.data(), *pb = B.data();
  const int32_t* pc = C.data();
  int32_t *pd = D.data(), *pm = M.data();
  auto* kernel = mma_s8_kernel<false>;
  CMPQ_LAUNCH(kernel, dim3(1), dim3(32), 0, nullptr, pa, pb, pc, pd);
  auto* mutant = mma_s8_kernel<true>;
  CMPQ_LAUNCH(mutant, dim3(1), dim3(32), 0, nullptr, pa, pb, pc, pm);
  int mutant_diffs = 0;
  for (int i = 0; i < 128; ++i) {
    CHECK(D[i] == ref[i], "s8 mma D[%d][%d] = %d, reference %d", i / 8, i % 8, D[i], ref[i]);
    mutant_diffs += M[i] != ref[i];
  }
  CHECK(mutant_diffs >= 120, "the lane-swapped mutant must differ almost everywhere, differs in %d of 128", mutant_diffs);
}

void test_ldmatrix() {
  std::vector<uint32_t> out(128, 0xdeadbeefu);
  uint32_t* p = out.data();
  auto* kernel = ldmatrix_kernel;
  CMPQ_LAUNCH(kernel, dim3(1), dim3(32), 0, nullptr, p, false);
  // Matrix m, row r = the 8 b16 values at the address lane 8m + r gave: tile[ld_row(lane)][8 * (lane & 1) + col].
  auto M = [](int m, int r, int c) { const int lane = 8 * m + r; return 0x1000u + ld_row(lane) * 16 + 8 * (lane & 1) + c; };
  for (int l = 0; l < 32; ++l)
    for (int m = 0; m < 4; ++m) {
      const int r = l >> 2, c = 2 * (l & 3);
      const uint32_t want = M(m, r, c) | M(m, r, c + 1) << 16;
      CHECK(out[l * 4 + m] == want, "ldmatrix lane %d reg %d: 0x%08x, want 0x%08x", l, m, out[l * 4 + m], want);
    }
  CHECK(has(error_of([&] { CMPQ_LAUNCH(kernel, dim3(1), dim3(32), 0, nullptr, p, true); }), "not 16-byte aligned"),
        "misaligned ldmatrix row");
}

void test_cp_async() {
  const unsigned n = 64;
  std::vector<uint4> src(2 * n), out(5 * n);
  for (unsigned i = 0; i < 2 * n; ++i) src[i] = make_uint4(i, i + 1, i + 2, i + 3);
  const uint4* ps = src.data();
  uint4* po = out.data();
  auto* kernel = cp_async_kernel;
  CMPQ_LAUNCH(kernel, dim3(1), dim3(n), 4 * n * sizeof(uint4), nullptr, ps, po);
  auto is = [](uint4 v, unsigned x) { return v.x == x && v.y == x + 1 && v.z == x + 2 && v.w == x + 3; };
  auto poison = [](uint4 v) { return v.x == ~0u && v.y == ~0u && v.z == ~0u && v.w == ~0u; };
  auto zero = [](uint4 v) { return (v.x | v.y | v.z | v.w) == 0; };
  for (unsigned t = 0; t < n; ++t) {
    CHECK(is(out[t], t), "cp.async group 0 complete after wait<1>, thread %u", t);
    CHECK(poison(out[n + t]), "cp.async group 1 still in flight after wait<1>, thread %u", t);
    CHECK(zero(out[2 * n + t]), "cp_async_16_pred(false) zero-fills, thread %u", t);
    CHECK(is(out[3 * n + t], n + (t + 1) % n), "cp_async_16_pred(true) copies, thread %u", t);
    CHECK(poison(out[4 * n + t]), "uncommitted cp.async is not waited for, thread %u", t);
  }
}

void test_warp_serial() {
  const int n = 64, steps = 4;
  std::vector<int> out(n);
  int* p = out.data();
  auto* kernel = races::ring<n>;
  auto wrong = [&](Schedule s, bool end_barrier) {
    cmpq::emu::set_schedule(s, 9);
    CMPQ_LAUNCH(kernel, dim3(1), dim3(n), 0, nullptr, steps, p, end_barrier);
    int bad = 0;
    for (int t = 0; t < n; ++t) {
      int want = 0;  // lane t ^ 1 read the slot 32 threads on from it, in every step
      for (int k = 0; k < steps; ++k) want += k * n + ((t ^ 1) + 32) % n;
      bad += out[t] != want;
    }
    return bad;
  };
  for (Schedule s : kAll) {
    CHECK(wrong(s, true) == 0, "ring with its end-of-step barrier, %s order must be right", name(s));
    const int bad = wrong(s, false);
    if (warp_serial(s)) CHECK(bad > 0, "%s order must expose the missing end-of-step barrier", name(s));
    else CHECK(bad == 0, "lane-level %s order keeps warps in lockstep: no wrong output (%d)", name(s), bad);
    std::printf("%s missing end-of-step barrier: %d of %d outputs wrong\n", name(s), bad, n);
  }
  restore_schedule();
}

// Runs launch() with hazard checking on, in schedule s; returns its error ("" when clean).
template <class F>
std::string checked(Schedule s, F launch) {
  cmpq::emu::set_schedule(s, 5);
  cmpq::emu::set_hazard_check(true);
  const std::string e = error_of(launch);
  cmpq::emu::set_hazard_check(false);
  return e;
}

struct Race {
  const char* kernel;                // as reports name it
  Schedule order;                    // in this schedule the report must read:
  std::vector<const char*> report;   //   these parts
  std::function<void(bool)> launch;  // runs the kernel with (true) or without (false) its barrier
};

void test_hazards() {
  std::vector<int> out(64);
  std::vector<uint32_t> out32(32);
  std::vector<uint4> src(64), out4(64);
  int* p = out.data();
  uint32_t* p32 = out32.data();
  const uint4* ps = src.data();
  uint4* p4 = out4.data();
  auto* produce_consume = races::produce_consume<32>;
  auto* read_then_overwrite = races::read_then_overwrite<32>;
  auto* both_write = races::both_write<32>;
  auto* wide_accesses = races::wide_accesses<32>;
  auto* early_read = races::early_read<64>;
  auto* ring = races::ring<64>;
  const Race races[] = {
      {"races::produce_consume<32>", Schedule::kWarpReverse,
       {"read-after-write: warp 0 reads what warp 1 wrote", "races::produce_consume<32>::box + "},
       [&](bool sync) { CMPQ_LAUNCH(produce_consume, dim3(1), dim3(64), 0, nullptr, p, sync); }},
      {"races::read_then_overwrite<32>", Schedule::kWarpForward,
       {"write-after-read: warp 1 overwrites what warp 0 read", "barrier epoch 1 of the block, after its __syncthreads #1",
        "at dynamic shared memory + 0;"},
       [&](bool sync) { CMPQ_LAUNCH(read_then_overwrite, dim3(1), dim3(64), 32 * sizeof(int), nullptr, p, sync); }},
      {"races::both_write<32>", Schedule::kForward,
       {"write-after-write: warp 1 overwrites what warp 0 wrote", "barrier epoch 0 of the block, before its first __syncthreads",
        "at races::both_write<32>::box + 0;"},
       [&](bool sync) { CMPQ_LAUNCH(both_write, dim3(1), dim3(64), 0, nullptr, p, sync); }},
      {"races::wide_accesses<32>", Schedule::kWarpReverse,
       {"write-after-read: warp 0 overwrites what warp 1 read", "at races::wide_accesses<32>::tile + 80;",
        "the access: a write of"},  // the compiler may split the 16-byte store
       [&](bool sync) { CMPQ_LAUNCH(wide_accesses, dim3(1), dim3(64), 0, nullptr, p32, sync); }},
      {"races::wide_accesses<32>", Schedule::kWarpForward,
       {"read-after-write: warp 1 reads what warp 0 wrote", "a read of 2 bytes at races::wide_accesses<32>::tile + 80"},
       [&](bool sync) { CMPQ_LAUNCH(wide_accesses, dim3(1), dim3(64), 0, nullptr, p32, sync); }},
      {"races::early_read<64>", Schedule::kForward,
       {"cp.async in flight: warp 0 touches what a cp.async of warp 1 may still write", "dynamic shared memory + 512;"},
       [&](bool wait_first) { CMPQ_LAUNCH(early_read, dim3(1), dim3(64), 64 * sizeof(uint4), nullptr, ps, p4, wait_first); }},
      {"races::ring<64>", Schedule::kForward,  // lockstep: the values come out right, the hazard is still reported
       {"write-after-read: warp 0 overwrites what warp 1 read", "barrier epoch 1 of the block, after its __syncthreads #1",
        "at races::ring<64>::slot + 0;"},
       [&](bool sync) { CMPQ_LAUNCH(ring, dim3(1), dim3(64), 0, nullptr, 3, p, sync); }},
  };
  for (const Race& race : races) {
    for (Schedule s : kAll) {
      const std::string e = checked(s, [&] { race.launch(false); });
      CHECK(has(e, "shared-memory hazard in ") && has(e, race.kernel), "%s, %s order: '%s'", race.kernel, name(s), e.c_str());
      CHECK(checked(s, [&] { race.launch(true); }).empty(), "%s with its barrier, %s order: reported", race.kernel, name(s));
    }
    const std::string e = checked(race.order, [&] { race.launch(false); });
    for (const char* part : race.report) CHECK(has(e, part), "%s, %s order: '%s' lacks '%s'", race.kernel, name(race.order), e.c_str(), part);
  }
  std::printf("hazard report:\n%s\n", checked(Schedule::kWarpReverse, [&] { races[3].launch(false); }).c_str());

  auto* lane_exchange = races::lane_exchange<64>;
  for (Schedule s : kAll) {
    CHECK(checked(s, [&] { CMPQ_LAUNCH(lane_exchange, dim3(1), dim3(64), 0, nullptr, p); }).empty(),
          "lanes ordered by __syncwarp, %s order: reported", name(s));
    for (int t = 0; t < 64; ++t) CHECK(out[t] == (t ^ 1), "lane exchange thread %d: %d", t, out[t]);
  }
  CHECK(error_of([&] { races[0].launch(false); }).empty(), "hazard checking is off by default");
  restore_schedule();
}

void test_concurrent_hosts() {
  // Two host threads launching at once are serialized by the launch mutex and both get correct results.
  bool ok[2] = {true, true};
  auto work = [&](int id) {
    const int n = 96;
    std::vector<int> out(n);
    int* p = out.data();
    auto* kernel = neighbour_kernel;
    for (int rep = 0; rep < 30; ++rep) {
      CMPQ_LAUNCH(kernel, dim3(2), dim3(n), n * sizeof(int), nullptr, p, true);
      for (int t = 1; t < n; ++t) ok[id] = ok[id] && out[t] == t - 1;
    }
  };
  std::thread t0(work, 0), t1(work, 1);
  t0.join(), t1.join();
  CHECK(ok[0] && ok[1], "concurrent launches from two host threads");
}

void report_timing() {
  const int threads = 128, iters = 4000;
  std::vector<int> out(threads);
  int* p = out.data();
  auto* sync_kernel = sync_loop_kernel;
  auto* shfl_kernel = shfl_loop_kernel;
  CMPQ_LAUNCH(sync_kernel, dim3(1), dim3(threads), 0, nullptr, 10, p);  // warm the stack pool
  auto t0 = std::chrono::steady_clock::now();
  CMPQ_LAUNCH(sync_kernel, dim3(1), dim3(threads), 0, nullptr, iters, p);
  auto t1 = std::chrono::steady_clock::now();
  CMPQ_LAUNCH(shfl_kernel, dim3(1), dim3(threads), 0, nullptr, iters / 4, p);
  auto t2 = std::chrono::steady_clock::now();
  CHECK(out[0] == iters / 4 + (iters / 4 % 2 ? 1 : 0), "shuffle loop result %d", out[0]);
  const double sync_ns = std::chrono::duration<double, std::nano>(t1 - t0).count() / (double(iters) * threads);
  const double shfl_ns = std::chrono::duration<double, std::nano>(t2 - t1).count() / (double(iters / 4) * threads);
  std::printf("timing (%s, %d threads): %.1f ns per __syncthreads per thread, %.1f ns per __shfl_xor_sync per thread\n",
              name(g_base), threads, sync_ns, shfl_ns);
}

}  // namespace

int main() {
  try {
    g_base = cmpq::emu::get_schedule(&g_base_seed);
  } catch (const std::exception& e) {
    std::printf("FAIL: %s\n", e.what());
    return 2;
  }
  std::printf("emu selftest, schedule %s (seed %llu)\n", name(g_base), static_cast<unsigned long long>(g_base_seed));
  const struct { const char* name; void (*fn)(); } tests[] = {
      {"builtins", test_builtins},       {"reduction", test_reduction},
      {"missing_sync", test_missing_sync}, {"errors", test_errors},
      {"shuffles", test_shuffles_and_votes}, {"bits", test_bits},
      {"half", test_half},               {"mma_f16", check_mma<false>},
      {"mma_bf16", check_mma<true>},     {"mma_s8", check_mma_s8},
      {"ldmatrix", test_ldmatrix},
      {"cp_async", test_cp_async},       {"warp_serial", test_warp_serial},
      {"hazards", test_hazards},         {"concurrent", test_concurrent_hosts},
      {"timing", report_timing}};
  for (const auto& t : tests) {
    const int before = g_failures;
    try {
      t.fn();
    } catch (const std::exception& e) {
      ++g_failures;
      std::printf("FAIL %s: unexpected exception: %s\n", t.name, e.what());
    }
    std::printf("%-13s %s\n", t.name, g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
