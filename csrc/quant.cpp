#include "registry.h"

namespace py = pybind11;

void register_quant(py::module_& m) {}
