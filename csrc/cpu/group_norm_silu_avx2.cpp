// The GroupNorm + SiLU loops (group_norm_silu_loops.h) compiled for AVX2 + FMA. See csrc/group_norm_silu.h.
#include "group_norm_silu_kernels.h"
#if defined(__x86_64__) || defined(_M_X64)

#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

// Everything below is compiled for this instruction set; the headers above are not (their inline functions are
// shared with the rest of the program). The driver calls this table only where CPUID reports the set.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace fastdiff {
namespace gn_cpu {
namespace avx2 {
#define GN_KERNELS_NAME table
#define GN_RECIPROCAL(d) ((vf)_mm256_rcp_ps((__m256)(d)))
#define GN_LANES 8
#include "group_norm_silu_loops.h"
#undef GN_LANES
#undef GN_RECIPROCAL
#undef GN_KERNELS_NAME
}  // namespace avx2

const Kernels& kernels_avx2() { return avx2::table(); }

}  // namespace gn_cpu
}  // namespace fastdiff

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
