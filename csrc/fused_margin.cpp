// Operator schemas of the fused_margin library and the Python module stub.
//
// Importing fused_margin._C loads this shared object, which runs the static
// TORCH_LIBRARY registrations below; the ops are then reachable as
// torch.ops.fused_margin.<name>. Kernels for each family live in their own
// file (angular.cpp, ...) and register with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: the registrations happen at load time.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_margin, m) {
  // Per-row inverse L2 norm, 0 for rows whose norm is <= eps (zero vectors get
  // cosine 0 and no gradient through the normalisation).
  m.def("row_inv_norm(Tensor x, float eps) -> Tensor");
}
