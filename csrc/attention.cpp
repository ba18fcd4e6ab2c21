#include "registry.h"

namespace py = pybind11;

void register_attention(py::module_& m) {}
