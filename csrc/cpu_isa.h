// fastdiff native extension: the CPU instruction set the micro-kernels use, shared by every CPU op.
#pragma once

namespace fastdiff {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// The best ISA of this CPU (CPUID; AMX only where the OS grants the tile state), capped by the environment variable
// FASTDIFF_CPU_ISA=avx512|avx2|generic, read on every call so tests can run every variant in one process.
CpuIsa active_cpu_isa();

}  // namespace fastdiff
