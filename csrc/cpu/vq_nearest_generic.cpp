// Portable vq_nearest micro-kernel (4 x 16, auto-vectorised) and the portable lane reduction (finish), used on any
// CPU; the AVX2 kernel shares the finish. See vq_nearest_cpu.cpp for the algorithm and vq_nearest_kernels.h for
// the interface.
#include "vq_nearest_kernels.h"

#include <algorithm>
#include <cstdint>

namespace fastdiff {
namespace vq_cpu {

template <int LANES>
void finish_generic(const float* best, const int32_t* bidx, const float* zsq, int64_t rows, int64_t* out_idx,
                    float* out_dist) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* bv = best + r * LANES;
    const int32_t* bi = bidx + r * LANES;
    float v = bv[0];
    int32_t i = bi[0];
    for (int l = 1; l < LANES; ++l) {  // branch-free: the winner is data-dependent
      const bool take = (bv[l] < v) | ((bv[l] == v) & (bi[l] < i));
      v = take ? bv[l] : v;
      i = take ? bi[l] : i;
    }
    out_idx[r] = i;
    out_dist[r] = std::max(v + zsq[r], 0.0f);
  }
}

// The instantiations the driver uses: 8 lanes (the AVX2 kernel: one ymm of floats per row) and 16 (the portable one).
template void finish_generic<8>(const float*, const int32_t*, const float*, int64_t, int64_t*, float*);
template void finish_generic<kGenericNR>(const float*, const int32_t*, const float*, int64_t, int64_t*, float*);

void micro_generic(const float* zp, const float* ep, const float* esq, int64_t D, float* best, int32_t* bidx,
                   int32_t j0, const float* pf, int64_t pf_lines) {
  (void)pf;
  (void)pf_lines;
  constexpr int MR = kGenericMR, NR = kGenericNR;
  float acc[MR][NR] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float* b = ep + d * NR;
    for (int r = 0; r < MR; ++r) {
      const float a = zp[d * MR + r];
      for (int j = 0; j < NR; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NR; ++j) {
      const float dist = esq[j] - 2.0f * acc[r][j];
      if (dist < best[r * NR + j]) {
        best[r * NR + j] = dist;
        bidx[r * NR + j] = j0 + j;
      }
    }
  }
}

}  // namespace vq_cpu
}  // namespace fastdiff
