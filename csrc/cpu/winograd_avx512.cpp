// The Winograd transform loops (winograd_loops.h) compiled for AVX-512 (F, BW, VL, DQ). See csrc/conv3x3_winograd.h.
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
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")
#endif

namespace fastdiff {
namespace wg_cpu {
namespace avx512 {
#define WG_KERNELS_NAME table
#define WG_LANES 16
#include "winograd_loops.h"
#undef WG_LANES
#undef WG_KERNELS_NAME
}  // namespace avx512

const Kernels& kernels_avx512() { return avx512::table(); }

}  // namespace wg_cpu
}  // namespace fastdiff

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
