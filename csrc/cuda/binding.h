// Registers the "cuda" backend (cuda_forward, cuda_backward) on the pyalign._C module.
#pragma once

#include <pybind11/pybind11.h>

namespace pyalign::cuda {

void register_cuda_bindings(pybind11::module_& m);

}  // namespace pyalign::cuda
