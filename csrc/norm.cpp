#include "registry.h"

namespace py = pybind11;

void register_norm(py::module_& m) {}
