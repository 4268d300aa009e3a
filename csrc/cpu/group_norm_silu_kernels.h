// Private header of the CPU GroupNorm + SiLU kernels: the loops each instruction-set file in csrc/cpu/ compiles
// (group_norm_silu_{avx512,avx2,generic}.cpp) and the table of function pointers they export to the driver
// csrc/group_norm_silu_cpu.cpp. The driver calls a table only where CPUID allows its instruction set.
#pragma once

#include <cstdint>

namespace fastdiff {
namespace gn_cpu {

// Element types, indexed as the tables are: fp32, bf16, fp16.
enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Statistics block sizes, in elements; they depend on nothing but the sample's shape (batch invariance).
constexpr int64_t kBlock = 4096;        // NCHW: a group's elements are contiguous; blocks of this many
constexpr int64_t kPixelBlock = 8192;   // NHWC: pixels per block = clamp(kPixelBlock / C, 16, S)

struct Kernels {
  // Mean and M2 (sum of squared deviations) of x[0, n), 1 <= n <= kBlock: fp32 sums, two passes over the block
  // (the second corrects the first); the mean is returned in fp64 (first-pass mean + fp32 correction).
  void (*block_stats[3])(const void* x, int64_t n, double* mean, float* m2);
  // y[i] = act((x[i] - hi) * a + shift) for i < n: hi the group mean rounded to fp32 (x - hi is exact where x is
  // near the mean), a = w rstd, shift = b - (mean - hi) a.
  void (*row_apply[3])(const void* x, void* y, int64_t n, float hi, float a, float shift, bool silu);
  // Channels-last block of P pixels x C channels: per-channel mean (fp64) and M2 over the P pixels.
  void (*pixel_stats[3])(const void* x, int64_t P, int64_t C, double* mean, float* m2);
  // Channels-last block: y[p, c] = act((x[p, c] - hi[c]) * a[c] + shift[c]).
  void (*pixel_apply[3])(const void* x, void* y, int64_t P, int64_t C, const float* hi, const float* a,
                         const float* shift, bool silu);
};

const Kernels& kernels_generic();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace gn_cpu
}  // namespace fastdiff
