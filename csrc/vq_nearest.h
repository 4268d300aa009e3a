// fastdiff native extension (fastdiff._C): nearest-codebook search for vector quantisation.
//
// The operator torch.ops.fastdiff.vq_nearest(z, codebook) -> (indices, distances) is defined in ops.cpp;
// this header declares its per-device implementations.
//
//   z         (N, D)  fp32 / fp16 / bf16, any strides
//   codebook  (K, D)  same dtype and device as z, K >= 1
//   indices   (N,)    int64, argmin_k ||z_n - e_k||^2, ties -> the lowest k (like torch.argmin)
//   distances (N,)    fp32, that minimum squared distance (clamped at 0)
//
// Distances are computed as ||e||^2 - 2 z.e (+ ||z||^2 for the returned value) with fp32 accumulation;
// the N x K distance matrix is never stored.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace fastdiff {

// Checks shared by every device (TORCH_CHECK -> a RuntimeError/ValueError in Python).
void check_vq_inputs(const at::Tensor& z, const at::Tensor& codebook);

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook);

// The CPU kernel this process uses: "amx" (bf16 tile screening + exact fp32 re-rank, for D >= 128; AVX-512
// otherwise), "avx512", "avx2" or "generic". FASTDIFF_CPU_ISA=avx512|avx2|generic (read on every call) caps it,
// so tests can run every variant on one machine.
std::string vq_cpu_isa();

#ifdef FASTDIFF_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z, const at::Tensor& codebook);
#endif

}  // namespace fastdiff
