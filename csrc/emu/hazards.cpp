// hazards.cpp — the shared-memory hazard checker of the SIMT emulation, in the spirit of compute-sanitizer's
// racecheck: two warps touching one shared byte with no __syncthreads between them is an error, whether or
// not the schedule happened to make the result wrong.
//
// Observing accesses. The translation unit that includes the kernels is compiled with -fsanitize=thread, so
// the compiler calls __tsan_read4(addr), __tsan_write16(addr), ... before every load and store of memory
// other threads could see. This file defines those hooks in place of the ThreadSanitizer runtime, which is
// never linked. So every load and store of kernel code is seen with its exact size — in helpers too,
// 16-byte vector accesses, and the emulated ldmatrix (which reads each row element by element) — with no
// change to the kernels. cp.async copies run inside emu.cpp, which reports them. Not seen: accesses made by
// a call into code compiled without the flag (a library memcpy of runtime size, say).
//
// Which memory is shared. Dynamic shared memory is the launch's buffer. `__shared__` arrays are `static`
// under the emulation and can have no initializer, so they live in the .bss of the module that holds the
// kernels — which must be the module this file is linked into. All of that .bss except the emulation's
// built-in variables counts as shared memory: kernel code writes no other zero-initialized static storage
// (a `__device__` variable would be checked the same way, and its races are as real).
//
// The rule. A block's epochs are its barrier intervals (epoch 0 ends at its first __syncthreads). Per byte
// the checker keeps the epoch and warp of the last write and the warps that read it in the current epoch.
// A read after another warp's write, a write after another warp's read, or a write after another warp's
// write within one epoch is a hazard: no barrier orders the two accesses. Accesses of one warp are not
// checked (its collectives and __syncwarp order them; the lane-level schedules test that order). A
// cp.async's bytes are in flight from issue to the wait that completes it: any access meanwhile is a
// hazard, and the copy is checked as a write of its warp both when issued (it may land at once) and when
// its wait completes (it may land that late).
//
// Cost: with no checked launch running, a hook is a call and a thread-local test; checked, a few shadow
// updates per byte touched.
#include "hazards.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "emu.h"

namespace cmpq {
namespace emu {
namespace detail {
namespace {

struct ByteState {
  uint32_t write_epoch = 0;  // epoch of the last write (0: none)
  uint32_t read_epoch = 0;   // the epoch `readers` belongs to
  uint32_t readers = 0;      // bit w: warp w read the byte in read_epoch (a block has at most 32 warps)
  uint32_t async_epoch = 0;  // epoch a cp.async into the byte was issued in, while it is in flight; else 0
  uint8_t writer = 0, async_warp = 0;
};

struct Region {
  uintptr_t base = 0;
  size_t size = 0;
  std::vector<ByteState> bytes;
  bool holds(uintptr_t a) const { return a - base < size; }
};

struct Checker {
  Region statics, dynamic;
  const void* kernel = nullptr;
  // Epochs count across blocks and launches, so state left by an earlier block never matches the current one.
  uint32_t epoch = 0, block_epoch = 0;  // the current epoch; the running block's first
  bool reported = false;                // the launch fails with its first hazard; later accesses are not checked
};

std::atomic<bool> g_enabled{false};
Checker g_checker;
thread_local Checker* t_checker = nullptr;  // the launching thread's, while a checked launch runs

// Finds the .bss of this module (see the top of the file): the part of its writable segment beyond the file.
int find_bss(dl_phdr_info* info, size_t, void* out) {
  const auto anchor = reinterpret_cast<uintptr_t>(&g_checker);  // itself in this module's .bss
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t start = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type != PT_LOAD || anchor - start >= ph.p_memsz) continue;
    auto* region = static_cast<Region*>(out);
    region->base = start + ph.p_filesz;
    region->size = ph.p_memsz - ph.p_filesz;
    return 1;
  }
  return 0;
}

Region* region_of(uintptr_t a) {
  Checker& c = g_checker;
  if (c.dynamic.holds(a)) return &c.dynamic;
  const bool builtin = a - reinterpret_cast<uintptr_t>(&g_builtins) < sizeof g_builtins;  // threadIdx reads
  return c.statics.holds(a) && !builtin ? &c.statics : nullptr;
}

unsigned running_warp() {
  const uint3 t = g_builtins.thread_idx;
  const dim3 d = g_builtins.block_dim;
  return (t.x + t.y * d.x + t.z * d.x * d.y) / 32;
}

// ---- naming things in reports ------------------------------------------------------------------------------
std::string hex(uintptr_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// "void ns::k<float, 4>(int, float*)::smem" -> "ns::k<float, 4>::smem": parameter lists only add noise.
std::string without_parameters(std::string name) {
  for (size_t at; (at = name.find("(anonymous namespace)")) != std::string::npos;) name.replace(at, 21, "{anonymous}");
  std::string out;
  int depth = 0;
  for (char c : name) {
    depth += c == '(';
    if (depth == 0) out += c;
    depth -= c == ')';
  }
  return out.rfind("void ", 0) == 0 ? out.substr(5) : out;
}

// The exported symbol that contains `a` and a's offset in it; false if none does (a symbol of internal
// linkage, or an executable linked without -rdynamic).
bool symbol_at(uintptr_t a, std::string* name, uintptr_t* offset) {
  Dl_info info;
  void* entry = nullptr;
  if (!dladdr1(reinterpret_cast<void*>(a), &info, &entry, RTLD_DL_SYMENT) || !entry || !info.dli_sname) return false;
  const auto* sym = static_cast<const ElfW(Sym)*>(entry);
  if (a - reinterpret_cast<uintptr_t>(info.dli_saddr) >= std::max<uintptr_t>(sym->st_size, 1)) return false;
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  *name = without_parameters(status == 0 ? demangled : info.dli_sname);
  std::free(demangled);
  *offset = a - reinterpret_cast<uintptr_t>(info.dli_saddr);
  return true;
}

std::string kernel_name(const void* kernel) {
  std::string name;
  uintptr_t offset;
  const auto a = reinterpret_cast<uintptr_t>(kernel);
  return symbol_at(a, &name, &offset) ? name : "the kernel at " + hex(a);
}

std::string where(const Region& r, uintptr_t a) {
  if (&r == &g_checker.dynamic) return "dynamic shared memory + " + std::to_string(a - r.base);
  std::string name;
  uintptr_t offset;
  if (symbol_at(a, &name, &offset)) return name + " + " + std::to_string(offset);
  return "static shared memory at " + hex(a) + " (not an exported symbol: no name)";
}

std::string epoch_name(uint32_t epoch) {
  const uint32_t n = epoch - g_checker.block_epoch;
  return "barrier epoch " + std::to_string(n) + " of the block, " +
         (n == 0 ? std::string("before its first __syncthreads") : "after its __syncthreads #" + std::to_string(n));
}

// ---- the rule --------------------------------------------------------------------------------------------
enum class Hazard { kNone, kReadAfterWrite, kWriteAfterRead, kWriteAfterWrite, kInFlight };

// The hazard an access of `warp` to a byte in state s makes now, and the other warp involved.
Hazard conflict(const ByteState& s, unsigned warp, bool write, unsigned* other) {
  const Checker& c = g_checker;
  if (s.async_epoch >= c.block_epoch) return *other = s.async_warp, Hazard::kInFlight;  // block_epoch >= 1
  if (s.write_epoch == c.epoch && s.writer != warp)
    return *other = s.writer, write ? Hazard::kWriteAfterWrite : Hazard::kReadAfterWrite;
  const uint32_t other_readers = s.read_epoch == c.epoch ? s.readers & ~(1u << warp) : 0;
  if (write && other_readers)
    return *other = static_cast<unsigned>(__builtin_ctz(other_readers)), Hazard::kWriteAfterRead;
  return Hazard::kNone;
}

void record(ByteState& s, unsigned warp, bool write) {
  const uint32_t epoch = g_checker.epoch;
  if (write) {
    s.write_epoch = epoch, s.writer = static_cast<uint8_t>(warp);
    return;
  }
  if (s.read_epoch != epoch) s.read_epoch = epoch, s.readers = 0;
  s.readers |= 1u << warp;
}

void report(Hazard h, unsigned warp, unsigned other, const Region& r, uintptr_t byte, const char* access,
            uintptr_t start, size_t size) {
  Checker& c = g_checker;
  c.reported = true;
  const std::string w = "warp " + std::to_string(warp), o = "warp " + std::to_string(other);
  std::string what;
  switch (h) {
    case Hazard::kReadAfterWrite: what = "read-after-write: " + w + " reads what " + o + " wrote"; break;
    case Hazard::kWriteAfterRead: what = "write-after-read: " + w + " overwrites what " + o + " read"; break;
    case Hazard::kWriteAfterWrite: what = "write-after-write: " + w + " overwrites what " + o + " wrote"; break;
    case Hazard::kInFlight:
      what = "cp.async in flight: " + w + " touches what a cp.async of " + o + " may still write";
      break;
    case Hazard::kNone: break;
  }
  fail_running_thread("shared-memory hazard in " + kernel_name(c.kernel) + ", " + what + " with no barrier between (" +
                      epoch_name(c.epoch) + "), at " + where(r, byte) + "; the access: " + access + " of " +
                      std::to_string(size) + " bytes at " + where(r, start));
}

// Checks and records an access of the running warp; `access` names it in a report.
void check(const void* p, size_t size, bool write, const char* access) {
  Checker& c = g_checker;
  const auto start = reinterpret_cast<uintptr_t>(p);
  Region* r = region_of(start);
  if (!r || c.reported) return;
  const unsigned warp = running_warp();
  const size_t end = std::min(start - r->base + size, r->size);
  for (size_t i = start - r->base; i < end; ++i) {
    ByteState& s = r->bytes[i];
    unsigned other = 0;
    if (const Hazard h = conflict(s, warp, write, &other); h != Hazard::kNone)
      return report(h, warp, other, *r, r->base + i, access, start, size);
    record(s, warp, write);
  }
}

}  // namespace

void hazards_launch_begin(const void* kernel, void* dynamic_smem, size_t dynamic_smem_bytes) {
  if (!g_enabled.load()) return;
  Checker& c = g_checker;
  if (!c.statics.size) {
    dl_iterate_phdr(&find_bss, &c.statics);
    c.statics.bytes.resize(c.statics.size);
  }
  c.dynamic.base = reinterpret_cast<uintptr_t>(dynamic_smem);
  c.dynamic.size = dynamic_smem_bytes;
  if (c.dynamic.bytes.size() < dynamic_smem_bytes) c.dynamic.bytes.resize(dynamic_smem_bytes);
  c.kernel = kernel;
  c.reported = false;
  t_checker = &c;
}

void hazards_launch_end() { t_checker = nullptr; }

void hazards_block_begin() {
  if (t_checker) t_checker->block_epoch = ++t_checker->epoch;
}

void hazards_barrier() {
  if (t_checker) ++t_checker->epoch;
}

void hazards_async_issue(const void* dst, size_t bytes) {
  if (!t_checker) return;
  check(dst, bytes, true, "a cp.async issued");
  Region* r = region_of(reinterpret_cast<uintptr_t>(dst));
  if (!r || t_checker->reported) return;
  const size_t first = reinterpret_cast<uintptr_t>(dst) - r->base;
  for (size_t i = first; i < std::min(first + bytes, r->size); ++i)
    r->bytes[i].async_epoch = t_checker->epoch, r->bytes[i].async_warp = static_cast<uint8_t>(running_warp());
}

void hazards_async_complete(const void* dst, size_t bytes) {
  if (!t_checker) return;
  Region* r = region_of(reinterpret_cast<uintptr_t>(dst));
  if (!r) return;
  const size_t first = reinterpret_cast<uintptr_t>(dst) - r->base;
  for (size_t i = first; i < std::min(first + bytes, r->size); ++i) r->bytes[i].async_epoch = 0;
  check(dst, bytes, true, "a cp.async completed by its wait");
}

}  // namespace detail

void set_hazard_check(bool on) { detail::g_enabled.store(on); }

}  // namespace emu
}  // namespace cmpq

// ---- ThreadSanitizer's compiler interface --------------------------------------------------------------------
// The calls -fsanitize=thread code makes, with the compiler's signatures. Only accesses during a checked
// launch, on its thread, are looked at.
namespace {
inline void on_access(void* p, size_t size, bool write) {
  if (cmpq::emu::detail::t_checker) cmpq::emu::detail::check(p, size, write, write ? "a write" : "a read");
}
}  // namespace

#define CMPQ_TSAN_SIZED_HOOKS(n)                                                 \
  void __tsan_read##n(void* p) { on_access(p, n, false); }                      \
  void __tsan_write##n(void* p) { on_access(p, n, true); }                      \
  void __tsan_unaligned_read##n(void* p) { on_access(p, n, false); }            \
  void __tsan_unaligned_write##n(void* p) { on_access(p, n, true); }

extern "C" {
CMPQ_TSAN_SIZED_HOOKS(2)
CMPQ_TSAN_SIZED_HOOKS(4)
CMPQ_TSAN_SIZED_HOOKS(8)
CMPQ_TSAN_SIZED_HOOKS(16)
void __tsan_read1(void* p) { on_access(p, 1, false); }
void __tsan_write1(void* p) { on_access(p, 1, true); }
void __tsan_read_range(void* p, unsigned long size) { on_access(p, size, false); }
void __tsan_write_range(void* p, unsigned long size) { on_access(p, size, true); }
// No synchronisation to model: fibers run one at a time, and function boundaries and vtable stores (of
// exceptions a kernel throws) touch no shared memory.
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
}
