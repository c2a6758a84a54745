// cpu_isa_env.h — the CMPQ_CPU_SIMD rule, shared by the CMPQ and MixLLM CPU ops (cmpq_ops.cpp, mixllm_ops.cpp).
#pragma once

#include <stdlib.h>
#include <string.h>

#include <torch/torch.h>

#include "cpu/gemm_cpu.h"

namespace cmpq {

// CMPQ_CPU_SIMD picks the CPU kernels' instruction set, read on every call: unset, "", "auto" or "1" = the
// best exact one this CPU runs; "scalar" (or "0"), "avx2", "avx512" force one (tests run every path; it
// also helps bisect a suspected SIMD bug); "avx512-int8" opts into the approximate int8 kernel (m <= 16).
// A name this CPU cannot run is an error, never a silent fallback.
inline cpu::Isa cpu_isa_for_call() {
  static const cpu::Isa best = cpu::best_isa();
  const char* env = getenv("CMPQ_CPU_SIMD");
  if (env == nullptr || *env == '\0' || strcmp(env, "auto") == 0 || strcmp(env, "1") == 0) return best;
  if (strcmp(env, "0") == 0) return cpu::Isa::kScalar;
  cpu::Isa isa;
  TORCH_CHECK_VALUE(cpu::isa_from_name(env, &isa), "CMPQ_CPU_SIMD='", env,
                    "' is not one of auto, scalar (or 0), avx2, avx512, avx512-int8");
  TORCH_CHECK_VALUE(cpu::supports(isa), "CMPQ_CPU_SIMD=", env, " but this CPU cannot run ", env,
                    "; it runs ", cpu::isa_name(best));
  return isa;
}

}  // namespace cmpq
