// fastdiff native extension (fastdiff._C): 3x3 convolution (stride 1, padding 1) on the CPU by Winograd's minimal
// filtering, F(2x2, 3x3) or F(4x4, 3x3).
//
// torch.ops.fastdiff.conv3x3_winograd_native(x, u, bias, tile) -> y, defined in ops.cpp:
//   x     (N, C, H, W) fp32 or bf16 CPU, any strides (made channels_last)
//   u     (A*A, C, K) the transformed weights G g G^T (A = tile + 2), x's dtype, contiguous:
//         fastdiff.ops.winograd_weight(weight, tile)
//   bias  optional (K,), fp32 or x's dtype
//   tile  2 (F(2x2, 3x3): 16 products per 4 outputs instead of 36) or 4 (F(4x4, 3x3): 36 per 16 instead of 144)
//   y     (N, K, H, W) channels_last, x's dtype: conv2d(x, weight, bias, padding=1) up to rounding
//
// The batch's tiles (m x m output pixels each, m = tile) are cut into blocks of a fixed number of tiles; per block,
// one thread transforms the input tiles (fp32 arithmetic) into V (A*A, Tb, C), multiplies V by u on the A*A
// positions (at::bmm_out, one GEMM per position, run on that thread) and transforms the products back, adding the
// bias. The last block is padded with zero tiles and GEMM rows are padded to 64 bytes, so every GEMM has the same
// shape and alignment, and each runs on one thread inside the parallel region: a tile's output depends only on its
// own inputs, the same bits whatever the batch size or the thread count.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastdiff {

at::Tensor conv3x3_winograd_cpu(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                                int64_t tile);

}  // namespace fastdiff
