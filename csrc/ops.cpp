// Operator registration for the native extension fastdiff._C, and the input checks of vq_nearest that every device
// shares.
//
// The `fastdiff` namespace is shared with the ops that fastdiff/ops.py defines from Python
// (torch.library.custom_op), so this file registers a FRAGMENT, never the namespace's one TORCH_LIBRARY block:
// both sides coexist in one process whichever is loaded first. The fake (meta) implementation of vq_nearest is
// registered from Python (fastdiff/native.py) once this library is loaded.
#include <Python.h>
#include <torch/library.h>

#include "conv3x3_winograd.h"
#include "group_norm_silu.h"
#include "rows_matmul.h"
#include "vq_nearest.h"

#include <cstdint>
#include <limits>
#include <string>

namespace fastdiff {

// vq_nearest's contract, checked by every device's implementation (vq_nearest_cpu.cpp, vq_nearest_cuda.cpp).
void check_vq_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(z.dim() == 2, "vq_nearest: z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, "vq_nearest: codebook must have shape (K, D), got ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(1) == z.size(1), "vq_nearest: codebook has D=", codebook.size(1), " but z has D=",
                    z.size(1));
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "vq_nearest: codebook must have at least one row (K >= 1)");
  TORCH_CHECK_VALUE(codebook.size(0) <= std::numeric_limits<int32_t>::max(), "vq_nearest: K must be < 2^31");
  TORCH_CHECK_VALUE(z.device() == codebook.device(), "vq_nearest: codebook is on ", codebook.device(),
                    " but z is on ", z.device());
  const auto dtype = z.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "vq_nearest: z must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_TYPE(codebook.scalar_type() == dtype, "vq_nearest: codebook must have z's dtype ", dtype, ", got ",
                   codebook.scalar_type());
}

namespace {

// What this build contains and which CPU micro-kernel runs: e.g. "cpu=avx512 cuda=no".
std::string native_info() {
#ifdef FASTDIFF_WITH_CUDA
  const char* cuda = "yes";
#else
  const char* cuda = "no";
#endif
  return "cpu=" + vq_cpu_isa() + " cuda=" + cuda;
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def("vq_nearest(Tensor z, Tensor codebook) -> (Tensor indices, Tensor distances)");
  m.def("rows_matmul(Tensor x, Tensor weight) -> Tensor");
  m.def("group_norm_silu_native(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu) -> "
        "Tensor");
  m.def("conv3x3_winograd_native(Tensor x, Tensor u, Tensor? bias, int tile) -> Tensor");
  m.def("_native_info() -> str", &fastdiff::native_info);
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("vq_nearest", &fastdiff::vq_nearest_cpu);
  m.impl("rows_matmul", &fastdiff::rows_matmul_cpu);
  m.impl("group_norm_silu_native", &fastdiff::group_norm_silu_cpu);
  m.impl("conv3x3_winograd_native", &fastdiff::conv3x3_winograd_cpu);
}

// `import fastdiff._C` (the setup.py build) needs a module init; the just-in-time build is loaded as a plain
// shared library, where the static registrations above are all that matters.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastdiff native ops (torch.ops.fastdiff)", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
