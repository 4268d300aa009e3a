// CPU implementation of fastdiff::vq_nearest (see vq_nearest.h for the contract).
//
// The search is a GEMM whose output is reduced on the fly. For every block of 96 rows of z:
//   1. the rows are converted to fp32 and packed as [micro-block][D][MR], so a micro-kernel broadcasts
//      consecutive floats;
//   2. the codebook, packed once per call as panels [K/NR][D][NR] (a thread-shared buffer, ||e||^2 alongside,
//      padded columns get ||e||^2 = +inf), is swept panel by panel: a panel stays in L1 while every micro-block
//      of the block uses it, and those calls prefetch the next panel into L2;
//   3. a register-blocked micro-kernel computes an MR x NR tile of dot products z.e in fp32 (FMA over d), turns
//      them into ||e||^2 - 2 z.e and folds them into a running per-lane minimum and argmin (strict "<", and
//      every lane sees its codebook columns in increasing order, so ties keep the lowest index);
//   4. the lanes of each row are reduced to one (distance, index), equal distances keeping the lower index.
// Only an MR x NR tile of distances ever exists, in registers.
//
// Micro-kernels: AVX-512 (12 x 32), AVX2+FMA (6 x 16) and a portable one (4 x 16, auto-vectorised). On CPUs with
// AMX-BF16 and D >= 128 an AMX path (below) screens in bf16 and re-ranks in fp32, returning the AVX-512 result.
// The ISA-specific code is compiled with per-function target attributes and picked at run time from CPUID, so the
// extension needs no -march flag and runs correctly on any x86-64 (or other) CPU.
#include "vq_nearest.h"

#include "cpu_isa.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FASTDIFF_X86 1
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define FASTDIFF_X86 0
#endif

namespace fastdiff {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Rows of z per parallel work item (a multiple of every MR below).
constexpr int64_t kBlockRows = 96;

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;

// 64-byte aligned scratch memory (aligned vector loads of packed panels and of the per-lane state).
template <typename T>
Buffer<T> alloc_aligned(int64_t count) {
  size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
  bytes = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "fastdiff.vq_nearest: could not allocate ", bytes, " bytes of scratch memory");
  return Buffer<T>(static_cast<T*>(p));
}

// One micro-kernel call: zp is an [D][MR] fp32 block of rows, ep an [D][NR] codebook panel whose first column
// is codebook row j0, esq its NR squared norms; best/bidx the [MR][LANES] running minimum and argmin; pf_lines
// 64-byte lines from pf on (a slice of the next panel) are prefetched into L2 along the way.
using MicroFn = void (*)(const float* zp, const float* ep, const float* esq, int64_t D, float* best, int32_t* bidx,
                         int32_t j0, const float* pf, int64_t pf_lines);

// Reduces each row's LANES running (minimum, argmin) pairs to one: the smallest distance, equal distances taking
// the lowest index; writes index and distance + ||z||^2 (clamped at 0) for `rows` rows.
using FinishFn = void (*)(const float* best, const int32_t* bidx, const float* zsq, int64_t rows, int64_t* out_idx,
                          float* out_dist);

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

// ------------------------------------------------------------------------------------------------ micro-kernels
constexpr int kGenericMR = 4, kGenericNR = 16;

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

#if FASTDIFF_X86
constexpr int kAvx2MR = 6, kAvx2NR = 16;

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

constexpr int kAvx512MR = 12, kAvx512NR = 32;

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
#endif  // FASTDIFF_X86

// ------------------------------------------------------------------------------------------------ ISA choice
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

#if FASTDIFF_X86
bool amx_usable();
#endif

Isa supported_isa() {
  static const Isa isa = [] {
#if FASTDIFF_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {  // libgcc also checks that the OS saves the zmm state
      return amx_usable() ? Isa::kAmx : Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kGeneric;
  }();
  return isa;
}

Isa active_isa() {
  Isa isa = supported_isa();
  if (const char* cap = std::getenv("FASTDIFF_CPU_ISA")) {
    if (std::strcmp(cap, "generic") == 0) {
      isa = Isa::kGeneric;
    } else if (std::strcmp(cap, "avx2") == 0 && isa > Isa::kAvx2) {
      isa = Isa::kAvx2;
    } else if (std::strcmp(cap, "avx512") == 0 && isa > Isa::kAvx512) {
      isa = Isa::kAvx512;
    }
  }
  return isa;
}

// ------------------------------------------------------------------------------------------------ packing + driver
// codebook (K, D) of T, any strides -> panels [ceil(K/NR)][D][NR] fp32 and esq [ceil(K/NR) * NR].
template <typename T>
void pack_codebook(const T* e, int64_t s0, int64_t s1, int64_t K, int64_t D, int64_t NR, float* packed, float* esq) {
  const int64_t panels = (K + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(NR * D, 1));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t j = 0; j < NR; ++j) {
        const int64_t row = p * NR + j;
        float* col = packed + p * D * NR + j;
        if (row < K) {
          const T* src = e + row * s0;
          float sq = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            const float v = static_cast<float>(src[d * s1]);
            col[d * NR] = v;
            sq += v * v;
          }
          esq[row] = sq;
        } else {  // padding column: never chosen, since +inf is not < any running minimum
          for (int64_t d = 0; d < D; ++d) col[d * NR] = 0.0f;
          esq[row] = kInf;
        }
      }
    }
  });
}

template <int MR, int NR, int LANES, typename T>
void search_rows(MicroFn micro, FinishFn finish, const T* z, int64_t zs0, int64_t zs1, int64_t N, int64_t D,
                 const float* packed, const float* esq, int64_t K, int64_t* out_idx, float* out_dist) {
  static_assert(kBlockRows % MR == 0, "kBlockRows must be a multiple of MR");
  static_assert(NR % LANES == 0, "NR must be a multiple of LANES");
  constexpr int64_t kMicroBlocks = kBlockRows / MR;
  const int64_t panels = (K + NR - 1) / NR;
  const int64_t panel_floats = D * NR;
  const int64_t panel_lines = panel_floats * static_cast<int64_t>(sizeof(float)) / 64;  // cache lines per panel
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;

  // Blocks are handed out one at a time from a shared counter rather than split statically, so a thread whose
  // core is busy with another process does not hold the others up at the end of the parallel region.
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::min<int64_t>(blocks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Buffer<float> zp = alloc_aligned<float>(kMicroBlocks * D * MR);
    Buffer<float> best = alloc_aligned<float>(kBlockRows * LANES);
    Buffer<int32_t> bidx = alloc_aligned<int32_t>(kBlockRows * LANES);
    float zsq[kBlockRows];
    int64_t next = next_block.fetch_add(1, std::memory_order_relaxed);
    for (int64_t b = next; b < blocks; b = next) {
      next = next_block.fetch_add(1, std::memory_order_relaxed);  // claimed now, so its rows can be prefetched
      const int64_t row0 = b * kBlockRows;
      const int64_t rows = std::min(kBlockRows, N - row0);
      const int64_t mblocks = (rows + MR - 1) / MR;
      // Rows of the next block, when they are one contiguous range, stream into L2 while this one computes.
      const char* next_rows = nullptr;
      int64_t next_row_lines = 0;
      if (next < blocks && zs1 == 1 && zs0 == D) {
        next_rows = reinterpret_cast<const char*>(z + next * kBlockRows * zs0);
        next_row_lines = (std::min(kBlockRows, N - next * kBlockRows) * D * static_cast<int64_t>(sizeof(T)) + 63) / 64;
      }
      const int64_t row_lines_per_panel = (next_row_lines + panels - 1) / panels;
      // 1. rows -> fp32 [micro-block][D][MR] (rows past N are zeros whose results are dropped)
      for (int64_t r = 0; r < mblocks * MR; ++r) {
        float* dst = zp.get() + (r / MR) * D * MR + (r % MR);
        if (r >= rows) {
          for (int64_t d = 0; d < D; ++d) dst[d * MR] = 0.0f;
        } else if (zs1 == 1) {
          const T* src = z + (row0 + r) * zs0;
          for (int64_t d = 0; d < D; ++d) dst[d * MR] = static_cast<float>(src[d]);
        } else {
          const T* src = z + (row0 + r) * zs0;
          for (int64_t d = 0; d < D; ++d) dst[d * MR] = static_cast<float>(src[d * zs1]);
        }
      }
      //    and ||z||^2 from the packed rows: MR independent sums (they vectorise, no serial dependency chain)
      for (int64_t m = 0; m < mblocks; ++m) {
        const float* zm = zp.get() + m * D * MR;
        float sq[MR] = {};
        for (int64_t d = 0; d < D; ++d) {
          for (int r = 0; r < MR; ++r) sq[r] += zm[d * MR + r] * zm[d * MR + r];
        }
        for (int r = 0; r < MR; ++r) zsq[m * MR + r] = sq[r];
      }
      std::fill_n(best.get(), mblocks * MR * LANES, kInf);
      std::fill_n(bidx.get(), mblocks * MR * LANES, 0);
      // 2. sweep the codebook panel by panel, in increasing column order: a panel stays in L1 while every
      //    micro-block of this block uses it, and those calls prefetch the next panel into L2 between them.
      for (int64_t p = 0; p < panels; ++p) {
        for (int64_t l = p * row_lines_per_panel; l < std::min(next_row_lines, (p + 1) * row_lines_per_panel); ++l) {
          __builtin_prefetch(next_rows + l * 64, 0, 2);
        }
        const float* panel = packed + p * panel_floats;
        const int64_t next_lines = p + 1 < panels ? panel_lines : 0;
        const int64_t slice = (next_lines + mblocks - 1) / mblocks;
        for (int64_t m = 0; m < mblocks; ++m) {
          const int64_t first = std::min(next_lines, m * slice);
          const int64_t count = std::min(next_lines - first, slice);
          const float* pf = count > 0 ? panel + panel_floats + first * 16 : panel;
          micro(zp.get() + m * D * MR, panel, esq + p * NR, D, best.get() + m * MR * LANES, bidx.get() + m * MR * LANES,
                static_cast<int32_t>(p * NR), pf, count);
        }
      }
      // 3. lanes -> one (distance, index) per row
      finish(best.get(), bidx.get(), zsq, rows, out_idx + row0, out_dist + row0);
    }
  });
}

#if FASTDIFF_X86
// ------------------------------------------------------------------------------------------------ AMX-BF16 path
// On CPUs with AMX (Sapphire Rapids and later) the tile unit multiplies bf16 matrices with fp32 accumulation
// several times faster than AVX-512 FMAs, but bf16 inputs are not exact. So AMX only screens, and fp32 decides:
//   sweep 1: approximate distances ||e||^2 - 2 z'.e' (z', e' rounded to bf16) give each row's approximate minimum m;
//   sweep 2: the same distances again, keeping every code within m + band of it, where the band is twice a bound on
//            |approximate - fp32| (bf16 rounding 2u per product, u = 2^-8, plus fp32 summation; Cauchy-Schwarz bounds
//            the sum of |z_d e_d| by ||z|| max||e||), so the fp32 minimiser and everything tied with it are kept;
//   re-rank: the candidates' distances in fp32, computed exactly as the AVX-512 kernel computes them (one FMA chain
//            over d, then ||e||^2 - 2 acc), minimum taken with the lowest index on ties.
// The result is therefore the AVX-512 kernel's result, bit for bit. A row with more candidates than kAmxCandidates
// is searched exhaustively in fp32; inputs too large for the bound (or not finite) take the AVX-512 path.
constexpr int64_t kAmxBlockRows = 256;      // rows per work item: 8 sub-blocks of 32 (two 16-row A tiles)
constexpr int64_t kAmxChunkBytes = 256 << 10;  // bf16 codebook bytes per L2-resident chunk
constexpr int kAmxCandidates = 16;          // candidates kept per row before it falls back to a full fp32 scan
constexpr float kAmxMaxAbs = 1e15f;         // |values| up to this keep every product and sum finite in fp32
constexpr int64_t kAmxMinD = 128;           // below this, tile loads and epilogues outweigh AMX's arithmetic

bool amx_usable() {
  static const bool ok = [] {
#if defined(__linux__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
    if (!amx_bf16 || !amx_tile || !__builtin_cpu_supports("avx512f")) return false;
    // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); once per process.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

inline uint16_t to_bf16(float v) {  // round to nearest even (finite inputs only)
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0..3: C (16 x 16 fp32); 4, 5: two 16-row slabs of z (16 x 32 bf16); 6, 7: two 16-code panels (VNNI pairs).
const TileConfig& amx_tile_config() {
  // In static memory: GCC does not see _tile_loadconfig read the struct and drops stores to a local one.
  static const TileConfig cfg = [] {
    TileConfig c;
    std::memset(&c, 0, sizeof(c));
    c.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  return cfg;
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_begin() { _tile_loadconfig(&amx_tile_config()); }

__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }

// c[32][32] = a[32 rows][Dp] (bf16, row stride Dp) . panels b0, b1 ([Dp/2][16][2] bf16 each)^T, fp32 accumulation.
__attribute__((target("amx-tile,amx-bf16"))) void amx_tile_32x32(const uint16_t* a, const uint16_t* b0,
                                                                const uint16_t* b1, int64_t Dp, float* c) {
  const int64_t stride = Dp * 2;  // bytes per row of a
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < Dp; k += 32) {
    _tile_loadd(4, a + k, stride);
    _tile_loadd(5, a + 16 * Dp + k, stride);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_loadd(7, b1 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 16 * 32, 128);
  _tile_stored(3, c + 16 * 32 + 16, 128);
}

// Sweep 1 epilogue: rowmin[r] (16 lanes) = min(rowmin[r], ||e||^2 - 2c) over the tile's 32 codes.
__attribute__((target("avx512f"))) void amx_fold_min(const float* c, const float* esq, int64_t rows, float* rowmin) {
  const __m512 e0 = _mm512_load_ps(esq), e1 = _mm512_load_ps(esq + 16), minus2 = _mm512_set1_ps(-2.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 d0 = _mm512_fmadd_ps(_mm512_load_ps(c + r * 32), minus2, e0);
    const __m512 d1 = _mm512_fmadd_ps(_mm512_load_ps(c + r * 32 + 16), minus2, e1);
    _mm512_store_ps(rowmin + r * 16, _mm512_min_ps(_mm512_load_ps(rowmin + r * 16), _mm512_min_ps(d0, d1)));
  }
}

// Sweep 2 epilogue: append the tile's codes with distance <= thr[r] to row r's candidates (in increasing order).
__attribute__((target("avx512f"))) void amx_collect(const float* c, const float* esq, int64_t rows, const float* thr,
                                                    int32_t k0, int32_t* cand, int32_t* ncand) {
  const __m512 e0 = _mm512_load_ps(esq), e1 = _mm512_load_ps(esq + 16), minus2 = _mm512_set1_ps(-2.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 t = _mm512_set1_ps(thr[r]);
    const __m512 d0 = _mm512_fmadd_ps(_mm512_load_ps(c + r * 32), minus2, e0);
    const __m512 d1 = _mm512_fmadd_ps(_mm512_load_ps(c + r * 32 + 16), minus2, e1);
    uint32_t hits = static_cast<uint32_t>(_mm512_cmp_ps_mask(d0, t, _CMP_LE_OQ)) |
                    (static_cast<uint32_t>(_mm512_cmp_ps_mask(d1, t, _CMP_LE_OQ)) << 16);
    while (hits) {
      const int j = __builtin_ctz(hits);
      hits &= hits - 1;
      if (ncand[r] < kAmxCandidates) cand[r * kAmxCandidates + ncand[r]] = k0 + j;
      ++ncand[r];
    }
  }
}

struct Candidate {
  int64_t row;   // within the block
  int32_t code;
};

// The AVX-512 kernel's fp32 distance for each (row, code) pair: one FMA chain over d per pair, then ||e||^2 - 2 acc.
// Eight pairs advance together so the chains overlap.
template <typename T>
__attribute__((target("fma"))) void exact_distances(const float* zf, const T* e, int64_t es0, int64_t es1, int64_t D,
                                                    const float* esq, const std::vector<Candidate>& pairs, float* out) {
  constexpr size_t kLanes = 8;
  for (size_t i0 = 0; i0 < pairs.size(); i0 += kLanes) {
    const size_t n = std::min(kLanes, pairs.size() - i0);
    const float* zr[kLanes];
    const T* er[kLanes];
    float acc[kLanes];
    for (size_t j = 0; j < kLanes; ++j) {
      const Candidate& c = pairs[i0 + std::min(j, n - 1)];  // idle lanes repeat the last pair
      zr[j] = zf + c.row * D;
      er[j] = e + c.code * es0;
      acc[j] = 0.0f;
    }
    for (int64_t d = 0; d < D; ++d) {
      for (size_t j = 0; j < kLanes; ++j) acc[j] = std::fma(zr[j][d], static_cast<float>(er[j][d * es1]), acc[j]);
    }
    for (size_t j = 0; j < n; ++j) out[i0 + j] = std::fma(acc[j], -2.0f, esq[pairs[i0 + j].code]);
  }
}

// The AVX-512 kernel for a few rows (indices `rows` into zf (.., D) fp32) over all `panels` fp32 panels.
void exhaustive_avx512(const float* zf, int64_t D, const std::vector<int64_t>& rows, const float* panels_fp32,
                       const float* esq, int64_t panels, const float* zsq, int64_t* out_idx, float* out_dist) {
  constexpr int MR = kAvx512MR, NR = kAvx512NR;
  Buffer<float> zp = alloc_aligned<float>(D * MR);
  Buffer<float> best = alloc_aligned<float>(MR * 16);
  Buffer<int32_t> bidx = alloc_aligned<int32_t>(MR * 16);
  float group_sq[MR];
  int64_t group_idx[MR];
  float group_dist[MR];
  for (size_t g = 0; g < rows.size(); g += MR) {
    const int64_t n = std::min<int64_t>(MR, static_cast<int64_t>(rows.size() - g));
    for (int64_t r = 0; r < MR; ++r) {
      for (int64_t d = 0; d < D; ++d) zp[d * MR + r] = r < n ? zf[rows[g + r] * D + d] : 0.0f;
      group_sq[r] = r < n ? zsq[rows[g + r]] : 0.0f;
    }
    std::fill_n(best.get(), MR * 16, kInf);
    std::fill_n(bidx.get(), MR * 16, 0);
    for (int64_t p = 0; p < panels; ++p) {
      micro_avx512(zp.get(), panels_fp32 + p * D * NR, esq + p * NR, D, best.get(), bidx.get(),
                   static_cast<int32_t>(p * NR), panels_fp32, 0);
    }
    finish_avx512(best.get(), bidx.get(), group_sq, n, group_idx, group_dist);
    for (int64_t r = 0; r < n; ++r) {
      out_idx[rows[g + r]] = group_idx[r];
      out_dist[rows[g + r]] = group_dist[r];
    }
  }
}

// True when it ran; false when the inputs need the AVX-512 path.
template <typename T>
bool search_rows_amx(const T* z, int64_t zs0, int64_t zs1, int64_t N, int64_t D, const T* e, int64_t es0,
                     int64_t es1, int64_t K, int64_t* out_idx, float* out_dist) {
  const int64_t Dp = (D + 31) / 32 * 32, Kp = (K + 31) / 32 * 32;
  // Codebook: bf16 VNNI panels of 16 codes [Kp/16][Dp/2][16][2] (zero padded), fp32 ||e||^2 (+inf padded).
  Buffer<uint16_t> ebf = alloc_aligned<uint16_t>(Kp * Dp);
  Buffer<float> esq = alloc_aligned<float>(Kp);
  std::atomic<bool> codebook_ok{true};
  at::parallel_for(0, Kp / 16, 1, [&](int64_t p0, int64_t p1) {
    bool ok = true;
    for (int64_t p = p0; p < p1; ++p) {
      uint16_t* panel = ebf.get() + p * Dp * 16;
      for (int64_t n = 0; n < 16; ++n) {
        const int64_t k = p * 16 + n;
        float sq = 0.0f;
        for (int64_t d = 0; d < Dp; ++d) {
          const float v = (k < K && d < D) ? static_cast<float>(e[k * es0 + d * es1]) : 0.0f;
          ok &= std::fabs(v) <= kAmxMaxAbs;  // false for NaN and inf too
          panel[(d / 2) * 32 + n * 2 + (d % 2)] = to_bf16(v);
          if (d < D) sq += v * v;  // as pack_codebook: the same ||e||^2 as the AVX-512 path
        }
        esq[k] = k < K ? sq : kInf;
      }
    }
    if (!ok) codebook_ok = false;
  });
  if (!codebook_ok) return false;
  float emax = 0.0f;
  for (int64_t k = 0; k < K; ++k) emax = std::max(emax, std::sqrt(esq[k]));
  const double u = std::ldexp(1.0, -8), gamma = Dp * std::ldexp(1.0, -24) / (1.0 - Dp * std::ldexp(1.0, -24));
  const double rel = 2.0 * u + u * u + 2.0 * gamma;  // |approx dot - fp32 dot| <= rel * ||z|| * max||e|| (+ tiny)
  const int64_t chunk = std::max<int64_t>(32, kAmxChunkBytes / (Dp * 2) / 32 * 32);  // codes per chunk
  const int64_t blocks = (N + kAmxBlockRows - 1) / kAmxBlockRows;

  std::once_flag fp32_once;  // fp32 panels for the AVX-512 kernel, packed only if some row needs them
  Buffer<float> fp32_panels, fp32_esq;
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::min<int64_t>(blocks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Buffer<uint16_t> abf = alloc_aligned<uint16_t>(kAmxBlockRows * Dp);
    Buffer<float> zf = alloc_aligned<float>(kAmxBlockRows * D);
    Buffer<float> rowmin = alloc_aligned<float>(kAmxBlockRows * 16);
    Buffer<float> cbuf = alloc_aligned<float>(32 * 32);
    Buffer<int32_t> cand = alloc_aligned<int32_t>(kAmxBlockRows * kAmxCandidates);
    std::vector<float> zsq(kAmxBlockRows), thr(kAmxBlockRows);
    std::vector<int32_t> ncand(kAmxBlockRows);
    std::vector<Candidate> pairs;
    std::vector<float> pair_dist;
    amx_begin();
    for (int64_t b = next_block.fetch_add(1, std::memory_order_relaxed); b < blocks;
         b = next_block.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t row0 = b * kAmxBlockRows;
      const int64_t rows = std::min(kAmxBlockRows, N - row0);
      const int64_t padded = (rows + 31) / 32 * 32;
      // 1. rows -> fp32 [rows][D] (for the re-rank) and bf16 [padded][Dp] (zero padded); ||z||^2 as the AVX-512 path
      bool block_ok = true;
      for (int64_t r = 0; r < padded; ++r) {
        uint16_t* dst = abf.get() + r * Dp;
        float sq = 0.0f;
        for (int64_t d = 0; d < Dp; ++d) {
          const float v = (r < rows && d < D) ? static_cast<float>(z[(row0 + r) * zs0 + d * zs1]) : 0.0f;
          block_ok &= std::fabs(v) <= kAmxMaxAbs;
          dst[d] = to_bf16(v);
          if (r < rows && d < D) {
            zf[r * D + d] = v;
            sq += v * v;
          }
        }
        if (r < rows) zsq[r] = sq;
      }
      std::vector<int64_t> overflow;  // rows for the AVX-512 kernel: too many candidates, or values out of bounds
      if (!block_ok) {
        for (int64_t r = 0; r < rows; ++r) overflow.push_back(r);
      }
      // 2. two sweeps over the codebook, chunk by chunk (a chunk stays in L2 while all sub-blocks use it)
      for (int sweep = 0; sweep < 2 && block_ok; ++sweep) {
        if (sweep == 0) {
          std::fill_n(rowmin.get(), padded * 16, kInf);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            float m = kInf;
            for (int l = 0; l < 16; ++l) m = std::min(m, rowmin[r * 16 + l]);
            const double zn = std::sqrt(static_cast<double>(zsq[r]));
            const double err = rel * zn * emax + D * std::ldexp(1.0, -125) * (zn + emax);
            const double slack = std::ldexp(1.0, -20) * (std::fabs(m) + emax * emax + 2.0 * zn * emax) + 1e-30;
            thr[r] = static_cast<float>(m + 4.0 * err + slack);  // twice the distance error 2 * err, and rounding
          }
          std::fill(ncand.begin(), ncand.end(), 0);
        }
        for (int64_t c0 = 0; c0 < Kp; c0 += chunk) {
          const int64_t c1 = std::min(Kp, c0 + chunk);
          for (int64_t s = 0; s < padded; s += 32) {
            const int64_t srows = std::min<int64_t>(32, rows - s);
            for (int64_t k0 = c0; k0 < c1; k0 += 32) {
              const uint16_t* b0 = ebf.get() + k0 * Dp;
              amx_tile_32x32(abf.get() + s * Dp, b0, b0 + 16 * Dp, Dp, cbuf.get());
              if (sweep == 0) {
                amx_fold_min(cbuf.get(), esq.get() + k0, srows, rowmin.get() + s * 16);
              } else {
                amx_collect(cbuf.get(), esq.get() + k0, srows, thr.data() + s, static_cast<int32_t>(k0),
                            cand.get() + s * kAmxCandidates, ncand.data() + s);
              }
            }
          }
        }
      }
      // 3. re-rank in fp32, eight independent FMA chains at a time (one chain is latency-bound); candidates come in
      //    increasing index order, so strict "<" keeps the lowest index on ties.
      if (block_ok) {
        pairs.clear();
        for (int64_t r = 0; r < rows; ++r) {
          if (ncand[r] > kAmxCandidates) {
            overflow.push_back(r);
          } else {
            for (int32_t i = 0; i < ncand[r]; ++i) pairs.push_back({r, cand[r * kAmxCandidates + i]});
          }
        }
        pair_dist.resize(pairs.size());
        exact_distances(zf.get(), e, es0, es1, D, esq.get(), pairs, pair_dist.data());
        std::vector<float> best(rows, kInf);
        std::vector<int32_t> best_k(rows, 0);
        for (size_t i = 0; i < pairs.size(); ++i) {
          const int64_t r = pairs[i].row;
          if (pair_dist[i] < best[r]) {
            best[r] = pair_dist[i];
            best_k[r] = pairs[i].code;
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          if (ncand[r] > kAmxCandidates) continue;
          out_idx[row0 + r] = best_k[r];
          out_dist[row0 + r] = std::max(best[r] + zsq[r], 0.0f);
        }
      }
      if (!overflow.empty()) {
        std::call_once(fp32_once, [&] {
          fp32_panels = alloc_aligned<float>(Kp * D);
          fp32_esq = alloc_aligned<float>(Kp);
          pack_codebook<T>(e, es0, es1, K, D, kAvx512NR, fp32_panels.get(), fp32_esq.get());
        });
        exhaustive_avx512(zf.get(), D, overflow, fp32_panels.get(), fp32_esq.get(), Kp / kAvx512NR, zsq.data(),
                          out_idx + row0, out_dist + row0);
      }
    }
    amx_end();
  });
  return true;
}
#endif  // FASTDIFF_X86

template <typename T>
void vq_nearest_cpu_impl(const at::Tensor& z, const at::Tensor& codebook, at::Tensor& indices, at::Tensor& distances) {
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  const T* zdata = z.const_data_ptr<T>();
  const T* edata = codebook.const_data_ptr<T>();
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  float* dist = distances.mutable_data_ptr<float>();
  const int64_t zs0 = z.stride(0), zs1 = z.stride(1);
  Isa isa = active_isa();
#if FASTDIFF_X86
  if (isa == Isa::kAmx) {  // small problems, and inputs outside the screening bound, take the AVX-512 kernel
    if (N >= 64 && K >= 64 && D >= kAmxMinD &&
        search_rows_amx<T>(zdata, zs0, zs1, N, D, edata, codebook.stride(0), codebook.stride(1), K, idx, dist)) {
      return;
    }
    isa = Isa::kAvx512;
  }
#endif
  const int64_t NR = isa == Isa::kAvx512 ? 32 : 16;
  const int64_t panels = (K + NR - 1) / NR;
  Buffer<float> packed = alloc_aligned<float>(panels * NR * D);
  Buffer<float> esq = alloc_aligned<float>(panels * NR);
  pack_codebook<T>(edata, codebook.stride(0), codebook.stride(1), K, D, NR, packed.get(), esq.get());
  switch (isa) {
#if FASTDIFF_X86
    case Isa::kAvx512:
      search_rows<kAvx512MR, kAvx512NR, 16, T>(micro_avx512, finish_avx512, zdata, zs0, zs1, N, D, packed.get(),
                                               esq.get(), K, idx, dist);
      return;
    case Isa::kAvx2:
      search_rows<kAvx2MR, kAvx2NR, 8, T>(micro_avx2, finish_generic<8>, zdata, zs0, zs1, N, D, packed.get(),
                                          esq.get(), K, idx, dist);
      return;
#endif
    default:
      search_rows<kGenericMR, kGenericNR, kGenericNR, T>(micro_generic, finish_generic<kGenericNR>, zdata, zs0, zs1,
                                                         N, D, packed.get(), esq.get(), K, idx, dist);
  }
}

}  // namespace

void check_vq_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(z.dim() == 2, "vq_nearest: z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, "vq_nearest: codebook must have shape (K, D), got ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(1) == z.size(1), "vq_nearest: codebook has D=", codebook.size(1), " but z has D=",
                    z.size(1));
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "vq_nearest: codebook must have at least one row (K >= 1)");
  TORCH_CHECK_VALUE(codebook.size(0) <= std::numeric_limits<int32_t>::max(), "vq_nearest: K must be < 2^31");
  TORCH_CHECK_VALUE(z.device() == codebook.device(), "vq_nearest: codebook is on ", codebook.device(),
                    " but z is on ", z.device());
  const auto dtype = z.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "vq_nearest: z must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(codebook.scalar_type() == dtype, "vq_nearest: codebook must have z's dtype ", dtype, ", got ",
                   codebook.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook) {
  check_vq_inputs(z, codebook);
  TORCH_CHECK(z.device().is_cpu(), "vq_nearest_cpu: expected CPU tensors, got ", z.device());
  at::Tensor indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({z.size(0)}, z.options().dtype(at::kFloat));
  if (z.size(0) == 0) return {indices, distances};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vq_nearest_cpu", [&] {
    vq_nearest_cpu_impl<scalar_t>(z, codebook, indices, distances);
  });
  return {indices, distances};
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(static_cast<int>(active_isa())); }

std::string vq_cpu_isa() {
  switch (active_isa()) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace fastdiff
