// engine._C: the compiled half of KFE. Importing it runs the TORCH_LIBRARY_FRAGMENT blocks of every
// source file, which register the compiled kernels as torch.ops.kfe.* operators. The Python module
// itself exports nothing; the engine reaches the kernels through torch.ops only.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "KFE compiled kernels (registered as torch.ops.kfe.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
