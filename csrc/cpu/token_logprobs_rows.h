// Row kernels of the CPU token log-prob op, on raw pointers (no at::Tensor).
//
// token_logprobs_rows.cpp is compiled once per instruction set (CMake defines CPU_CAPABILITY to
// DEFAULT, AVX2 or AVX512, as ATen does for its own kernels), each copy in its own namespace, so
// that one shared object carries all of them and picks the widest one the running CPU supports
// (token_logprobs.cpp). That keeps the .so portable between machines: no -march=native.
#pragma once

#include <cstdint>

namespace pyalign::cpu {

enum class DType : int { Float32, BFloat16, Float16, Float64 };

// The logit transform (pyalign/reference.py): z = logit_scale * x, or with softcap > 0,
// z = softcap * tanh(logit_scale * x / softcap). Rows are normalised through y (x, or the
// soft-capped z) with z - z' = a * (y - y').
struct Transform {
  double logit_scale;  // > 0
  double softcap;      // > 0, or 0 for none
};

// Logits row r = b * seq_len + t starts at element b * stride_batch + t * stride_time of
// `logits`; its vocab elements are contiguous. Outputs are contiguous arrays of the accumulation
// type: double for Float64 logits, float otherwise.
struct ForwardArgs {
  DType dtype;
  const void* logits;
  int64_t seq_len;
  int64_t vocab;
  int64_t stride_batch;
  int64_t stride_time;
  const int64_t* labels;
  int64_t ignore_index;
  Transform transform;
  void* logp;  // out [rows]: a * (y[label] - M) - L, 0 where the label is ignored
  void* norm;  // out [rows, 2]: M = max y, L = log sum exp(a (y - M)); 0 where ignored (not read)
};

// grad_out row r starts at b * out_stride_batch + t * out_stride_time of `grad_out`, which has
// the logits' dtype and may be the logits themselves (in-place backward).
struct BackwardArgs {
  DType dtype;
  const void* logits;
  int64_t seq_len;
  int64_t vocab;
  int64_t stride_batch;
  int64_t stride_time;
  const int64_t* labels;
  int64_t ignore_index;
  Transform transform;
  const void* norm;  // [rows, 2], accumulation type: the forward's (M, L)
  const void* grad;  // [rows], accumulation type
  void* grad_out;
  int64_t out_stride_batch;
  int64_t out_stride_time;
};

using ForwardRowsFn = void (*)(const ForwardArgs&, int64_t row_begin, int64_t row_end);
using BackwardRowsFn = void (*)(const BackwardArgs&, int64_t row_begin, int64_t row_end);

#define PYALIGN_DECLARE_ROW_KERNELS(capability)                                       \
  namespace capability {                                                              \
  void forward_rows(const ForwardArgs& args, int64_t row_begin, int64_t row_end);    \
  void backward_rows(const BackwardArgs& args, int64_t row_begin, int64_t row_end);  \
  }

PYALIGN_DECLARE_ROW_KERNELS(DEFAULT)
#ifdef PYALIGN_CPU_HAVE_AVX2
PYALIGN_DECLARE_ROW_KERNELS(AVX2)
#endif
#ifdef PYALIGN_CPU_HAVE_AVX512
PYALIGN_DECLARE_ROW_KERNELS(AVX512)
#endif

#undef PYALIGN_DECLARE_ROW_KERNELS

}  // namespace pyalign::cpu
