// kernels.cpp — the CUDA kernels' exact sources compiled for the host under the SIMT emulation, in a
// translation unit of their own: it is the one built with -fsanitize=thread, so the hazard checker
// (hazards.cpp) sees every shared-memory access of the kernels, while the torch bindings (emu_ops.cpp) and
// the emulation itself stay uninstrumented. Link it into the same module as hazards.cpp.
#include "cuda/dequant.cu"
#include "cuda/gemm_tc.cu"
#include "cuda/gemv.cu"
#include "cuda/mixllm_gemm.cu"
