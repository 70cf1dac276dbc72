// The "cpu" backend of the token log-prob op on tensors (contract: docs/DESIGN.md).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace pyalign::cpu {

// logits3 [B, T, V] (float32/bfloat16/float16/float64, stride(2) == 1), labels2 [B, T] int64
// -> (logp2 [B, T], norm2 [B, T, 2]), float32 (float64 for float64 logits); the logits are
// transformed first (logit_scale, softcap: pyalign/reference.py).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits3, const at::Tensor& labels2,
                                           int64_t ignore_index, double logit_scale,
                                           std::optional<double> softcap);

// grad_out3 <- grad2 * (onehot(label) - softmax(z)) * dz/dx, zeros on ignored rows; grad_out3
// may be logits3 itself. norm2 is the forward's.
void backward(const at::Tensor& logits3, const at::Tensor& labels2, const at::Tensor& norm2,
              const at::Tensor& grad2, int64_t ignore_index, const at::Tensor& grad_out3,
              double logit_scale, std::optional<double> softcap);

// Instruction-set variant of the row kernels in use ("DEFAULT", "AVX2", "AVX512"), the ones
// this CPU can run, and a way to force one (for tests and benchmarks).
std::string capability();
std::vector<std::string> capabilities();
void set_capability(const std::string& name);

// How many of ATen's threads ran part of the last forward or backward (tests: the kernels must
// use more than one thread wherever torch has more than one).
int threads_used_by_last_call();

}  // namespace pyalign::cpu
