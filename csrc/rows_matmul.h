// fastdiff native extension (fastdiff._C): a batch-invariant fp32 matrix product for fastdiff.batch_invariant().
//
// torch.ops.fastdiff.rows_matmul(x, weight) -> y, defined in ops.cpp:
//   x       (R, K)  fp32 CPU, any strides
//   weight  (N, K)  fp32 CPU, any strides (the layout of F.linear's weight)
//   y       (R, N)  fp32, contiguous: y[r, n] = sum over k = 0, 1, ..., K-1 of x[r, k] * weight[n, k]
//
// Every y[r, n] is one chain of fused multiply-adds in increasing k, starting from +0: acc = fma(x, w, acc). No
// blocking, threading, vector width, alignment or position of the row changes that chain, so a row's result is the
// same bits whatever the other rows, the thread count, or the micro-kernel (AVX-512, AVX2+FMA, portable std::fma).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastdiff {

at::Tensor rows_matmul_cpu(const at::Tensor& x, const at::Tensor& weight);

}  // namespace fastdiff
