// CUDA implementations of the prefopt_fast::row_* ops (defined in csrc/cpu/bindings.cpp)
// through the LibTorch stable ABI. Compiled by the host compiler; the kernels live in the
// nvcc-compiled forward.cu / backward.cu behind the plain interface of
// row_kernels_cuda.h. Also exports prefopt_fast_cuda_build_info() (C linkage, read by
// prefopt_fast/_build_info.py through ctypes): the CUDA version and architectures built in.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <dlfcn.h>

#include <cstdio>
#include <optional>
#include <vector>

#include "binding_common.h"
#include "row_kernels_cuda.h"

namespace {

namespace binding = prefopt::binding;
using torch::stable::Tensor;

void check(const char* err, const char* what) {
  STD_TORCH_CHECK(err == nullptr, "prefopt_fast cuda kernels: ", what, " failed: ", err ? err : "");
}

// torch's current CUDA stream of `device` as a cudaStream_t.
#if defined(TORCH_VERSION_2_13_0) && TORCH_FEATURE_VERSION >= TORCH_VERSION_2_13_0
void* current_stream(int32_t device) { return torch::stable::accelerator::getCurrentStream(device).nativeHandle(); }
#else
// Stream::nativeHandle() came with torch 2.13. Before it, the stream comes from the AOTI C
// shim's aoti_torch_get_current_cuda_stream (the same stable C interface, exported by
// libtorch_cuda.so since torch 2.3). Looked up at run time, not linked: this extension must
// also load into a CPU-only torch, which has no libtorch_cuda.so. A CUDA tensor reaching this
// op means a CUDA torch, whose libtorch_cuda.so is already loaded (RTLD_NOLOAD finds it).
void* current_stream(int32_t device) {
  using Fn = int32_t (*)(int32_t, void**);
  static const Fn fn = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<Fn>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  STD_TORCH_CHECK(fn != nullptr, "prefopt_fast cuda kernels: aoti_torch_get_current_cuda_stream not found in "
                  "libtorch_cuda.so (needed with torch < 2.13)");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(device, &stream) == 0, "prefopt_fast cuda kernels: aoti_torch_get_current_cuda_stream(",
                  device, ") failed");
  return stream;
}
#endif

Tensor row_forward(Tensor logits, Tensor labels, Tensor inv_temp, int64_t ignore_index, int64_t stats,
                   std::optional<Tensor> ref_logits) {
  const binding::Target tg = binding::cuda_target(logits);
  const binding::ForwardCall c = binding::forward_call(logits, labels, inv_temp, ignore_index, stats, ref_logits, tg);
  if (c.L.rows == 0) return c.out;
  torch::stable::accelerator::DeviceGuard guard(tg.device);
  void* stream = current_stream(tg.device);
  check(prefopt_cuda::row_forward(c.L, c.ref(), c.A, tg.device, stream), "row_forward launch");
  return c.out;
}

void backward_into(const Tensor& logits, const prefopt::RowsView& L, const Tensor& labels, const Tensor& inv_temp,
                   const Tensor& lse, const Tensor& lse_lo, const Tensor& entropy, const Tensor& grad_logp,
                   const std::optional<Tensor>& grad_entropy, int64_t ignore_index,
                   const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& ref_logits,
                   const std::optional<Tensor>& ref_lse, const std::optional<Tensor>& kl, void* grad) {
  const binding::Target tg = binding::cuda_target(logits);
  const binding::BackwardCall c = binding::backward_call(logits, L, labels, inv_temp, lse, lse_lo, entropy, grad_logp,
                                                         grad_entropy, ignore_index, grad_kl, ref_logits, ref_lse, kl, tg);
  if (L.rows == 0 || L.V == 0) return;
  torch::stable::accelerator::DeviceGuard guard(tg.device);
  void* stream = current_stream(tg.device);
  check(prefopt_cuda::row_backward(L, c.ref(), c.A, grad, tg.device, stream), "row_backward launch");
}

Tensor row_backward(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy, Tensor grad_logp,
                    std::optional<Tensor> grad_entropy, int64_t ignore_index, std::optional<Tensor> grad_kl,
                    std::optional<Tensor> ref_logits, std::optional<Tensor> ref_lse, std::optional<Tensor> kl) {
  const prefopt::RowsView L = binding::rows_view(logits, "logits", binding::cuda_target(logits));
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  Tensor grad = torch::stable::new_empty(logits, shape);  // contiguous, logits.dtype
  backward_into(logits, L, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy, ignore_index, grad_kl,
                ref_logits, ref_lse, kl, grad.data_ptr());
  return grad;
}

void row_backward_(Tensor logits, Tensor labels, Tensor inv_temp, Tensor lse, Tensor lse_lo, Tensor entropy, Tensor grad_logp,
                   std::optional<Tensor> grad_entropy, int64_t ignore_index, std::optional<Tensor> grad_kl,
                   std::optional<Tensor> ref_logits, std::optional<Tensor> ref_lse, std::optional<Tensor> kl) {
  const binding::Target tg = binding::cuda_target(logits);
  const prefopt::RowsView L = binding::rows_view(logits, "logits", tg);
  binding::check_inplace(L, tg);
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
