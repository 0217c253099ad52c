// Binding of the CPU row kernels to PyTorch through the LibTorch stable ABI: the
// resulting prefopt_fast._C is one abi3 shared object for every torch >= 2.13 and
// CPython >= 3.10. Defines the prefopt_fast::row_* ops and their CPU kernels; the fake
// (meta) implementations live in prefopt_fast/backends/cpu.py.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030a0000  // torch BuildExtension passes it for py_limited_api builds
#endif
#include <Python.h>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdlib>
#include <optional>
#include <vector>

#include "row_kernels.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

void pf_parallel_for(int64_t begin, int64_t end, int64_t grain, prefopt_cpu::RangeFn fn, void* ctx) {
  torch::stable::parallel_for(begin, end, grain, [fn, ctx](int64_t b, int64_t e) { fn(b, e, ctx); });
}

prefopt_cpu::Threading threading() {
  prefopt_cpu::Threading th;
  th.parallel_for = pf_parallel_for;
  th.num_threads = (int)torch::stable::get_num_threads();
  return th;
}

// logits [..., V]: CPU, fp32/bf16/fp16, last stride 1. Leading dims are coalesced where
// their strides allow, so a contiguous tensor (or logits[:, :-1]) has 1 (or 2) of them.
prefopt_cpu::RowsView rows_view(const Tensor& logits) {
  STD_TORCH_CHECK(logits.is_cpu(), "prefopt_fast cpu kernels: logits must be a CPU tensor");
  const int64_t nd = logits.dim();
  STD_TORCH_CHECK(nd >= 1, "prefopt_fast cpu kernels: logits must have at least 1 dimension [..., V]");
  prefopt_cpu::RowsView L;
  const ScalarType st = logits.scalar_type();
  if (st == ScalarType::Float) {
    L.dtype = prefopt_cpu::kF32;
  } else if (st == ScalarType::BFloat16) {
    L.dtype = prefopt_cpu::kBF16;
  } else if (st == ScalarType::Half) {
    L.dtype = prefopt_cpu::kF16;
  } else {
    STD_TORCH_CHECK(false, "prefopt_fast cpu kernels: logits must be float32, bfloat16 or float16");
  }
  L.V = logits.size(nd - 1);
  STD_TORCH_CHECK(L.V <= 1 || logits.stride(nd - 1) == 1,
                  "prefopt_fast cpu kernels: logits must have stride 1 in its last dimension, got ",
                  logits.stride(nd - 1));
  L.data = logits.data_ptr();  // storage offset already applied
  L.rows = 1;
  L.nlead = 0;
  for (int64_t d = 0; d < nd - 1; ++d) {
    const int64_t s = logits.size(d), str = logits.stride(d);
    L.rows *= s;
    if (s == 1) continue;
    if (L.nlead > 0 && L.lead_strides[L.nlead - 1] == str * s) {  // merge into the previous dim
      L.lead_sizes[L.nlead - 1] *= s;
      L.lead_strides[L.nlead - 1] = str;
      continue;
    }
    STD_TORCH_CHECK(L.nlead < prefopt_cpu::kMaxLeadDims, "prefopt_fast cpu kernels: too many dimensions");
    L.lead_sizes[L.nlead] = s;
    L.lead_strides[L.nlead] = str;
    ++L.nlead;
  }
  if (L.rows == 0) L.nlead = 0;
  return L;
}

void check_vec(const Tensor& t, const char* name, ScalarType st, const char* st_name, int64_t n) {
  STD_TORCH_CHECK(t.is_cpu(), "prefopt_fast cpu kernels: ", name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.scalar_type() == st, "prefopt_fast cpu kernels: ", name, " must be ", st_name);
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "prefopt_fast cpu kernels: ", name,
                  " must have shape [N] with N = logits.numel() / V = ", n);
  STD_TORCH_CHECK(n <= 1 || t.stride(0) == 1, "prefopt_fast cpu kernels: ", name, " must be contiguous");
}

// ref_logits: same shape and dtype as logits, its own strides.
prefopt_cpu::RowsView ref_view(const Tensor& logits, const Tensor& ref) {
  const prefopt_cpu::RowsView R = rows_view(ref);
  STD_TORCH_CHECK(ref.scalar_type() == logits.scalar_type(),
                  "prefopt_fast cpu kernels: ref_logits must have the dtype of logits");
  bool same = ref.dim() == logits.dim();
  for (int64_t d = 0; same && d < ref.dim(); ++d) same = ref.size(d) == logits.size(d);
  STD_TORCH_CHECK(same, "prefopt_fast cpu kernels: ref_logits must have the shape of logits");
  return R;
}

Tensor row_forward(Tensor logits, Tensor labels, Tensor inv_temp, int64_t ignore_index, int64_t stats,
                   std::optional<Tensor> ref_logits) {
  const prefopt_cpu::RowsView L = rows_view(logits);
  check_vec(labels, "labels", ScalarType::Long, "int64", L.rows);
  check_vec(inv_temp, "inv_temp", ScalarType::Float, "float32", L.rows);
  prefopt_cpu::RowsView R;
  const bool kl = (stats & 16) != 0;
  STD_TORCH_CHECK(!kl || ref_logits.has_value(), "prefopt_fast cpu kernels: STAT_KL needs ref_logits");
  if (kl) R = ref_view(logits, *ref_logits);
  std::vector<int64_t> shape = {prefopt_cpu::kNumOut, L.rows};
  Tensor out = torch::stable::empty(shape, ScalarType::Float, std::nullopt,
                                    torch::stable::Device(torch::headeronly::DeviceType::CPU));
  prefopt_cpu::row_forward(L, kl ? &R : nullptr, static_cast<const int64_t*>(labels.data_ptr()),
                           static_cast<const float*>(inv_temp.data_ptr()), ignore_index, (int)stats,
                           static_cast<float*>(out.data_ptr()), threading());
  return out;
}

const float* vec_ptr(const Tensor& t) { return static_cast<const float*>(t.data_ptr()); }

void backward_into(const Tensor& logits, const prefopt_cpu::RowsView& L, const Tensor& labels,
                   const Tensor& inv_temp, const Tensor& lse, const Tensor& lse_lo, const Tensor& entropy,
                   const Tensor& grad_logp,
                   const std::optional<Tensor>& grad_entropy, int64_t ignore_index,
                   const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& ref_logits,
                   const std::optional<Tensor>& ref_lse, const std::optional<Tensor>& kl, void* grad) {
  const int64_t N = L.rows;
  check_vec(labels, "labels", ScalarType::Long, "int64", N);
  check_vec(inv_temp, "inv_temp", ScalarType::Float, "float32", N);
  check_vec(lse, "lse", ScalarType::Float, "float32", N);
  check_vec(lse_lo, "lse_lo", ScalarType::Float, "float32", N);
  check_vec(grad_logp, "grad_logp", ScalarType::Float, "float32", N);
  prefopt_cpu::BackwardArgs A = {};
  A.labels = static_cast<const int64_t*>(labels.data_ptr());
  A.inv_temp = vec_ptr(inv_temp);
  A.lse = vec_ptr(lse);
  A.lse_lo = vec_ptr(lse_lo);
  A.grad_logp = vec_ptr(grad_logp);
  A.ignore_index = ignore_index;
  if (grad_entropy.has_value()) {
    check_vec(*grad_entropy, "grad_entropy", ScalarType::Float, "float32", N);
    check_vec(entropy, "entropy", ScalarType::Float, "float32", N);
    A.grad_entropy = vec_ptr(*grad_entropy);
    A.entropy = vec_ptr(entropy);
  }
  const int given = (int)grad_kl.has_value() + (int)ref_logits.has_value() + (int)ref_lse.has_value() +
                    (int)kl.has_value();
  STD_TORCH_CHECK(given == 0 || given == 4,
                  "prefopt_fast cpu kernels: grad_kl, ref_logits, ref_lse and kl must be given together");
  prefopt_cpu::RowsView R;
  if (given == 4) {
    R = ref_view(logits, *ref_logits);
    check_vec(*grad_kl, "grad_kl", ScalarType::Float, "float32", N);
    check_vec(*ref_lse, "ref_lse", ScalarType::Float, "float32", N);
    check_vec(*kl, "kl", ScalarType::Float, "float32", N);
    A.grad_kl = vec_ptr(*grad_kl);
    A.ref = &R;
    A.ref_lse = vec_ptr(*ref_lse);
    A.kl = vec_ptr(*kl);
  }
  prefopt_cpu::row_backward(L, A, grad, threading());
}

Tensor row_backward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy,
                    Tensor grad_logp, std::optional<Tensor> grad_entropy, int64_t ignore_index,
                    std::optional<Tensor> grad_kl, std::optional<Tensor> ref_logits,
                    std::optional<Tensor> ref_lse, std::optional<Tensor> kl) {
  const prefopt_cpu::RowsView L = rows_view(logits);
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  Tensor grad = torch::stable::empty(shape, logits.scalar_type(), std::nullopt,
                                     torch::stable::Device(torch::headeronly::DeviceType::CPU));
  void* g = grad.data_ptr();
  // PREFOPT_CPU_THP=0 turns the transparent-huge-page hint off (to compare first-touch costs)
  static const bool thp = [] {
    const char* v = std::getenv("PREFOPT_CPU_THP");
    return !(v && v[0] == '0');
  }();
  if (thp) prefopt_cpu::advise_huge_pages(g, (size_t)grad.numel() * grad.element_size());
  backward_into(logits, L, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy, ignore_index, grad_kl,
                ref_logits, ref_lse, kl, g);
  return grad;
}

void row_backward_(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy,
                   Tensor grad_logp, std::optional<Tensor> grad_entropy, int64_t ignore_index,
                   std::optional<Tensor> grad_kl, std::optional<Tensor> ref_logits,
                   std::optional<Tensor> ref_lse, std::optional<Tensor> kl) {
  const prefopt_cpu::RowsView L = rows_view(logits);
  STD_TORCH_CHECK(prefopt_cpu::rows_disjoint(L),
                  "prefopt_fast cpu kernels: in-place backward needs logits whose rows do not overlap "
                  "in memory (e.g. not an expand()ed tensor)");
  backward_into(logits, L, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy, ignore_index, grad_kl,
                ref_logits, ref_lse, kl, nullptr);
}

}  // namespace

STABLE_TORCH_LIBRARY(prefopt_fast, m) {
  m.def(
      "row_forward(Tensor logits, Tensor labels, Tensor inv_temp, int ignore_index, int stats, "
      "Tensor? ref_logits=None) -> Tensor");
  m.def(
      "row_backward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy, "
      "Tensor grad_logp, Tensor? grad_entropy, int ignore_index, Tensor? grad_kl=None, "
      "Tensor? ref_logits=None, Tensor? ref_lse=None, Tensor? kl=None) -> Tensor");
  m.def(
      "row_backward_(Tensor(a!) logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy, "
      "Tensor grad_logp, Tensor? grad_entropy, int ignore_index, Tensor? grad_kl=None, "
      "Tensor? ref_logits=None, Tensor? ref_lse=None, Tensor? kl=None) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(prefopt_fast, CPU, m) {
  m.impl("row_forward", TORCH_BOX(&row_forward));
  m.impl("row_backward", TORCH_BOX(&row_backward));
  m.impl("row_backward_", TORCH_BOX(&row_backward_));
}

// Importing prefopt_fast._C runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
