// Private header of the CPU Winograd 3x3 convolution: the table of transform loops each instruction-set file in
// csrc/cpu/ compiles (winograd_{avx512,avx2,generic}.cpp, from winograd_loops.h) for the driver
// csrc/conv3x3_winograd_cpu.cpp, which calls a table only where CPUID allows its instruction set.
#pragma once

#include <cstdint>

namespace fastdiff {
namespace wg_cpu {

// Indexed as the tables are: element type (fp32, bf16), then tile (A = 4: F(2,3); A = 6: F(4,3)).
enum Dtype : int { kF32 = 0, kBF16 = 1 };
inline int tile_index(int64_t tile) { return tile == 4 ? 1 : 0; }  // tile = m, the output tile side: 2 or 4

struct Kernels {
  // Input transform of the tiles g0 .. g0 + count - 1 into V (A*A, Tb, ldv): C channels, then zeros to ldv; slots
  // count .. Tb - 1 zeroed.
  void (*input[2][2])(const void* x, void* v, int64_t H, int64_t W, int64_t C, int64_t ldv, int64_t th, int64_t tw,
                      int64_t g0, int64_t count, int64_t Tb);
  // Output transform of M (A*A, Tb, ldm), its first K columns, for the same tiles, plus bias, into y (N, H, W, K).
  void (*output[2][2])(const void* m, void* y, const float* bias, int64_t H, int64_t W, int64_t K, int64_t ldm,
                       int64_t th, int64_t tw, int64_t g0, int64_t count, int64_t Tb);
};

const Kernels& kernels_generic();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace wg_cpu
}  // namespace fastdiff
