// Operator registration for the native extension fastdiff._C.
//
// The `fastdiff` namespace is shared with the ops that fastdiff/ops.py defines from Python
// (torch.library.custom_op), so this file registers a FRAGMENT, never the namespace's one TORCH_LIBRARY block:
// both sides coexist in one process whichever is loaded first. The fake (meta) implementation of vq_nearest is
// registered from Python (fastdiff/native.py) once this library is loaded.
#include <Python.h>
#include <torch/library.h>

#include "rows_matmul.h"
#include "vq_nearest.h"

namespace fastdiff {
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
  m.def("_native_info() -> str", &fastdiff::native_info);
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("vq_nearest", &fastdiff::vq_nearest_cpu);
  m.impl("rows_matmul", &fastdiff::rows_matmul_cpu);
}

// `import fastdiff._C` (the setup.py build) needs a module init; the just-in-time build is loaded as a plain
// shared library, where the static registrations above are all that matters.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fastdiff native ops (torch.ops.fastdiff)", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
