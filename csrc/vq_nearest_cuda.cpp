// The thin torch binding of the CUDA kernels (csrc/cuda/): validates, allocates, picks the stream, launches.
// Compiled only where torch was built with CUDA (setup.py's CUDAExtension, or the just-in-time build when
// torch.cuda is available); the kernels themselves need only the CUDA toolkit. It is also built on its own, with
// csrc/cuda/*.cu only, where the extension that loaded has no CUDA kernels but CUDA is usable (fastdiff/native.py,
// _jit_build_cuda): that library is linked against the loaded one, which defines the operator and
// check_vq_inputs, so this file must neither define the operator nor anything else the CPU build defines.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "cuda/vq_nearest_kernel.h"
#include "vq_nearest.h"

namespace fastdiff {
namespace {

// The kernels read rows with unit stride along D; any row stride is fine.
at::Tensor unit_inner_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z_in, const at::Tensor& codebook_in) {
  check_vq_inputs(z_in, codebook_in);
  TORCH_CHECK(z_in.is_cuda(), "vq_nearest_cuda: expected CUDA tensors, got ", z_in.device());
  const c10::cuda::CUDAGuard device_guard(z_in.device());
  const at::Tensor z = unit_inner_stride(z_in);
  const at::Tensor codebook = unit_inner_stride(codebook_in);
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  at::Tensor indices = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {indices, distances};

  cuda::VqDtype dtype = cuda::VqDtype::kFloat32;
  if (z.scalar_type() == at::kHalf) dtype = cuda::VqDtype::kFloat16;
  if (z.scalar_type() == at::kBFloat16) dtype = cuda::VqDtype::kBFloat16;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, z.get_device()));
  const cuda::VqPlan plan = cuda::vq_nearest_plan(N, K, D, sm_count);
  at::Tensor workspace = at::empty({plan.workspace_bytes}, z.options().dtype(at::kByte));
  const cudaError_t err = cuda::vq_nearest_launch(
      z.const_data_ptr(), z.stride(0), codebook.const_data_ptr(), codebook.stride(0), dtype, N, K, D, plan,
      workspace.mutable_data_ptr(), indices.mutable_data_ptr<int64_t>(), distances.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "vq_nearest_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return {indices, distances};
}

}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) { m.impl("vq_nearest", &fastdiff::vq_nearest_cuda); }
