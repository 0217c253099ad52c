// CUDA backward row kernel: the gradient of (log-prob, entropy, exact KL) with respect
// to a logits row, into a fresh contiguous buffer or over the logits (in place),
// semantics as in prefopt_fast/_rows.py; layout in common.cuh. Kernel code only (the
// launchers are in backward.cu), so that a host emulation can compile it too.
//
// p = exp(x - lse) is recomputed per element; every element but the label's takes the
// factored gradient of prefopt_math.h (pf_grad_coef / pf_grad_fast[_kl]), the label's
// element the literal formula in double (pf_grad_elem*), as on the CPU. Rows with
// non-finite per-row scalars (NaN / all -inf rows, NaN upstream gradients, infinite KL)
// or |lse| >= 2^64 take the literal formula in double for every element.
#pragma once

#include "common.cuh"

namespace prefopt_cuda {
namespace {

struct BwdParams {
  Rows x;         // logits
  Rows r;         // reference logits (KL variant only)
  void* grad;     // contiguous [rows, V], or nullptr: in place over x
  BackwardArgs a;
};

struct RowGrad {
  float it, lse, lse_lo, H, c, e, k, rlse, kl;  // log p_v = (x_v - lse) - lse_lo
  PfGradCoef<float> coef;
};

// The label's element: the literal formula in double (c * (1 - p) does not cancel when p ~ 1).
template <int MODE>
__device__ __forceinline__ float label_grad(float x, float xr, const RowGrad& r) {
  const double logp = ((double)x - (double)r.lse) - (double)r.lse_lo;
  const double p = exp(logp);
  if (MODE == kBwdKl)
    return (float)pf_grad_elem_kl<double>(p, logp, (double)xr - (double)r.rlse, 1.0, r.c, r.e, r.H, r.k, r.kl, r.it);
  if (MODE == kBwdEnt) return (float)pf_grad_elem<double>(p, logp, 1.0, r.c, r.e, r.H, r.it);
  return (float)pf_grad_elem_noent<double>(p, 1.0, r.c, r.it);
}

// Every other element: the factored form.
template <int MODE>
__device__ __forceinline__ float fast_grad(float z, float zr, const RowGrad& r) {
  // x rounded as in the forward; x - lse is exact where p is not negligible
  const float logp = (__fmul_rn(z, r.it) - r.lse) - r.lse_lo;
  const float p = fast_exp(logp);
  const float lpc = pf_exp_poly_arg(logp);  // finite: p = 0 gives 0, not 0 * -inf
  if (MODE == kBwdKl) return pf_grad_fast_kl<float>(p, lpc, __fmul_rn(zr, r.it) - r.rlse, 0.0f, r.coef);
  return pf_grad_fast<float>(p, lpc, 0.0f, r.coef);
}

// A group of K elements (P consecutive per piece, piece i at row index start[i]),
// gradient written over z; the label's element (y, -1 if none) gets `gy`.
template <int MODE, int K, int P>
__device__ __forceinline__ void bwd_group(float (&z)[K], const float (&zr)[K], const int64_t (&start)[K / P],
                                          int64_t y, float gy, const RowGrad& r) {
#pragma unroll
  for (int j = 0; j < K; ++j) z[j] = fast_grad<MODE>(z[j], zr[j], r);
#pragma unroll
  for (int i = 0; i < K / P; ++i) {
    const uint64_t off = (uint64_t)(y - start[i]);  // y = -1 wraps to huge
    if (off < (uint64_t)P) {
#pragma unroll
      for (int j = 0; j < P; ++j)
        if ((uint64_t)j == off) z[i * P + j] = gy;
    }
  }
}

// g may equal z (in place): every element is read and written by the same thread, and
// z is read with coherent loads.
template <class E, int MODE>
__device__ __forceinline__ void bwd_sweep(const typename E::S* z, const typename E::S* zr, typename E::S* g,
                                          int64_t V, int64_t y, float gy, const RowGrad& r) {
  typedef typename E::S S;
  constexpr bool KL = MODE == kBwdKl;
  constexpr bool NC = false;
  constexpr int VEC = E::kVec;
  constexpr int UNROLL = (KL ? 8 : 16) / VEC > 1 ? (KL ? 8 : 16) / VEC : 1;  // 16 elements in flight (8 with KL)
  const int64_t T = blockDim.x, tid = threadIdx.x;
  const uintptr_t az = reinterpret_cast<uintptr_t>(z);
  const bool vec_ok = ((az ^ reinterpret_cast<uintptr_t>(g)) & 15) == 0 &&
                      (!KL || ((az ^ reinterpret_cast<uintptr_t>(zr)) & 15) == 0);
  if (vec_ok) {
    int64_t head = (int64_t)(((16 - (az & 15)) & 15) / sizeof(S));
    head = head < V ? head : V;
    const int64_t nvec = (V - head) / VEC;
    const uint4* zv = reinterpret_cast<const uint4*>(z + head);
    const uint4* zrv = KL ? reinterpret_cast<const uint4*>(zr + head) : nullptr;
    uint4* gv = reinterpret_cast<uint4*>(g + head);
    int64_t vi = tid;
    for (; vi + (UNROLL - 1) * T < nvec; vi += UNROLL * T) {
      uint4 raw[UNROLL], rraw[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        raw[k] = ld_vec<NC>(zv + vi + k * T);
        if (KL) rraw[k] = ld_vec<true>(zrv + vi + k * T);
      }
      float a[UNROLL * VEC], b[UNROLL * VEC];
      int64_t s0[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) {
        E::unpack(raw[k], a + k * VEC);
        if (KL) E::unpack(rraw[k], b + k * VEC);
        else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) b[k * VEC + j] = 0.0f;
        }
        s0[k] = head + (vi + k * T) * VEC;
      }
      bwd_group<MODE, UNROLL * VEC, VEC>(a, b, s0, y, gy, r);
#pragma unroll
      for (int k = 0; k < UNROLL; ++k) gv[vi + k * T] = E::pack(a + k * VEC);
    }
    for (; vi < nvec; vi += T) {
      float a[VEC], b[VEC];
      E::unpack(ld_vec<NC>(zv + vi), a);
      if (KL) E::unpack(ld_vec<true>(zrv + vi), b);
      else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) b[j] = 0.0f;
      }
      const int64_t s0[1] = {head + vi * VEC};
      bwd_group<MODE, VEC, VEC>(a, b, s0, y, gy, r);
      gv[vi] = E::pack(a);
    }
    // the head (before the first 16-byte boundary) and the tail, one element per thread
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const int64_t v = part == 0 ? (tid < head ? tid : V) : head + nvec * VEC + tid;
      if (v < V) {
        float a[1] = {E::to_f(ld_one<NC>(z + v))}, b[1] = {KL ? E::to_f(__ldg(zr + v)) : 0.0f};
        const int64_t s0[1] = {v};
        bwd_group<MODE, 1, 1>(a, b, s0, y, gy, r);
        g[v] = E::from_f(a[0]);
      }
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
        a[k] = E::to_f(ld_one<NC>(z + s0[k]));
        b[k] = KL ? E::to_f(__ldg(zr + s0[k])) : 0.0f;
      }
      bwd_group<MODE, K, 1>(a, b, s0, y, gy, r);
#pragma unroll
      for (int k = 0; k < K; ++k) g[s0[k]] = E::from_f(a[k]);
    }
    for (; v < V; v += T) {
      float a[1] = {E::to_f(ld_one<NC>(z + v))}, b[1] = {KL ? E::to_f(__ldg(zr + v)) : 0.0f};
      const int64_t s0[1] = {v};
      bwd_group<MODE, 1, 1>(a, b, s0, y, gy, r);
      g[v] = E::from_f(a[0]);
    }
  }
}

template <class E>
__device__ __forceinline__ void zero_row(typename E::S* g, int64_t V) {
  typedef typename E::S S;
  const int64_t T = blockDim.x, tid = threadIdx.x;
  const uintptr_t ag = reinterpret_cast<uintptr_t>(g);
  int64_t head = (int64_t)(((16 - (ag & 15)) & 15) / sizeof(S));
  head = head < V ? head : V;
  const int64_t nvec = (V - head) / E::kVec;
  uint4* gv = reinterpret_cast<uint4*>(g + head);
  for (int64_t vi = tid; vi < nvec; vi += T) gv[vi] = make_uint4(0u, 0u, 0u, 0u);
  if (tid < head) g[tid] = S(0);  // +0.0 is all-zero bits in every dtype
  const int64_t v = head + nvec * E::kVec + tid;
  if (v < V) g[v] = S(0);
}

// Literal per-element formula in double, for rows with non-finite per-row scalars (NaN
// or all -inf rows, NaN upstream gradients, infinite KL) or |lse| >= 2^64. In place,
// each element is read and written by the same thread.
template <class E, int MODE>
__device__ void bwd_exact_row(const typename E::S* z, const typename E::S* zr, typename E::S* g, int64_t V,
                              int64_t y, const RowGrad& r) {
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const double x = (double)(E::to_f(z[v]) * r.it);
    const double logp = (x - (double)r.lse) - (double)r.lse_lo;
    const double p = exp(logp);
    const double oh = v == y ? 1.0 : 0.0;
    double gv;
    if (MODE == kBwdKl) {
      const double logq = (double)(E::to_f(zr[v]) * r.it) - (double)r.rlse;
      gv = pf_grad_elem_kl<double>(p, logp, logq, oh, r.c, r.e, r.H, r.k, r.kl, r.it);
    } else if (MODE == kBwdEnt) {
      gv = pf_grad_elem<double>(p, logp, oh, r.c, r.e, r.H, r.it);
    } else {
      gv = pf_grad_elem_noent<double>(p, oh, r.c, r.it);
    }
    g[v] = E::from_f((float)gv);
  }
}

__device__ __forceinline__ bool finite(float v) { return fabsf(v) < kInf; }

template <class E, int MODE>
__global__ void __launch_bounds__(kMaxThreads, 2) row_backward_kernel(const __grid_constant__ BwdParams P) {
  typedef typename E::S S;
  constexpr bool ENT = MODE != kBwdPlain, KL = MODE == kBwdKl;
  __shared__ float label_g;
  const int64_t N = P.x.rows, V = P.x.V;
  const BackwardArgs& A = P.a;
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    S* z = const_cast<S*>(static_cast<const S*>(P.x.data)) + row_offset(P.x, n);
    S* g = P.grad == nullptr ? z : static_cast<S*>(P.grad) + n * V;
    const int64_t y = A.labels[n];
    if (y == A.ignore_index) {
      zero_row<E>(g, V);
      continue;
    }
    const S* zr = KL ? static_cast<const S*>(P.r.data) + row_offset(P.r, n) : nullptr;
    RowGrad r;
    r.it = A.inv_temp[n];
    r.lse = A.lse[n];
    r.lse_lo = A.lse_lo[n];
    r.c = A.grad_logp[n];
    const bool has_e = ENT && A.grad_entropy != nullptr;
    r.e = has_e ? A.grad_entropy[n] : 0.0f;
    r.H = has_e ? A.entropy[n] : 0.0f;
    r.k = KL ? A.grad_kl[n] : 0.0f;
    r.rlse = KL ? A.ref_lse[n] : 0.0f;
    r.kl = KL ? A.kl[n] : 0.0f;
    r.coef = pf_grad_coef<float>(r.c, r.e, r.H, r.k, r.kl, r.it);
    const int64_t yv = (y >= 0 && y < V) ? y : -1;  // out of range: no one-hot term
    const bool fast = finite(r.it) && finite(r.lse) && finite(r.lse_lo) && finite(r.c) && finite(r.e) && finite(r.H) &&
                      finite(r.k) && finite(r.rlse) && finite(r.kl) && fabsf(r.lse) < PF_HUGE &&
                      fabsf(r.rlse) < PF_HUGE;
    if (!fast) {
      bwd_exact_row<E, MODE>(z, zr, g, V, yv, r);
      continue;
    }
    // The label's element, once per row, read before any thread overwrites it in place.
    if (threadIdx.x == 0 && yv >= 0)
      label_g = label_grad<MODE>(E::to_f(z[yv]) * r.it, KL ? E::to_f(zr[yv]) * r.it : 0.0f, r);
    __syncthreads();
    const float gy = label_g;
    bwd_sweep<E, MODE>(z, zr, g, V, yv, gy, r);
    __syncthreads();  // label_g is rewritten for the next row
  }
}

// The kernel variant and parameters for a request, handed to `launch(kernel, params)`.
template <class E, class Launch>
void dispatch_backward_mode(int mode, const BwdParams& P, Launch& launch) {
  switch (mode) {
    case kBwdPlain: launch(row_backward_kernel<E, kBwdPlain>, P); break;
    case kBwdEnt: launch(row_backward_kernel<E, kBwdEnt>, P); break;
    default: launch(row_backward_kernel<E, kBwdKl>, P); break;
  }
}

template <class Launch>
void dispatch_backward(const Rows& L, const Rows* R, const BackwardArgs& A, void* grad, Launch& launch) {
  BwdParams P;
  P.x = L;
  const bool kl = A.grad_kl != nullptr && R != nullptr;
  P.r = kl ? *R : L;
  P.grad = grad;
  P.a = A;
  const int mode = kl ? kBwdKl : A.grad_entropy != nullptr ? kBwdEnt : kBwdPlain;
  switch (L.dtype) {
    case kF32: dispatch_backward_mode<F32>(mode, P, launch); break;
    case kBF16: dispatch_backward_mode<BF16>(mode, P, launch); break;
    default: dispatch_backward_mode<F16>(mode, P, launch); break;
  }
}

}  // namespace
}  // namespace prefopt_cuda
