// The "cuda" backend on tensors: checks the contract (docs/DESIGN.md), allocates the outputs,
// and launches the raw-pointer kernels of token_logprobs.cu on torch's current stream.
#include "cuda/binding.h"

#include "cuda/token_logprobs.h"
#include "tensor_checks.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>

namespace pyalign::cuda {
namespace {

DType dtype_of(const at::Tensor& logits3) {
  switch (logits3.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default:
      TORCH_CHECK_VALUE(false, "logits3: the cuda backend takes float32, bfloat16 or float16, got ",
                        logits3.scalar_type());
  }
  return DType::Float32;  // unreachable
}

RowLayout layout_of(const at::Tensor& logits3) {
  TORCH_CHECK_VALUE(logits3.size(2) <= INT32_MAX, "logits3: vocabulary of ", logits3.size(2),
                    " exceeds the kernels' 2^31 - 1 limit");
  return RowLayout{logits3.size(0), logits3.size(1), logits3.size(2), logits3.stride(0),
                   logits3.stride(1)};
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "pyalign ", what, ": kernel launch failed: ",
              cudaGetErrorString(status));
}

// Labels are not range-checked here (that would synchronise with the device): the dispatcher
// validates them, and a label outside [0, V) that slips through yields NaN, never a stray read.
LogitTransform transform_of(double logit_scale, const std::optional<double>& softcap) {
  const double cap = checks::check_transform(logit_scale, softcap);
  return LogitTransform{static_cast<float>(logit_scale), static_cast<float>(cap)};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits3, const at::Tensor& labels2,
                                           int64_t ignore_index, double logit_scale,
                                           std::optional<double> softcap) {
  checks::check_logits_layout(logits3, "logits3", c10::DeviceType::CUDA);
  const DType dtype = dtype_of(logits3);
  checks::check_rows(labels2, "labels2", logits3, at::kLong);
  const LogitTransform transform = transform_of(logit_scale, softcap);
  const c10::cuda::CUDAGuard device_guard(logits3.device());
  const auto out_options = logits3.options().dtype(at::kFloat);
  at::Tensor logp2 = at::empty({logits3.size(0), logits3.size(1)}, out_options);
  at::Tensor norm2 = at::empty({logits3.size(0), logits3.size(1), 2}, out_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits3.device().index()).stream();
  check_launch(launch_forward(dtype, logits3.const_data_ptr(), layout_of(logits3),
                              labels2.const_data_ptr<int64_t>(), ignore_index, transform,
                              logp2.mutable_data_ptr<float>(), norm2.mutable_data_ptr<float>(),
                              stream),
               "cuda_forward");
  return {logp2, norm2};
}

void backward(const at::Tensor& logits3, const at::Tensor& labels2, const at::Tensor& norm2,
              const at::Tensor& grad2, int64_t ignore_index, const at::Tensor& grad_out3,
              double logit_scale, std::optional<double> softcap) {
  checks::check_logits_layout(logits3, "logits3", c10::DeviceType::CUDA);
  const DType dtype = dtype_of(logits3);
  checks::check_rows(labels2, "labels2", logits3, at::kLong);
  checks::check_norm(norm2, "norm2", logits3, at::kFloat);
  checks::check_rows(grad2, "grad2", logits3, at::kFloat);
  checks::check_grad_out(logits3, grad_out3);
  const LogitTransform transform = transform_of(logit_scale, softcap);
  const c10::cuda::CUDAGuard device_guard(logits3.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits3.device().index()).stream();
  check_launch(launch_backward(dtype, logits3.const_data_ptr(), layout_of(logits3),
                               labels2.const_data_ptr<int64_t>(), norm2.const_data_ptr<float>(),
                               grad2.const_data_ptr<float>(), ignore_index, transform,
                               grad_out3.mutable_data_ptr(), grad_out3.stride(0),
                               grad_out3.stride(1), stream),
               "cuda_backward");
}

}  // namespace

void register_cuda_bindings(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cuda_forward", &forward, py::arg("logits3"), py::arg("labels2"), py::arg("ignore_index"),
        py::arg("logit_scale") = 1.0, py::arg("softcap") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "(logp2 [B, T], norm2 [B, T, 2]) of the transformed CUDA logits3 [B, T, V] at labels2 "
        "[B, T]; one pass over the logits.");
  m.def("cuda_backward", &backward, py::arg("logits3"), py::arg("labels2"), py::arg("norm2"),
        py::arg("grad2"), py::arg("ignore_index"), py::arg("grad_out3"),
        py::arg("logit_scale") = 1.0, py::arg("softcap") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "grad_out3 <- grad2 * (onehot(labels2) - softmax(z)) * dz/dx; grad_out3 may be logits3.");
}

}  // namespace pyalign::cuda
