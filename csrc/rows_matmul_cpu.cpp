// CPU implementation of fastdiff::rows_matmul (see rows_matmul.h for the contract).
//
// A plain register-blocked GEMM whose only unusual property is the one the contract needs: every output element is
// one fused-multiply-add chain over k = 0..K-1, in that order, started at +0. The weight is packed once per call as
// panels [ceil(N/NR)][K][NR] (padded columns are zero and never stored); a micro-kernel computes an MR x NR tile,
// broadcasting x[r, k] and streaming the panel's row k. Work items are (block of rows, panel) pairs; each element is
// computed by exactly one thread. Micro-kernels: AVX-512 (12 x 32), AVX2+FMA (6 x 16, twice per panel) and a
// portable one (4 x 32, std::fma). All three make the same chains, so they give the same bits.
#include "rows_matmul.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>

#include "cpu_isa.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FASTDIFF_ROWS_X86 1
#include <immintrin.h>
#else
#define FASTDIFF_ROWS_X86 0
#endif

namespace fastdiff {
namespace {

constexpr int64_t kNR = 32;        // panel width (columns of y per micro-kernel call)
constexpr int64_t kRowBlock = 96;  // rows per work item: a multiple of every MR below
constexpr int kMaxMR = 12;

// c[r * ldc + j] = chain_k x[r, k] * panel[k, j] for r < MR, j < kNR. `a` points at x[row0, 0], rows lda apart.
using MicroKernel = void (*)(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc);

template <int MR>
void micro_generic(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc) {
  float acc[MR][kNR] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* b = panel + k * kNR;
    for (int r = 0; r < MR; ++r) {
      const float av = a[r * lda + k];
      for (int64_t j = 0; j < kNR; ++j) acc[r][j] = std::fma(av, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) std::copy(acc[r], acc[r] + kNR, c + r * ldc);
}

#if FASTDIFF_ROWS_X86
template <int MR>
__attribute__((target("avx512f"))) void micro_avx512(const float* a, int64_t lda, const float* panel, int64_t K,
                                                     float* c, int64_t ldc) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(panel + k * kNR), b1 = _mm512_loadu_ps(panel + k * kNR + 16);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(c + r * ldc, lo[r]);
    _mm512_storeu_ps(c + r * ldc + 16, hi[r]);
  }
}

// 16 of the panel's 32 columns (AVX2 has 16 vector registers: 12 accumulators, 2 panel rows, 1 broadcast).
template <int MR>
__attribute__((target("avx2,fma"))) void half_avx2(const float* a, int64_t lda, const float* panel, int64_t K,
                                                   float* c, int64_t ldc) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kNR), b1 = _mm256_loadu_ps(panel + k * kNR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, lo[r]);
    _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
  }
}

template <int MR>
void micro_avx2(const float* a, int64_t lda, const float* panel, int64_t K, float* c, int64_t ldc) {
  half_avx2<MR>(a, lda, panel, K, c, ldc);
  half_avx2<MR>(a, lda, panel + 16, K, c + 16, ldc);
}
#endif  // FASTDIFF_ROWS_X86

template <int MR>
struct GenericK {
  static constexpr MicroKernel fn = &micro_generic<MR>;
};
#if FASTDIFF_ROWS_X86
template <int MR>
struct Avx512K {
  static constexpr MicroKernel fn = &micro_avx512<MR>;
};
template <int MR>
struct Avx2K {
  static constexpr MicroKernel fn = &micro_avx2<MR>;
};
#endif

struct Kernels {
  int mr;
  MicroKernel by_rows[kMaxMR];  // by_rows[m - 1]: m rows
};

template <template <int> class K, int... M>
Kernels make_kernels(std::integer_sequence<int, M...>) {
  Kernels ks{static_cast<int>(sizeof...(M)), {}};
  const MicroKernel fns[] = {K<M + 1>::fn...};
  for (size_t i = 0; i < sizeof...(M); ++i) ks.by_rows[i] = fns[i];
  return ks;
}

const Kernels& kernels_for(CpuIsa isa) {
  static const Kernels generic = make_kernels<GenericK>(std::make_integer_sequence<int, 4>{});
#if FASTDIFF_ROWS_X86
  static const Kernels avx512 = make_kernels<Avx512K>(std::make_integer_sequence<int, 12>{});
  static const Kernels avx2 = make_kernels<Avx2K>(std::make_integer_sequence<int, 6>{});
  if (isa >= CpuIsa::kAvx512) return avx512;
  if (isa == CpuIsa::kAvx2) return avx2;
#endif
  (void)isa;
  return generic;
}

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

}  // namespace

at::Tensor rows_matmul_cpu(const at::Tensor& x_in, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, "rows_matmul: x must be 2-D (R, K), got ", x_in.dim(), "-D");
  TORCH_CHECK_VALUE(weight.dim() == 2, "rows_matmul: weight must be 2-D (N, K), got ", weight.dim(), "-D");
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                   "rows_matmul: x and weight must be float32, got ", x_in.scalar_type(), " and ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && weight.device().is_cpu(), "rows_matmul: tensors must be on the CPU");
  TORCH_CHECK_VALUE(x_in.size(1) == weight.size(1), "rows_matmul: x (R, K) and weight (N, K) must share K, got ",
                    x_in.sizes(), " and ", weight.sizes());
  const int64_t R = x_in.size(0), K = x_in.size(1), N = weight.size(0);
  if (R == 0 || N == 0 || K == 0) return at::zeros({R, N}, x_in.options());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({R, N}, x.options());

  // pack the weight: panels[p][k][j] = weight[p * kNR + j, k], zero past N
  const int64_t panels = (N + kNR - 1) / kNR;
  std::unique_ptr<float, FreeDeleter> packed(
      static_cast<float*>(std::aligned_alloc(64, ((panels * K * kNR * sizeof(float) + 63) / 64) * 64)));
  TORCH_CHECK(packed, "rows_matmul: out of memory packing the weight");
  const float* w = weight.data_ptr<float>();
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1);
  float* pk = packed.get();
  at::parallel_for(0, panels, std::max<int64_t>(1, 16384 / std::max<int64_t>(K * kNR, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = pk + p * K * kNR;
      const int64_t cols = std::min(kNR, N - p * kNR);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < cols; ++j) dst[k * kNR + j] = w[(p * kNR + j) * ws0 + k * ws1];
        for (int64_t j = cols; j < kNR; ++j) dst[k * kNR + j] = 0.0f;
      }
    }
  });

  const Kernels& ks = kernels_for(active_cpu_isa());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t row_blocks = (R + kRowBlock - 1) / kRowBlock;
  const int64_t item_flops = std::min(kRowBlock, R) * K * kNR;
  at::parallel_for(0, row_blocks * panels, std::max<int64_t>(1, 65536 / std::max<int64_t>(item_flops, 1)),
                   [&](int64_t i0, int64_t i1) {
    alignas(64) float tile[kMaxMR * kNR];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t rb = item / panels, p = item % panels;
      const int64_t cols = std::min(kNR, N - p * kNR);
      const float* panel = pk + p * K * kNR;
      const int64_t r_end = std::min(R, (rb + 1) * kRowBlock);
      for (int64_t r = rb * kRowBlock; r < r_end; r += ks.mr) {
        const int64_t m = std::min<int64_t>(ks.mr, r_end - r);
        float* out = yp + r * N + p * kNR;
        if (cols == kNR) {
          ks.by_rows[m - 1](xp + r * K, K, panel, K, out, N);
        } else {  // the last, partial panel: through a tile, storing the valid columns only
          ks.by_rows[m - 1](xp + r * K, K, panel, K, tile, kNR);
          for (int64_t i = 0; i < m; ++i) std::copy(tile + i * kNR, tile + i * kNR + cols, out + i * N);
        }
      }
    }
  });
  return y;
}

}  // namespace fastdiff
