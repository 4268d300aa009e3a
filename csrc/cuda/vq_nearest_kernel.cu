// CUDA kernels of fastdiff::vq_nearest (contract in vq_nearest_kernel.h). Needs only the CUDA toolkit.
//
// 1. codebook_norms_kernel: ||e_k||^2, one warp per codebook row.
// 2. vq_search_kernel: a thread block owns kBM = 128 rows of z and one slice of the codebook's kBN = 128-row
//    tiles. For each codebook tile it computes the 128 x 128 dot products z.e as a small GEMM: both operands are
//    staged through shared memory in kBK = 16-wide slabs along D (converted to fp32, transposed to [k][row]),
//    and each of the 256 threads accumulates an 8 x 8 register tile in fp32 (rows ty + 16 i, columns tx + 16 j).
//    The tile is folded at once into a per-row running (minimum, argmin): distances ||e||^2 - 2 z.e, strict "<",
//    and every thread sees its columns in increasing order, so ties keep the lowest index. Between tiles that
//    running pair lives in shared memory (each thread's own slots, 16 KiB per block), not in registers, so the
//    kernel fits the 128 registers that kBlocksPerSm = 2 resident blocks of 256 threads allow with room to spare
//    (ptxas 13.0: 101-104 registers unbounded, no spills even when capped at 120; with the pair in registers it
//    took 126-130 and sm_90 fp32 spilled 200 bytes). 16 extra shared-memory loads and stores per thread per
//    128-column tile are noise next to its 64 x D FMAs. The 16 threads sharing a row then reduce with warp shuffles
//    on (distance, index), and the block writes one partial result per row for its slice. Nothing N x K is ever
//    stored.
// 3. vq_finalize_kernel: one warp per row reduces the slices' partials (lexicographic on (distance, index)),
//    adds ||z||^2 and writes the int64 index and the fp32 distance.
#include "vq_nearest_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cmath>

namespace fastdiff {
namespace cuda {
namespace {

constexpr int kBM = 128;  // rows of z per thread block
constexpr int kBN = 128;  // codebook rows per tile
constexpr int kBK = 16;   // slab width along D staged in shared memory
constexpr int kThreadsX = 16, kThreadsY = 16, kThreads = kThreadsX * kThreadsY;
// Resident blocks of vq_search_kernel per multiprocessor that the design (and vq_nearest_plan's split) counts on:
// __launch_bounds__ caps the kernel at 65536 / (kThreads * kBlocksPerSm) = 128 registers per thread.
// tests/test_native_cuda_build.py checks with ptxas that no instantiation spills at that bound (sm_80, sm_90).
constexpr int kBlocksPerSm = 2;
constexpr int kTM = kBM / kThreadsY, kTN = kBN / kThreadsX;  // 8 x 8 register tile per thread
constexpr int kPad = 1;                                      // [k][row] stores stay (mostly) conflict-free
constexpr int kWarpsPerBlock = 8;                            // for the warp-per-row kernels
constexpr int kMaxSplits = 65535;                            // gridDim.y limit

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t align256(int64_t bytes) { return ceil_div(bytes, 256) * 256; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// The order on candidates: smaller distance first, equal distances -> smaller index (NaN never wins).
__device__ __forceinline__ bool better(float v, int32_t i, float best_v, int32_t best_i) {
  return v < best_v || (v == best_v && i < best_i);
}

template <typename T>
__global__ void codebook_norms_kernel(const T* __restrict__ e,  // (K, D), row stride lde
                                      int64_t lde, int64_t K, int64_t D,
                                      float* __restrict__ esq) {  // (K,)
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= K) return;  // whole warps leave together
  const T* src = e + row * lde;
  float s = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = to_float(src[d]);
    s = fmaf(v, v, s);
  }
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) esq[row] = s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    vq_search_kernel(const T* __restrict__ z,         // (N, D), row stride ldz
                     int64_t ldz,
                     const T* __restrict__ e,         // (K, D), row stride lde
                     int64_t lde,
                     const float* __restrict__ esq,   // (K,)
                     int64_t N, int64_t K, int64_t D, int64_t tiles_per_split,
                     float* __restrict__ part_val,    // (splits, N)
                     int32_t* __restrict__ part_idx)  // (splits, N)
{
  __shared__ float zs[kBK][kBM + kPad];
  __shared__ float es[kBK][kBN + kPad];
  const int tid = threadIdx.x;
  const int tx = tid % kThreadsX, ty = tid / kThreadsX;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const int64_t n_begin = static_cast<int64_t>(split) * tiles_per_split * kBN;
  const int64_t n_end = min64(K, n_begin + tiles_per_split * kBN);

  // The running (minimum, argmin) of each of this thread's kTM rows lives in shared memory between tiles (only this
  // thread touches its slots: no barrier needed), which keeps 2 * kTM registers free during the tile's GEMM.
  __shared__ float best_s[kTM][kThreads];
  __shared__ int32_t best_is[kTM][kThreads];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best_s[i][tid] = INFINITY;
    best_is[i][tid] = static_cast<int32_t>(min64(n_begin, INT_MAX));
  }

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBN) {
    float acc[kTM][kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.0f;

    for (int64_t k0 = 0; k0 < D; k0 += kBK) {
      // Stage a kBM x kBK slab of z and a kBN x kBK slab of the codebook as fp32 [k][row]; consecutive
      // threads read consecutive elements of a row (coalesced), out-of-range elements are zeros.
      for (int t = tid; t < kBM * kBK; t += kThreads) {
        const int r = t / kBK, c = t % kBK;
        const int64_t row = m0 + r, col = k0 + c;
        zs[c][r] = (row < N && col < D) ? to_float(z[row * ldz + col]) : 0.0f;
      }
      for (int t = tid; t < kBN * kBK; t += kThreads) {
        const int r = t / kBK, c = t % kBK;
        const int64_t row = n0 + r, col = k0 + c;
        es[c][r] = (row < n_end && col < D) ? to_float(e[row * lde + col]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        float a[kTM], b[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) a[i] = zs[k][ty + kThreadsY * i];
#pragma unroll
        for (int j = 0; j < kTN; ++j) b[j] = es[k][tx + kThreadsX * j];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

    // Fold the tile into the running minimum, columns in increasing order (j ascending, tiles ascending).
    float e_sq[kTN];
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t col = n0 + tx + kThreadsX * j;
      e_sq[j] = col < n_end ? esq[col] : INFINITY;
    }
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      float b = best_s[i][tid];
      int32_t bi = best_is[i][tid];
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const float dist = fmaf(-2.0f, acc[i][j], e_sq[j]);  // -2x is exact: e_sq - 2 z.e rounded once
        if (dist < b) {
          b = dist;
          bi = static_cast<int32_t>(n0 + tx + kThreadsX * j);
        }
      }
      best_s[i][tid] = b;
      best_is[i][tid] = bi;
    }
  }

  float best[kTM];
  int32_t best_idx[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = best_s[i][tid];
    best_idx[i] = best_is[i][tid];
  }

  // The 16 threads of a row group are 16 consecutive lanes (tid = ty * 16 + tx): xor offsets < 16 stay inside.
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int off = kThreadsX / 2; off > 0; off >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best[i], off);
      const int32_t idx = __shfl_xor_sync(0xffffffffu, best_idx[i], off);
      if (better(v, idx, best[i], best_idx[i])) {
        best[i] = v;
        best_idx[i] = idx;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t row = m0 + ty + kThreadsY * i;
      if (row < N) {
        part_val[split * N + row] = best[i];
        part_idx[split * N + row] = best_idx[i];
      }
    }
  }
}

template <typename T>
__global__ void vq_finalize_kernel(const T* __restrict__ z,  // (N, D), row stride ldz
                                   int64_t ldz, int64_t N, int64_t D, int splits,
                                   const float* __restrict__ part_val,    // (splits, N)
                                   const int32_t* __restrict__ part_idx,  // (splits, N)
                                   int64_t* __restrict__ indices,         // (N,)
                                   float* __restrict__ distances) {       // (N,)
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= N) return;  // whole warps leave together
  float best = INFINITY;
  int32_t best_idx = INT_MAX;
  for (int s = lane; s < splits; s += 32) {
    const float v = part_val[static_cast<int64_t>(s) * N + row];
    const int32_t idx = part_idx[static_cast<int64_t>(s) * N + row];
    if (better(v, idx, best, best_idx)) {
      best = v;
      best_idx = idx;
    }
  }
  const T* src = z + row * ldz;
  float sq = 0.0f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = to_float(src[d]);
    sq = fmaf(v, v, sq);
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, off);
    const int32_t idx = __shfl_xor_sync(0xffffffffu, best_idx, off);
    if (better(v, idx, best, best_idx)) {
      best = v;
      best_idx = idx;
    }
    sq += __shfl_xor_sync(0xffffffffu, sq, off);
  }
  if (lane == 0) {
    indices[row] = best_idx;
    distances[row] = fmaxf(best + sq, 0.0f);
  }
}

template <typename T>
cudaError_t launch_typed(const T* z, int64_t ldz, const T* e, int64_t lde, int64_t N, int64_t K, int64_t D,
                         const VqPlan& plan, void* workspace, int64_t* indices, float* distances,
                         cudaStream_t stream) {
  char* ws = static_cast<char*>(workspace);
  float* esq = reinterpret_cast<float*>(ws);
  float* part_val = reinterpret_cast<float*>(ws + align256(K * 4));
  int32_t* part_idx = reinterpret_cast<int32_t*>(ws + align256(K * 4) + align256(plan.splits * N * 4));
  const int64_t tiles = ceil_div(K, kBN);
  const int64_t tiles_per_split = ceil_div(tiles, plan.splits);

  codebook_norms_kernel<T><<<static_cast<unsigned>(ceil_div(K, kWarpsPerBlock)), kWarpsPerBlock * 32, 0, stream>>>(
      e, lde, K, D, esq);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const dim3 grid(static_cast<unsigned>(ceil_div(N, kBM)), static_cast<unsigned>(plan.splits));
  vq_search_kernel<T><<<grid, kThreads, 0, stream>>>(z, ldz, e, lde, esq, N, K, D, tiles_per_split, part_val,
                                                     part_idx);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  vq_finalize_kernel<T><<<static_cast<unsigned>(ceil_div(N, kWarpsPerBlock)), kWarpsPerBlock * 32, 0, stream>>>(
      z, ldz, N, D, plan.splits, part_val, part_idx, indices, distances);
  return cudaGetLastError();
}

}  // namespace

VqPlan vq_nearest_plan(int64_t N, int64_t K, int64_t D, int sm_count) {
  (void)D;
  const int64_t tiles = std::max<int64_t>(ceil_div(K, kBN), 1);
  const int64_t row_blocks = std::max<int64_t>(ceil_div(N, kBM), 1);
  // Aim for kBlocksPerSm thread blocks per multiprocessor: split the codebook when there are few row blocks.
  const int64_t target = kBlocksPerSm * static_cast<int64_t>(std::max(sm_count, 1));
  int64_t splits = row_blocks >= target ? 1 : std::min(tiles, ceil_div(target, row_blocks));
  splits = std::min<int64_t>(splits, kMaxSplits);
  splits = ceil_div(tiles, ceil_div(tiles, splits));  // no empty slices
  VqPlan plan;
  plan.splits = static_cast<int>(splits);
  plan.workspace_bytes = align256(K * 4) + align256(splits * N * 4) * 2;
  return plan;
}

cudaError_t vq_nearest_launch(const void* z, int64_t ldz, const void* codebook, int64_t lde, VqDtype dtype, int64_t N,
                              int64_t K, int64_t D, const VqPlan& plan, void* workspace, int64_t* indices,
                              float* distances, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (K < 1 || plan.splits < 1 || workspace == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case VqDtype::kFloat32:
      return launch_typed(static_cast<const float*>(z), ldz, static_cast<const float*>(codebook), lde, N, K, D, plan,
                          workspace, indices, distances, stream);
    case VqDtype::kFloat16:
      return launch_typed(static_cast<const __half*>(z), ldz, static_cast<const __half*>(codebook), lde, N, K, D,
                          plan, workspace, indices, distances, stream);
    case VqDtype::kBFloat16:
      return launch_typed(static_cast<const __nv_bfloat16*>(z), ldz, static_cast<const __nv_bfloat16*>(codebook),
                          lde, N, K, D, plan, workspace, indices, distances, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastdiff
