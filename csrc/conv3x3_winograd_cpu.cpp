// CPU implementation of fastdiff::conv3x3_winograd_native (see conv3x3_winograd.h for the contract). Transform
// loops: csrc/cpu/winograd_loops.h, compiled per instruction set.
#include "conv3x3_winograd.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/winograd_kernels.h"
#include "cpu_isa.h"

namespace fastdiff {
namespace {

const wg_cpu::Kernels& active_kernels() {
  switch (active_cpu_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case CpuIsa::kAmx:
    case CpuIsa::kAvx512:
      return wg_cpu::kernels_avx512();
    case CpuIsa::kAvx2:
      return wg_cpu::kernels_avx2();
#endif
    default:
      return wg_cpu::kernels_generic();
  }
}

// Tiles per block: from the tile size, the dtype and C only (never the batch), so every block's GEMMs have one shape.
// About 1 MiB of V per block for fp32 F(4,3); more tiles for bf16 F(2,3), whose GEMMs are cheaper per tile.
int64_t tiles_per_block(int64_t tile, bool bf16, int64_t C) {
  if (tile == 4) return 32;
  return bf16 ? std::clamp<int64_t>(16384 / std::max<int64_t>(C, 1), 64, 256) : 64;
}

}  // namespace

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x_in, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                                int64_t tile) {
  TORCH_CHECK_VALUE(tile == 2 || tile == 4, "conv3x3_winograd: tile must be 2 or 4, got ", tile);
  TORCH_CHECK_VALUE(x_in.dim() == 4, "conv3x3_winograd: x must have shape (N, C, H, W), got ", x_in.sizes());
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "conv3x3_winograd: x must be on the CPU, got ", x_in.device());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16, "conv3x3_winograd: x must be float32 or bfloat16, "
                   "got ", dtype);
  const int64_t A = tile + 2, N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK_VALUE(u.dim() == 3 && u.size(0) == A * A && u.size(1) == C, "conv3x3_winograd: u must have shape (",
                    A * A, ", ", C, ", K) for tile ", tile, " and C=", C, ", got ", u.sizes());
  TORCH_CHECK_TYPE(u.scalar_type() == dtype, "conv3x3_winograd: u must have x's dtype ", dtype, ", got ",
                   u.scalar_type());
  TORCH_CHECK_VALUE(u.device().is_cpu() && u.is_contiguous(), "conv3x3_winograd: u must be a contiguous CPU tensor");
  const int64_t K = u.size(2);
  std::vector<float> b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == K, "conv3x3_winograd: bias must have shape (", K,
                      ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat || bias->scalar_type() == dtype, "conv3x3_winograd: bias "
                     "must be float32 or x's dtype ", dtype, ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device().is_cpu(), "conv3x3_winograd: bias must be on the CPU, got ", bias->device());
    const at::Tensor f = bias->to(at::kFloat).contiguous();
    b.assign(f.const_data_ptr<float>(), f.const_data_ptr<float>() + K);
  }

  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({N, K, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (C == 0) return y.zero_();

  // GEMM rows padded to 64 bytes (zero columns, zero weights): a tile's rows are then aligned alike in every slot of
  // a block (BLAS may sum a row in another order when its rows are not aligned).
  const int64_t align = 64 / static_cast<int64_t>(x.element_size());
  const int64_t ldv = (C + align - 1) / align * align, ldm = (K + align - 1) / align * align;
  at::Tensor up = u;
  if (ldv != C || ldm != K) {
    up = at::zeros({A * A, ldv, ldm}, u.options());
    up.narrow(1, 0, C).narrow(2, 0, K).copy_(u);
  }
  const int64_t th = (H + tile - 1) / tile, tw = (W + tile - 1) / tile, T = N * th * tw;
  const int64_t Tb = tiles_per_block(tile, dtype == at::kBFloat16, C), nblk = (T + Tb - 1) / Tb;
  const int dt = dtype == at::kFloat ? wg_cpu::kF32 : wg_cpu::kBF16, ti = wg_cpu::tile_index(tile);
  const wg_cpu::Kernels& k = active_kernels();
  const auto input = k.input[dt][ti];
  const auto output = k.output[dt][ti];
  const void* xp = x.const_data_ptr();
  void* yp = y.mutable_data_ptr();
  const float* bp = b.empty() ? nullptr : b.data();
  // At least two work items, so that at::parallel_for always opens its parallel region (with one it runs inline):
  // inside it the block's GEMMs run on one thread whatever the batch, never on BLAS's own threads.
  at::parallel_for(0, std::max<int64_t>(nblk, 2), 1, [&](int64_t b0, int64_t b1) {
    b1 = std::min(b1, nblk);
    if (b0 >= b1) return;
    at::Tensor v = at::empty({A * A, Tb, ldv}, x.options());
    at::Tensor mm = at::empty({A * A, Tb, ldm}, x.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t g0 = blk * Tb, count = std::min(Tb, T - g0);
      input(xp, v.mutable_data_ptr(), H, W, C, ldv, th, tw, g0, count, Tb);
      at::bmm_out(mm, v, up);
      output(mm.const_data_ptr(), yp, bp, H, W, K, ldm, th, tw, g0, count, Tb);
    }
  });
  return y;
}

}  // namespace fastdiff
