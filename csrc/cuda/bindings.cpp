// CUDA implementations of the prefopt_fast::row_* ops (defined in csrc/cpu/bindings.cpp)
// through the LibTorch stable ABI. Compiled by the host compiler; the kernels live in the
// nvcc-compiled forward.cu / backward.cu behind the plain interface of
// row_kernels_cuda.h. Also exports prefopt_fast_cuda_build_info() (C linkage, read by
// prefopt_fast/_build_info.py through ctypes): the CUDA version and architectures built in.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <utility>
#include <vector>

#include "row_kernels_cuda.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int64_t kStatKl = 16;  // prefopt_fast._rows.STAT_KL

// logits [..., V]: CUDA, fp32/bf16/fp16, last stride 1. Leading dims are coalesced where
// their strides allow, so a contiguous tensor (or logits[:, :-1]) has 1 (or 2) of them.
prefopt_cuda::Rows rows_view(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), "prefopt_fast cuda kernels: ", name, " must be a CUDA tensor");
  const int64_t nd = t.dim();
  STD_TORCH_CHECK(nd >= 1, "prefopt_fast cuda kernels: ", name, " must have at least 1 dimension [..., V]");
  prefopt_cuda::Rows L;
  const ScalarType st = t.scalar_type();
  if (st == ScalarType::Float) {
    L.dtype = prefopt_cuda::kF32;
  } else if (st == ScalarType::BFloat16) {
    L.dtype = prefopt_cuda::kBF16;
  } else if (st == ScalarType::Half) {
    L.dtype = prefopt_cuda::kF16;
  } else {
    STD_TORCH_CHECK(false, "prefopt_fast cuda kernels: ", name, " must be float32, bfloat16 or float16");
  }
  L.V = t.size(nd - 1);
  STD_TORCH_CHECK(L.V <= 1 || t.stride(nd - 1) == 1, "prefopt_fast cuda kernels: ", name,
                  " must have stride 1 in its last dimension, got ", t.stride(nd - 1));
  L.data = t.data_ptr();  // storage offset applied
  STD_TORCH_CHECK(L.V == 0 || reinterpret_cast<uintptr_t>(L.data) % t.element_size() == 0,
                  "prefopt_fast cuda kernels: ", name, " is not aligned to its element size");
  L.rows = 1;
  L.nlead = 0;
  for (int64_t d = 0; d < nd - 1; ++d) {
    const int64_t s = t.size(d), str = t.stride(d);
    L.rows *= s;
    if (s == 1) continue;
    if (L.nlead > 0 && L.lead_strides[L.nlead - 1] == str * s) {  // merge into the previous dim
      L.lead_sizes[L.nlead - 1] *= s;
      L.lead_strides[L.nlead - 1] = str;
      continue;
    }
    STD_TORCH_CHECK(L.nlead < prefopt_cuda::kMaxLeadDims, "prefopt_fast cuda kernels: too many dimensions");
    L.lead_sizes[L.nlead] = s;
    L.lead_strides[L.nlead] = str;
    ++L.nlead;
  }
  if (L.rows == 0) L.nlead = 0;
  return L;
}

void check_vec(const Tensor& t, const char* name, ScalarType st, const char* st_name, int64_t n,
               int32_t device) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == device, "prefopt_fast cuda kernels: ", name,
                  " must be on the device of logits (cuda:", device, ")");
  STD_TORCH_CHECK(t.scalar_type() == st, "prefopt_fast cuda kernels: ", name, " must be ", st_name);
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "prefopt_fast cuda kernels: ", name,
                  " must have shape [N] with N = logits.numel() / V = ", n);
  STD_TORCH_CHECK(n <= 1 || t.stride(0) == 1, "prefopt_fast cuda kernels: ", name, " must be contiguous");
}

// ref_logits: same shape, dtype and device as logits, its own strides.
prefopt_cuda::Rows ref_view(const Tensor& logits, const Tensor& ref) {
  const prefopt_cuda::Rows R = rows_view(ref, "ref_logits");
  STD_TORCH_CHECK(ref.scalar_type() == logits.scalar_type(),
                  "prefopt_fast cuda kernels: ref_logits must have the dtype of logits");
  STD_TORCH_CHECK(ref.get_device_index() == logits.get_device_index(),
                  "prefopt_fast cuda kernels: ref_logits must be on the device of logits");
  bool same = ref.dim() == logits.dim();
  for (int64_t d = 0; same && d < ref.dim(); ++d) same = ref.size(d) == logits.size(d);
  STD_TORCH_CHECK(same, "prefopt_fast cuda kernels: ref_logits must have the shape of logits");
  return R;
}

// True if no two rows of the view share memory (a sufficient check), which in-place
// writing requires.
bool rows_disjoint(const prefopt_cuda::Rows& L) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size)
  for (int d = 0; d < L.nlead; ++d) {
    if (L.lead_sizes[d] == 0) return true;
    if (L.lead_sizes[d] > 1) dims.emplace_back(L.lead_strides[d] < 0 ? -L.lead_strides[d] : L.lead_strides[d], L.lead_sizes[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = L.V;
  for (const auto& d : dims) {
    if (d.first < span) return false;
    span = d.first * (d.second - 1) + span;
  }
  return true;
}

void check(const char* err, const char* what) {
  STD_TORCH_CHECK(err == nullptr, "prefopt_fast cuda kernels: ", what, " failed: ", err ? err : "");
}

Tensor row_forward(Tensor logits, Tensor labels, Tensor inv_temp, int64_t ignore_index, int64_t stats,
                   std::optional<Tensor> ref_logits) {
  const prefopt_cuda::Rows L = rows_view(logits, "logits");
  const int32_t device = logits.get_device_index();
  check_vec(labels, "labels", ScalarType::Long, "int64", L.rows, device);
  check_vec(inv_temp, "inv_temp", ScalarType::Float, "float32", L.rows, device);
  const bool kl = (stats & kStatKl) != 0;
  STD_TORCH_CHECK(!kl || ref_logits.has_value(), "prefopt_fast cuda kernels: STAT_KL needs ref_logits");
  prefopt_cuda::Rows R;
  if (kl) R = ref_view(logits, *ref_logits);
  std::vector<int64_t> shape = {prefopt_cuda::kNumOut, L.rows};
  Tensor out = torch::stable::new_empty(logits, shape, ScalarType::Float);
  if (L.rows == 0) return out;
  torch::stable::accelerator::DeviceGuard guard(device);
  void* stream = torch::stable::accelerator::getCurrentStream(device).nativeHandle();
  prefopt_cuda::ForwardArgs A;
  A.labels = static_cast<const int64_t*>(labels.data_ptr());
  A.inv_temp = static_cast<const float*>(inv_temp.data_ptr());
  A.ignore_index = ignore_index;
  A.stats = (int)stats;
  A.out = static_cast<float*>(out.data_ptr());
  check(prefopt_cuda::row_forward(L, kl ? &R : nullptr, A, device, stream), "row_forward launch");
  return out;
}

const float* vec_ptr(const Tensor& t) { return static_cast<const float*>(t.data_ptr()); }

void backward_into(const Tensor& logits, const prefopt_cuda::Rows& L, const Tensor& labels, const Tensor& inv_temp,
                   const Tensor& lse, const Tensor& lse_lo, const Tensor& entropy, const Tensor& grad_logp,
                   const std::optional<Tensor>& grad_entropy, int64_t ignore_index,
                   const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& ref_logits,
                   const std::optional<Tensor>& ref_lse, const std::optional<Tensor>& kl, void* grad) {
  const int64_t N = L.rows;
  const int32_t device = logits.get_device_index();
  check_vec(labels, "labels", ScalarType::Long, "int64", N, device);
  check_vec(inv_temp, "inv_temp", ScalarType::Float, "float32", N, device);
  check_vec(lse, "lse", ScalarType::Float, "float32", N, device);
  check_vec(lse_lo, "lse_lo", ScalarType::Float, "float32", N, device);
  check_vec(grad_logp, "grad_logp", ScalarType::Float, "float32", N, device);
  prefopt_cuda::BackwardArgs A = {};
  A.labels = static_cast<const int64_t*>(labels.data_ptr());
  A.inv_temp = vec_ptr(inv_temp);
  A.lse = vec_ptr(lse);
  A.lse_lo = vec_ptr(lse_lo);
  A.grad_logp = vec_ptr(grad_logp);
  A.ignore_index = ignore_index;
  if (grad_entropy.has_value()) {
    check_vec(*grad_entropy, "grad_entropy", ScalarType::Float, "float32", N, device);
    check_vec(entropy, "entropy", ScalarType::Float, "float32", N, device);
    A.grad_entropy = vec_ptr(*grad_entropy);
    A.entropy = vec_ptr(entropy);
  }
  const int given = (int)grad_kl.has_value() + (int)ref_logits.has_value() + (int)ref_lse.has_value() +
                    (int)kl.has_value();
  STD_TORCH_CHECK(given == 0 || given == 4,
                  "prefopt_fast cuda kernels: grad_kl, ref_logits, ref_lse and kl must be given together");
  prefopt_cuda::Rows R;
  if (given == 4) {
    R = ref_view(logits, *ref_logits);
    check_vec(*grad_kl, "grad_kl", ScalarType::Float, "float32", N, device);
    check_vec(*ref_lse, "ref_lse", ScalarType::Float, "float32", N, device);
    check_vec(*kl, "kl", ScalarType::Float, "float32", N, device);
    A.grad_kl = vec_ptr(*grad_kl);
    A.ref_lse = vec_ptr(*ref_lse);
    A.kl = vec_ptr(*kl);
  }
  if (N == 0 || L.V == 0) return;
  torch::stable::accelerator::DeviceGuard guard(device);
  void* stream = torch::stable::accelerator::getCurrentStream(device).nativeHandle();
  check(prefopt_cuda::row_backward(L, given == 4 ? &R : nullptr, A, grad, device, stream), "row_backward launch");
}

Tensor row_backward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy, Tensor grad_logp,
                    std::optional<Tensor> grad_entropy, int64_t ignore_index, std::optional<Tensor> grad_kl,
                    std::optional<Tensor> ref_logits, std::optional<Tensor> ref_lse, std::optional<Tensor> kl) {
  const prefopt_cuda::Rows L = rows_view(logits, "logits");
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  Tensor grad = torch::stable::new_empty(logits, shape);  // contiguous, logits.dtype
  backward_into(logits, L, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy, ignore_index, grad_kl,
                ref_logits, ref_lse, kl, grad.data_ptr());
  return grad;
}

void row_backward_(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy, Tensor grad_logp,
                   std::optional<Tensor> grad_entropy, int64_t ignore_index, std::optional<Tensor> grad_kl,
                   std::optional<Tensor> ref_logits, std::optional<Tensor> ref_lse, std::optional<Tensor> kl) {
  const prefopt_cuda::Rows L = rows_view(logits, "logits");
  STD_TORCH_CHECK(rows_disjoint(L),
                  "prefopt_fast cuda kernels: in-place backward needs logits whose rows do not overlap "
                  "in memory (e.g. not an expand()ed tensor)");
  backward_into(logits, L, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy, ignore_index, grad_kl,
                ref_logits, ref_lse, kl, nullptr);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(prefopt_fast, CUDA, m) {
  m.impl("row_forward", TORCH_BOX(&row_forward));
  m.impl("row_backward", TORCH_BOX(&row_backward));
  m.impl("row_backward_", TORCH_BOX(&row_backward_));
}

// ---------------------------------------------------------------- build information

#define PF_STR_(...) #__VA_ARGS__
#define PF_STR(...) PF_STR_(__VA_ARGS__)
#ifndef PREFOPT_CUDA_ARCHS
#define PREFOPT_CUDA_ARCHS unknown
#endif

// JSON: {"cuda_built": 13000, "cuda_runtime": ..., "cuda_driver": ..., "archs": "sm_80,sm_90,compute_90"}
// (runtime / driver 0 where no driver is installed). The string lives until the next call.
extern "C" __attribute__((visibility("default"))) const char* prefopt_fast_cuda_build_info() {
  static char buf[512];
  std::snprintf(buf, sizeof(buf), "{\"cuda_built\": %d, \"cuda_runtime\": %d, \"cuda_driver\": %d, \"archs\": \"%s\"}",
                prefopt_cuda::cuda_version_built(), prefopt_cuda::cuda_runtime_version(),
                prefopt_cuda::cuda_driver_version(), PF_STR(PREFOPT_CUDA_ARCHS));
  return buf;
}

// 0 if the CUDA kernels can run on `device`; else nonzero with the CUDA error in msg.
// *arch: the architecture of the code the device will run (e.g. 90), 0 on error.
extern "C" __attribute__((visibility("default"))) int prefopt_fast_cuda_probe(int device, int* arch, char* msg,
                                                                             int msg_len) {
  const char* err = prefopt_cuda::probe(device, arch);
  if (msg && msg_len > 0) std::snprintf(msg, (size_t)msg_len, "%s", err ? err : "");
  return err ? 1 : 0;
}
