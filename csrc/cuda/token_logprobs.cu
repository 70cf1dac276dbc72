// CUDA kernels of the token log-prob op (interface and layout: token_logprobs.h).
//
// Memory-bound by design: the forward reads each logit once, the backward reads each once and
// writes each gradient once, so the floor is 3 passes over the logits at copy bandwidth. Rows
// whose label is ignored are never read: the forward writes logp = norm = 0 for them and the
// backward writes zeros.
// - One CTA per row; the block size grows with the vocabulary (32..512 threads).
// - 16-byte loads and stores: a scalar head up to the first 16-byte boundary of the row (rows of
//   odd V, or of logits[:, :-1], start anywhere), a vectorised body, a scalar tail; kUnroll
//   loads are issued before the first use so that enough bytes are in flight.
// - Per thread, an online (max, sum of 2^((y - max) * a log2 e)) in float32, rescaled only when a
//   16-byte pack raises the max; then warp shuffles and one shared-memory step per block. y is
//   the logit, or with a softcap the soft-capped logit (one tanhf per element, kSoftcap).
// - Each row's result is the pair (M, L) = (max y, log of the sum), never one log-sum-exp M + L
//   (at |M| >= 2^24 it rounds L away); y - M is formed first, exact where exp does not
//   underflow, so any finite offset of a row is harmless (pyalign/reference.py).
// - exp is ex2.approx on a scaled difference (one FADD + one FMUL/FFMA + one MUFU per element).
// - Offsets are 64-bit (N * V exceeds 2^31 on real shapes); indices within a row are 32-bit.
#include "token_logprobs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace pyalign::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kUnroll = 4;
constexpr int kMaxThreads = 512;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x with one MUFU instruction (relative error about 2^-22; 2^-inf = 0, NaN stays NaN).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Elem<__half> {
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

// 16 bytes of elements, moved as one uint4.
template <typename T>
struct Pack {
  static constexpr int kSize = 16 / sizeof(T);
  uint4 raw;
  __device__ __forceinline__ float get(int k) const {
    return Elem<T>::to_float(reinterpret_cast<const T*>(&raw)[k]);
  }
  __device__ __forceinline__ void set(int k, float v) {
    reinterpret_cast<T*>(&raw)[k] = Elem<T>::from_float(v);
  }
};

// Forward: read-only cache path. Backward: a plain load, since it may run in place and the
// non-coherent path is only defined for memory that the kernel does not write.
template <typename T>
__device__ __forceinline__ Pack<T> load_pack_readonly(const T* p) {
  return Pack<T>{__ldg(reinterpret_cast<const uint4*>(p))};
}
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return Pack<T>{*reinterpret_cast<const uint4*>(p)};
}
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pack) {
  *reinterpret_cast<uint4*>(p) = pack.raw;
}

// Elements before the first 16-byte boundary of a row (0 when it starts on one).
template <typename T>
__device__ __forceinline__ int head_elements(const T* row, int vocab) {
  const int misaligned_bytes = static_cast<int>(reinterpret_cast<uintptr_t>(row) & 15u);
  const int head = misaligned_bytes == 0 ? 0 : (16 - misaligned_bytes) / static_cast<int>(sizeof(T));
  return head < vocab ? head : vocab;
}

__device__ __forceinline__ const void* row_start(const void* base, int64_t row, int64_t seq_len,
                                                 int64_t stride_batch, int64_t stride_time,
                                                 int elem_bytes) {
  const int64_t b = row / seq_len;
  const int64_t t = row - b * seq_len;
  return static_cast<const char*>(base) + (b * stride_batch + t * stride_time) * elem_bytes;
}

// The transform's constants (token_logprobs.h): y = x, a = logit_scale without a softcap; with
// one, y = cap * tanh(cap_k * x), cap_k = logit_scale / cap, a = 1. dz/dx = grad_scale (times
// 1 - tanh^2 with a softcap).
struct Transform {
  float a;
  float a_log2e;
  float cap_k;
  float cap;
  float grad_scale;
};

Transform transform_of(LogitTransform t) {
  const bool softcap = t.softcap > 0.f;
  const float a = softcap ? 1.f : t.logit_scale;
  return {a, a * kLog2e, softcap ? t.logit_scale / t.softcap : 0.f, t.softcap, t.logit_scale};
}

template <bool kSoftcap>
__device__ __forceinline__ float monotone(float x, const Transform& tr) {
  if constexpr (kSoftcap) return tr.cap * tanhf(x * tr.cap_k);
  return x;
}

// Running max `m` and sum `s` of 2^((y - m) * a log2 e) over the values y seen.
struct MaxSum {
  float m;
  float s;

  __device__ __forceinline__ void add(float y, float a_log2e) {
    if (y > m) {
      s *= fast_exp2((m - y) * a_log2e);  // m = -inf: scale 0, and s was 0
      m = y;
    }
    // y - m first: exact for nearby values at any offset. m still -inf means y is -inf (adds 0).
    s += fast_exp2((y - (m == neg_inf() ? 0.f : m)) * a_log2e);
  }

  template <bool kSoftcap, typename T>
  __device__ __forceinline__ void add(const Pack<T>& pack, const Transform& tr) {
    float y[Pack<T>::kSize];
#pragma unroll
    for (int k = 0; k < Pack<T>::kSize; ++k) y[k] = monotone<kSoftcap>(pack.get(k), tr);
    float pack_max = y[0];
#pragma unroll
    for (int k = 1; k < Pack<T>::kSize; ++k) pack_max = fmaxf(pack_max, y[k]);
    if (pack_max > m) {
      s *= fast_exp2((m - pack_max) * tr.a_log2e);
      m = pack_max;
    }
    // A pack of only -inf with m still -inf adds 2^-inf = 0 (base 0); NaN propagates into s.
    const float base = m == neg_inf() ? 0.f : m;
#pragma unroll
    for (int k = 0; k < Pack<T>::kSize; ++k) s += fast_exp2((y[k] - base) * tr.a_log2e);
  }
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b, float a_log2e) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return {m, 0.f};
  return {m, a.s * fast_exp2((a.m - m) * a_log2e) + b.s * fast_exp2((b.m - m) * a_log2e)};
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum v, float a_log2e) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, other, a_log2e);
  }
  return v;
}

// Result is valid in thread 0. `scratch` holds kThreads / 32 entries.
template <int kThreads>
__device__ __forceinline__ MaxSum block_reduce(MaxSum v, MaxSum* scratch, float a_log2e) {
  v = warp_reduce(v, a_log2e);
  constexpr int kWarps = kThreads / 32;
  if constexpr (kWarps > 1) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
      v = lane < kWarps ? scratch[lane] : MaxSum{neg_inf(), 0.f};
      v = warp_reduce(v, a_log2e);
    }
  }
  return v;
}

template <typename T, int kThreads, bool kSoftcap>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ logits, RowLayout layout, const int64_t* __restrict__ labels,
                   int64_t ignore_index, Transform tr, float* __restrict__ logp, float* __restrict__ norm) {
  __shared__ MaxSum scratch[kThreads / 32];
  constexpr int kVec = Pack<T>::kSize;
  const int vocab = static_cast<int>(layout.vocab);
  const int64_t rows = layout.batch * layout.seq_len;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t label = labels[row];
    // An ignored row is not read (norm is unspecified there by the contract). The branch is
    // uniform over the block, whose threads all work on this row, so skipping the reduction's
    // barriers is safe; the barrier at the end of the previous row already protects scratch.
    if (label == ignore_index) {
      if (threadIdx.x == 0) {
        norm[2 * row] = norm[2 * row + 1] = 0.f;
        logp[row] = 0.f;
      }
      continue;
    }
    const T* x = static_cast<const T*>(row_start(logits, row, layout.seq_len, layout.stride_batch,
                                                 layout.stride_time, sizeof(T)));
    const bool label_ok = label >= 0 && label < vocab;
    float label_logit = 0.f;
    if (threadIdx.x == 0 && label_ok) label_logit = Elem<T>::to_float(x[label]);

    MaxSum state{neg_inf(), 0.f};
    const int head = head_elements(x, vocab);
    for (int i = threadIdx.x; i < head; i += kThreads) {
      state.add(monotone<kSoftcap>(Elem<T>::to_float(x[i]), tr), tr.a_log2e);
    }
    const T* body = x + head;
    const int packs = (vocab - head) / kVec;
    for (int base = threadIdx.x; base < packs; base += kThreads * kUnroll) {
      Pack<T> loaded[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = base + u * kThreads;
        if (p < packs) loaded[u] = load_pack_readonly(body + static_cast<int64_t>(p) * kVec);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < packs) state.add<kSoftcap>(loaded[u], tr);
      }
    }
    for (int i = head + packs * kVec + threadIdx.x; i < vocab; i += kThreads) {
      state.add(monotone<kSoftcap>(Elem<T>::to_float(x[i]), tr), tr.a_log2e);
    }

    state = block_reduce<kThreads>(state, scratch, tr.a_log2e);
    if (threadIdx.x == 0) {
      const float log_sum = log2f(state.s) * kLn2;
      norm[2 * row] = state.m;
      norm[2 * row + 1] = log_sum;
      const float label_y = monotone<kSoftcap>(label_logit, tr);
      logp[row] = label_ok ? (label_y - state.m) * tr.a - log_sum : __int_as_float(0x7fc00000);
    }
    __syncthreads();  // scratch is reused by the next row
  }
}

// One row's constants in the backward: g carries dz/dx's constant factor (logit_scale).
struct RowGrad {
  float g;
  float neg_g;
  float row_max;
  float log_sum_log2;
};

template <bool kSoftcap>
__device__ __forceinline__ float grad_value(float x, int v, int label, const RowGrad& r,
                                            const Transform& tr) {
  float y = x;
  float tanh_kx = 0.f;
  if constexpr (kSoftcap) {
    tanh_kx = tanhf(x * tr.cap_k);
    y = tr.cap * tanh_kx;
  }
  const float p = fast_exp2(fmaf(y - r.row_max, tr.a_log2e, -r.log_sum_log2));
  const float grad = v == label ? r.g * (1.f - p) : r.neg_g * p;
  if constexpr (kSoftcap) return grad * (1.f - tanh_kx * tanh_kx);
  return grad;
}

// kVectorStore: grad_out's row has the same offset from a 16-byte boundary as the logits' row
// (always true in place), so the packs of both line up; otherwise packs are stored elementwise.
template <typename T, int kThreads, bool kVectorStore, bool kSoftcap>
__device__ __forceinline__ void backward_row(const T* __restrict__ x, T* __restrict__ out, int vocab,
                                             int label, const RowGrad& r, const Transform& tr) {
  constexpr int kVec = Pack<T>::kSize;
  const int head = head_elements(x, vocab);
  for (int i = threadIdx.x; i < head; i += kThreads) {
    out[i] = Elem<T>::from_float(grad_value<kSoftcap>(Elem<T>::to_float(x[i]), i, label, r, tr));
  }
  const int packs = (vocab - head) / kVec;
  for (int base = threadIdx.x; base < packs; base += kThreads * kUnroll) {
    Pack<T> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * kThreads;
      if (p < packs) loaded[u] = load_pack(x + head + static_cast<int64_t>(p) * kVec);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = base + u * kThreads;
      if (p >= packs) continue;
      const int first = head + p * kVec;
      Pack<T> result;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        result.set(k, grad_value<kSoftcap>(loaded[u].get(k), first + k, label, r, tr));
      }
      if constexpr (kVectorStore) {
        store_pack(out + first, result);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) out[first + k] = reinterpret_cast<const T*>(&result.raw)[k];
      }
    }
  }
  for (int i = head + packs * kVec + threadIdx.x; i < vocab; i += kThreads) {
    out[i] = Elem<T>::from_float(grad_value<kSoftcap>(Elem<T>::to_float(x[i]), i, label, r, tr));
  }
}

template <typename T, int kThreads>
__device__ __forceinline__ void zero_row(T* out, int vocab) {
  constexpr int kVec = Pack<T>::kSize;
  const int head = head_elements(out, vocab);
  const T zero = Elem<T>::from_float(0.f);
  for (int i = threadIdx.x; i < head; i += kThreads) out[i] = zero;
  const int packs = (vocab - head) / kVec;
  const Pack<T> zeros{make_uint4(0u, 0u, 0u, 0u)};  // +0.0 is all-zero bits in every dtype
  for (int p = threadIdx.x; p < packs; p += kThreads) {
    store_pack(out + head + static_cast<int64_t>(p) * kVec, zeros);
  }
  for (int i = head + packs * kVec + threadIdx.x; i < vocab; i += kThreads) out[i] = zero;
}

template <typename T, int kThreads, bool kSoftcap>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* logits, RowLayout layout, const int64_t* __restrict__ labels,
                    const float* __restrict__ norm, const float* __restrict__ grad,
                    int64_t ignore_index, Transform tr, T* grad_out, int64_t out_stride_batch,
                    int64_t out_stride_time) {
  // logits and grad_out are not __restrict__: they may be the same memory (in-place backward).
  const int vocab = static_cast<int>(layout.vocab);
  const int64_t rows = layout.batch * layout.seq_len;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(row_start(logits, row, layout.seq_len, layout.stride_batch,
                                                 layout.stride_time, sizeof(T)));
    T* out = static_cast<T*>(const_cast<void*>(
        row_start(grad_out, row, layout.seq_len, out_stride_batch, out_stride_time, sizeof(T))));
    const int64_t label = labels[row];
    if (label == ignore_index) {
      zero_row<T, kThreads>(out, vocab);
      continue;
    }
    const bool label_ok = label >= 0 && label < vocab;
    const float g = label_ok ? grad[row] * tr.grad_scale : __int_as_float(0x7fc00000);  // bad label: NaN row
    const RowGrad r{g, -g, norm[2 * row], norm[2 * row + 1] * kLog2e};
    const int label_index = label_ok ? static_cast<int>(label) : -1;
    const bool same_alignment =
        ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
    if (same_alignment) {
      backward_row<T, kThreads, true, kSoftcap>(x, out, vocab, label_index, r, tr);
    } else {
      backward_row<T, kThreads, false, kSoftcap>(x, out, vocab, label_index, r, tr);
    }
  }
}

// Threads per row: about 8 packs per thread, between one warp and kMaxThreads.
int threads_for(int64_t vocab, int elem_bytes) {
  const int64_t packs = vocab * elem_bytes / 16;
  int threads = 32;
  while (threads < kMaxThreads && threads * 8 < packs) threads *= 2;
  return threads;
}

// One CTA per row; the grid-stride loop in the kernels covers rows beyond the grid limit.
unsigned int grid_for(int64_t rows) {
  constexpr int64_t kMaxGrid = 0x7fffffff;
  return static_cast<unsigned int>(rows < kMaxGrid ? rows : kMaxGrid);
}

template <typename T, bool kSoftcap>
cudaError_t forward_typed(const void* logits, RowLayout layout, const int64_t* labels,
                          int64_t ignore_index, Transform tr, float* logp, float* norm,
                          cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  const dim3 grid(grid_for(layout.batch * layout.seq_len));
#define PYALIGN_LAUNCH_FORWARD(threads)                          \
  forward_kernel<T, threads, kSoftcap><<<grid, threads, 0, stream>>>( \
      x, layout, labels, ignore_index, tr, logp, norm)
  switch (threads_for(layout.vocab, sizeof(T))) {
    case 32: PYALIGN_LAUNCH_FORWARD(32); break;
    case 64: PYALIGN_LAUNCH_FORWARD(64); break;
    case 128: PYALIGN_LAUNCH_FORWARD(128); break;
    case 256: PYALIGN_LAUNCH_FORWARD(256); break;
    default: PYALIGN_LAUNCH_FORWARD(512); break;
  }
#undef PYALIGN_LAUNCH_FORWARD
  return cudaGetLastError();
}

template <typename T, bool kSoftcap>
cudaError_t backward_typed(const void* logits, RowLayout layout, const int64_t* labels,
                           const float* norm, const float* grad, int64_t ignore_index, Transform tr,
                           void* grad_out, int64_t out_stride_batch, int64_t out_stride_time,
                           cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  T* out = static_cast<T*>(grad_out);
  const dim3 grid(grid_for(layout.batch * layout.seq_len));
#define PYALIGN_LAUNCH_BACKWARD(threads)                                                 \
  backward_kernel<T, threads, kSoftcap><<<grid, threads, 0, stream>>>(                   \
      x, layout, labels, norm, grad, ignore_index, tr, out, out_stride_batch, out_stride_time)
  switch (threads_for(layout.vocab, sizeof(T))) {
    case 32: PYALIGN_LAUNCH_BACKWARD(32); break;
    case 64: PYALIGN_LAUNCH_BACKWARD(64); break;
    case 128: PYALIGN_LAUNCH_BACKWARD(128); break;
    case 256: PYALIGN_LAUNCH_BACKWARD(256); break;
    default: PYALIGN_LAUNCH_BACKWARD(512); break;
  }
#undef PYALIGN_LAUNCH_BACKWARD
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_dispatch(const void* logits, RowLayout layout, const int64_t* labels,
                             int64_t ignore_index, LogitTransform transform, float* logp,
                             float* norm, cudaStream_t stream) {
  const Transform tr = transform_of(transform);
  if (transform.softcap > 0.f) {
    return forward_typed<T, true>(logits, layout, labels, ignore_index, tr, logp, norm, stream);
  }
  return forward_typed<T, false>(logits, layout, labels, ignore_index, tr, logp, norm, stream);
}

template <typename T>
cudaError_t backward_dispatch(const void* logits, RowLayout layout, const int64_t* labels,
                              const float* norm, const float* grad, int64_t ignore_index,
                              LogitTransform transform, void* grad_out, int64_t out_stride_batch,
                              int64_t out_stride_time, cudaStream_t stream) {
  const Transform tr = transform_of(transform);
  if (transform.softcap > 0.f) {
    return backward_typed<T, true>(logits, layout, labels, norm, grad, ignore_index, tr, grad_out,
                                   out_stride_batch, out_stride_time, stream);
  }
  return backward_typed<T, false>(logits, layout, labels, norm, grad, ignore_index, tr, grad_out,
                                  out_stride_batch, out_stride_time, stream);
}

bool valid_transform(const LogitTransform& t) {
  return std::isfinite(t.logit_scale) && t.logit_scale > 0.f && std::isfinite(t.softcap) && t.softcap >= 0.f;
}

bool valid_layout(const RowLayout& layout) {
  return layout.batch >= 0 && layout.seq_len >= 0 && layout.vocab >= 0 &&
         layout.vocab <= 0x7fffffff;
}

}  // namespace

cudaError_t launch_forward(DType dtype, const void* logits, RowLayout layout,
                           const int64_t* labels, int64_t ignore_index, LogitTransform transform,
                           float* logp, float* norm, cudaStream_t stream) {
  if (!valid_layout(layout) || !valid_transform(transform)) return cudaErrorInvalidValue;
  if (layout.batch * layout.seq_len == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return forward_dispatch<float>(logits, layout, labels, ignore_index, transform, logp, norm, stream);
    case DType::BFloat16:
      return forward_dispatch<__nv_bfloat16>(logits, layout, labels, ignore_index, transform, logp,
                                             norm, stream);
    case DType::Float16:
      return forward_dispatch<__half>(logits, layout, labels, ignore_index, transform, logp, norm, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType dtype, const void* logits, RowLayout layout,
                            const int64_t* labels, const float* norm, const float* grad,
                            int64_t ignore_index, LogitTransform transform, void* grad_out,
                            int64_t out_stride_batch, int64_t out_stride_time, cudaStream_t stream) {
  if (!valid_layout(layout) || !valid_transform(transform)) return cudaErrorInvalidValue;
  if (layout.batch * layout.seq_len == 0 || layout.vocab == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return backward_dispatch<float>(logits, layout, labels, norm, grad, ignore_index, transform,
                                      grad_out, out_stride_batch, out_stride_time, stream);
    case DType::BFloat16:
      return backward_dispatch<__nv_bfloat16>(logits, layout, labels, norm, grad, ignore_index,
                                              transform, grad_out, out_stride_batch,
                                              out_stride_time, stream);
    case DType::Float16:
      return backward_dispatch<__half>(logits, layout, labels, norm, grad, ignore_index, transform,
                                       grad_out, out_stride_batch, out_stride_time, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyalign::cuda
