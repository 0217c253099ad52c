// Inline math shared by the native backends (CPU now, CUDA later).
//
// Host/device functions only: no torch headers, no host-only library calls. The
// row-kernel semantics these serve are documented in prefopt_fast/_rows.py.
//
// Notation: x = z * inv_temp (a logits row, scaled), M = a reference value (the running
// max, or any value the max does not exceed by much), e_v = exp(x_v - M). The online
// logsumexp accumulator keeps, relative to M,
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

// Fast paths keep IEEE semantics (no -ffast-math), so non-finite inputs announce
// themselves through the row's accumulators: a NaN makes sum_v x_v NaN, a +inf makes
// the max +inf, -inf entries give exp = 0 (and must not meet a 0 * inf). Values of
// magnitude >= PF_HUGE are routed to exact paths so that differences of two values in
// a row never overflow.
#define PF_HUGE 0x1p64f

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

// d clamped to [-88.3, 88], the range pf_exp_poly evaluates; e * pf_exp_poly_arg(d) is
// 0, not NaN, for d = -inf. Clamped on the bit patterns: integer min vectorises to one
// instruction, whereas float compares against constants let compilers split lanes
// into constant cases and evaluate everything under masks (measured 1.5x slower).
// Unsigned order: positives, then negatives by growing magnitude (-inf, -NaN last);
// signed order: negatives, then positives by growing magnitude (+inf, +NaN last).
PF_HD PF_INLINE float pf_exp_poly_arg(float d) {
  uint32_t u = pf_f32_bits(d);
  u = u < 0xc2b0999au ? u : 0xc2b0999au;  // >= -88.3f (bits of -88.3f)
  int32_t i = (int32_t)u;
  i = i < 0x42b00000 ? i : 0x42b00000;    // <= 88.0f
  return pf_bits_f32((uint32_t)i);
}

// exp(d) as straight-line arithmetic, so compilers vectorise it without a vector math
// library and without masks: d = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
// polynomial (Cephes expf coefficients), 2^n built in the exponent bits. Max error ~1.4
// ulp. Below d = -87.3 (exp(d) < 1.2e-38) the result goes to 0 without a select: the
// clamp at -88.3 gives n = -127, whose exponent field is 0, so 2^n is built as +0.0.
// Saturates at exp(88) above d = 88. NaN input gives a non-NaN value (the clamps are
// bit operations): callers detect NaN rows by other means (e.g. the sum of the row).
PF_HD PF_INLINE float pf_exp_poly(float d) {
  const float dc = pf_exp_poly_arg(d);
  // (written as a * b + c, not fmaf: without hardware FMA fmaf is a slow library call;
  // compilers contract to FMA where the ISA has it, and every step is accurate without.)
  // n = round(d / ln2): adding 1.5 * 2^23 rounds to an integer held in the low bits
  const float shifted = dc * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = dc - n * 0.693145751953125f;  // ln2 hi part: n * hi is exact for |n| < 2^9
  r = r - n * 1.428606765330187045e-06f;  // ln2 - hi
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  // n + 127 in [0, 254] lands in the exponent field; 0 there (n = -127) is +0.0
  const uint32_t scale = (pf_f32_bits(shifted) - 0x4b400000u + 127u) << 23;
  return p * pf_bits_f32(scale);
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
  // f == 0: a is negligible next to m; a.s * dm may overflow then, and 0 * inf is NaN
  // (f * a.t keeps a NaN)
  r.t = f == T(0) ? f * a.t : f * (a.t + a.s * dm);
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
  T f = pf_exp(-dm);
  // negligible part (f == 0; (dmr - dm) * s may overflow): 0, but an infinite or NaN u stays
  if (f == T(0)) return T(0) * u == T(0) ? T(0) : u;
  return f * (u + (dmr - dm) * s);
}

template <typename T>
PF_HD PF_INLINE T pf_kl_value(T u, T s, T sr) { return u / s - pf_log(s) + pf_log(sr); }

template <typename T>
PF_HD PF_INLINE T pf_lse_value(PfLseAcc<T> a) { return a.m + pf_log(a.s); }

// lse = m + ls (ls = log s) as an fp32 pair: *hi the float nearest to m + ls, *lo = fl32(lse -
// hi), summed in double (m - hi is exact there), 0 where hi is not finite. The backward's
// (x - hi) - lo then keeps p = exp(x - lse) accurate to fp32 at any magnitude of x, where
// a single fp32 lse costs ulp(lse) of relative error (O(1) at |x| ~ 1e8).
PF_HD PF_INLINE void pf_lse_split(double m, double ls, float* hi, float* lo) {
  const float h = (float)(m + ls);
  *hi = h;
  *lo = (h - h == 0.0f) ? (float)((m - (double)h) + ls) : 0.0f;
}

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

// The same gradient factored per row for fast loops:
//   g = onehot * oh + p * (a + b * logp + c * logq)
// with oh = inv_temp c, a = -inv_temp (c + e H + k kl), b = inv_temp (k - e),
// c = -inv_temp k (k = 0 without the KL term). Pass logp through pf_exp_poly_arg (finite:
// p = 0 then gives 0 instead of 0 * -inf); with a KL term use pf_grad_fast_kl, which
// selects 0 where p = 0 (logq may be -inf there).
template <typename T>
struct PfGradCoef {
  T oh, a, b, c;
};

template <typename T>
PF_HD PF_INLINE PfGradCoef<T> pf_grad_coef(T c, T e, T H, T k, T kl, T inv_temp) {
  PfGradCoef<T> r;
  r.oh = inv_temp * c;
  r.a = -inv_temp * (c + e * H + k * kl);
  r.b = inv_temp * (k - e);
  r.c = -inv_temp * k;
  return r;
}

template <typename T>
PF_HD PF_INLINE T pf_grad_fast(T p, T logp_clamped, T onehot, const PfGradCoef<T>& g) {
  return onehot * g.oh + p * (g.a + g.b * logp_clamped);
}

template <typename T>
PF_HD PF_INLINE T pf_grad_fast_kl(T p, T logp_clamped, T logq, T onehot, const PfGradCoef<T>& g) {
  T inner = g.a + g.b * logp_clamped + g.c * logq;
  inner = p == T(0) ? T(0) : inner;
  return onehot * g.oh + p * inner;
}

// Same without an entropy term (grad_entropy absent).
template <typename T>
PF_HD PF_INLINE T pf_grad_elem_noent(T p, T onehot, T c, T inv_temp) {
  return inv_temp * (c * (onehot - p));
}
