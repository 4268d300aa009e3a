// AVX2+FMA vq_nearest micro-kernel (6 x 16), compiled with a per-function target attribute (no -march flag) and
// called only where CPUID reports AVX2 and FMA; its 8 lanes per row are reduced by finish_generic<8>. See
// vq_nearest_cpu.cpp for the algorithm and vq_nearest_kernels.h for the interface.
#include "vq_nearest_kernels.h"

#if FASTDIFF_X86
#include <immintrin.h>

#include <cstdint>

namespace fastdiff {
namespace vq_cpu {

// 6 rows x 16 columns: 12 ymm accumulators + 2 panel vectors + 1 broadcast = 15 of the 16 ymm registers.
__attribute__((target("avx2,fma"))) void micro_avx2(const float* zp, const float* ep, const float* esq, int64_t D,
                                                    float* best, int32_t* bidx, int32_t j0, const float* pf,
                                                    int64_t pf_lines) {
  constexpr int MR = kAvx2MR, NR = kAvx2NR;
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_load_ps(ep + d * NR);
    const __m256 b1 = _mm256_load_ps(ep + d * NR + 8);
    if (d < pf_lines) _mm_prefetch(reinterpret_cast<const char*>(pf + d * 16), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(zp + d * MR + r);
      acc0[r] = _mm256_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(a, b1, acc1[r]);
    }
  }
  const __m256 e0 = _mm256_load_ps(esq), e1 = _mm256_load_ps(esq + 8);
  const __m256 minus2 = _mm256_set1_ps(-2.0f);
  const __m256i i0 = _mm256_add_epi32(_mm256_set1_epi32(j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(8));
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m256 d0 = _mm256_fmadd_ps(acc0[r], minus2, e0);  // exact -2x, so this equals e - 2 z.e rounded once
    const __m256 d1 = _mm256_fmadd_ps(acc1[r], minus2, e1);
    // Columns 8..15 have the higher indices: they win a lane only when strictly smaller.
    const __m256 lt = _mm256_cmp_ps(d1, d0, _CMP_LT_OQ);
    const __m256 dm = _mm256_blendv_ps(d0, d1, lt);
    const __m256i im = _mm256_blendv_epi8(i0, i1, _mm256_castps_si256(lt));
    const __m256 bv = _mm256_load_ps(best + r * 8);
    const __m256i bi = _mm256_load_si256(reinterpret_cast<const __m256i*>(bidx + r * 8));
    const __m256 better = _mm256_cmp_ps(dm, bv, _CMP_LT_OQ);
    _mm256_store_ps(best + r * 8, _mm256_blendv_ps(bv, dm, better));
    _mm256_store_si256(reinterpret_cast<__m256i*>(bidx + r * 8),
                       _mm256_blendv_epi8(bi, im, _mm256_castps_si256(better)));
  }
}

}  // namespace vq_cpu
}  // namespace fastdiff
#endif  // FASTDIFF_X86
