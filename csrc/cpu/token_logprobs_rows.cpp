// Vectorised row kernels of the CPU token log-prob op (see token_logprobs_rows.h).
//
// This file is compiled once per instruction set with CPU_CAPABILITY set to DEFAULT, AVX2 or
// AVX512 and the matching compiler flags; at::vec::Vectorized then maps onto those registers.
// It includes only ATen's vector headers (which live in a namespace named after CPU_CAPABILITY)
// and plain C++, so nothing compiled here with wide instructions is shared with the rest of the
// extension.
//
// Forward, per row: one read of the logits, exp once per element (a per-element online max/sum
// update would need two). The row is walked in blocks of kBlock elements (16 KiB as float32,
// resident in L1): the first block's maximum becomes the shift, and each later block yields its
// maximum and its sum of exp(x - shift) in one sweep; the rare block that overshoots the shift a
// lot is summed again from L1 against a new shift (see row_logsumexp). The label's logit is read
// directly. A row whose label is ignored is not read at all (logp = lse = 0; lse is unspecified
// there by the contract), which saves a pass over the prompt tokens of a preference batch.
//
// Backward, per row: one read of the logits and one write of the gradient,
// grad_out = -g * exp(x - lse), then the label's element g * (1 - exp(x_label - lse)) from the
// label logit read before the row was written (so grad_out may be the logits themselves);
// an ignored row is not read either, only zeroed.
//
// Math is float32 for float32/bfloat16/float16 logits and float64 for float64 logits.
#include "token_logprobs_rows.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#ifndef CPU_CAPABILITY
#error "token_logprobs_rows.cpp must be compiled with CPU_CAPABILITY defined (see CMakeLists.txt)"
#endif

namespace pyalign::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements per L1-resident block of the forward pass.
constexpr int64_t kBlock = 4096;

// Accumulation type of each logits type.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// A "chunk" is two accumulation vectors' worth of elements: one Vectorized<BFloat16/Half>
// converts into exactly two Vectorized<float>, so every dtype walks the row in the same unit.
template <typename Acc>
constexpr int64_t chunk_size() {
  return 2 * Vectorized<Acc>::size();
}

inline void load_chunk(const float* p, Vectorized<float>& lo, Vectorized<float>& hi) {
  lo = Vectorized<float>::loadu(p);
  hi = Vectorized<float>::loadu(p + Vectorized<float>::size());
}
inline void load_chunk(const double* p, Vectorized<double>& lo, Vectorized<double>& hi) {
  lo = Vectorized<double>::loadu(p);
  hi = Vectorized<double>::loadu(p + Vectorized<double>::size());
}
template <typename Reduced>
inline void load_chunk(const Reduced* p, Vectorized<float>& lo, Vectorized<float>& hi) {
  static_assert(Vectorized<Reduced>::size() == 2 * Vectorized<float>::size());
  std::tie(lo, hi) = at::vec::convert_to_float<Reduced>(Vectorized<Reduced>::loadu(p));
}

inline void store_chunk(float* p, const Vectorized<float>& lo, const Vectorized<float>& hi) {
  lo.store(p);
  hi.store(p + Vectorized<float>::size());
}
inline void store_chunk(double* p, const Vectorized<double>& lo, const Vectorized<double>& hi) {
  lo.store(p);
  hi.store(p + Vectorized<double>::size());
}
template <typename Reduced>
inline void store_chunk(Reduced* p, const Vectorized<float>& lo, const Vectorized<float>& hi) {
  at::vec::convert_from_float<Reduced>(lo, hi).store(p);
}

// exp_u20 is ATen's polynomial exp (about 20 ulp, what its own softmax kernels use): far inside
// float32 tolerances of a log-softmax. float64 keeps the accurate exp (gradcheck needs it).
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// max that propagates NaN, so a NaN logit gives a NaN lse as in eager PyTorch.
template <typename Acc>
inline Acc nan_max(Acc a, Acc b) {
  return (std::isnan(a) || a >= b) ? a : b;
}

template <typename Acc>
inline Acc horizontal_max(const Vectorized<Acc>& v) {
  Acc lanes[Vectorized<Acc>::size()];
  v.store(lanes);
  Acc best = lanes[0];
  for (int64_t i = 1; i < Vectorized<Acc>::size(); ++i) best = nan_max(best, lanes[i]);
  return best;
}

template <typename Acc>
inline Acc horizontal_sum(const Vectorized<Acc>& v) {
  Acc lanes[Vectorized<Acc>::size()];
  v.store(lanes);
  Acc total = 0;
  for (int64_t i = 0; i < Vectorized<Acc>::size(); ++i) total += lanes[i];
  return total;
}

template <typename T, typename Acc = typename AccType<T>::type>
Acc block_max(const T* x, int64_t n) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kChunk = chunk_size<Acc>();
  Acc result = -std::numeric_limits<Acc>::infinity();
  int64_t i = 0;
  if (n >= kChunk) {
    Vec max_lo(result), max_hi(result), lo, hi;
    for (; i + kChunk <= n; i += kChunk) {
      load_chunk(x + i, lo, hi);
      max_lo = at::vec::maximum(max_lo, lo);
      max_hi = at::vec::maximum(max_hi, hi);
    }
    result = horizontal_max(at::vec::maximum(max_lo, max_hi));
  }
  for (; i < n; ++i) result = nan_max(result, static_cast<Acc>(x[i]));
  return result;
}

template <typename T, typename Acc = typename AccType<T>::type>
Acc block_sum_exp(const T* x, int64_t n, Acc shift) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kChunk = chunk_size<Acc>();
  Acc result = 0;
  int64_t i = 0;
  if (n >= kChunk) {
    const Vec vshift(shift);
    Vec sum_lo(Acc(0)), sum_hi(Acc(0)), lo, hi;
    for (; i + kChunk <= n; i += kChunk) {
      load_chunk(x + i, lo, hi);
      sum_lo += vexp(lo - vshift);
      sum_hi += vexp(hi - vshift);
    }
    result = horizontal_sum(sum_lo + sum_hi);
  }
  for (; i < n; ++i) result += std::exp(static_cast<Acc>(x[i]) - shift);
  return result;
}

// One pass over a block: its maximum and the sum of exp(x - shift) for a given shift.
template <typename T, typename Acc = typename AccType<T>::type>
std::pair<Acc, Acc> block_max_and_sum_exp(const T* x, int64_t n, Acc shift) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kChunk = chunk_size<Acc>();
  Acc max_result = -std::numeric_limits<Acc>::infinity();
  Acc sum_result = 0;
  int64_t i = 0;
  if (n >= kChunk) {
    const Vec vshift(shift);
    Vec max_lo(max_result), max_hi(max_result), sum_lo(Acc(0)), sum_hi(Acc(0)), lo, hi;
    for (; i + kChunk <= n; i += kChunk) {
      load_chunk(x + i, lo, hi);
      max_lo = at::vec::maximum(max_lo, lo);
      max_hi = at::vec::maximum(max_hi, hi);
      sum_lo += vexp(lo - vshift);
      sum_hi += vexp(hi - vshift);
    }
    max_result = horizontal_max(at::vec::maximum(max_lo, max_hi));
    sum_result = horizontal_sum(sum_lo + sum_hi);
  }
  for (; i < n; ++i) {
    const Acc v = static_cast<Acc>(x[i]);
    max_result = nan_max(max_result, v);
    sum_result += std::exp(v - shift);
  }
  return {max_result, sum_result};
}

// A block whose maximum exceeds the shift by at most this much is summed against the old shift:
// each term is at most e^64 and a block sums to at most 4096 * e^64, far from float overflow
// (e^88), and a floating-point sum keeps its relative precision at any scale.
constexpr double kShiftSlack = 64.0;

// log-sum-exp of one row, combined in double (one log per row). The shift is the maximum of the
// first block holding a finite value; later blocks take their maximum and their exp-sum in the
// same sweep, and only a block that overshoots the shift by more than kShiftSlack (or holds a
// NaN or +inf) is summed again, from L1, against its own maximum.
template <typename T, typename Acc = typename AccType<T>::type>
double row_logsumexp(const T* x, int64_t vocab) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  Acc shift = kNegInf;
  double sum = 0.0;  // sum of exp(x - shift) over the blocks so far
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const T* block = x + start;
    if (shift == kNegInf) {  // nothing finite yet: find the shift first
      const Acc block_maximum = block_max(block, n);
      if (block_maximum == kNegInf) continue;
      shift = block_maximum;
      sum = double(block_sum_exp(block, n, shift));
      continue;
    }
    const auto [block_maximum, block_sum] = block_max_and_sum_exp(block, n, shift);
    if (double(block_maximum) - double(shift) <= kShiftSlack) {  // false for NaN too
      sum += double(block_sum);
      continue;
    }
    const Acc new_shift = nan_max(block_maximum, shift);
    sum = sum * std::exp(double(shift) - double(new_shift)) +
          double(block_sum_exp(block, n, new_shift));
    shift = new_shift;
  }
  return double(shift) + std::log(sum);
}

template <typename T>
void forward_rows_typed(const ForwardArgs& args, int64_t row_begin, int64_t row_end) {
  using Acc = typename AccType<T>::type;
  const T* logits = static_cast<const T*>(args.logits);
  Acc* logp = static_cast<Acc*>(args.logp);
  Acc* lse = static_cast<Acc*>(args.lse);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t label = args.labels[row];
    if (label == args.ignore_index) {  // lse is unspecified here: the row is never read
      lse[row] = Acc(0);
      logp[row] = Acc(0);
      continue;
    }
    const int64_t b = row / args.seq_len;
    const int64_t t = row - b * args.seq_len;
    const T* x = logits + b * args.stride_batch + t * args.stride_time;
    const double row_lse = row_logsumexp(x, args.vocab);
    lse[row] = static_cast<Acc>(row_lse);
    logp[row] = static_cast<Acc>(double(static_cast<Acc>(x[label])) - row_lse);
  }
}

template <typename T>
void backward_rows_typed(const BackwardArgs& args, int64_t row_begin, int64_t row_end) {
  using Acc = typename AccType<T>::type;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kChunk = chunk_size<Acc>();
  const T* logits = static_cast<const T*>(args.logits);
  T* grad_out = static_cast<T*>(args.grad_out);
  const Acc* lse = static_cast<const Acc*>(args.lse);
  const Acc* grad = static_cast<const Acc*>(args.grad);
  const int64_t vocab = args.vocab;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / args.seq_len;
    const int64_t t = row - b * args.seq_len;
    const T* x = logits + b * args.stride_batch + t * args.stride_time;
    T* out = grad_out + b * args.out_stride_batch + t * args.out_stride_time;
    const int64_t label = args.labels[row];
    if (label == args.ignore_index) {
      std::memset(static_cast<void*>(out), 0, sizeof(T) * vocab);  // +0.0 is all-zero bits
      continue;
    }
    const Acc row_lse = lse[row];
    const Acc g = grad[row];
    const Acc x_label = static_cast<Acc>(x[label]);  // read before the row may be overwritten
    const Vec vlse(row_lse), vneg_g(-g);
    Vec lo, hi;
    int64_t i = 0;
    for (; i + kChunk <= vocab; i += kChunk) {
      load_chunk(x + i, lo, hi);
      store_chunk(out + i, vneg_g * vexp(lo - vlse), vneg_g * vexp(hi - vlse));
    }
    for (; i < vocab; ++i) out[i] = static_cast<T>(-g * std::exp(static_cast<Acc>(x[i]) - row_lse));
    out[label] = static_cast<T>(g * (Acc(1) - std::exp(x_label - row_lse)));
  }
}

}  // namespace

void forward_rows(const ForwardArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case DType::Float32: return forward_rows_typed<float>(args, row_begin, row_end);
    case DType::BFloat16: return forward_rows_typed<c10::BFloat16>(args, row_begin, row_end);
    case DType::Float16: return forward_rows_typed<c10::Half>(args, row_begin, row_end);
    case DType::Float64: return forward_rows_typed<double>(args, row_begin, row_end);
  }
}

void backward_rows(const BackwardArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.dtype) {
    case DType::Float32: return backward_rows_typed<float>(args, row_begin, row_end);
    case DType::BFloat16: return backward_rows_typed<c10::BFloat16>(args, row_begin, row_end);
    case DType::Float16: return backward_rows_typed<c10::Half>(args, row_begin, row_end);
    case DType::Float64: return backward_rows_typed<double>(args, row_begin, row_end);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace pyalign::cpu
