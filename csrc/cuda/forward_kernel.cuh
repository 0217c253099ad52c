// CUDA forward row kernel: logsumexp, log-prob of the label and the optional row
// statistics (entropy, log sum p^2, mean, first argmax, exact KL against reference
// logits), semantics as in prefopt_fast/_rows.py; layout in common.cuh. Kernel code only (the
// launchers are in forward.cu), so that a host emulation can compile it too.
//
// Each thread keeps an online-logsumexp accumulator (PfLseAcc of prefopt_math.h)
// relative to its running max, rescaled (pf_lse_rescale) only when a group of elements
// raises the max; the block merges them with pf_lse_merge / pf_kl_rebase, the same
// functions the CPU kernels use, and finishes with pf_lse_value / pf_lse_entropy /
// pf_lse_log_sum_sq / pf_kl_value. NaN / +inf anywhere poison the sums (NaN LSE, as
// float64 log_softmax gives); a row of only -inf gives s = 0, hence LSE = -inf and a NaN
// log-prob.
#pragma once

#include "common.cuh"

namespace prefopt_cuda {
namespace {

struct FwdParams {
  Rows x;  // logits
  Rows r;  // reference logits (KL variants only)
  const int64_t* labels;
  const float* inv_temp;
  float* out;
  int64_t ignore_index;
};

struct FwdState {
  PfLseAcc<float> acc;   // policy row: m = running max, s, t, q relative to shift_of(m)
  float sx;              // sum x / V
  float bz;              // argmax: best value (raw logit; NaN ignored here)
  int64_t bi;            //   and its first index, -1 if none yet
  PfLseAcc<float> racc;  // reference row (m, s)
  float u;               // sum e ((x - c) - (xr - cr)), see pf_kl_rebase
};

__device__ __forceinline__ FwdState fwd_empty() {
  FwdState st;
  st.acc = pf_lse_empty<float>(-kInf);
  st.racc = pf_lse_empty<float>(-kInf);
  st.sx = 0.0f;
  st.bz = -kInf;
  st.bi = -1;
  st.u = 0.0f;
  return st;
}

// Merge two partial states of one row (any order: the argmax keeps the smaller index on ties).
template <int MODE>
__device__ __forceinline__ FwdState fwd_merge(const FwdState& a, const FwdState& b) {
  constexpr bool FULL = (MODE & kFwdFull) != 0, KL = (MODE & kFwdKl) != 0;
  FwdState r = a;
  r.acc = pf_lse_merge(a.acc, b.acc);
  if (KL) {
    r.racc = pf_lse_merge(a.racc, b.racc);
    const float c = shift_of(r.acc.m), cr = shift_of(r.racc.m);
    r.u = pf_kl_rebase<float>(a.u, a.acc.s, c - shift_of(a.acc.m), cr - shift_of(a.racc.m)) +
          pf_kl_rebase<float>(b.u, b.acc.s, c - shift_of(b.acc.m), cr - shift_of(b.racc.m));
  }
  if (FULL) {
    r.sx = a.sx + b.sx;
    const bool take_b = b.bi >= 0 && (a.bi < 0 || b.bz > a.bz || (b.bz == a.bz && b.bi < a.bi));
    r.bz = take_b ? b.bz : a.bz;
    r.bi = take_b ? b.bi : a.bi;
  }
  return r;
}

template <int MODE>
__device__ __forceinline__ FwdState fwd_shfl_xor(const FwdState& a, int mask) {
  constexpr bool ENT = (MODE & kFwdEnt) != 0, FULL = (MODE & kFwdFull) != 0, KL = (MODE & kFwdKl) != 0;
  FwdState b = a;
  b.acc.m = __shfl_xor_sync(0xffffffffu, a.acc.m, mask);
  b.acc.s = __shfl_xor_sync(0xffffffffu, a.acc.s, mask);
  if (ENT) b.acc.t = __shfl_xor_sync(0xffffffffu, a.acc.t, mask);
  if (FULL) {
    b.acc.q = __shfl_xor_sync(0xffffffffu, a.acc.q, mask);
    b.sx = __shfl_xor_sync(0xffffffffu, a.sx, mask);
    b.bz = __shfl_xor_sync(0xffffffffu, a.bz, mask);
    b.bi = __shfl_xor_sync(0xffffffffu, (long long)a.bi, mask);
  }
  if (KL) {
    b.racc.m = __shfl_xor_sync(0xffffffffu, a.racc.m, mask);
    b.racc.s = __shfl_xor_sync(0xffffffffu, a.racc.s, mask);
    b.u = __shfl_xor_sync(0xffffffffu, a.u, mask);
  }
  return b;
}

// The block's merged state, returned to every thread. `red` holds 32 states.
template <int MODE>
__device__ __forceinline__ FwdState fwd_block_reduce(FwdState st, FwdState* red) {
  for (int o = 16; o > 0; o >>= 1) st = fwd_merge<MODE>(st, fwd_shfl_xor<MODE>(st, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if (lane == 0) red[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? red[lane] : fwd_empty();
    for (int o = 16; o > 0; o >>= 1) st = fwd_merge<MODE>(st, fwd_shfl_xor<MODE>(st, o));
    if (lane == 0) red[0] = st;
  }
  __syncthreads();
  return red[0];
}

__device__ __forceinline__ int64_t block_min_i64(int64_t v, int64_t* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t w = __shfl_xor_sync(0xffffffffu, (long long)v, o);
    v = w < v ? w : v;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? red[lane] : INT64_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const int64_t w = __shfl_xor_sync(0xffffffffu, (long long)v, o);
      v = w < v ? w : v;
    }
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  return red[0];
}

// Accumulate a group of K raw elements (P consecutive ones per piece; piece i starts at
// row index start[i]) into the thread's state. Pieces come in increasing index order.
template <int MODE, int K, int P>
__device__ __forceinline__ void fwd_group(FwdState& st, const float (&z)[K], const float (&zr)[K],
                                          const int64_t (&start)[K / P], float it, float itv) {
  constexpr bool ENT = (MODE & kFwdEnt) != 0, FULL = (MODE & kFwdFull) != 0, KL = (MODE & kFwdKl) != 0;
  // the max of the group (NaN ignored: a NaN poisons s below), then one rescale at most
  float cm = -kInf, cmr = -kInf;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    cm = fmaxf(cm, z[j]);
    if (KL) cmr = fmaxf(cmr, zr[j]);
  }
  // inv_temp > 0: max(z) * it = max(z * it)
  const float mx = __fmul_rn(cm, it), mxr = __fmul_rn(cmr, it);
  if (KL) {
    const bool up = mx > st.acc.m, upr = mxr > st.racc.m;
    if (up || upr) {
      const float m1 = up ? mx : st.acc.m, mr1 = upr ? mxr : st.racc.m;
      st.u = pf_kl_rebase<float>(st.u, st.acc.s, shift_of(m1) - shift_of(st.acc.m),
                                 shift_of(mr1) - shift_of(st.racc.m));
      if (up) st.acc = pf_lse_rescale<float>(st.acc, m1);
      if (upr) st.racc = pf_lse_rescale<float>(st.racc, mr1);
    }
  } else if (mx > st.acc.m) {
    st.acc = pf_lse_rescale<float>(st.acc, mx);
  }
  const float nc = -shift_of(st.acc.m), ncr = -shift_of(st.racc.m);
#pragma unroll
  for (int j = 0; j < K; ++j) {
    // x - c with x = z * inv_temp rounded (__fmul_rn: never contracted into an fma), as the
    // max and x_y are: the max element gives d = 0 and e = 1 exactly, so log s >= 0 and
    // log-probs stay <= 0 (an fma would see the unrounded product)
    const float d = __fmul_rn(z[j], it) + nc;
    const float e = fast_exp(d);
    st.acc.s += e;
    // e * d with d = -inf must count 0: clamp d (e is 0 there; a NaN d has a NaN e)
    if (ENT) st.acc.t = fmaf(e, fmaxf(d, -104.0f), st.acc.t);
    if (FULL) {
      st.acc.q = fmaf(e, e, st.acc.q);
      st.sx = fmaf(z[j], itv, st.sx);  // x / V: no overflow of the sum
    }
    if (KL) {
      const float dr = __fmul_rn(zr[j], it) + ncr;
      st.racc.s += fast_exp(dr);
      // q_v = 0 (xr = -inf) where p_v > 0 makes this +inf, as KL should be
      st.u += e > 0.0f ? e * (d - dr) : 0.0f;
    }
  }
  if (FULL && (cm > st.bz || st.bi < 0)) {  // first index of the new max (rare after warm-up)
    bool found = false;
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (!found && z[j] == cm) {
        found = true;
        st.bz = cm;
        st.bi = start[j / P] + j % P;
      }
    }
  }
}

template <class E, int MODE>
__device__ __forceinline__ void fwd_sweep(FwdState& st, const typename E::S* z, const typename E::S* zr, int64_t V,
                                          float it, float itv) {
  typedef typename E::S S;
  constexpr bool KL = (MODE & kFwdKl) != 0;
  constexpr int VEC = E::kVec;
  constexpr int UNROLL = (KL ? 8 : 16) / VEC > 1 ? (KL ? 8 : 16) / VEC : 1;  // 16 elements in flight (8 with KL)
  const int64_t T = blockDim.x, tid = threadIdx.x;
  const uintptr_t az = reinterpret_cast<uintptr_t>(z);
  const bool vec_ok = !KL || ((az ^ reinterpret_cast<uintptr_t>(zr)) & 15) == 0;
  if (vec_ok) {
    int64_t head = (int64_t)(((16 - (az & 15)) & 15) / sizeof(S));
    head = head < V ? head : V;
    if (tid < head) {
      float a[1] = {E::to_f(__ldg(z + tid))}, b[1] = {KL ? E::to_f(__ldg(zr + tid)) : 0.0f};
      const int64_t s0[1] = {tid};
      fwd_group<MODE, 1, 1>(st, a, b, s0, it, itv);
    }
    const int64_t nvec = (V - head) / VEC;
    const uint4* zv = reinterpret_cast<const uint4*>(z + head);
    const uint4* zrv = KL ? reinterpret_cast<const uint4*>(zr + head) : nullptr;
    int64_t vi = tid;
    for (; vi + (UNROLL - 1) * T < nvec; vi += UNROLL * T) {
      uint4 raw[UNROLL], rraw[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        raw[k] = ld_vec<true>(zv + vi + k * T);
        if (KL) rraw[k] = ld_vec<true>(zrv + vi + k * T);
      }
      float a[UNROLL * VEC], b[UNROLL * VEC];
      int64_t s0[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        E::unpack(raw[k], a + k * VEC);
        if (KL) E::unpack(rraw[k], b + k * VEC);
        s0[k] = head + (vi + k * T) * VEC;
      }
      fwd_group<MODE, UNROLL * VEC, VEC>(st, a, b, s0, it, itv);
    }
    for (; vi < nvec; vi += T) {
      float a[VEC], b[VEC];
      E::unpack(ld_vec<true>(zv + vi), a);
      if (KL) E::unpack(ld_vec<true>(zrv + vi), b);
      const int64_t s0[1] = {head + vi * VEC};
      fwd_group<MODE, VEC, VEC>(st, a, b, s0, it, itv);
    }
    const int64_t v = head + nvec * VEC + tid;
    if (v < V) {
      float a[1] = {E::to_f(__ldg(z + v))}, b[1] = {KL ? E::to_f(__ldg(zr + v)) : 0.0f};
      const int64_t s0[1] = {v};
      fwd_group<MODE, 1, 1>(st, a, b, s0, it, itv);
    }
  } else {
    constexpr int K = UNROLL * 2;
    int64_t v = tid;
    for (; v + (K - 1) * T < V; v += K * T) {
      float a[K], b[K];
      int64_t s0[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        s0[k] = v + k * T;
        a[k] = E::to_f(__ldg(z + s0[k]));
        b[k] = KL ? E::to_f(__ldg(zr + s0[k])) : 0.0f;
      }
      fwd_group<MODE, K, 1>(st, a, b, s0, it, itv);
    }
    for (; v < V; v += T) {
      float a[1] = {E::to_f(__ldg(z + v))}, b[1] = {KL ? E::to_f(__ldg(zr + v)) : 0.0f};
      const int64_t s0[1] = {v};
      fwd_group<MODE, 1, 1>(st, a, b, s0, it, itv);
    }
  }
}

template <class E, int MODE>
__global__ void __launch_bounds__(kMaxThreads, 2) row_forward_kernel(const __grid_constant__ FwdParams P) {
  typedef typename E::S S;
  constexpr bool ENT = (MODE & kFwdEnt) != 0, FULL = (MODE & kFwdFull) != 0, KL = (MODE & kFwdKl) != 0;
  __shared__ FwdState red[32];
  __shared__ int64_t red_i[32];
  const int64_t N = P.x.rows, V = P.x.V;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t y = P.labels[n];
    float* o = P.out + n;
    if (y == P.ignore_index) {  // not read; every output 0
      if (threadIdx.x < kNumOut) o[threadIdx.x * N] = 0.0f;
      continue;
    }
    const S* z = static_cast<const S*>(P.x.data) + row_offset(P.x, n);
    const S* zr = KL ? static_cast<const S*>(P.r.data) + row_offset(P.r, n) : nullptr;
    const float it = P.inv_temp[n];
    const float itv = it / (float)V;
    FwdState st = fwd_empty();
    fwd_sweep<E, MODE>(st, z, zr, V, it, itv);
    st = fwd_block_reduce<MODE>(st, red);
    int64_t amax = st.bi;
    if (FULL && !(st.acc.s == st.acc.s)) {
      // NaN or +inf in the row: the argmax (torch semantics) is the first NaN, if any
      int64_t first = INT64_MAX;
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const float x = E::to_f(z[v]);
        if (x != x) {
          first = v;
          break;
        }
      }
      first = block_min_i64(first, red_i);
      if (first != INT64_MAX) amax = first;
    }
    if (threadIdx.x == 0) {
      const bool y_ok = y >= 0 && y < V;
      const float ls = pf_log(st.acc.s);
      const float c = shift_of(st.acc.m);
      // relative to the shift rather than x_y - lse: no cancellation for large logits
      const float logp = y_ok ? (__fmul_rn(E::to_f(z[y]), it) - c) - ls : __int_as_float(0x7fc00000);
      o[kOutLogp * N] = logp;
      // lse = c + log s as an fp32 pair (summed in double, once per row); -inf for a row of
      // only -inf (c = 0, s = 0), NaN for NaN / +inf rows
      float hi, lo;
      pf_lse_split((double)c, (double)ls, &hi, &lo);
      o[kOutLse * N] = hi;
      o[kOutLseLo * N] = lo;
      o[kOutEntropy * N] = ENT ? pf_lse_entropy(st.acc) : 0.0f;
      o[kOutLssp * N] = FULL ? pf_lse_log_sum_sq(st.acc) : 0.0f;
      o[kOutMean * N] = FULL ? st.sx : 0.0f;
      o[kOutArgmax * N] = (FULL && y_ok && amax == y) ? 1.0f : 0.0f;
      o[kOutKl * N] = KL ? pf_kl_value(st.u, st.acc.s, st.racc.s) : 0.0f;
      o[kOutRefLse * N] = KL ? pf_lse_value(st.racc) : 0.0f;
    }
    __syncthreads();  // `red` is reused by the next row
  }
}

// The kernel variant and parameters for a request, handed to `launch(kernel, params)`
// (the CUDA launcher, or the host emulation of the tests): one dispatch for both.
template <class E, class Launch>
void dispatch_forward_mode(int mode, const FwdParams& P, Launch& launch) {
  switch (mode) {
    case 0: launch(row_forward_kernel<E, 0>, P); break;
    case kFwdEnt: launch(row_forward_kernel<E, kFwdEnt>, P); break;
    case kFwdEnt | kFwdFull: launch(row_forward_kernel<E, kFwdEnt | kFwdFull>, P); break;
    case kFwdKl: launch(row_forward_kernel<E, kFwdKl>, P); break;
    case kFwdKl | kFwdEnt: launch(row_forward_kernel<E, kFwdKl | kFwdEnt>, P); break;
    default: launch(row_forward_kernel<E, kFwdKl | kFwdEnt | kFwdFull>, P); break;
  }
}

template <class Launch>
void dispatch_forward(const Rows& L, const Rows* R, const ForwardArgs& A, Launch& launch) {
  FwdParams P;
  P.x = L;
  const bool kl = R != nullptr && (A.stats & kStatKl) != 0;
  P.r = kl ? *R : L;
  P.labels = A.labels;
  P.inv_temp = A.inv_temp;
  P.out = A.out;
  P.ignore_index = A.ignore_index;
  int mode = 0;
  if (A.stats & (kStatLssp | kStatMean | kStatArgmax)) mode = kFwdEnt | kFwdFull;
  else if (A.stats & kStatEntropy) mode = kFwdEnt;
  if (kl) mode |= kFwdKl;
  switch (L.dtype) {
    case kF32: dispatch_forward_mode<F32>(mode, P, launch); break;
    case kBF16: dispatch_forward_mode<BF16>(mode, P, launch); break;
    default: dispatch_forward_mode<F16>(mode, P, launch); break;
  }
}

}  // namespace
}  // namespace prefopt_cuda
