// fastdiff native extension (fastdiff._C): GroupNorm + SiLU on the CPU, one read for the statistics and one pass
// for the output.
//
// torch.ops.fastdiff.group_norm_silu_native(x, num_groups, weight, bias, eps, silu) -> y, defined in ops.cpp:
//   x       (N, C, *spatial) fp32, bf16 or fp16 CPU, contiguous or channels_last (4-D) / channels_last_3d (5-D);
//           any other layout is copied to contiguous first
//   weight  optional (C,), fp32 or x's dtype;  bias: the same
//   eps     > 0, added to the (biased) variance
//   silu    apply SiLU after the affine map
//   y       x's shape, dtype and memory format: y = act((x - mean_g) * rstd_g * w_c + b_c)
//
// Statistics are fp32 blocks combined in fp64 (Chan's formula), so a large mean offset costs no digits, and the
// blocks depend only on the sample's own shape: every sample's output is the same bits whatever the batch size or
// the thread count. The loops are compiled for AVX-512, AVX2 and portable code (picked from CPUID, capped by
// FASTDIFF_CPU_ISA); those may differ in the last bit (fused multiply-adds), not in anything else.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastdiff {

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, bool silu);

}  // namespace fastdiff
