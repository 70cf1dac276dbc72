// CUDA kernels of the token log-prob op on raw device pointers. No torch headers: this header
// and token_logprobs.cu compile with plain nvcc; binding.cpp adapts them to at::Tensor.
//
// Layout (docs/DESIGN.md, "Backend contract"): logits row r = b * seq_len + t starts at element
// b * stride_batch + t * stride_time and holds `vocab` contiguous elements; labels, logp, lse and
// grad are contiguous [rows] arrays (rows = batch * seq_len); the math is float32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyalign::cuda {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

struct RowLayout {
  int64_t batch;
  int64_t seq_len;
  int64_t vocab;  // at most 2^31 - 1 (indices within a row are 32-bit; offsets are 64-bit)
  int64_t stride_batch;
  int64_t stride_time;
};

// logp[r] = logits[r, labels[r]] - lse[r] (0 where labels[r] == ignore_index, NaN where the label
// is out of range), lse[r] = log-sum-exp of row r (0 where labels[r] == ignore_index: an ignored
// row is not read). One read of the kept rows of the logits.
cudaError_t launch_forward(DType dtype, const void* logits, RowLayout layout,
                           const int64_t* labels, int64_t ignore_index, float* logp, float* lse,
                           cudaStream_t stream);

// grad_out[r, v] = grad[r] * (1[v == labels[r]] - exp(logits[r, v] - lse[r])), zeros on ignored
// rows, in the logits' dtype; grad_out's rows start at b * out_stride_batch + t * out_stride_time.
// grad_out may be the logits themselves (each element is read before it is written). One read
// and one write per element.
cudaError_t launch_backward(DType dtype, const void* logits, RowLayout layout,
                            const int64_t* labels, const float* lse, const float* grad,
                            int64_t ignore_index, void* grad_out, int64_t out_stride_batch,
                            int64_t out_stride_time, cudaStream_t stream);

}  // namespace pyalign::cuda
