// CPU implementation of fastdiff::vq_nearest (see vq_nearest.h for the contract): the driver. It packs the inputs,
// picks the micro-kernel from CPUID at run time and runs the parallel search; the micro-kernels live in csrc/cpu/,
// one file per instruction set (interface: cpu/vq_nearest_kernels.h).
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
// Micro-kernels: AVX-512 (12 x 32, cpu/vq_nearest_avx512.cpp), AVX2+FMA (6 x 16, cpu/vq_nearest_avx2.cpp) and a
// portable one (4 x 16, auto-vectorised, cpu/vq_nearest_generic.cpp). On CPUs with AMX-BF16 and D >= 128 an AMX path
// (cpu/vq_nearest_amx.cpp) screens in bf16 and re-ranks in fp32, returning the AVX-512 result.
// The ISA-specific code is compiled with per-function target attributes and picked at run time from CPUID, so the
// extension needs no -march flag and runs correctly on any x86-64 (or other) CPU.
#include "vq_nearest.h"

#include "cpu/vq_nearest_kernels.h"
#include "cpu_isa.h"

#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#if FASTDIFF_X86
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace fastdiff {
namespace vq_cpu {

// ------------------------------------------------------------------------------------------------ packing
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

template void pack_codebook<float>(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*);
template void pack_codebook<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, float*);
template void pack_codebook<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, int64_t, float*,
                                           float*);

}  // namespace vq_cpu

namespace {

using namespace vq_cpu;

// Rows of z per parallel work item (a multiple of every micro-kernel's MR).
constexpr int64_t kBlockRows = 96;

// ------------------------------------------------------------------------------------------------ ISA choice
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

#if FASTDIFF_X86
// AMX-BF16 and the tile unit in CPUID, AVX-512F for the epilogues, and the tile state granted by the OS.
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

// ------------------------------------------------------------------------------------------------ driver

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

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook) {
  check_vq_inputs(z, codebook);
  TORCH_CHECK(z.device().is_cpu(), "vq_nearest_cpu: expected CPU tensors, got ", z.device());
  at::Tensor indices = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({z.size(0)}, z.options().dtype(at::kFloat));
  if (z.size(0) == 0) return {indices, distances};
  // Only the dtypes check_vq_inputs accepts.
  AT_DISPATCH_V2(z.scalar_type(), "vq_nearest_cpu", AT_WRAP([&] {
    vq_nearest_cpu_impl<scalar_t>(z, codebook, indices, distances);
  }), at::kFloat, at::kHalf, at::kBFloat16);
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
