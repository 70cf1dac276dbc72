// Argument checks shared by the cpu and cuda backends (contract: docs/DESIGN.md). Each failure
// raises ValueError in Python and names the argument.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <utility>

namespace pyalign::checks {

// [B, T, V] with a contiguous vocabulary dimension, on `device_type`.
inline void check_logits_layout(const at::Tensor& t, const char* name, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, ": expected a 3-D [B, T, V] tensor, got ", t.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(t.device().type() == device_type, name, ": expected a ", device_type,
                    " tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.stride(2) == 1 || t.size(2) <= 1, name,
                    ": the vocabulary dimension must be contiguous (stride(2) == 1), got stride ",
                    t.stride(2));
}

// A contiguous [B, T] tensor of `dtype` on the logits' device.
inline void check_rows(const at::Tensor& t, const char* name, const at::Tensor& logits3,
                       at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == logits3.size(0) && t.size(1) == logits3.size(1),
                    name, ": expected shape [", logits3.size(0), ", ", logits3.size(1), "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits3.device(), name, ": expected it on ", logits3.device(),
                    " like logits3, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// A contiguous [B, T, 2] tensor of `dtype` on the logits' device: each row's normaliser (M, L).
inline void check_norm(const at::Tensor& t, const char* name, const at::Tensor& logits3,
                       at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == logits3.size(0) && t.size(1) == logits3.size(1) &&
                        t.size(2) == 2,
                    name, ": expected shape [", logits3.size(0), ", ", logits3.size(1),
                    ", 2] (the forward's row maximum and log-sum), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits3.device(), name, ": expected it on ", logits3.device(),
                    " like logits3, got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// logit_scale finite and > 0; softcap absent or finite and > 0. Returns softcap, 0 for none.
inline double check_transform(double logit_scale, const std::optional<double>& softcap) {
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0,
                    "logit_scale: expected a finite positive float, got ", logit_scale);
  if (!softcap.has_value()) return 0.0;
  TORCH_CHECK_VALUE(std::isfinite(*softcap) && *softcap > 0,
                    "softcap: expected None or a finite positive float, got ", *softcap);
  return *softcap;
}

// Byte range [first, last] that a tensor's elements span in its storage.
inline std::pair<int64_t, int64_t> byte_extent(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const int64_t element = static_cast<int64_t>(t.element_size());
  const int64_t first = t.storage_offset() * element;
  return {first, first + (last + 1) * element - 1};
}

// grad_out3: the logits' shape, dtype and device, a contiguous vocabulary dimension, and either
// logits3 itself (same elements, same strides: in-place backward) or memory disjoint from it.
// Anything in between would read logits after the kernel overwrote them.
inline void check_grad_out(const at::Tensor& logits3, const at::Tensor& grad_out3) {
  check_logits_layout(grad_out3, "grad_out3", logits3.device().type());
  TORCH_CHECK_VALUE(grad_out3.sizes() == logits3.sizes(), "grad_out3: expected shape ",
                    logits3.sizes(), ", got ", grad_out3.sizes());
  TORCH_CHECK_VALUE(grad_out3.device() == logits3.device(), "grad_out3: expected it on ",
                    logits3.device(), " like logits3, got ", grad_out3.device());
  TORCH_CHECK_VALUE(grad_out3.scalar_type() == logits3.scalar_type(),
                    "grad_out3: expected the logits' dtype ", logits3.scalar_type(), ", got ",
                    grad_out3.scalar_type());
  TORCH_CHECK_VALUE(at::has_internal_overlap(grad_out3) != at::MemOverlap::Yes,
                    "grad_out3: must not have elements that share memory (e.g. an expanded view)");
  if (grad_out3.numel() == 0 || !grad_out3.storage().is_alias_of(logits3.storage())) return;
  if (grad_out3.storage_offset() == logits3.storage_offset() &&
      grad_out3.strides() == logits3.strides()) {
    return;
  }
  const auto [out_first, out_last] = byte_extent(grad_out3);
  const auto [in_first, in_last] = byte_extent(logits3);
  TORCH_CHECK_VALUE(out_last < in_first || in_last < out_first,
                    "grad_out3: must be logits3 itself (in-place backward) or memory disjoint "
                    "from it, got a partially overlapping view");
}

}  // namespace pyalign::checks
