// CUDA kernels of the token log-prob op on raw device pointers. No torch headers: this header
// and token_logprobs.cu compile with plain nvcc; binding.cpp adapts them to at::Tensor.
//
// Layout (docs/DESIGN.md, "Backend contract"): logits row r = b * seq_len + t starts at element
// b * stride_batch + t * stride_time and holds `vocab` contiguous elements; labels, logp and grad
// are contiguous [rows] arrays (rows = batch * seq_len), norm a contiguous [rows, 2] array; the
// math is float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyalign::cuda {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// The logit transform (pyalign/reference.py): z = logit_scale * x, or with softcap > 0,
// z = softcap * tanh(logit_scale * x / softcap). Rows are normalised through y (x, or the
// soft-capped z) with z - z' = a (y - y'): norm[r] = (M, L) = (max y, log sum exp(a (y - M))).
struct LogitTransform {
  float logit_scale;  // > 0
  float softcap;      // > 0, or 0 for none
};

struct RowLayout {
  int64_t batch;
  int64_t seq_len;
  int64_t vocab;  // at most 2^31 - 1 (indices within a row are 32-bit; offsets are 64-bit)
  int64_t stride_batch;
  int64_t stride_time;
};

// logp[r] = a (y[r, labels[r]] - M[r]) - L[r] (0 where labels[r] == ignore_index, NaN where the
// label is out of range), norm[r] = (M[r], L[r]) (0 where labels[r] == ignore_index: an ignored
// row is not read). One read of the kept rows of the logits.
cudaError_t launch_forward(DType dtype, const void* logits, RowLayout layout,
                           const int64_t* labels, int64_t ignore_index, LogitTransform transform,
                           float* logp, float* norm, cudaStream_t stream);

// grad_out[r, v] = grad[r] * (1[v == labels[r]] - exp(a (y[r, v] - M[r]) - L[r])) * dz/dx, zeros
// on ignored rows, in the logits' dtype; grad_out's rows start at b * out_stride_batch +
// t * out_stride_time. grad_out may be the logits themselves (each element is read before it is
// written). One read and one write per element.
cudaError_t launch_backward(DType dtype, const void* logits, RowLayout layout,
                            const int64_t* labels, const float* norm, const float* grad,
                            int64_t ignore_index, LogitTransform transform, void* grad_out,
                            int64_t out_stride_batch, int64_t out_stride_time, cudaStream_t stream);

}  // namespace pyalign::cuda
