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
// maximum and its sum of exp(a (y - shift)) in one sweep; the rare block that overshoots the
// shift a lot is summed again from L1 against a new shift (see row_normaliser). The row's
// normaliser is kept as the pair (M, L) = (max y, log sum exp(a (y - M))), never as one
// log-sum-exp M + L: at |M| >= 2^24 a float32 log-sum-exp rounds L away (pyalign/reference.py).
// The label's logit is read directly. A row whose label is ignored is not read at all (logp =
// norm = 0; norm is unspecified there by the contract), which saves a pass over the prompt tokens
// of a preference batch.
//
// Backward, per row: one read of the logits and one write of the gradient,
// grad_out = -g * exp(-L) * exp(a (y - M)) * dz/dx, then the label's element from the label logit
// read before the row was written (so grad_out may be the logits themselves); an ignored row is not
// read either, only zeroed. y - M is formed before anything else touches it: two values of one
// row, so exact where exp does not underflow, at any offset of the row.
//
// The transform is a template parameter (Plain: z = x; Scale: z = a x; Softcap: z = y =
// c tanh(k x)), so the plain path compiles to what it was without transforms.
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

// tanh for the soft-cap: (1 - e) / (1 + e) with e = exp(-2|u|) (Sleef's 1-ulp exp), u's sign
// restored; below |u| = 0.25, where 1 - e cancels, the odd Taylor polynomial to u^11. Within 1.5
// ulp of tanh over [-12, 12] and about 2x cheaper here than Sleef's tanh, which made a soft-capped
// pass ~8x the plain one. float64 keeps the library's tanh (gradcheck needs it).
inline Vectorized<float> vtanh(const Vectorized<float>& u) {
  using Vec = Vectorized<float>;
  const Vec one(1.f);
  const Vec abs_u = u.abs();
  const Vec e = (abs_u * Vec(-2.f)).exp();
  const Vec large = (one - e) / (one + e);
  const Vec small_u = at::vec::minimum(abs_u, Vec(0.25f));
  const Vec u2 = small_u * small_u;
  Vec poly = at::vec::fmadd(u2, Vec(-0.008863235529902197f), Vec(0.021869488536155203f));
  poly = at::vec::fmadd(u2, poly, Vec(-0.05396825396825397f));
  poly = at::vec::fmadd(u2, poly, Vec(0.13333333333333333f));
  poly = at::vec::fmadd(u2, poly, Vec(-0.3333333333333333f));
  const Vec small = at::vec::fmadd(small_u * u2, poly, small_u);
  const Vec t = Vec::blendv(large, small, abs_u < Vec(0.25f));
  return Vec::blendv(t, Vec(0.f) - t, u < Vec(0.f));
}
inline Vectorized<double> vtanh(const Vectorized<double>& u) { return u.tanh(); }

// max that propagates NaN, so a NaN logit gives a NaN normaliser as in eager PyTorch.
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

enum class Mode { Plain, Scale, Softcap };

// y(x), the exponent a (y - shift) and dz/dx of one transform, in Acc (scalar and vector).
template <Mode kMode, typename Acc>
struct Map {
  Acc a;  // exponent scale: logit_scale (Scale), 1 (Plain, Softcap)
  Acc k;  // logit_scale / softcap (Softcap)
  Acc c;  // softcap (Softcap)
  Acc s;  // logit_scale: dz/dx = s (Scale), s (1 - tanh^2) (Softcap)

  static Map from(const Transform& transform) {
    Map map{Acc(1), Acc(0), Acc(0), Acc(transform.logit_scale)};
    if constexpr (kMode == Mode::Scale) map.a = Acc(transform.logit_scale);
    if constexpr (kMode == Mode::Softcap) {
      map.k = Acc(transform.logit_scale / transform.softcap);
      map.c = Acc(transform.softcap);
    }
    return map;
  }

  Acc y(Acc x) const {
    if constexpr (kMode == Mode::Softcap) return c * std::tanh(x * k);
    return x;
  }
  Vectorized<Acc> y(const Vectorized<Acc>& x) const {
    if constexpr (kMode == Mode::Softcap) return Vectorized<Acc>(c) * vtanh(x * Vectorized<Acc>(k));
    return x;
  }
  Vectorized<Acc> exponent(const Vectorized<Acc>& y_value, const Vectorized<Acc>& shift) const {
    if constexpr (kMode == Mode::Scale) return (y_value - shift) * Vectorized<Acc>(a);
    return y_value - shift;
  }
  Acc exponent(Acc y_value, Acc shift) const {
    if constexpr (kMode == Mode::Scale) return (y_value - shift) * a;
    return y_value - shift;
  }
};

template <Mode kMode, typename T, typename Acc = typename AccType<T>::type>
Acc block_sum_exp(const Map<kMode, Acc>& map, const T* x, int64_t n, Acc shift) {
  using Vec = Vectorized<Acc>;
  constexpr int64_t kChunk = chunk_size<Acc>();
  Acc result = 0;
  int64_t i = 0;
  if (n >= kChunk) {
    const Vec vshift(shift);
    Vec sum_lo(Acc(0)), sum_hi(Acc(0)), lo, hi;
    for (; i + kChunk <= n; i += kChunk) {
      load_chunk(x + i, lo, hi);
      sum_lo += vexp(map.exponent(map.y(lo), vshift));
      sum_hi += vexp(map.exponent(map.y(hi), vshift));
    }
    result = horizontal_sum(sum_lo + sum_hi);
  }
  for (; i < n; ++i) result += std::exp(map.exponent(map.y(static_cast<Acc>(x[i])), shift));
  return result;
}

// One pass over a block: the maximum of its logits x and the sum of exp(a (y - shift)).
template <Mode kMode, typename T, typename Acc = typename AccType<T>::type>
std::pair<Acc, Acc> block_max_and_sum_exp(const Map<kMode, Acc>& map, const T* x, int64_t n,
                                          Acc shift) {
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
      sum_lo += vexp(map.exponent(map.y(lo), vshift));
      sum_hi += vexp(map.exponent(map.y(hi), vshift));
    }
    max_result = horizontal_max(at::vec::maximum(max_lo, max_hi));
    sum_result = horizontal_sum(sum_lo + sum_hi);
  }
  for (; i < n; ++i) {
    const Acc v = static_cast<Acc>(x[i]);
    max_result = nan_max(max_result, v);
    sum_result += std::exp(map.exponent(map.y(v), shift));
  }
  return {max_result, sum_result};
}

// A block whose maximum exceeds the shift by at most this much (in a (y - shift)) is summed
// against the old shift: each term is at most e^64 and a block sums to at most 4096 * e^64, far
// from float overflow (e^88), and a floating-point sum keeps its relative precision at any scale.
constexpr double kShiftSlack = 64.0;

// (M, L) of one row (the header's contract), combined in double (one log per row). Maxima are
// taken over the logits x and mapped through y (increasing), so the max pass needs no tanh. The
// shift is y of the maximum of the first block whose y is above -inf (a soft-capped -inf logit
// is -softcap, and counts); later blocks take their maximum and their exp-sum in the same sweep,
// and only a block that overshoots the shift by more than kShiftSlack (or holds a NaN or +inf)
// is summed again, from L1, against its own maximum. The sum is finally re-expressed against the
// row's maximum M.
template <Mode kMode, typename T, typename Acc = typename AccType<T>::type>
std::pair<Acc, double> row_normaliser(const Map<kMode, Acc>& map, const T* x, int64_t vocab) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  Acc shift = kNegInf;    // in y
  Acc row_max = kNegInf;  // in y
  double sum = 0.0;       // sum of exp(a (y - shift)) over the blocks so far
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const T* block = x + start;
    if (shift == kNegInf) {  // nothing above -inf yet: find the shift first
      const Acc block_maximum = map.y(block_max(block, n));
      if (block_maximum == kNegInf) continue;
      shift = row_max = block_maximum;
      sum = double(block_sum_exp(map, block, n, shift));
      continue;
    }
    const auto [block_max_x, block_sum] = block_max_and_sum_exp(map, block, n, shift);
    const Acc block_maximum = map.y(block_max_x);
    row_max = nan_max(block_maximum, row_max);
    // false for NaN too
    if (double(map.a) * (double(block_maximum) - double(shift)) <= kShiftSlack) {
      sum += double(block_sum);
      continue;
    }
    const Acc new_shift = nan_max(block_maximum, shift);
    sum = sum * std::exp(double(map.a) * (double(shift) - double(new_shift))) +
          double(block_sum_exp(map, block, n, new_shift));
    shift = new_shift;
  }
  // A row of -inf (unless soft-capped) has M = -inf and L = log 0 - NaN = NaN, as the reference.
  return {row_max, std::log(sum) + double(map.a) * (double(shift) - double(row_max))};
}

template <Mode kMode, typename T>
void forward_rows_mode(const ForwardArgs& args, int64_t row_begin, int64_t row_end) {
  using Acc = typename AccType<T>::type;
  const auto map = Map<kMode, Acc>::from(args.transform);
  const T* logits = static_cast<const T*>(args.logits);
  Acc* logp = static_cast<Acc*>(args.logp);
  Acc* norm = static_cast<Acc*>(args.norm);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t label = args.labels[row];
    if (label == args.ignore_index) {  // norm is unspecified here: the row is never read
      norm[2 * row] = norm[2 * row + 1] = Acc(0);
      logp[row] = Acc(0);
      continue;
    }
    const int64_t b = row / args.seq_len;
    const int64_t t = row - b * args.seq_len;
    const T* x = logits + b * args.stride_batch + t * args.stride_time;
    const auto [row_max, log_sum] = row_normaliser(map, x, args.vocab);
    norm[2 * row] = row_max;
    norm[2 * row + 1] = static_cast<Acc>(log_sum);
    const double label_y = double(map.y(static_cast<Acc>(x[label])));
    logp[row] = static_cast<Acc>(double(map.a) * (label_y - double(row_max)) - log_sum);
  }
}

template <Mode kMode, typename T>
void backward_rows_mode(const BackwardArgs& args, int64_t row_begin, int64_t row_end) {
  using Acc = typename AccType<T>::type;
  using Vec = Vectorized<Acc>;
  constexpr int64_t kChunk = chunk_size<Acc>();
  const auto map = Map<kMode, Acc>::from(args.transform);
  const T* logits = static_cast<const T*>(args.logits);
  T* grad_out = static_cast<T*>(args.grad_out);
  const Acc* norm = static_cast<const Acc*>(args.norm);
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
    const Acc row_max = norm[2 * row];
    // p = exp(a (y - M)) * exp(-L): exp(-L) (at most 1) rides on the row's constant, so the plain
    // path costs what it did with one log-sum-exp (one subtraction before the exp), and y - M
    // stays the first operation on y.
    const Acc inv_sum = static_cast<Acc>(std::exp(-double(norm[2 * row + 1])));
    // dz/dx's constant factor goes into the upstream gradient: -g p for Plain, -g a p for Scale,
    // -g s (1 - tanh^2) p for Softcap.
    const Acc g = kMode == Mode::Plain ? grad[row] : grad[row] * map.s;
    const Acc x_label = static_cast<Acc>(x[label]);  // read before the row may be overwritten
    const Vec vmax(row_max), vneg_g_inv_sum(-g * inv_sum);
    Vec lo, hi;
    int64_t i = 0;
    if constexpr (kMode == Mode::Softcap) {
      const Vec vk(map.k), vc(map.c), one(Acc(1));
      auto grad_of = [&](const Vec& v) {
        const Vec tanh_kx = vtanh(v * vk);
        return vneg_g_inv_sum * vexp(vc * tanh_kx - vmax) * (one - tanh_kx * tanh_kx);
      };
      for (; i + kChunk <= vocab; i += kChunk) {
        load_chunk(x + i, lo, hi);
        store_chunk(out + i, grad_of(lo), grad_of(hi));
      }
    } else {
      for (; i + kChunk <= vocab; i += kChunk) {
        load_chunk(x + i, lo, hi);
        store_chunk(out + i, vneg_g_inv_sum * vexp(map.exponent(lo, vmax)),
                    vneg_g_inv_sum * vexp(map.exponent(hi, vmax)));
      }
    }
    auto scalar_grad = [&](Acc v, Acc onehot) {
      const Acc p = std::exp(map.exponent(map.y(v), row_max)) * inv_sum;
      if constexpr (kMode == Mode::Softcap) {
        const Acc tanh_kx = std::tanh(v * map.k);
        return g * (onehot - p) * (Acc(1) - tanh_kx * tanh_kx);
      }
      return g * (onehot - p);
    };
    for (; i < vocab; ++i) out[i] = static_cast<T>(scalar_grad(static_cast<Acc>(x[i]), Acc(0)));
    out[label] = static_cast<T>(scalar_grad(x_label, Acc(1)));
  }
}

template <typename T>
void forward_rows_typed(const ForwardArgs& args, int64_t begin, int64_t end) {
  if (args.transform.softcap > 0) return forward_rows_mode<Mode::Softcap, T>(args, begin, end);
  if (args.transform.logit_scale != 1.0) return forward_rows_mode<Mode::Scale, T>(args, begin, end);
  forward_rows_mode<Mode::Plain, T>(args, begin, end);
}

template <typename T>
void backward_rows_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  if (args.transform.softcap > 0) return backward_rows_mode<Mode::Softcap, T>(args, begin, end);
  if (args.transform.logit_scale != 1.0) return backward_rows_mode<Mode::Scale, T>(args, begin, end);
  backward_rows_mode<Mode::Plain, T>(args, begin, end);
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
