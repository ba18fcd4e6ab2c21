#include "registry.h"

namespace py = pybind11;

void register_sampling(py::module_& m) {}
