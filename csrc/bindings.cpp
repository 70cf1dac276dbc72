// Python module pyalign._C: the "cpu" backend always, the "cuda" backend when built with CUDA.
// Signatures follow docs/DESIGN.md ("Backend contract"). pybind11 comes from torch's own headers
// (torch/csrc/utils/pybind.h), so the tensor type casters and the pybind11 ABI match torch's.
#include <torch/csrc/utils/pybind.h>

#include "cpu/token_logprobs.h"

#ifdef PYALIGN_WITH_CUDA
#include "cuda/binding.h"
#endif

namespace py = pybind11;

namespace {

constexpr bool kBuiltWithCuda =
#ifdef PYALIGN_WITH_CUDA
    true;
#else
    false;
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyalign's compiled kernels: fused log-softmax + gather of the label, and its backward";

  m.def("cpu_forward", &pyalign::cpu::forward, py::arg("logits3"), py::arg("labels2"),
        py::arg("ignore_index"), py::arg("logit_scale") = 1.0, py::arg("softcap") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "(logp2 [B, T], norm2 [B, T, 2]) of the transformed logits3 [B, T, V] at labels2 [B, T]; "
        "norm2 holds each row's (max, log-sum). One pass over the logits.");
  m.def("cpu_backward", &pyalign::cpu::backward, py::arg("logits3"), py::arg("labels2"),
        py::arg("norm2"), py::arg("grad2"), py::arg("ignore_index"), py::arg("grad_out3"),
        py::arg("logit_scale") = 1.0, py::arg("softcap") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "grad_out3 <- grad2 * (onehot(labels2) - softmax(z)) * dz/dx; grad_out3 may be logits3.");
  m.def("cpu_capability", &pyalign::cpu::capability,
        "Instruction-set variant of the CPU kernels in use: DEFAULT, AVX2 or AVX512.");
  m.def("cpu_capabilities", &pyalign::cpu::capabilities,
        "Instruction-set variants compiled in that this CPU can run.");
  m.def("set_cpu_capability", &pyalign::cpu::set_capability, py::arg("name"),
        "Force one variant of the CPU kernels (tests and benchmarks).");
  m.def("cpu_threads_used_by_last_call", &pyalign::cpu::threads_used_by_last_call,
        "How many threads ran part of the last cpu_forward / cpu_backward.");
  m.def("has_cuda", [] { return kBuiltWithCuda; },
        "Whether this build carries the CUDA kernels (cuda_forward / cuda_backward).");

#ifdef PYALIGN_WITH_CUDA
  pyalign::cuda::register_cuda_bindings(m);
#endif
}
