// The Winograd transform loops (winograd_loops.h) compiled for AVX2 + FMA. See csrc/conv3x3_winograd.h.
#include "winograd_kernels.h"
#if defined(__x86_64__) || defined(_M_X64)

#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Everything below is compiled for this instruction set; the headers above are not (their inline functions are
// shared with the rest of the program). The driver calls this table only where CPUID reports the set.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace fastdiff {
namespace wg_cpu {
namespace avx2 {
#define WG_KERNELS_NAME table
#define WG_LANES 8
#include "winograd_loops.h"
#undef WG_LANES
#undef WG_KERNELS_NAME
}  // namespace avx2

const Kernels& kernels_avx2() { return avx2::table(); }

}  // namespace wg_cpu
}  // namespace fastdiff

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
