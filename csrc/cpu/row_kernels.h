// Torch-free interface of the CPU row kernels (see prefopt_fast/_rows.py for the
// semantics). The binding translation unit turns torch tensors into these plain
// descriptions; the kernels only see raw pointers, sizes and strides.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace prefopt_cpu {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int kMaxLeadDims = 16;

// A logits tensor [..., V] with last stride 1: row n starts at
// data + sum_i idx_i(n) * lead_strides[i] elements, idx(n) the row-major multi-index of
// n over lead_sizes. Offsets are 64-bit throughout.
struct RowsView {
  void* data;
  int dtype;
  int64_t V;
  int64_t rows;
  int nlead;
  int64_t lead_sizes[kMaxLeadDims];
  int64_t lead_strides[kMaxLeadDims];
};

// Threading is supplied by the caller (torch's parallel_for through the stable ABI),
// so this translation unit needs neither torch nor an OpenMP runtime.
typedef void (*RangeFn)(int64_t begin, int64_t end, void* ctx);
typedef void (*ParallelFor)(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx);

struct Threading {
  ParallelFor parallel_for;
  int num_threads;
};

constexpr int kNumOut = 9;  // rows of prefopt_fast._rows.OUT_*

// out: fp32 [kNumOut, rows] contiguous. ref: nullptr, or the reference logits (same
// rows, V and dtype as `logits`, own strides) for the exact-KL statistic.
void row_forward(const RowsView& logits, const RowsView* ref, const int64_t* labels,
                 const float* inv_temp, int64_t ignore_index, int stats, float* out,
                 const Threading& th);

// grad: nullptr to write in place over `logits`, else a contiguous [rows, V] buffer of
// logits.dtype. grad_entropy == nullptr: no entropy term (entropy unused).
// grad_kl == nullptr: no KL term (ref, ref_lse, kl unused).
struct BackwardArgs {
  const int64_t* labels;
  const float* inv_temp;
  const float* lse;
  const float* lse_lo;  // lse = lse + lse_lo (prefopt_fast._rows.OUT_LSE_LO)
  const float* entropy;
  const float* grad_logp;
  const float* grad_entropy;
  const float* grad_kl;
  const RowsView* ref;
  const float* ref_lse;
  const float* kl;
  int64_t ignore_index;
};
void row_backward(const RowsView& logits, const BackwardArgs& args, void* grad, const Threading& th);

// True if no two rows of the view share memory (a sufficient check), which in-place
// writing requires.
bool rows_disjoint(const RowsView& logits);

// Hint the kernel to back a fresh, not yet touched buffer with transparent huge
// pages: first-touch page faults on an N x V gradient otherwise cost more than the
// whole kernel (see BUILD_NOTES.md). No-op for small buffers or where unsupported.
void advise_huge_pages(void* p, size_t bytes);

}  // namespace prefopt_cpu
