// AMX-BF16 path of vq_nearest: bf16 tile screening followed by an exact fp32 re-rank, returning the AVX-512
// kernel's result bit for bit (the driver takes it on CPUs with AMX-BF16 and D >= kAmxMinD). The tile and AVX-512
// code is compiled with per-function target attributes (no -march flag). See vq_nearest_cpu.cpp for the driver and
// vq_nearest_kernels.h for the interface.
#include "vq_nearest_kernels.h"

#if FASTDIFF_X86
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace fastdiff {
namespace vq_cpu {
namespace {

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

}  // namespace

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

// The dtypes vq_nearest accepts (check_vq_inputs).
template bool search_rows_amx<float>(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                     int64_t, int64_t*, float*);
template bool search_rows_amx<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, int64_t, const c10::Half*,
                                         int64_t, int64_t, int64_t, int64_t*, float*);
template bool search_rows_amx<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t,
                                             const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t*, float*);

}  // namespace vq_cpu
}  // namespace fastdiff
#endif  // FASTDIFF_X86
