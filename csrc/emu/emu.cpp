// emu.cpp — fibers, the block scheduler, barriers, the warp-collective primitive and fp16/bf16 rounding for
// the SIMT emulation declared in emu.h. Plain C++17; x86-64 uses a hand-written context switch (a prototype
// measured ~40 ns per __syncthreads per thread; ucontext costs ~10x because swapcontext makes a
// sigprocmask syscall each time), other targets fall back to ucontext.
#include "emu.h"

#include "hazards.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#if !defined(__x86_64__) || defined(CMPQ_EMU_UCONTEXT)
#define CMPQ_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

// ASan must be told about stack switches, or it reports false stack-buffer errors on fiber stacks.
#if defined(__SANITIZE_ADDRESS__)
#define CMPQ_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CMPQ_EMU_ASAN 1
#endif
#endif
#if defined(CMPQ_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace cmpq {
namespace emu {
namespace detail {

Builtins g_builtins{};

namespace {

constexpr size_t kStackBytes = 128 * 1024;  // per fiber; kernels keep big arrays in shared memory

enum class State : uint8_t { kRunnable, kBarrier, kCollective, kDone };
struct Fiber;
[[noreturn]] void fiber_main(Fiber* f);

// ---- context switch ----------------------------------------------------------------------------------
#if !defined(CMPQ_EMU_USE_UCONTEXT)
// Saves the callee-saved registers of the SysV ABI (rbx, rbp, r12-r15) on the current stack, stores rsp in
// *save_sp, loads load_sp and pops the other context's registers. Everything else is caller-saved, so the
// C++ call site already assumes it is clobbered. MXCSR / x87 control words are left alone (see emu.h).
extern "C" void cmpq_emu_switch(void** save_sp, void* load_sp);
// First "return" of a new fiber lands here with rsp 16-byte aligned: call entry(arg) from r13(r12).
extern "C" void cmpq_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl cmpq_emu_switch
  .hidden cmpq_emu_switch
  .type cmpq_emu_switch, @function
cmpq_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cmpq_emu_switch, .-cmpq_emu_switch

  .p2align 4
  .globl cmpq_emu_trampoline
  .hidden cmpq_emu_trampoline
  .type cmpq_emu_trampoline, @function
cmpq_emu_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size cmpq_emu_trampoline, .-cmpq_emu_trampoline
)");

struct Context { void* sp = nullptr; };
void context_init(Context& c, char* stack, Fiber* arg) {
  auto* sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t{15});
  *--sp = reinterpret_cast<void*>(&cmpq_emu_trampoline);  // consumed by ret; leaves rsp 16-aligned
  *--sp = nullptr;                                        // rbp = 0 ends frame-pointer walks
  *--sp = nullptr;                                        // rbx
  *--sp = arg;                                            // r12: argument
  *--sp = reinterpret_cast<void*>(&fiber_main);           // r13: entry
  *--sp = nullptr;                                        // r14
  *--sp = nullptr;                                        // r15
  c.sp = sp;
}
inline void context_switch(Context& from, Context& to) { cmpq_emu_switch(&from.sp, to.sp); }
#else
struct Context { ucontext_t uc; };
Fiber* g_starting = nullptr;  // makecontext passes only ints portably
void ucontext_entry() { fiber_main(g_starting); }
void context_init(Context& c, char* stack, Fiber* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, &ucontext_entry, 0);
  g_starting = arg;
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- runtime state (one launch at a time) -----------------------------------------------------------------
struct PendingCopy { void* dst; const void* src; size_t bytes; bool zero_fill; unsigned group; };

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  unsigned linear = 0;
  uint3 tid{};
  State state = State::kRunnable;
  bool started = false;
  unsigned coll_mask = 0;           // mask of the collective it waits in (diagnostics)
  std::vector<PendingCopy> copies;  // deferred cp.async
  unsigned groups_committed = 0;
  void* asan_fake = nullptr;
};

struct Pending {  // one warp collective being assembled
  unsigned mask, arrived;
  const void* tag;
  const void* in[32];
  void* out[32];
};

struct Cancelled {};  // unwinds a stuck fiber's stack; deliberately not a std::exception

struct Runtime {
  std::mutex mutex;
  bool schedule_set = false;
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;

  char* pool = nullptr;  // stacks with a PROT_NONE guard page below each, kept across launches
  size_t pool_stacks = 0, pool_stride = 0;

  std::vector<Fiber> fibers;
  std::vector<std::vector<Pending>> warps;
  std::vector<unsigned> order;       // lane-level schedules: fibers in resume order
  std::vector<unsigned> warp_order;  // warp-serial schedules: warps in run order,
  unsigned lane_order[32];           //   and the running warp's lanes in resume order
  unsigned nthreads = 0, barrier_arrived = 0;
  uint64_t releases = 0;  // __syncthreads released so far: a change ends a warp-serial barrier interval
  Fiber* current = nullptr;
  Context sched_ctx;
  bool cancelling = false, failed = false;
  std::string error;
  std::function<void()>* body = nullptr;

  void* smem = nullptr;
  size_t smem_capacity = 0;

  const void* asan_main_bottom = nullptr;
  size_t asan_main_size = 0;
  void* asan_sched_fake = nullptr;
};
Runtime g_rt;
thread_local bool t_in_launch = false;

#if defined(CMPQ_EMU_ASAN)
#define ASAN_START(fake, bottom, size) __sanitizer_start_switch_fiber(fake, bottom, size)
#define ASAN_FINISH(fake, bottom, size) __sanitizer_finish_switch_fiber(fake, bottom, size)
#else
#define ASAN_START(fake, bottom, size) ((void)0)
#define ASAN_FINISH(fake, bottom, size) ((void)0)
#endif

std::string fmt_dim(unsigned x, unsigned y, unsigned z) {
  return "(" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}
std::string block_name() {
  const uint3 b = g_builtins.block_idx;
  return "block " + fmt_dim(b.x, b.y, b.z);
}
std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

void fail(const std::string& what) {  // the first failure of a block is the one reported
  if (g_rt.failed) return;
  g_rt.failed = true;
  g_rt.error = what;
}

Fiber& current_fiber(const char* what) {
  if (!g_rt.current) throw std::runtime_error(std::string("cmpq::emu: ") + what + " called outside a kernel");
  return *g_rt.current;
}

// Fiber side of a switch point: back to the scheduler; on return, unwind if the launch is being aborted.
void yield() {
  Fiber& f = *g_rt.current;
  ASAN_START(&f.asan_fake, g_rt.asan_main_bottom, g_rt.asan_main_size);
  context_switch(f.ctx, g_rt.sched_ctx);
  ASAN_FINISH(f.asan_fake, nullptr, nullptr);
  if (g_rt.cancelling) throw Cancelled{};
}

// Exceptions never cross a fiber boundary: everything is caught here and recorded for launch().
// No fiber switches while a catch block is active, so the per-thread C++ exception state stays consistent.
[[noreturn]] void fiber_main(Fiber* f) {
  ASAN_FINISH(nullptr, &g_rt.asan_main_bottom, &g_rt.asan_main_size);
  try {
    (*g_rt.body)();
  } catch (const Cancelled&) {
  } catch (const std::exception& e) {
    fail(block_name() + " thread " + fmt_dim(f->tid.x, f->tid.y, f->tid.z) + ": " + e.what());
  } catch (...) {
    fail(block_name() + " thread " + fmt_dim(f->tid.x, f->tid.y, f->tid.z) + ": unknown exception");
  }
  f->state = State::kDone;
  ASAN_START(nullptr, g_rt.asan_main_bottom, g_rt.asan_main_size);  // this stack's frames are gone
  context_switch(f->ctx, g_rt.sched_ctx);
  std::abort();  // a finished fiber is re-initialised, never resumed
}

void resume(Fiber& f) {
  if (!f.started) {
#if defined(CMPQ_EMU_ASAN)
    __asan_unpoison_memory_region(f.stack, kStackBytes);  // redzones of the stack's previous life
#endif
    context_init(f.ctx, f.stack, &f);
    f.started = true;
  }
  g_rt.current = &f;
  g_builtins.thread_idx = f.tid;
  ASAN_START(&g_rt.asan_sched_fake, f.stack, kStackBytes);
  context_switch(g_rt.sched_ctx, f.ctx);
  ASAN_FINISH(g_rt.asan_sched_fake, nullptr, nullptr);
  g_rt.current = nullptr;
}

void ensure_stacks(size_t n) {
  if (n <= g_rt.pool_stacks) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t stride = page + kStackBytes;
  if (g_rt.pool) munmap(g_rt.pool, g_rt.pool_stacks * g_rt.pool_stride);
  g_rt.pool = nullptr, g_rt.pool_stacks = 0;
  void* p = mmap(nullptr, n * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cmpq::emu: cannot map fiber stacks");
  g_rt.pool = static_cast<char*>(p), g_rt.pool_stacks = n, g_rt.pool_stride = stride;
  for (size_t i = 0; i < n; ++i)  // a stack overflow faults on the guard instead of corrupting a neighbour
    if (mprotect(g_rt.pool + i * stride, page, PROT_NONE) != 0) throw std::runtime_error("cmpq::emu: mprotect failed");
}

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

bool is_random(Schedule s) { return s == Schedule::kRandom || s == Schedule::kWarpRandom; }
bool is_warp_serial(Schedule s) {
  return s == Schedule::kWarpForward || s == Schedule::kWarpReverse || s == Schedule::kWarpRandom;
}

// CMPQ_EMU_SCHEDULE: a schedule name, random ones optionally followed by :<seed>.
void resolve_schedule() {
  if (g_rt.schedule_set) return;
  const char* env = std::getenv("CMPQ_EMU_SCHEDULE");
  if (env && *env) {
    const std::string s = env;
    const size_t colon = s.find(':');
    Schedule schedule;
    if (!parse_schedule(s.substr(0, colon), &schedule) || (colon != std::string::npos && !is_random(schedule)))
      throw std::runtime_error(std::string("cmpq::emu: CMPQ_EMU_SCHEDULE must be ") + kScheduleNames +
                               " (random ones optionally :<seed>), got '" + s + "'");
    g_rt.schedule = schedule;
    g_rt.seed = colon == std::string::npos ? 0 : std::strtoull(s.c_str() + colon + 1, nullptr, 0);
  }
  g_rt.schedule_set = true;
}

// One line per run of consecutive threads in the same situation, e.g. "threads 1-127: wait at __syncthreads".
std::string describe_stuck_block() {
  std::vector<std::string> what(g_rt.nthreads);
  bool exited = false, barrier = false;
  for (unsigned i = 0; i < g_rt.nthreads; ++i) {
    const Fiber& f = g_rt.fibers[i];
    switch (f.state) {
      case State::kDone: what[i] = "exited"; exited = true; break;
      case State::kBarrier: what[i] = "wait at __syncthreads"; barrier = true; break;
      case State::kRunnable: what[i] = "runnable"; break;
      case State::kCollective: {
        unsigned arrived = 0;
        for (const Pending& p : g_rt.warps[i / 32])
          if (p.mask == f.coll_mask) arrived = p.arrived;
        what[i] = "wait at a warp collective of warp " + std::to_string(i / 32) + ", mask " + hex(f.coll_mask) +
                  ", lanes missing " + hex(f.coll_mask & ~arrived);
        break;
      }
    }
  }
  const dim3 bd = g_builtins.block_dim;
  std::string msg = "deadlock in " + block_name() + ", blockDim " + fmt_dim(bd.x, bd.y, bd.z) +
                    " (threads by linear id x + y*blockDim.x + z*blockDim.x*blockDim.y)";
  if (exited && barrier) msg += ": a thread exited while others wait at __syncthreads";
  for (unsigned i = 0; i < g_rt.nthreads;) {
    unsigned j = i;
    while (j + 1 < g_rt.nthreads && what[j + 1] == what[i]) ++j;
    msg += "\n  threads " + std::to_string(i) + (j > i ? "-" + std::to_string(j) : "") + ": " + what[i];
    i = j + 1;
  }
  return msg;
}

void shuffle(std::vector<unsigned>& v, uint64_t& rng) {
  for (size_t i = v.size() - 1; i > 0; --i) std::swap(v[i], v[splitmix64(rng) % (i + 1)]);
}

// Lane-level: a round resumes every runnable fiber once, in schedule order; released fibers run in the
// next round. Returns whether any fiber ran.
bool run_round(uint64_t& rng, unsigned& done) {
  if (g_rt.schedule == Schedule::kRandom) shuffle(g_rt.order, rng);
  bool progressed = false;
  for (unsigned idx : g_rt.order) {
    Fiber& f = g_rt.fibers[idx];
    if (f.state != State::kRunnable) continue;
    resume(f);
    progressed = true;
    if (f.state == State::kDone) ++done;
    if (g_rt.failed) break;
  }
  return progressed;
}

// Warp-serial: one barrier interval. Each warp in turn runs alone, in rounds over its lanes, until none of
// them can run (all wait at the barrier or in a collective, or exited); the barrier's release ends the
// interval, so the next call picks a fresh order. Returns whether any fiber ran.
bool run_interval(uint64_t& rng, unsigned& done) {
  if (g_rt.schedule == Schedule::kWarpRandom) shuffle(g_rt.warp_order, rng);
  const uint64_t interval = g_rt.releases;
  bool progressed = false;
  for (unsigned warp : g_rt.warp_order) {
    for (bool again = true; again;) {
      again = false;
      for (unsigned lane : g_rt.lane_order) {
        const unsigned idx = warp * 32 + lane;
        if (idx >= g_rt.nthreads || g_rt.fibers[idx].state != State::kRunnable) continue;
        resume(g_rt.fibers[idx]);
        progressed = again = true;
        if (g_rt.fibers[idx].state == State::kDone) ++done;
        if (g_rt.failed || g_rt.releases != interval) return progressed;
      }
    }
  }
  return progressed;
}

void run_block(uint64_t& rng) {
  const unsigned n = g_rt.nthreads;
  for (Fiber& f : g_rt.fibers) f.state = State::kRunnable, f.started = false, f.copies.clear(), f.groups_committed = 0;
  for (auto& w : g_rt.warps) w.clear();
  g_rt.barrier_arrived = 0;
  hazards_block_begin();
  const bool warp_serial = is_warp_serial(g_rt.schedule);
  unsigned done = 0;
  while (done < n && !g_rt.failed)
    if (!(warp_serial ? run_interval(rng, done) : run_round(rng, done))) fail(describe_stuck_block());
  if (!g_rt.failed) return;
  g_rt.cancelling = true;  // unwind every suspended fiber so destructors on its stack run
  for (Fiber& f : g_rt.fibers)
    if (f.started && f.state != State::kDone) resume(f);
  g_rt.cancelling = false;
  throw std::runtime_error("cmpq::emu::launch: " + g_rt.error);
}

}  // namespace

// ---- fiber-side primitives ----------------------------------------------------------------------------
void sync_threads() {
  Fiber& f = current_fiber("__syncthreads");
  f.state = State::kBarrier;
  if (++g_rt.barrier_arrived == g_rt.nthreads) {  // everyone is here (an exited thread never arrives)
    g_rt.barrier_arrived = 0;
    ++g_rt.releases;
    hazards_barrier();
    for (Fiber& g : g_rt.fibers) g.state = State::kRunnable;
  }
  yield();
}

void collective(unsigned mask, const void* tag, const void* in, void* out, CollectiveFn run, void* ctx) {
  Fiber& f = current_fiber("a warp collective");
  const unsigned lane = f.linear % 32, warp = f.linear / 32, bit = 1u << lane;
  const unsigned lanes_in_warp = std::min(32u, g_rt.nthreads - warp * 32);
  const unsigned existing = lanes_in_warp == 32 ? ~0u : (1u << lanes_in_warp) - 1;
  auto who = [&] { return "warp " + std::to_string(warp) + " lane " + std::to_string(lane) + ": collective mask " + hex(mask); };
  if (!(mask & bit)) throw std::runtime_error(who() + " excludes the calling lane");
  if (mask & ~existing) throw std::runtime_error(who() + " names lanes beyond the block's last thread");
  std::vector<Pending>& pending = g_rt.warps[warp];
  Pending* p = nullptr;
  for (Pending& q : pending) {
    if (q.mask == mask) p = &q;
    else if (q.mask & mask)
      throw std::runtime_error(who() + " overlaps mask " + hex(q.mask) + " of a collective other lanes wait in");
  }
  if (!p) {
    pending.push_back(Pending{mask, 0, tag, {}, {}});
    p = &pending.back();
  } else if (p->tag != tag) {
    throw std::runtime_error(who() + ": its lanes meet in different kinds of warp collective");
  }
  p->in[lane] = in, p->out[lane] = out, p->arrived |= bit;
  f.state = State::kCollective, f.coll_mask = mask;
  if (p->arrived == mask) {  // last arrival: compute every lane's output, release the lanes
    run(p->in, p->out, ctx);
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) g_rt.fibers[warp * 32 + l].state = State::kRunnable;
    pending.erase(pending.begin() + (p - pending.data()));
  }
  yield();  // the last arrival yields too, so the rotation follows the schedule at every switch point
}

void trap() { throw std::runtime_error("__trap() called"); }

void fail_running_thread(const std::string& what) {
  const uint3 t = current_fiber("a hazard report").tid;
  fail(block_name() + " thread " + fmt_dim(t.x, t.y, t.z) + ": " + what);
}

void cp_async(void* dst, const void* src, size_t bytes, bool zero_fill) {
  Fiber& f = current_fiber("cp.async");
  hazards_async_issue(dst, bytes);
  f.copies.push_back(PendingCopy{dst, src, bytes, zero_fill, f.groups_committed});
}
void cp_async_commit() { ++current_fiber("cp.async.commit_group").groups_committed; }
void cp_async_wait(int pending_groups) {
  // Completes every committed group except the newest `pending_groups`; uncommitted copies stay pending.
  Fiber& f = current_fiber("cp.async.wait_group");
  const long limit = static_cast<long>(f.groups_committed) - pending_groups;
  size_t kept = 0;
  for (const PendingCopy& c : f.copies) {  // in issue order, like the hardware's per-thread queue
    if (static_cast<long>(c.group) >= limit) {
      f.copies[kept++] = c;
      continue;
    }
    hazards_async_complete(c.dst, c.bytes);
    if (c.zero_fill) std::memset(c.dst, 0, c.bytes);
    else std::memcpy(c.dst, c.src, c.bytes);
  }
  f.copies.resize(kept);
}

// ---- rounding -----------------------------------------------------------------------------------------
namespace {
// Round |v| (+ tail) to a format with `mant` stored mantissa bits and minimum normal exponent emin, RNE.
// tail is the exact remainder TwoSum leaves (|tail| <= half an ulp of v in double, far below half an ulp of
// the 16-bit format), so it can only matter when v sits exactly on a tie.
uint16_t round_binary(double v, double tail, int mant, int emin, uint32_t inf_bits) {
  if (std::isnan(v)) return 0x7fff;  // canonical NaN, as the GPU's cvt/add/mul/fma produce
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(v);
  if (sign) tail = -tail;
  if (std::isinf(a)) return static_cast<uint16_t>(sign | inf_bits);
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);                             // a = f * 2^e, f in [0.5, 1)
  const int exp = std::max(e - 1, emin);         // exponent of the leading bit, clamped to the subnormal range
  const double scaled = std::ldexp(a, mant - exp);  // exact; integer part = kept bits
  const double whole = std::floor(scaled), frac = scaled - whole;
  uint64_t n = static_cast<uint64_t>(whole);
  if (frac > 0.5 || (frac == 0.5 && (tail > 0 || (tail == 0 && (n & 1))))) ++n;
  // Normal: (biased exponent - 1) << mant plus n (which holds the implicit bit, so a carry bumps the
  // exponent); subnormal: exp == emin and n alone. Past the largest finite value: infinity.
  const uint64_t bits = (static_cast<uint64_t>(exp - emin) << mant) + n;
  return static_cast<uint16_t>(sign | std::min<uint64_t>(bits, inf_bits));
}
}  // namespace
uint16_t round_to_f16(double v, double tail) { return round_binary(v, tail, 10, -14, 0x7c00); }
uint16_t round_to_bf16(double v, double tail) { return round_binary(v, tail, 7, -126, 0x7f80); }

}  // namespace detail

// ---- public API --------------------------------------------------------------------------------------------
using detail::g_rt;

void set_schedule(Schedule schedule, uint64_t seed) {
  std::lock_guard<std::mutex> lock(g_rt.mutex);
  g_rt.schedule = schedule, g_rt.seed = seed, g_rt.schedule_set = true;
}

bool parse_schedule(const std::string& name, Schedule* schedule) {
  static const std::pair<const char*, Schedule> kNames[] = {
      {"forward", Schedule::kForward},           {"reverse", Schedule::kReverse},
      {"random", Schedule::kRandom},             {"warp-forward", Schedule::kWarpForward},
      {"warp-reverse", Schedule::kWarpReverse}, {"warp-random", Schedule::kWarpRandom}};
  for (const auto& [n, s] : kNames)
    if (name == n) return *schedule = s, true;
  return false;
}

Schedule get_schedule(uint64_t* seed) {
  std::lock_guard<std::mutex> lock(g_rt.mutex);
  detail::resolve_schedule();
  if (seed) *seed = g_rt.seed;
  return g_rt.schedule;
}

void* dynamic_smem() { return g_rt.smem; }

void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, cudaStream_t, std::function<void()> body,
            const void* kernel) {
  if (detail::t_in_launch) throw std::runtime_error("cmpq::emu::launch is not reentrant (launch from inside a kernel?)");
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("cmpq::emu::launch: invalid grid " + detail::fmt_dim(grid.x, grid.y, grid.z));
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    throw std::runtime_error("cmpq::emu::launch: invalid block " + detail::fmt_dim(block.x, block.y, block.z));
  std::lock_guard<std::mutex> lock(g_rt.mutex);
  struct InLaunch {
    InLaunch() { detail::t_in_launch = true; }
    ~InLaunch() {
      detail::hazards_launch_end();
      detail::t_in_launch = false, g_rt.body = nullptr, g_rt.failed = false, g_rt.error.clear();
    }
  } in_launch;
  detail::resolve_schedule();

  const unsigned n = static_cast<unsigned>(nthreads);
  detail::ensure_stacks(n);
  g_rt.nthreads = n;
  g_rt.fibers.resize(n);
  g_rt.warps.resize((n + 31) / 32);
  g_rt.order.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    detail::Fiber& f = g_rt.fibers[i];
    f.stack = g_rt.pool + i * g_rt.pool_stride + (g_rt.pool_stride - detail::kStackBytes);
    f.linear = i;
    f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    g_rt.order[i] = g_rt.schedule == Schedule::kReverse ? n - 1 - i : i;
  }
  const bool descending = g_rt.schedule == Schedule::kWarpReverse;
  g_rt.warp_order.resize(g_rt.warps.size());
  for (unsigned w = 0; w < g_rt.warp_order.size(); ++w)
    g_rt.warp_order[w] = descending ? static_cast<unsigned>(g_rt.warp_order.size()) - 1 - w : w;
  for (unsigned l = 0; l < 32; ++l) g_rt.lane_order[l] = descending ? 31 - l : l;
  // Exactly the requested size (rounded to 16), so ASan sees an overrun past the end of dynamic smem.
  const size_t smem_alloc = (std::max<size_t>(dynamic_smem_bytes, 16) + 15) & ~size_t{15};
  if (smem_alloc != g_rt.smem_capacity) {
    std::free(g_rt.smem);
    g_rt.smem = std::aligned_alloc(16, smem_alloc);
    g_rt.smem_capacity = g_rt.smem ? smem_alloc : 0;
    if (!g_rt.smem) throw std::runtime_error("cmpq::emu::launch: out of memory for dynamic shared memory");
  }
  g_rt.body = &body;
  detail::hazards_launch_begin(kernel, g_rt.smem, smem_alloc);
  detail::g_builtins.block_dim = block;
  detail::g_builtins.grid_dim = grid;
  uint64_t rng = g_rt.seed;  // each launch replays the same random order: failures are reproducible
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        detail::g_builtins.block_idx = uint3{x, y, z};
        std::memset(g_rt.smem, 0xff, smem_alloc);  // NaN pattern: reads of unwritten smem stand out
        detail::run_block(rng);
      }
}

}  // namespace emu
}  // namespace cmpq
