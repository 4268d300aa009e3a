// AVX-512F vq_nearest micro-kernel (12 x 32) and its lane reduction (finish), compiled with per-function target
// attributes (no -march flag) and called only where CPUID reports AVX-512F (the AMX path uses them too). See
// vq_nearest_cpu.cpp for the algorithm and vq_nearest_kernels.h for the interface.
#include "vq_nearest_kernels.h"

#if FASTDIFF_X86
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace fastdiff {
namespace vq_cpu {

// 12 rows x 32 columns: 24 zmm accumulators + 2 panel vectors, the row values come as embedded broadcasts.
__attribute__((target("avx512f"))) void micro_avx512(const float* zp, const float* ep, const float* esq, int64_t D,
                                                     float* best, int32_t* bidx, int32_t j0, const float* pf,
                                                     int64_t pf_lines) {
  constexpr int MR = kAvx512MR, NR = kAvx512NR;
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  // One step along D: two panel vectors, MR broadcast row values, 2 * MR FMAs.
#define FASTDIFF_AVX512_STEP(d)                                     \
  {                                                                 \
    const __m512 b0 = _mm512_load_ps(ep + (d) * NR);                \
    const __m512 b1 = _mm512_load_ps(ep + (d) * NR + 16);           \
    _Pragma("GCC unroll 16") for (int r = 0; r < MR; ++r) {         \
      const __m512 a = _mm512_set1_ps(zp[(d) * MR + r]);            \
      acc0[r] = _mm512_fmadd_ps(a, b0, acc0[r]);                    \
      acc1[r] = _mm512_fmadd_ps(a, b1, acc1[r]);                    \
    }                                                               \
  }
  // The first steps also prefetch the slice of the next panel (two lines a step), the rest run bare, unrolled
  // by two so the loop overhead does not take FMA port slots.
  const int64_t pf_steps = std::min<int64_t>(D, (pf_lines + 1) / 2);
  int64_t d = 0;
  for (; d < pf_steps; ++d) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * d * 16), _MM_HINT_T1);
    if (2 * d + 1 < pf_lines) _mm_prefetch(reinterpret_cast<const char*>(pf + (2 * d + 1) * 16), _MM_HINT_T1);
    FASTDIFF_AVX512_STEP(d)
  }
  for (; d + 1 < D; d += 2) {
    FASTDIFF_AVX512_STEP(d)
    FASTDIFF_AVX512_STEP(d + 1)
  }
  if (d < D) FASTDIFF_AVX512_STEP(d)
#undef FASTDIFF_AVX512_STEP
  const __m512 e0 = _mm512_load_ps(esq), e1 = _mm512_load_ps(esq + 16);
  const __m512 minus2 = _mm512_set1_ps(-2.0f);
  const __m512i i0 = _mm512_add_epi32(_mm512_set1_epi32(j0),
                                      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(16));
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 d0 = _mm512_fmadd_ps(acc0[r], minus2, e0);  // exact -2x, so this equals e - 2 z.e rounded once
    const __m512 d1 = _mm512_fmadd_ps(acc1[r], minus2, e1);
    // Columns 16..31 have the higher indices: they win a lane only when strictly smaller.
    const __mmask16 lt = _mm512_cmp_ps_mask(d1, d0, _CMP_LT_OQ);
    const __m512 dm = _mm512_mask_mov_ps(d0, lt, d1);
    const __m512i im = _mm512_mask_mov_epi32(i0, lt, i1);
    const __m512 bv = _mm512_load_ps(best + r * 16);
    const __m512i bi = _mm512_load_si512(bidx + r * 16);
    const __mmask16 better = _mm512_cmp_ps_mask(dm, bv, _CMP_LT_OQ);
    _mm512_store_ps(best + r * 16, _mm512_mask_mov_ps(bv, better, dm));
    _mm512_store_si512(bidx + r * 16, _mm512_mask_mov_epi32(bi, better, im));
  }
}

__attribute__((target("avx512f"))) void finish_avx512(const float* best, const int32_t* bidx, const float* zsq,
                                                      int64_t rows, int64_t* out_idx, float* out_dist) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 bv = _mm512_load_ps(best + r * 16);  // never NaN: only values that won a "<" get in
    const float v = _mm512_reduce_min_ps(bv);
    const __mmask16 at_min = _mm512_cmp_ps_mask(bv, _mm512_set1_ps(v), _CMP_EQ_OQ);
    out_idx[r] = _mm512_mask_reduce_min_epi32(at_min, _mm512_load_si512(bidx + r * 16));
    out_dist[r] = std::max(v + zsq[r], 0.0f);
  }
}

}  // namespace vq_cpu
}  // namespace fastdiff
#endif  // FASTDIFF_X86
