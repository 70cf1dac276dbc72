// CUDA kernels of the token log-prob op (interface and layout: token_logprobs.h).
//
// Memory-bound by design: the forward reads each logit once, the backward reads each once and
// writes each gradient once, so the floor is 3 passes over the logits at copy bandwidth. Rows
// whose label is ignored are never read: the forward writes logp = lse = 0 for them and the
// backward writes zeros.
// - One CTA per row; the block size grows with the vocabulary (32..512 threads).
// - 16-byte loads and stores: a scalar head up to the first 16-byte boundary of the row (rows of
//   odd V, or of logits[:, :-1], start anywhere), a vectorised body, a scalar tail; kUnroll
//   loads are issued before the first use so that enough bytes are in flight.
// - Per thread, an online (max, sum of 2^((x - max) * log2 e)) in float32, rescaled only when a
//   16-byte pack raises the max; then warp shuffles and one shared-memory step per block.
// - exp is ex2.approx on a pre-scaled argument (one FFMA + one MUFU per element).
// - Offsets are 64-bit (N * V exceeds 2^31 on real shapes); indices within a row are 32-bit.
#include "token_logprobs.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// Running max `m` and sum `s` of 2^((x - m) * log2 e) over the values seen.
struct MaxSum {
  float m;
  float s;

  __device__ __forceinline__ void add(float x) {
    if (x > m) {
      s *= fast_exp2((m - x) * kLog2e);  // m = -inf: scale 0, and s was 0
      m = x;
    }
    s += fast_exp2(fmaf(x, kLog2e, m == neg_inf() ? 0.f : -m * kLog2e));
  }

  template <typename T>
  __device__ __forceinline__ void add(const Pack<T>& pack) {
    float pack_max = pack.get(0);
#pragma unroll
    for (int k = 1; k < Pack<T>::kSize; ++k) pack_max = fmaxf(pack_max, pack.get(k));
    if (pack_max > m) {
      s *= fast_exp2((m - pack_max) * kLog2e);
      m = pack_max;
    }
    // A pack of only -inf with m still -inf adds 2^-inf = 0 (shift 0); NaN propagates into s.
    const float shift = m == neg_inf() ? 0.f : -m * kLog2e;
#pragma unroll
    for (int k = 0; k < Pack<T>::kSize; ++k) s += fast_exp2(fmaf(pack.get(k), kLog2e, shift));
  }
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return {m, 0.f};
  return {m, a.s * fast_exp2((a.m - m) * kLog2e) + b.s * fast_exp2((b.m - m) * kLog2e)};
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, other);
  }
  return v;
}

// Result is valid in thread 0. `scratch` holds kThreads / 32 entries.
template <int kThreads>
__device__ __forceinline__ MaxSum block_reduce(MaxSum v, MaxSum* scratch) {
  v = warp_reduce(v);
  constexpr int kWarps = kThreads / 32;
  if constexpr (kWarps > 1) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
      v = lane < kWarps ? scratch[lane] : MaxSum{neg_inf(), 0.f};
      v = warp_reduce(v);
    }
  }
  return v;
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ logits, RowLayout layout, const int64_t* __restrict__ labels,
                   int64_t ignore_index, float* __restrict__ logp, float* __restrict__ lse) {
  __shared__ MaxSum scratch[kThreads / 32];
  constexpr int kVec = Pack<T>::kSize;
  const int vocab = static_cast<int>(layout.vocab);
  const int64_t rows = layout.batch * layout.seq_len;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t label = labels[row];
    // An ignored row is not read (lse is unspecified there by the contract). The branch is
    // uniform over the block, whose threads all work on this row, so skipping the reduction's
    // barriers is safe; the barrier at the end of the previous row already protects scratch.
    if (label == ignore_index) {
      if (threadIdx.x == 0) {
        lse[row] = 0.f;
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
    for (int i = threadIdx.x; i < head; i += kThreads) state.add(Elem<T>::to_float(x[i]));
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
        if (base + u * kThreads < packs) state.add(loaded[u]);
      }
    }
    for (int i = head + packs * kVec + threadIdx.x; i < vocab; i += kThreads) {
      state.add(Elem<T>::to_float(x[i]));
    }

    state = block_reduce<kThreads>(state, scratch);
    if (threadIdx.x == 0) {
      const float row_lse = state.m + log2f(state.s) * kLn2;
      lse[row] = row_lse;
      logp[row] = label_ok ? label_logit - row_lse : __int_as_float(0x7fc00000);
    }
    __syncthreads();  // scratch is reused by the next row
  }
}

__device__ __forceinline__ float grad_value(float x, int v, int label, float g, float neg_g,
                                            float lse_log2) {
  const float p = fast_exp2(fmaf(x, kLog2e, -lse_log2));
  return v == label ? g * (1.f - p) : neg_g * p;
}

// kVectorStore: grad_out's row has the same offset from a 16-byte boundary as the logits' row
// (always true in place), so the packs of both line up; otherwise packs are stored elementwise.
template <typename T, int kThreads, bool kVectorStore>
__device__ __forceinline__ void backward_row(const T* __restrict__ x, T* __restrict__ out, int vocab,
                                             int label, float g, float lse_value) {
  constexpr int kVec = Pack<T>::kSize;
  const float neg_g = -g;
  const float lse_log2 = lse_value * kLog2e;
  const int head = head_elements(x, vocab);
  for (int i = threadIdx.x; i < head; i += kThreads) {
    out[i] = Elem<T>::from_float(grad_value(Elem<T>::to_float(x[i]), i, label, g, neg_g, lse_log2));
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
        result.set(k, grad_value(loaded[u].get(k), first + k, label, g, neg_g, lse_log2));
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
    out[i] = Elem<T>::from_float(grad_value(Elem<T>::to_float(x[i]), i, label, g, neg_g, lse_log2));
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

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* logits, RowLayout layout, const int64_t* __restrict__ labels,
                    const float* __restrict__ lse, const float* __restrict__ grad,
                    int64_t ignore_index, T* grad_out, int64_t out_stride_batch,
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
    const float g = label_ok ? grad[row] : __int_as_float(0x7fc00000);  // bad label: NaN row
    const int label_index = label_ok ? static_cast<int>(label) : -1;
    const bool same_alignment =
        ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
    if (same_alignment) {
      backward_row<T, kThreads, true>(x, out, vocab, label_index, g, lse[row]);
    } else {
      backward_row<T, kThreads, false>(x, out, vocab, label_index, g, lse[row]);
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

template <typename T>
cudaError_t forward_typed(const void* logits, RowLayout layout, const int64_t* labels,
                          int64_t ignore_index, float* logp, float* lse, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  const dim3 grid(grid_for(layout.batch * layout.seq_len));
  switch (threads_for(layout.vocab, sizeof(T))) {
    case 32: forward_kernel<T, 32><<<grid, 32, 0, stream>>>(x, layout, labels, ignore_index, logp, lse); break;
    case 64: forward_kernel<T, 64><<<grid, 64, 0, stream>>>(x, layout, labels, ignore_index, logp, lse); break;
    case 128: forward_kernel<T, 128><<<grid, 128, 0, stream>>>(x, layout, labels, ignore_index, logp, lse); break;
    case 256: forward_kernel<T, 256><<<grid, 256, 0, stream>>>(x, layout, labels, ignore_index, logp, lse); break;
    default: forward_kernel<T, 512><<<grid, 512, 0, stream>>>(x, layout, labels, ignore_index, logp, lse); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const void* logits, RowLayout layout, const int64_t* labels,
                           const float* lse, const float* grad, int64_t ignore_index,
                           void* grad_out, int64_t out_stride_batch, int64_t out_stride_time,
                           cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  T* out = static_cast<T*>(grad_out);
  const dim3 grid(grid_for(layout.batch * layout.seq_len));
#define PYALIGN_LAUNCH_BACKWARD(threads)                                                 \
  backward_kernel<T, threads><<<grid, threads, 0, stream>>>(                             \
      x, layout, labels, lse, grad, ignore_index, out, out_stride_batch, out_stride_time)
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

bool valid_layout(const RowLayout& layout) {
  return layout.batch >= 0 && layout.seq_len >= 0 && layout.vocab >= 0 &&
         layout.vocab <= 0x7fffffff;
}

}  // namespace

cudaError_t launch_forward(DType dtype, const void* logits, RowLayout layout,
                           const int64_t* labels, int64_t ignore_index, float* logp, float* lse,
                           cudaStream_t stream) {
  if (!valid_layout(layout)) return cudaErrorInvalidValue;
  if (layout.batch * layout.seq_len == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return forward_typed<float>(logits, layout, labels, ignore_index, logp, lse, stream);
    case DType::BFloat16:
      return forward_typed<__nv_bfloat16>(logits, layout, labels, ignore_index, logp, lse, stream);
    case DType::Float16:
      return forward_typed<__half>(logits, layout, labels, ignore_index, logp, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(DType dtype, const void* logits, RowLayout layout,
                            const int64_t* labels, const float* lse, const float* grad,
                            int64_t ignore_index, void* grad_out, int64_t out_stride_batch,
                            int64_t out_stride_time, cudaStream_t stream) {
  if (!valid_layout(layout)) return cudaErrorInvalidValue;
  if (layout.batch * layout.seq_len == 0 || layout.vocab == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return backward_typed<float>(logits, layout, labels, lse, grad, ignore_index, grad_out,
                                   out_stride_batch, out_stride_time, stream);
    case DType::BFloat16:
      return backward_typed<__nv_bfloat16>(logits, layout, labels, lse, grad, ignore_index,
                                           grad_out, out_stride_batch, out_stride_time, stream);
    case DType::Float16:
      return backward_typed<__half>(logits, layout, labels, lse, grad, ignore_index, grad_out,
                                    out_stride_batch, out_stride_time, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pyalign::cuda
