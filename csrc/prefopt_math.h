// Inline math shared by the native backends (CPU now, CUDA later).
//
// Host/device functions only: no torch headers, no host-only library calls. The
// row-kernel semantics these serve are documented in prefopt_fast/_rows.py.
//
// Notation: x = z * inv_temp (a logits row, scaled), M = running max of x,
// e_v = exp(x_v - M). The online logsumexp accumulator keeps, relative to M,
//   s = sum e_v,  t = sum e_v (x_v - M),  q = sum e_v^2
// from which lse = M + log s, entropy H = log s - t / s, log sum p^2 = log q - 2 log s.
#pragma once

#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__CUDACC__)
#define PF_HD __host__ __device__
#define PF_INLINE __forceinline__
#else
#define PF_HD
#define PF_INLINE inline __attribute__((always_inline))
#endif

// ---------------------------------------------------------------- bit casts

PF_HD PF_INLINE uint32_t pf_f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

PF_HD PF_INLINE float pf_bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// Classification by bits: cannot be optimised away by fast-math flags, and
// vectorises as integer compares.
#define PF_F32_NEG_INF_BITS 0xff800000u
// |x| >= 2^64 (includes inf and NaN). Rows with such values take the exact path, so
// the fast path can rely on differences of two values never overflowing.
#define PF_F32_HUGE_BITS 0x5f800000u

// Finite stand-in for -inf inside the fast loops: below every value the fast path
// accepts (|x| < 2^64), and x - M stays finite, so exp gives 0 and 0 * (x - M) gives 0.
#define PF_SENTINEL (-0x1p100f)

// ---------------------------------------------------------------- 16-bit floats

PF_HD PF_INLINE float pf_bf16_to_f32(uint16_t h) { return pf_bits_f32((uint32_t)h << 16); }

// Round to nearest even; NaN stays NaN (quiet), infinities stay infinities.
PF_HD PF_INLINE uint16_t pf_f32_to_bf16(float f) {
  uint32_t u = pf_f32_bits(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : r);
}

// IEEE half -> float, branch-free (vectorises): the 15 magnitude bits shifted into
// place and rescaled by 2^112 give normals and subnormals alike; inf/NaN get the
// float exponent. (Signed compares: AVX2 has no unsigned 32-bit compare.)
PF_HD PF_INLINE float pf_f16_to_f32(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  int32_t em = (int32_t)(h & 0x7fffu);
  float mag = pf_bits_f32((uint32_t)em << 13) * 0x1p112f;
  uint32_t mb = (em >= 0x7c00) ? (((uint32_t)em << 13) | 0x7f800000u) : pf_f32_bits(mag);
  return pf_bits_f32(mb | sign);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN to quiet NaN.
PF_HD PF_INLINE uint16_t pf_f32_to_f16(float f) {
  uint32_t u = pf_f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t a = (int32_t)(u & 0x7fffffffu);
  // normal halves: rebias the exponent (127 -> 15) and round the 13 dropped bits;
  // a carry out of the mantissa correctly bumps the exponent (up to inf)
  int32_t nrm = (a - 0x38000000 + 0xfff + ((a >> 13) & 1)) >> 13;
  nrm = nrm > 0x7c00 ? 0x7c00 : nrm;
  // subnormal halves: adding 0.5f aligns the value so the FPU's own rounding does it
  int32_t sub = (int32_t)pf_f32_bits(pf_bits_f32((uint32_t)a) + 0.5f) - 0x3f000000;
  int32_t r = a < 0x38800000 ? sub : nrm;
  r = a >= 0x47800000 ? 0x7c00 : r;
  r = a > 0x7f800000 ? 0x7e00 : r;
  return (uint16_t)((uint32_t)r | sign);
}

// ---------------------------------------------------------------- exp / log

PF_HD PF_INLINE float pf_exp(float x) { return expf(x); }
PF_HD PF_INLINE double pf_exp(double x) { return exp(x); }
PF_HD PF_INLINE float pf_log(float x) { return logf(x); }
PF_HD PF_INLINE double pf_log(double x) { return log(x); }
PF_HD PF_INLINE float pf_log1p(float x) { return log1pf(x); }
PF_HD PF_INLINE double pf_log1p(double x) { return log1p(x); }

// exp(d) as straight-line arithmetic, so compilers vectorise it without a vector math
// library: d = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes expf
// coefficients), 2^n built in the exponent bits. Max error ~1.4 ulp. Returns exactly 0
// for d < -87 (where exp(d) < 1.7e-38, below anything that can move a float sum of
// terms that include exp(0) = 1) and saturates at exp(88) for d > 88.
PF_HD PF_INLINE float pf_exp_poly(float d) {
  float dc = d < -87.0f ? -87.0f : d;
  dc = dc > 88.0f ? 88.0f : dc;
  // n = round(d / ln2): adding 1.5 * 2^23 rounds to an integer held in the low bits
  // (written as a * b + c, not fmaf: without hardware FMA fmaf is a slow library call;
  // compilers contract to FMA where the ISA has it, and every step is accurate without.)
  float shifted = dc * 1.44269504088896341f + 12582912.0f;
  float n = shifted - 12582912.0f;
  float r = dc - n * 0.693145751953125f;  // ln2 hi part: n * hi is exact for |n| < 2^9
  r = r - n * 1.428606765330187045e-06f;  // ln2 - hi
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  uint32_t scale = (pf_f32_bits(shifted) - 0x4b400000u + 127u) << 23;
  float v = p * pf_bits_f32(scale);
  return d < -87.0f ? 0.0f : v;
}

// log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), never overflows.
template <typename T>
PF_HD PF_INLINE T pf_log_sigmoid(T x) {
  T ax = x < T(0) ? -x : x;
  T mn = x < T(0) ? x : T(0);
  return mn - pf_log1p(pf_exp(-ax));
}

// ---------------------------------------------------------------- online logsumexp

template <typename T>
struct PfLseAcc {
  T m;  // running max (any value when s == 0)
  T s;  // sum e_v
  T t;  // sum e_v (x_v - m)
  T q;  // sum e_v^2
};

template <typename T>
PF_HD PF_INLINE PfLseAcc<T> pf_lse_empty(T m0) {
  PfLseAcc<T> a;
  a.m = m0;
  a.s = T(0);
  a.t = T(0);
  a.q = T(0);
  return a;
}

// Re-express the accumulator relative to a new max m >= a.m.
template <typename T>
PF_HD PF_INLINE PfLseAcc<T> pf_lse_rescale(PfLseAcc<T> a, T m) {
  if (a.s == T(0)) return pf_lse_empty<T>(m);  // also avoids 0 * inf from an -inf max
  T dm = a.m - m;
  T f = pf_exp(dm);
  PfLseAcc<T> r;
  r.m = m;
  r.t = f * (a.t + a.s * dm);
  r.s = f * a.s;
  r.q = f * f * a.q;
  return r;
}

// Merge two partial accumulators (e.g. two segments of one row); empty ones are
// identities, so -inf maxima never meet arithmetic.
template <typename T>
PF_HD PF_INLINE PfLseAcc<T> pf_lse_merge(PfLseAcc<T> a, PfLseAcc<T> b) {
  if (b.s == T(0)) return a;
  if (a.s == T(0)) return b;
  T m = a.m > b.m ? a.m : b.m;
  PfLseAcc<T> ra = pf_lse_rescale(a, m);
  PfLseAcc<T> rb = pf_lse_rescale(b, m);
  ra.s += rb.s;
  ra.t += rb.t;
  ra.q += rb.q;
  return ra;
}

// Exact KL(p || q) of two rows x (policy) and xr (reference) in the same pass: with
// e_v = exp(x_v - M), M and Mr the running maxima of x and xr, accumulate
//   u = sum e_v ((x_v - M) - (xr_v - Mr)),  and s, sr the two exp-sums;
// then KL = u / s - log s + log sr. When the maxima grow by dm = M' - M >= 0 and
// dmr = Mr' - Mr >= 0, u becomes exp(-dm) (u + (dmr - dm) s)  (s before rescaling).
template <typename T>
PF_HD PF_INLINE T pf_kl_rebase(T u, T s, T dm, T dmr) {
  if (s == T(0)) return T(0);
  return pf_exp(-dm) * (u + (dmr - dm) * s);
}

template <typename T>
PF_HD PF_INLINE T pf_kl_value(T u, T s, T sr) { return u / s - pf_log(s) + pf_log(sr); }

template <typename T>
PF_HD PF_INLINE T pf_lse_value(PfLseAcc<T> a) { return a.m + pf_log(a.s); }

template <typename T>
PF_HD PF_INLINE T pf_lse_entropy(PfLseAcc<T> a) { return pf_log(a.s) - a.t / a.s; }

template <typename T>
PF_HD PF_INLINE T pf_lse_log_sum_sq(PfLseAcc<T> a) { return pf_log(a.q) - T(2) * pf_log(a.s); }

// ---------------------------------------------------------------- gradient

// d loss / d z_v for one element of a row:
//   inv_temp * (c * (onehot - p) - e * p * (logp + H)),  p = exp(logp), logp = x_v - lse
// with the entropy term taken as 0 where p == 0 (x_v = -inf gives logp = -inf).
template <typename T>
PF_HD PF_INLINE T pf_grad_elem(T p, T logp, T onehot, T c, T e, T H, T inv_temp) {
  T ent = e * p * (logp + H);
  ent = p == T(0) ? T(0) : ent;
  return inv_temp * (c * (onehot - p) - ent);
}

// With the exact-KL term as well: + inv_temp * k * p * (logp - logq - kl), 0 where p == 0.
template <typename T>
PF_HD PF_INLINE T pf_grad_elem_kl(T p, T logp, T logq, T onehot, T c, T e, T H, T k, T kl, T inv_temp) {
  T inner = k * (logp - logq - kl) - e * (logp + H);
  inner = p == T(0) ? T(0) : p * inner;
  return inv_temp * (c * (onehot - p) + inner);
}

// Same without an entropy term (grad_entropy absent).
template <typename T>
PF_HD PF_INLINE T pf_grad_elem_noent(T p, T onehot, T c, T inv_temp) {
  return inv_temp * (c * (onehot - p));
}
