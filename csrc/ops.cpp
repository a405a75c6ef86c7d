// The one binding file of tlcore's compiled extension, `tlcore._C`.
//
// Kernels live in csrc/cpu/*.cpp and csrc/cuda/*.cu behind plain C++ entry points
// (csrc/*.h, light headers so nvcc stays fast); this file declares each op once in
// the `tlcore` namespace, wraps tensors, and registers the CPU and CUDA kernels.
// Ops named `_x_cpu` / `_x_cuda` are the compiled backends of the public Python ops
// in tlcore/ops, which choose a backend and hold the fake (shape-only) twins.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(tlcore, m) {
}

extern "C" {
// `import tlcore._C` runs this; registration happens in the static initialisers above.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "tlcore's compiled kernels", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef TLCORE_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}
