// The plain (torch-free, CUDA-free) argument descriptions shared by the CPU and CUDA row
// kernels and their bindings (semantics: prefopt_fast/_rows.py). The CUDA kernels take
// these structs by value as kernel parameters, and tests/cuda_emulation/emulated.py
// mirrors their layout with ctypes: change both together.
#pragma once

#include <stdint.h>

#include "prefopt_math.h"  // PF_HD / PF_INLINE: row_offset runs on the host and the device

namespace prefopt {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr int kMaxLeadDims = 16;

// The row contract's constants, defined here only (plain constexpr ints: usable by the
// CPU kernels, the bindings and CUDA device code alike). They must equal
// prefopt_fast/_rows.py: kStatFoo == STAT_FOO, kOutFoo == OUT_FOO, kNumOut == N_OUT;
// tests/test_cpu_extension.py parses this file and checks every one against _rows.py.
// Bits of ForwardArgs::stats (prefopt_fast._rows.STAT_*).
constexpr int kStatEntropy = 1;
constexpr int kStatLssp = 2;
constexpr int kStatMean = 4;
constexpr int kStatArgmax = 8;
constexpr int kStatKl = 16;
constexpr int kStatAll = kStatEntropy | kStatLssp | kStatMean | kStatArgmax | kStatKl;
// Rows of ForwardArgs::out (prefopt_fast._rows.OUT_*), and their count (N_OUT).
constexpr int kOutLogp = 0;
constexpr int kOutLse = 1;
constexpr int kOutEntropy = 2;
constexpr int kOutLssp = 3;
constexpr int kOutMean = 4;
constexpr int kOutArgmax = 5;
constexpr int kOutKl = 6;
constexpr int kOutRefLse = 7;
constexpr int kOutLseLo = 8;
constexpr int kNumOut = 9;

static_assert(kStatEntropy == 1 && kStatLssp == 2 && kStatMean == 4 && kStatArgmax == 8 && kStatKl == 16 &&
                  kStatAll == 31,
              "kStat* must equal prefopt_fast._rows.STAT_*");
static_assert(kOutLogp == 0 && kOutLse == 1 && kOutEntropy == 2 && kOutLssp == 3 && kOutMean == 4 &&
                  kOutArgmax == 5 && kOutKl == 6 && kOutRefLse == 7 && kOutLseLo == 8,
              "kOut* must equal prefopt_fast._rows.OUT_*");
static_assert(kNumOut == 9 && kOutLseLo + 1 == kNumOut, "kNumOut must equal prefopt_fast._rows.N_OUT");

// A logits tensor [..., V] with last stride 1: row n starts at
// data + sum_i idx_i(n) * lead_strides[i] elements, idx(n) the row-major multi-index of
// n over lead_sizes (leading dims of size 1 dropped, mergeable ones merged). 64-bit
// offsets throughout. `data` is written only by an in-place backward.
struct RowsView {
  void* data;
  int dtype;
  int nlead;
  int64_t V;
  int64_t rows;
  int64_t lead_sizes[kMaxLeadDims];
  int64_t lead_strides[kMaxLeadDims];
};

struct ForwardArgs {
  const int64_t* labels;   // [rows]
  const float* inv_temp;   // [rows]
  int64_t ignore_index;
  int stats;               // bit mask of prefopt_fast._rows.STAT_*
  float* out;              // [kNumOut, rows] contiguous
};

// All [rows] fp32 except labels. grad_entropy == nullptr: no entropy term (entropy
// unused); grad_kl == nullptr: no KL term (the reference logits, ref_lse, kl unused).
struct BackwardArgs {
  const int64_t* labels;
  const float* inv_temp;
  const float* lse;
  const float* lse_lo;  // lse = lse + lse_lo (prefopt_fast._rows.OUT_LSE_LO)
  const float* entropy;
  const float* grad_logp;
  const float* grad_entropy;
  const float* grad_kl;
  const float* ref_lse;
  const float* kl;
  int64_t ignore_index;
};

// Offset in elements of row n from data (the row-major multi-index of n over lead_sizes).
PF_HD PF_INLINE int64_t row_offset(const RowsView& L, int64_t n) {
  if (L.nlead == 1) return n * L.lead_strides[0];
  int64_t off = 0;
  for (int d = L.nlead - 1; d >= 0; --d) {
    const int64_t s = L.lead_sizes[d];
    off += (n % s) * L.lead_strides[d];
    n /= s;
  }
  return off;
}

// True if no two rows of the view share memory (a sufficient check), which in-place
// writing requires. Sorted by |stride|, each dimension must step past everything the
// smaller ones span. O(nlead^2), no allocation.
inline bool rows_disjoint(const RowsView& L) {
  int64_t st[kMaxLeadDims], sz[kMaxLeadDims];
  int k = 0;
  for (int d = 0; d < L.nlead; ++d) {
    if (L.lead_sizes[d] == 0) return true;  // no rows at all
    if (L.lead_sizes[d] > 1) {
      st[k] = L.lead_strides[d] < 0 ? -L.lead_strides[d] : L.lead_strides[d];
      sz[k] = L.lead_sizes[d];
      ++k;
    }
  }
  for (int i = 1; i < k; ++i)
    for (int j = i; j > 0 && st[j] < st[j - 1]; --j) {
      const int64_t s = st[j], z = sz[j];
      st[j] = st[j - 1];
      sz[j] = sz[j - 1];
      st[j - 1] = s;
      sz[j - 1] = z;
    }
  int64_t span = L.V;
  for (int i = 0; i < k; ++i) {
    if (st[i] < span) return false;
    span = st[i] * (sz[i] - 1) + span;
  }
  return true;
}

}  // namespace prefopt
