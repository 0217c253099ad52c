// Argument marshalling shared by the CPU and CUDA bindings of the prefopt_fast::row_* ops
// (csrc/cpu/bindings.cpp, csrc/cuda/bindings.cpp; LibTorch stable ABI, host compiler):
// checks the tensors of one call and turns them into the plain descriptions of
// row_args.h. Semantics: prefopt_fast/_rows.py. Errors are "prefopt_fast <cpu|cuda>
// kernels: <argument> must ...".
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <vector>

#include "row_args.h"

namespace prefopt {
namespace binding {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Where every tensor of a call must live: the CPU, or the CUDA device of the logits.
struct Target {
  const char* name;  // "cpu" / "cuda", for messages
  bool cuda;
  int32_t device;    // CUDA device index (cuda only)
};

inline Target cpu_target() { return Target{"cpu", false, -1}; }
inline Target cuda_target(const Tensor& logits) { return Target{"cuda", true, logits.get_device_index()}; }

inline void check_device(const Tensor& t, const char* name, const Target& tg) {
  if (tg.cuda) {
    STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == tg.device, "prefopt_fast cuda kernels: ", name,
                    " must be on the device of logits (cuda:", tg.device, ")");
  } else {
    STD_TORCH_CHECK(t.is_cpu(), "prefopt_fast cpu kernels: ", name, " must be a CPU tensor");
  }
}

// t [..., V]: fp32/bf16/fp16, last stride 1, on the target. Leading dims are coalesced where
// their strides allow, so a contiguous tensor (or logits[:, :-1]) has 1 (or 2) of them.
inline RowsView rows_view(const Tensor& t, const char* name, const Target& tg) {
  if (tg.cuda) {
    STD_TORCH_CHECK(t.is_cuda(), "prefopt_fast cuda kernels: ", name, " must be a CUDA tensor");
  } else {
    check_device(t, name, tg);
  }
  const int64_t nd = t.dim();
  STD_TORCH_CHECK(nd >= 1, "prefopt_fast ", tg.name, " kernels: ", name, " must have at least 1 dimension [..., V]");
  RowsView L;
  const ScalarType st = t.scalar_type();
  if (st == ScalarType::Float) {
    L.dtype = kF32;
  } else if (st == ScalarType::BFloat16) {
    L.dtype = kBF16;
  } else if (st == ScalarType::Half) {
    L.dtype = kF16;
  } else {
    STD_TORCH_CHECK(false, "prefopt_fast ", tg.name, " kernels: ", name, " must be float32, bfloat16 or float16");
  }
  L.V = t.size(nd - 1);
  STD_TORCH_CHECK(L.V <= 1 || t.stride(nd - 1) == 1, "prefopt_fast ", tg.name, " kernels: ", name,
                  " must have stride 1 in its last dimension, got ", t.stride(nd - 1));
  L.data = t.data_ptr();  // storage offset applied
  STD_TORCH_CHECK(L.V == 0 || reinterpret_cast<uintptr_t>(L.data) % t.element_size() == 0,
                  "prefopt_fast ", tg.name, " kernels: ", name, " is not aligned to its element size");
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
    STD_TORCH_CHECK(L.nlead < kMaxLeadDims, "prefopt_fast ", tg.name, " kernels: too many dimensions");
    L.lead_sizes[L.nlead] = s;
    L.lead_strides[L.nlead] = str;
    ++L.nlead;
  }
  if (L.rows == 0) L.nlead = 0;
  return L;
}

// t: contiguous [n] of dtype st on the target.
inline void check_vec(const Tensor& t, const char* name, ScalarType st, const char* st_name, int64_t n,
                      const Target& tg) {
  check_device(t, name, tg);
  STD_TORCH_CHECK(t.scalar_type() == st, "prefopt_fast ", tg.name, " kernels: ", name, " must be ", st_name);
  STD_TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "prefopt_fast ", tg.name, " kernels: ", name,
                  " must have shape [N] with N = logits.numel() / V = ", n);
  STD_TORCH_CHECK(n <= 1 || t.stride(0) == 1, "prefopt_fast ", tg.name, " kernels: ", name, " must be contiguous");
}

inline const float* f32_ptr(const Tensor& t) { return static_cast<const float*>(t.data_ptr()); }

// ref_logits: same shape, dtype and device as logits, its own strides.
inline RowsView ref_view(const Tensor& logits, const Tensor& ref, const Target& tg) {
  const RowsView R = rows_view(ref, "ref_logits", tg);
  check_device(ref, "ref_logits", tg);
  STD_TORCH_CHECK(ref.scalar_type() == logits.scalar_type(),
                  "prefopt_fast ", tg.name, " kernels: ref_logits must have the dtype of logits");
  bool same = ref.dim() == logits.dim();
  for (int64_t d = 0; same && d < ref.dim(); ++d) same = ref.size(d) == logits.size(d);
  STD_TORCH_CHECK(same, "prefopt_fast ", tg.name, " kernels: ref_logits must have the shape of logits");
  return R;
}

// One checked row_forward call: out (fp32 [kNumOut, N], allocated like logits), its args,
// and the reference rows when STAT_KL is asked for (ref() is nullptr otherwise).
struct ForwardCall {
  RowsView L, R;
  bool kl;
  ForwardArgs A;
  Tensor out;
  const RowsView* ref() const { return kl ? &R : nullptr; }
};

inline ForwardCall forward_call(const Tensor& logits, const Tensor& labels, const Tensor& inv_temp,
                                int64_t ignore_index, int64_t stats, const std::optional<Tensor>& ref_logits,
                                const Target& tg) {
  ForwardCall c;
  c.L = rows_view(logits, "logits", tg);
  check_vec(labels, "labels", ScalarType::Long, "int64", c.L.rows, tg);
  check_vec(inv_temp, "inv_temp", ScalarType::Float, "float32", c.L.rows, tg);
  c.kl = (stats & kStatKl) != 0;
  STD_TORCH_CHECK(!c.kl || ref_logits.has_value(), "prefopt_fast ", tg.name, " kernels: STAT_KL needs ref_logits");
  if (c.kl) c.R = ref_view(logits, *ref_logits, tg);
  std::vector<int64_t> shape = {kNumOut, c.L.rows};
  c.out = torch::stable::new_empty(logits, shape, ScalarType::Float);
  c.A.labels = static_cast<const int64_t*>(labels.data_ptr());
  c.A.inv_temp = f32_ptr(inv_temp);
  c.A.ignore_index = ignore_index;
  c.A.stats = (int)stats;
  c.A.out = static_cast<float*>(c.out.data_ptr());
  return c;
}

// One checked row_backward call over the rows L of logits: its args, and the reference
// rows when the KL term is given (ref() is nullptr otherwise).
struct BackwardCall {
  RowsView R;
  bool kl;
  BackwardArgs A;
  const RowsView* ref() const { return kl ? &R : nullptr; }
};

inline BackwardCall backward_call(const Tensor& logits, const RowsView& L, const Tensor& labels,
                                  const Tensor& inv_temp, const Tensor& lse, const Tensor& lse_lo,
                                  const Tensor& entropy, const Tensor& grad_logp,
                                  const std::optional<Tensor>& grad_entropy, int64_t ignore_index,
                                  const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& ref_logits,
                                  const std::optional<Tensor>& ref_lse, const std::optional<Tensor>& kl,
                                  const Target& tg) {
  const int64_t N = L.rows;
  check_vec(labels, "labels", ScalarType::Long, "int64", N, tg);
  check_vec(inv_temp, "inv_temp", ScalarType::Float, "float32", N, tg);
  check_vec(lse, "lse", ScalarType::Float, "float32", N, tg);
  check_vec(lse_lo, "lse_lo", ScalarType::Float, "float32", N, tg);
  check_vec(grad_logp, "grad_logp", ScalarType::Float, "float32", N, tg);
  BackwardCall c = {};
  c.A.labels = static_cast<const int64_t*>(labels.data_ptr());
  c.A.inv_temp = f32_ptr(inv_temp);
  c.A.lse = f32_ptr(lse);
  c.A.lse_lo = f32_ptr(lse_lo);
  c.A.grad_logp = f32_ptr(grad_logp);
  c.A.ignore_index = ignore_index;
  if (grad_entropy.has_value()) {
    check_vec(*grad_entropy, "grad_entropy", ScalarType::Float, "float32", N, tg);
    check_vec(entropy, "entropy", ScalarType::Float, "float32", N, tg);
    c.A.grad_entropy = f32_ptr(*grad_entropy);
    c.A.entropy = f32_ptr(entropy);
  }
  const int given = (int)grad_kl.has_value() + (int)ref_logits.has_value() + (int)ref_lse.has_value() +
                    (int)kl.has_value();
  STD_TORCH_CHECK(given == 0 || given == 4, "prefopt_fast ", tg.name,
                  " kernels: grad_kl, ref_logits, ref_lse and kl must be given together");
  c.kl = given == 4;
  if (c.kl) {
    c.R = ref_view(logits, *ref_logits, tg);
    check_vec(*grad_kl, "grad_kl", ScalarType::Float, "float32", N, tg);
    check_vec(*ref_lse, "ref_lse", ScalarType::Float, "float32", N, tg);
    check_vec(*kl, "kl", ScalarType::Float, "float32", N, tg);
    c.A.grad_kl = f32_ptr(*grad_kl);
    c.A.ref_lse = f32_ptr(*ref_lse);
    c.A.kl = f32_ptr(*kl);
  }
  return c;
}

// The in-place backward writes each row over itself: rows must not share memory.
inline void check_inplace(const RowsView& L, const Target& tg) {
  STD_TORCH_CHECK(rows_disjoint(L), "prefopt_fast ", tg.name,
                  " kernels: in-place backward needs logits whose rows do not overlap "
                  "in memory (e.g. not an expand()ed tensor)");
}

}  // namespace binding
}  // namespace prefopt
