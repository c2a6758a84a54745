// hazards.h — how the scheduler (emu.cpp) and the shared-memory hazard checker (hazards.cpp) talk to each
// other. Internal to the emulation: kernels never include it.
#pragma once

#include <cstddef>
#include <string>

namespace cmpq {
namespace emu {
namespace detail {

// The scheduler tells the checker (on the launching thread; no-ops unless the launch is checked):
void hazards_launch_begin(const void* kernel, void* dynamic_smem, size_t dynamic_smem_bytes);
void hazards_launch_end();
void hazards_block_begin();  // a block starts: a new epoch, no copy in flight
void hazards_barrier();      // a __syncthreads released the block: a new epoch
// A cp.async of the running thread: its bytes are in flight from issue to the wait that completes it.
void hazards_async_issue(const void* dst, size_t bytes);
void hazards_async_complete(const void* dst, size_t bytes);

// The checker tells the scheduler: end the launch with this error, naming the running block and thread.
void fail_running_thread(const std::string& what);

}  // namespace detail
}  // namespace emu
}  // namespace cmpq
