// The "cpu" backend of the token log-prob op: tensor checks, outputs, threading, and the choice
// of row kernel by instruction set. The contract is docs/DESIGN.md ("Backend contract").
#include "token_logprobs.h"

#include "token_logprobs_rows.h"
#include "tensor_checks.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace pyalign::cpu {
namespace {

struct RowKernels {
  std::string name;
  ForwardRowsFn forward;
  BackwardRowsFn backward;
};

// Every compiled variant, narrowest first.
const std::vector<RowKernels>& compiled_kernels() {
  static const std::vector<RowKernels> kernels = [] {
    std::vector<RowKernels> all{{"DEFAULT", DEFAULT::forward_rows, DEFAULT::backward_rows}};
#ifdef PYALIGN_CPU_HAVE_AVX2
    all.push_back({"AVX2", AVX2::forward_rows, AVX2::backward_rows});
#endif
#ifdef PYALIGN_CPU_HAVE_AVX512
    all.push_back({"AVX512", AVX512::forward_rows, AVX512::backward_rows});
#endif
    return all;
  }();
  return kernels;
}

// Whether the running CPU can execute the kernels compiled for `name`. ATen's own capability
// (at::get_cpu_capability) already accounts for the hardware and for ATEN_CPU_CAPABILITY; the
// cpuid check keeps an explicit choice (set_capability) from running illegal instructions.
bool cpu_supports(const std::string& name) {
  if (name == "DEFAULT") return true;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (name == "AVX2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }
#endif
  return false;
}

int rank(const std::string& name) {
  if (name == "AVX512") return 2;
  if (name == "AVX2") return 1;
  return 0;
}

std::mutex selection_mutex;
const RowKernels* selected = nullptr;

// The widest variant that both ATen's CPU capability and the CPU allow, chosen on first use.
const RowKernels& row_kernels() {
  std::lock_guard<std::mutex> lock(selection_mutex);
  if (selected == nullptr) {
    const int allowed = rank(at::get_cpu_capability());
    for (const auto& kernels : compiled_kernels()) {
      if (rank(kernels.name) <= allowed && cpu_supports(kernels.name)) selected = &kernels;
    }
  }
  return *selected;
}

DType dtype_of(const at::Tensor& logits3) {
  switch (logits3.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    case at::kDouble: return DType::Float64;
    default:
      TORCH_CHECK_VALUE(false, "logits3: expected float32, bfloat16, float16 or float64, got ",
                        logits3.scalar_type());
  }
  return DType::Float32;  // unreachable
}

at::ScalarType acc_type_of(const at::Tensor& logits3) {
  return logits3.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const at::Tensor& logits3) {
  checks::check_logits_layout(logits3, "logits3", c10::DeviceType::CPU);
  dtype_of(logits3);
}

// Every label must index the row or be ignore_index: the kernels read logits[row, label].
void check_label_values(const at::Tensor& labels2, int64_t vocab, int64_t ignore_index) {
  const int64_t* labels = labels2.const_data_ptr<int64_t>();
  const int64_t n = labels2.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = labels[i];
    TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < vocab), "labels2: value ",
                      label, " at flat position ", i, " is outside [0, ", vocab,
                      ") and is not ignore_index (", ignore_index, ")");
  }
}

// Which of ATen's worker threads ran a chunk of the last forward or backward (bit t = thread t,
// threads past 63 share bit 63). One relaxed atomic per chunk, not per row: cheap, and it lets a
// test check that the kernels really run on several threads (a build without OpenMP compiles
// at::parallel_for to a serial loop without any error).
std::atomic<uint64_t> threads_seen{0};

void note_thread() {
  const int tid = std::min(at::get_thread_num(), 63);
  threads_seen.fetch_or(uint64_t{1} << tid, std::memory_order_relaxed);
}

template <typename Fn>
void parallel_rows(int64_t rows, int64_t grain, const Fn& fn) {
  threads_seen.store(0, std::memory_order_relaxed);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    note_thread();
    fn(begin, end);
  });
}

// Rows per task of at::parallel_for: at least ATen's usual 32k elements of work per task.
int64_t grain_rows(int64_t vocab) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(vocab, 1));
}

}  // namespace

std::string capability() { return row_kernels().name; }

int threads_used_by_last_call() {
  return std::popcount(threads_seen.load(std::memory_order_relaxed));
}

std::vector<std::string> capabilities() {
  std::vector<std::string> names;
  for (const auto& kernels : compiled_kernels()) {
    if (cpu_supports(kernels.name)) names.push_back(kernels.name);
  }
  return names;
}

void set_capability(const std::string& name) {
  std::lock_guard<std::mutex> lock(selection_mutex);
  for (const auto& kernels : compiled_kernels()) {
    if (kernels.name == name) {
      TORCH_CHECK_VALUE(cpu_supports(name), "capability: this CPU cannot run ", name);
      selected = &kernels;
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "capability: ", name, " is not compiled in; available: ",
                    c10::Join(", ", capabilities()));
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits3, const at::Tensor& labels2,
                                           int64_t ignore_index, double logit_scale,
                                           std::optional<double> softcap) {
  check_logits(logits3);
  checks::check_rows(labels2, "labels2", logits3, at::kLong);
  const Transform transform{logit_scale, checks::check_transform(logit_scale, softcap)};
  const int64_t vocab = logits3.size(2);
  check_label_values(labels2, vocab, ignore_index);

  const auto out_options = logits3.options().dtype(acc_type_of(logits3));
  at::Tensor logp2 = at::empty({logits3.size(0), logits3.size(1)}, out_options);
  at::Tensor norm2 = at::empty({logits3.size(0), logits3.size(1), 2}, out_options);
  const int64_t rows = logp2.numel();
  if (rows == 0) return {logp2, norm2};

  const ForwardArgs args{dtype_of(logits3), logits3.const_data_ptr(), logits3.size(1), vocab,
                         logits3.stride(0), logits3.stride(1), labels2.const_data_ptr<int64_t>(),
                         ignore_index, transform, logp2.mutable_data_ptr(),
                         norm2.mutable_data_ptr()};
  const ForwardRowsFn forward_rows = row_kernels().forward;
  parallel_rows(rows, grain_rows(vocab), [&](int64_t begin, int64_t end) { forward_rows(args, begin, end); });
  return {logp2, norm2};
}

void backward(const at::Tensor& logits3, const at::Tensor& labels2, const at::Tensor& norm2,
              const at::Tensor& grad2, int64_t ignore_index, const at::Tensor& grad_out3,
              double logit_scale, std::optional<double> softcap) {
  check_logits(logits3);
  checks::check_rows(labels2, "labels2", logits3, at::kLong);
  checks::check_norm(norm2, "norm2", logits3, acc_type_of(logits3));
  checks::check_rows(grad2, "grad2", logits3, acc_type_of(logits3));
  checks::check_grad_out(logits3, grad_out3);
  const Transform transform{logit_scale, checks::check_transform(logit_scale, softcap)};
  const int64_t vocab = logits3.size(2);
  check_label_values(labels2, vocab, ignore_index);
  const int64_t rows = labels2.numel();
  if (rows == 0 || vocab == 0) return;

  const BackwardArgs args{dtype_of(logits3),
                          logits3.const_data_ptr(),
                          logits3.size(1),
                          vocab,
                          logits3.stride(0),
                          logits3.stride(1),
                          labels2.const_data_ptr<int64_t>(),
                          ignore_index,
                          transform,
                          norm2.const_data_ptr(),
                          grad2.const_data_ptr(),
                          grad_out3.mutable_data_ptr(),
                          grad_out3.stride(0),
                          grad_out3.stride(1)};
  const BackwardRowsFn backward_rows = row_kernels().backward;
  parallel_rows(rows, grain_rows(vocab), [&](int64_t begin, int64_t end) { backward_rows(args, begin, end); });
}

}  // namespace pyalign::cpu
