// Binding of the CPU row kernels to PyTorch through the LibTorch stable ABI: the
// resulting prefopt_fast._C is one abi3 shared object for the torch it is built with (>= 2.10,
// see setup.py), every later torch and every CPython >= 3.10. Defines the prefopt_fast::row_*
// ops and their CPU kernels; the fake (meta) implementations live in prefopt_fast/backends/cpu.py.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030a0000  // torch BuildExtension passes it for py_limited_api builds
#endif
#include <Python.h>

#include <cstdlib>
#include <optional>
#include <vector>

#include "binding_common.h"
#include "row_kernels.h"

namespace {

namespace binding = prefopt::binding;
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

Tensor row_forward(Tensor logits, Tensor labels, Tensor inv_temp, int64_t ignore_index, int64_t stats,
                   std::optional<Tensor> ref_logits) {
  const binding::ForwardCall c =
      binding::forward_call(logits, labels, inv_temp, ignore_index, stats, ref_logits, binding::cpu_target());
  prefopt_cpu::row_forward(c.L, c.ref(), c.A, threading());
  return c.out;
}

void backward_into(const Tensor& logits, const prefopt::RowsView& L, const Tensor& labels,
                   const Tensor& inv_temp, const Tensor& lse, const Tensor& lse_lo, const Tensor& entropy,
                   const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, int64_t ignore_index,
                   const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& ref_logits,
                   const std::optional<Tensor>& ref_lse, const std::optional<Tensor>& kl, void* grad) {
  const binding::BackwardCall c =
      binding::backward_call(logits, L, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy,
                             ignore_index, grad_kl, ref_logits, ref_lse, kl, binding::cpu_target());
  prefopt_cpu::row_backward(L, c.ref(), c.A, grad, threading());
}

Tensor row_backward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy,
                    Tensor grad_logp, std::optional<Tensor> grad_entropy, int64_t ignore_index,
                    std::optional<Tensor> grad_kl, std::optional<Tensor> ref_logits,
                    std::optional<Tensor> ref_lse, std::optional<Tensor> kl) {
  const prefopt::RowsView L = binding::rows_view(logits, "logits", binding::cpu_target());
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  Tensor grad = torch::stable::new_empty(logits, shape);  // contiguous, logits.dtype
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
  const prefopt::RowsView L = binding::rows_view(logits, "logits", binding::cpu_target());
  binding::check_inplace(L, binding::cpu_target());
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
