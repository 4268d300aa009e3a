// Private header of the CPU vq_nearest kernels: what each instruction-set file in csrc/cpu/ exports to the driver
// csrc/vq_nearest_cpu.cpp (micro-kernels, their tile shapes, the AMX path), and what they share (scratch buffers,
// the codebook packing). Functions declared with a target attribute may only be called where the driver's CPUID check
// allows that instruction set; the attribute must match the definition's (in C++ a different one would declare
// another version of the function).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FASTDIFF_X86 1
#else
#define FASTDIFF_X86 0
#endif

namespace fastdiff {
namespace vq_cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();

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

// codebook (K, D) of T, any strides -> panels [ceil(K/NR)][D][NR] fp32 and esq [ceil(K/NR) * NR]
// (vq_nearest_cpu.cpp, for T = float, c10::Half, c10::BFloat16; the AMX path's fp32 fallback packs with it too).
template <typename T>
void pack_codebook(const T* e, int64_t s0, int64_t s1, int64_t K, int64_t D, int64_t NR, float* packed, float* esq);

// ------------------------------------------------------------------------------------------------ vq_nearest_generic.cpp
// Portable: 4 rows x 16 columns, auto-vectorised; 16 lanes per row.
constexpr int kGenericMR = 4, kGenericNR = 16;

void micro_generic(const float* zp, const float* ep, const float* esq, int64_t D, float* best, int32_t* bidx,
                   int32_t j0, const float* pf, int64_t pf_lines);

// The portable finish, for LANES = 8 (the AVX2 kernel's lanes) and 16 (the portable kernel's).
template <int LANES>
void finish_generic(const float* best, const int32_t* bidx, const float* zsq, int64_t rows, int64_t* out_idx,
                    float* out_dist);

#if FASTDIFF_X86
// ------------------------------------------------------------------------------------------------ vq_nearest_avx2.cpp
// AVX2+FMA: 6 rows x 16 columns; 8 lanes per row (finished by finish_generic<8>).
constexpr int kAvx2MR = 6, kAvx2NR = 16;

__attribute__((target("avx2,fma"))) void micro_avx2(const float* zp, const float* ep, const float* esq, int64_t D,
                                                    float* best, int32_t* bidx, int32_t j0, const float* pf,
                                                    int64_t pf_lines);

// ------------------------------------------------------------------------------------------------ vq_nearest_avx512.cpp
// AVX-512F: 12 rows x 32 columns; 16 lanes per row.
constexpr int kAvx512MR = 12, kAvx512NR = 32;

__attribute__((target("avx512f"))) void micro_avx512(const float* zp, const float* ep, const float* esq, int64_t D,
                                                     float* best, int32_t* bidx, int32_t j0, const float* pf,
                                                     int64_t pf_lines);

__attribute__((target("avx512f"))) void finish_avx512(const float* best, const int32_t* bidx, const float* zsq,
                                                      int64_t rows, int64_t* out_idx, float* out_dist);

// ------------------------------------------------------------------------------------------------ vq_nearest_amx.cpp
constexpr int64_t kAmxMinD = 128;  // below this, tile loads and epilogues outweigh AMX's arithmetic

// The whole search on AMX-BF16 (bf16 screening, fp32 re-rank; the AVX-512 kernel's result bit for bit), for
// T = float, c10::Half, c10::BFloat16. Needs AMX-BF16 with the tile state granted, and AVX-512F. True when it ran;
// false when the inputs need the AVX-512 path.
template <typename T>
bool search_rows_amx(const T* z, int64_t zs0, int64_t zs1, int64_t N, int64_t D, const T* e, int64_t es0,
                     int64_t es1, int64_t K, int64_t* out_idx, float* out_dist);
#endif  // FASTDIFF_X86

}  // namespace vq_cpu
}  // namespace fastdiff
