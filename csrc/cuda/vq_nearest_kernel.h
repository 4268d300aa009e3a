// CUDA kernels of fastdiff::vq_nearest: launchers with plain pointers, so this header and the .cu files need
// only the CUDA toolkit (no torch headers). The torch binding (csrc/vq_nearest_cuda.cpp) allocates the tensors,
// picks the stream and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastdiff {
namespace cuda {

// Element type of z and codebook (both have the same one).
enum class VqDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How a search is split: the codebook's tiles are divided into `splits` slices searched by different thread
// blocks (so that small N still fills the GPU), and a last kernel reduces the slices. `workspace_bytes` of
// device memory (256-byte aligned) hold ||e||^2 and the per-slice partial results.
struct VqPlan {
  int splits;
  int64_t workspace_bytes;
};

// sm_count: the device's number of multiprocessors.
VqPlan vq_nearest_plan(int64_t N, int64_t K, int64_t D, int sm_count);

// indices[n] = argmin_k ||z[n] - codebook[k]||^2 (ties -> lowest k), distances[n] = that minimum (fp32, >= 0).
//   z          (N, D) row-major with row stride ldz elements (unit stride along D)
//   codebook   (K, D) row-major with row stride lde elements (unit stride along D), K >= 1
//   workspace  plan.workspace_bytes of device memory
//   indices    (N,) int64;  distances (N,) fp32
// Accumulates in fp32 whatever the input type. Returns the first launch error (cudaSuccess when the kernels
// were queued on `stream`); N == 0 launches nothing.
cudaError_t vq_nearest_launch(const void* z, int64_t ldz, const void* codebook, int64_t lde, VqDtype dtype, int64_t N,
                              int64_t K, int64_t D, const VqPlan& plan, void* workspace, int64_t* indices,
                              float* distances, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdiff
