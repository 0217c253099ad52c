// Torch-free interface of the CPU row kernels (see prefopt_fast/_rows.py for the
// semantics). The binding translation unit turns torch tensors into these plain
// descriptions; the kernels only see raw pointers, sizes and strides.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "row_args.h"

namespace prefopt_cpu {

// RowsView, ForwardArgs, BackwardArgs, DType, kStat*, kOut*, kNumOut, rows_disjoint ... (row_args.h)
using namespace prefopt;

// Threading is supplied by the caller (torch's parallel_for through the stable ABI),
// so this translation unit needs neither torch nor an OpenMP runtime.
typedef void (*RangeFn)(int64_t begin, int64_t end, void* ctx);
typedef void (*ParallelFor)(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx);

struct Threading {
  ParallelFor parallel_for;
  int num_threads;
};

// out: fp32 [kNumOut, rows] contiguous (args.out). ref: nullptr, or the reference logits
// (same rows, V and dtype as `logits`, own strides) for the exact-KL statistic.
void row_forward(const RowsView& logits, const RowsView* ref, const ForwardArgs& args, const Threading& th);

// grad: nullptr to write in place over `logits`, else a contiguous [rows, V] buffer of
// logits.dtype. ref: the reference logits when args.grad_kl is given, else unused.
void row_backward(const RowsView& logits, const RowsView* ref, const BackwardArgs& args, void* grad,
                  const Threading& th);

// Hint the kernel to back a fresh, not yet touched buffer with transparent huge
// pages: first-touch page faults on an N x V gradient otherwise cost more than the
// whole kernel (see BUILD_NOTES.md). No-op for small buffers or where unsupported.
void advise_huge_pages(void* p, size_t bytes);

}  // namespace prefopt_cpu
