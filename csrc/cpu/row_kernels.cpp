// CPU row kernels: forward (logsumexp, log-prob and row statistics) and backward
// (gradient of the logits), semantics as in prefopt_fast/_rows.py. No torch headers.
//
// Forward: one fused pass per chunk of kChunk elements (convert to fp32, max, sum of x,
// exp-sums against a running reference max; see fwd_segment_impl), so each logits byte
// is read once. Backward: one pass, one read of the row and one write of the gradient.
// Rows are spread over threads; a few very long rows are split into segments whose
// partial accumulators are merged (pf_lse_merge, pf_kl_rebase).
//
// The whole file is compiled with IEEE semantics, no -ffast-math: float reductions
// vectorise through `omp simd reduction` clauses (-fopenmp-simd, no OpenMP runtime),
// and exp is pf_exp_poly (prefopt_math.h), straight-line arithmetic, so there is no
// vector math library and no flush-to-zero side effect on the host process. Because
// IEEE holds, NaN / +inf show up in the row's sum / max and -inf entries give exp = 0;
// such rows, rows of only -inf and rows with |x| >= 2^64 go through an exact scalar
// path in double precision that follows float64 torch.log_softmax.
#include "row_kernels.h"

#include <math.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "prefopt_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// per-ISA copies chosen once at load time; x86-64-v3 = AVX2 + FMA, v4 = AVX-512
#define PF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PF_CLONES
#endif

namespace prefopt_cpu {
namespace {

// 2048 fp32 = 8 KiB (16-bit rows: plus 4 KiB of input): the widened buffers stay in L1d.
constexpr int64_t kChunk = 2048;

// kStat* (STAT_* bits), kOut* (OUT_* rows), kNumOut: row_args.h
enum : uint32_t { kFlagBad = 1 };

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------- element types

struct F32 {
  typedef float S;
  static PF_INLINE float load(const S* p, int64_t i) { return p[i]; }
  static PF_INLINE void store(S* p, int64_t i, float v) { p[i] = v; }
};
struct BF16 {
  typedef uint16_t S;
  static PF_INLINE float load(const S* p, int64_t i) { return pf_bf16_to_f32(p[i]); }
  static PF_INLINE void store(S* p, int64_t i, float v) { p[i] = pf_f32_to_bf16(v); }
};
struct F16 {
  typedef uint16_t S;
  static PF_INLINE float load(const S* p, int64_t i) { return pf_f16_to_f32(p[i]); }
  static PF_INLINE void store(S* p, int64_t i, float v) { p[i] = pf_f32_to_f16(v); }
};

// Items [0, n) in blocks handed out dynamically (an atomic counter): torch's parallel_for
// splits statically, so one thread slowed down by a neighbour on a shared machine
// would otherwise hold up the whole call. `min_block` items are the least worth a task.
template <class F>
void run_parallel(const Threading& th, int64_t n, int64_t min_block, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::max(th.num_threads, 1);
  min_block = std::max<int64_t>(min_block, 1);
  if (threads == 1 || n <= min_block) {
    f(0, n);
    return;
  }
  const int64_t block = std::max<int64_t>(min_block, n / (16 * threads));  // ~16 blocks per thread
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    for (;;) {
      const int64_t b = next.fetch_add(block, std::memory_order_relaxed);
      if (b >= n) break;
      f(b, std::min(n, b + block));
    }
  };
  const int64_t workers = std::min(threads, (n + block - 1) / block);
  th.parallel_for(0, workers, 1,
                  [](int64_t b, int64_t e, void* ctx) { (*static_cast<const decltype(worker)*>(ctx))(b, e); },
                  const_cast<void*>(static_cast<const void*>(&worker)));
}

// Few long rows are split into segments (of about kSegLen elements) so that they can feed
// several threads. The split depends on (rows, V) only, never on the thread count: the
// forward merges the segments' float partial sums, whose grouping is then the same for any
// torch.get_num_threads(), and so are the bits of every output. kFewRows rows or more
// keep 4 threads per row busy up to 16 threads without any split.
struct Split {
  int64_t nseg;
  int64_t seg_len;
};

constexpr int64_t kFewRows = 64;
constexpr int64_t kSegLen = 32768;

Split split_rows(int64_t rows, int64_t V) {
  int64_t nseg = 1;
  if (rows < kFewRows && V >= 2 * kSegLen) nseg = V / kSegLen;
  int64_t seg_len = (V + nseg - 1) / nseg;
  seg_len = (seg_len + 63) / 64 * 64;
  if (seg_len == 0) seg_len = 1;
  nseg = std::max<int64_t>(1, (V + seg_len - 1) / seg_len);
  return {nseg, seg_len};
}

// ---------------------------------------------------------------- forward, fast path
//
// One fused pass per chunk: convert, max, sum x, and the exp-sums relative to a
// reference `ref` that is the first finite chunk max of the row, raised whenever a
// chunk max exceeds it by more than kJump (the chunk is then recomputed). So the row
// max stays in [ref, ref + kJump]: exp(x - ref) <= e^30 cannot overflow the float sums
// (nor e^60 the sum of squares), and terms dropped by the e^-87 cut are < e^-87
// relative to the largest. Any reference gives lse = ref + log s, H = log s - t / s.

constexpr float kJump = 30.0f;

enum : int { kModeBasic = 0, kModeFull = 1, kModeKl = 2 };

struct ChunkSums {
  float cm, cmr;    // chunk maxima (NaN ignored, -inf if none)
  float sx, sxr;    // sums of x and xr (NaN / +inf detectors; sx also gives the mean)
  float s, t, q;    // sum e, sum e * (x - ref), sum e^2 with e = exp(x - ref)
  float u, sr;      // KL: sum e ((x - ref) - (xr - rref)), sum exp(xr - rref)
};

template <class D>
PF_INLINE void widen(const typename D::S* z, float* x, int n, float it) {
#pragma omp simd
  for (int i = 0; i < n; ++i) x[i] = D::load(z, i) * it;
}

// Software prefetch of elements [from, to) of a row, issued for the chunk two ahead of
// the one being processed. Used only where it measured faster (A/B, one thread, 1024 x
// 128256): the 16-bit backward, 38 -> 31.5 ms, whose widen / compute / narrow phases
// leave the input stream idle; it made the fp32 loops ~15% slower.
template <class S>
PF_INLINE void prefetch_range(const S* base, int64_t from, int64_t to) {
  const char* a = reinterpret_cast<const char*>(base + from);
  const char* e = reinterpret_cast<const char*>(base + to);
  for (; a < e; a += 64) __builtin_prefetch(a, 0, 3);
}
constexpr int64_t kPrefetchAhead = 2 * kChunk;

// x = z * inv_temp rounded to fp32, never contracted into what follows. With
// -ffp-contract=fast, x - ref would become fma(z, inv_temp, -ref): the exp-sum would see
// the unrounded product while the max and x_y are the rounded one, and log-probs come out
// up to 0.5 ulp(max |x|) above 0. An xor with a zero the compiler cannot see through
// keeps the product a separate, rounded value at the cost of one integer op per element
// (-ffp-contract=off instead cost ~40%: pf_exp_poly needs its FMAs; widening fp32 rows
// into a buffer ~50%). __builtin_assoc_barrier is dropped by the vectorizer (GCC 12).
PF_INLINE uint32_t opaque_zero() {
  uint32_t z = 0;
#if defined(__GNUC__)
  __asm__("" : "+r"(z));
#endif
  return z;
}
PF_INLINE float mul_rn(float a, float b, uint32_t zero) { return pf_bits_f32(pf_f32_bits(a * b) ^ zero); }

// ROUND: x = mul_rn(z, it) (fp32 rows with it != 1); else z * it is exact or already rounded
// (it == 1, or a widened 16-bit chunk).
template <class D, int MODE, bool ROUND>
PF_INLINE ChunkSums chunk_pass(const typename D::S* zc, const typename D::S* zrc, int n, float it, float ref,
                               float rref) {
  constexpr bool FULL = MODE != kModeBasic;
  constexpr bool KL = MODE == kModeKl;
  const float ninf = -std::numeric_limits<float>::infinity();
  float cm = ninf, cmr = ninf, sx = 0.0f, sxr = 0.0f, s = 0.0f, t = 0.0f, q = 0.0f, u = 0.0f, sr = 0.0f;
  const uint32_t zero = ROUND ? opaque_zero() : 0u;
#pragma omp simd reduction(max : cm, cmr) reduction(+ : sx, sxr, s, t, q, u, sr)
  for (int i = 0; i < n; ++i) {
    const float x = ROUND ? mul_rn(D::load(zc, i), it, zero) : D::load(zc, i) * it;
    cm = x > cm ? x : cm;
    sx += x;
    const float d = x - ref;
    const float e = pf_exp_poly(d);
    s += e;
    if (FULL) {
      t += e * pf_exp_poly_arg(d);  // e = 0 where d = -inf: 0, not NaN
      q += e * e;
    }
    if (KL) {
      const float xr = ROUND ? mul_rn(D::load(zrc, i), it, zero) : D::load(zrc, i) * it;
      cmr = xr > cmr ? xr : cmr;
      sxr += xr;
      const float dr = xr - rref;
      sr += pf_exp_poly(dr);
      // q_v = 0 (xr = -inf) where p_v > 0 makes this +inf, as KL should be; p_v = 0 adds 0
      u += e > 0.0f ? e * (pf_exp_poly_arg(d) - dr) : 0.0f;
    }
  }
  ChunkSums c;
  c.cm = cm;
  c.cmr = cmr;
  c.sx = sx;
  c.sxr = sxr;
  c.s = s;
  c.t = t;
  c.q = q;
  c.u = u;
  c.sr = sr;
  return c;
}

struct FwdPart {
  PfLseAcc<double> acc;   // policy row, relative to acc.m = ref (-inf: no finite value yet)
  PfLseAcc<double> racc;  // reference row (KL only; s and m used)
  double u;               // KL accumulator, see pf_kl_rebase
  double sum_x;
  float max;              // row max (-inf if none)
  int64_t argmax;         // first index of the max, -1 if none
  uint32_t flags;
};

// A chunk max that makes the fast path unsafe: +inf or |x| >= 2^64 (NaN never is a max).
PF_INLINE bool huge_max(float m) { return m >= PF_HUGE || (m <= -PF_HUGE && m != -std::numeric_limits<float>::infinity()); }
PF_INLINE bool nan_or_posinf(float v) { return !(v < std::numeric_limits<float>::infinity()); }

template <class D, int MODE>
PF_INLINE FwdPart fwd_segment_impl(const typename D::S* z, const typename D::S* zr, int64_t v0, int64_t v1,
                                   float it, bool want_argmax) {
  constexpr bool KL = MODE == kModeKl;
  const double dninf = -kInf;
  PfLseAcc<double> acc = pf_lse_empty<double>(dninf);
  PfLseAcc<double> racc = pf_lse_empty<double>(dninf);
  float ref = -std::numeric_limits<float>::infinity(), rref = ref, best = ref;
  double U = 0.0, SX = 0.0;
  int64_t amax = -1;
  uint32_t flags = 0;
  // 16-bit rows are first widened into fp32 buffers (x = z * inv_temp): loops that mix
  // 16- and 32-bit lanes vectorise poorly (half-width vectors, register spills)
  constexpr bool WIDEN = !std::is_same<D, F32>::value;
  alignas(64) float bx[WIDEN ? kChunk : 1];
  alignas(64) float bxr[WIDEN && KL ? kChunk : 1];
  const bool round = !WIDEN && it != 1.0f;
  for (int64_t c0 = v0; c0 < v1; c0 += kChunk) {
    const int n = (int)std::min<int64_t>(kChunk, v1 - c0);
    const float* zc;
    const float* zrc = nullptr;
    float itc;
    if (WIDEN) {
      widen<D>(z + c0, bx, n, it);
      if (KL) widen<D>(zr + c0, bxr, n, it);
      zc = bx;
      zrc = bxr;
      itc = 1.0f;
    } else {
      zc = reinterpret_cast<const float*>(z) + c0;
      zrc = KL ? reinterpret_cast<const float*>(zr) + c0 : nullptr;
      itc = it;
    }
    // no reference yet: compute against 0 and (unless the chunk is all -inf) redo below
    const float ref_eff = acc.m == dninf ? 0.0f : ref;
    const float rref_eff = racc.m == dninf ? 0.0f : rref;
    ChunkSums cs = round ? chunk_pass<F32, MODE, true>(zc, zrc, n, itc, ref_eff, rref_eff)
                         : chunk_pass<F32, MODE, false>(zc, zrc, n, itc, ref_eff, rref_eff);
    if (nan_or_posinf(cs.sx) || huge_max(cs.cm) || (KL && (nan_or_posinf(cs.sxr) || huge_max(cs.cmr)))) {
      flags |= kFlagBad;  // the exact path redoes the whole row
      break;
    }
    const bool new_ref = cs.cm != -std::numeric_limits<float>::infinity() && (acc.m == dninf || cs.cm > ref + kJump);
    const bool new_rref =
        KL && cs.cmr != -std::numeric_limits<float>::infinity() && (racc.m == dninf || cs.cmr > rref + kJump);
    if (new_ref || new_rref) {
      // (U so far is relative to the effective references: 0 where none was set yet)
      if (KL && new_rref) {
        U = pf_kl_rebase<double>(U, acc.s, 0.0, (double)cs.cmr - (double)rref_eff);
        racc = pf_lse_rescale<double>(racc, (double)cs.cmr);
        rref = cs.cmr;
      }
      if (new_ref) {
        if (KL) U = pf_kl_rebase<double>(U, acc.s, (double)cs.cm - (double)ref_eff, 0.0);
        acc = pf_lse_rescale<double>(acc, (double)cs.cm);
        ref = cs.cm;
      }
      const float ref2 = acc.m == dninf ? 0.0f : ref, rref2 = racc.m == dninf ? 0.0f : rref;
      const ChunkSums again = round ? chunk_pass<F32, MODE, true>(zc, zrc, n, itc, ref2, rref2)
                                    : chunk_pass<F32, MODE, false>(zc, zrc, n, itc, ref2, rref2);
      cs.s = again.s;
      cs.t = again.t;
      cs.q = again.q;
      cs.u = again.u;
      cs.sr = again.sr;
    }
    if (acc.m != dninf) {  // else: every x so far is -inf, nothing to add
      acc.s += cs.s;
      acc.t += cs.t;
      acc.q += cs.q;
      U += cs.u;
    }
    if (KL && racc.m != dninf) racc.s += cs.sr;
    SX += cs.sx;
    if (cs.cm > best) {
      best = cs.cm;
      if (want_argmax) {
        int i = 0;
        while (i < n - 1 && zc[i] * itc != cs.cm) ++i;
        amax = c0 + i;
      }
    }
  }
  FwdPart part;
  part.acc = acc;
  part.racc = racc;
  part.u = U;
  part.sum_x = SX;
  part.max = best;
  part.argmax = amax;
  part.flags = flags;
  return part;
}

#define PF_FWD_VARIANT(NAME, D, MODE)                                                                  \
  PF_CLONES FwdPart NAME(const void* z, const void* zr, int64_t v0, int64_t v1, float it, bool am) {   \
    return fwd_segment_impl<D, MODE>(static_cast<const D::S*>(z), static_cast<const D::S*>(zr), v0, v1, \
                                     it, am);                                                          \
  }
PF_FWD_VARIANT(fwd_f32_basic, F32, kModeBasic)
PF_FWD_VARIANT(fwd_f32_full, F32, kModeFull)
PF_FWD_VARIANT(fwd_f32_kl, F32, kModeKl)
PF_FWD_VARIANT(fwd_bf16_basic, BF16, kModeBasic)
PF_FWD_VARIANT(fwd_bf16_full, BF16, kModeFull)
PF_FWD_VARIANT(fwd_bf16_kl, BF16, kModeKl)
PF_FWD_VARIANT(fwd_f16_basic, F16, kModeBasic)
PF_FWD_VARIANT(fwd_f16_full, F16, kModeFull)
PF_FWD_VARIANT(fwd_f16_kl, F16, kModeKl)
#undef PF_FWD_VARIANT

typedef FwdPart (*FwdSegmentFn)(const void*, const void*, int64_t, int64_t, float, bool);

// Merge two consecutive segments of one row.
FwdPart merge_parts(FwdPart a, const FwdPart& b, bool kl) {
  if (b.max > a.max) {  // ties keep the earlier index
    a.max = b.max;
    a.argmax = b.argmax;
  }
  if (kl) {
    const double m = std::max(a.acc.m, b.acc.m), mr = std::max(a.racc.m, b.racc.m);
    auto rebased = [&](const FwdPart& p) {
      if (p.acc.s == 0.0) return 0.0;
      // p > 0 somewhere (s > 0) against a reference segment of only -inf: q = 0 there
      if (!(p.u < kInf) || p.racc.m == -kInf) return kInf;
      return pf_kl_rebase<double>(p.u, p.acc.s, m - p.acc.m, mr - p.racc.m);
    };
    a.u = rebased(a) + rebased(b);
    a.racc = pf_lse_merge(a.racc, b.racc);
  }
  a.acc = pf_lse_merge(a.acc, b.acc);
  a.sum_x += b.sum_x;
  a.flags |= b.flags;
  return a;
}

// ---------------------------------------------------------------- forward, exact path

// Float64 torch.log_softmax semantics for one row (NaN/inf, all -inf, huge values).
// Returns the maximum (NaN if any NaN), fills lse (NaN for NaN/+inf rows, -inf for
// all -inf rows) and the accumulator relative to the max when it is finite.
template <class D>
double exact_lse(const typename D::S* z, int64_t V, float it, int64_t* argmax, double* mean,
                 PfLseAcc<double>* acc) {
  double M = -kInf, sx = 0.0;
  bool nan = false;
  int64_t am = 0;
  for (int64_t v = 0; v < V; ++v) {
    const double x = (double)(D::load(z, v) * it);
    sx += x;
    if (x != x) {
      if (!nan) am = v;  // torch.argmax: the first NaN is the max
      nan = true;
    } else if (!nan && x > M) {
      M = x;
      am = v;
    }
  }
  if (argmax) *argmax = am;
  if (mean) *mean = V > 0 ? sx / (double)V : kNaN;
  *acc = pf_lse_empty<double>(M);
  if (nan || M == kInf) return kNaN;  // NaN or +inf anywhere: NaN row
  if (M == -kInf) return -kInf;       // only -inf (or V == 0)
  for (int64_t v = 0; v < V; ++v) {
    const double d = (double)(D::load(z, v) * it) - M;
    const double e = exp(d);
    acc->s += e;
    acc->t += e > 0.0 ? e * d : 0.0;
    acc->q += e * e;
  }
  return pf_lse_value(*acc);
}

template <class D>
void exact_row_forward(const typename D::S* z, const typename D::S* zr, int64_t V, float it, int64_t y,
                       bool y_ok, double* o) {
  int64_t am = 0;
  double mean = 0.0;
  PfLseAcc<double> acc;
  const double lse = exact_lse<D>(z, V, it, &am, &mean, &acc);
  o[kOutLse] = lse;
  o[kOutLseLo] = 0.0;
  o[kOutMean] = mean;
  o[kOutArgmax] = (y_ok && y == am) ? 1.0 : 0.0;
  const bool fin = lse == lse && lse != -kInf;  // lse is never +inf
  if (fin) {
    float hi, lo;
    pf_lse_split(acc.m, log(acc.s), &hi, &lo);
    o[kOutLse] = hi;
    o[kOutLseLo] = lo;
    // (x_y - max) - log s, as the fast path: x_y - lse cancels where |x| >> log s
    o[kOutLogp] = y_ok ? ((double)(D::load(z, y) * it) - acc.m) - log(acc.s) : kNaN;
    o[kOutEntropy] = pf_lse_entropy(acc);
    o[kOutLssp] = pf_lse_log_sum_sq(acc);
  } else {  // log-probs are NaN - lse or -inf - (-inf)
    o[kOutLogp] = o[kOutEntropy] = o[kOutLssp] = kNaN;
  }
  if (zr) {
    PfLseAcc<double> racc;
    const double rlse = exact_lse<D>(zr, V, it, nullptr, nullptr, &racc);
    o[kOutRefLse] = rlse;
    double kl = kNaN;
    if (fin && rlse == rlse && rlse != -kInf) {
      kl = 0.0;
      for (int64_t v = 0; v < V; ++v) {
        const double x = (double)(D::load(z, v) * it);
        const double xr = (double)(D::load(zr, v) * it);
        if (x == -kInf) continue;  // p_v = 0
        if (xr == -kInf) {         // q_v = 0 < p_v
          kl = kInf;
          break;
        }
        // relative to the maxima, as the log-prob: no cancellation of huge x against lse
        const double lp = (x - acc.m) - log(acc.s);
        const double lq = (xr - racc.m) - log(racc.s);
        kl += exp(lp) * (lp - lq);
      }
    }
    o[kOutKl] = kl;
  }
}

template <class D>
void finish_row(const typename D::S* z, const typename D::S* zr, int64_t V, float it, int64_t y,
                const FwdPart& part, bool want_mean, double* o) {
  const bool y_ok = y >= 0 && y < V;
  if ((part.flags & kFlagBad) || part.acc.s == 0.0 || (zr && part.racc.s == 0.0)) {
    exact_row_forward<D>(z, zr, V, it, y, y_ok, o);
    return;
  }
  const double ls = log(part.acc.s);
  float hi, lo;
  pf_lse_split(part.acc.m, ls, &hi, &lo);
  o[kOutLse] = hi;
  o[kOutLseLo] = lo;
  // relative to the reference rather than x_y - lse: no cancellation for large logits
  o[kOutLogp] = y_ok ? ((double)(D::load(z, y) * it) - part.acc.m) - ls : kNaN;
  o[kOutEntropy] = pf_lse_entropy(part.acc);
  o[kOutLssp] = pf_lse_log_sum_sq(part.acc);
  o[kOutMean] = part.sum_x / (double)V;
  if (want_mean && part.sum_x == -kInf) {
    // -inf entries, or (rarely) finite values near -FLT_MAX that overflowed the float
    // partial sums: tell them apart in double
    double sx = 0.0;
    for (int64_t v = 0; v < V && sx != -kInf; ++v) sx += (double)(D::load(z, v) * it);
    o[kOutMean] = sx / (double)V;
  }
  o[kOutArgmax] = (y_ok && y == part.argmax) ? 1.0 : 0.0;
  if (zr) {
    o[kOutRefLse] = pf_lse_value(part.racc);
    o[kOutKl] = pf_kl_value(part.u, part.acc.s, part.racc.s);  // u = +inf: q_v = 0 < p_v
  }
}

template <class D>
void forward_rows(const RowsView& L, const RowsView* R, const int64_t* labels, const float* inv_temp,
                  int64_t ignore_index, int stats, float* out, const Threading& th) {
  typedef typename D::S S;
  const int64_t N = L.rows, V = L.V;
  const S* base = static_cast<const S*>(L.data);
  const S* rbase = R ? static_cast<const S*>(R->data) : nullptr;
  const bool kl = R != nullptr && (stats & kStatKl) != 0;
  const bool full = (stats & (kStatEntropy | kStatLssp | kStatMean)) != 0;
  const bool want_argmax = (stats & kStatArgmax) != 0;
  const bool want_mean = (stats & kStatMean) != 0;
  const int mode = kl ? kModeKl : full ? kModeFull : kModeBasic;
  static const FwdSegmentFn table[3][3] = {{fwd_f32_basic, fwd_f32_full, fwd_f32_kl},
                                           {fwd_bf16_basic, fwd_bf16_full, fwd_bf16_kl},
                                           {fwd_f16_basic, fwd_f16_full, fwd_f16_kl}};
  const FwdSegmentFn seg_fn = table[L.dtype][mode];
  const Split sp = split_rows(N, V);
  const int64_t seg_len = sp.seg_len, nseg = sp.nseg;

  auto write = [&](int64_t n, const double* o) {
    static const int bit[kNumOut] = {0, 0, kStatEntropy, kStatLssp, kStatMean, kStatArgmax, kStatKl, kStatKl, 0};
    for (int r = 0; r < kNumOut; ++r) {
      const bool on = bit[r] == 0 || ((stats & bit[r]) && (bit[r] != kStatKl || kl));
      out[r * N + n] = on ? (float)o[r] : 0.0f;
    }
  };
  const double zeros[kNumOut] = {};
  auto row_ptrs = [&](int64_t n, const S** z, const S** zr) {
    *z = base + row_offset(L, n);
    *zr = kl ? rbase + row_offset(*R, n) : nullptr;
  };

  if (nseg == 1) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
    run_parallel(th, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const int64_t y = labels[n];
        if (y == ignore_index) {
          write(n, zeros);
          continue;
        }
        const S *z, *zr;
        row_ptrs(n, &z, &zr);
        const float it = inv_temp[n];
        const FwdPart part = seg_fn(z, zr, 0, V, it, want_argmax);
        double o[kNumOut] = {};
        finish_row<D>(z, zr, V, it, y, part, want_mean, o);
        write(n, o);
      }
    });
    return;
  }

  // Few long rows: segments in parallel, then an in-order merge per row.
  std::vector<FwdPart> parts((size_t)(N * nseg));
  run_parallel(th, N * nseg, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / nseg, sg = item % nseg;
      if (labels[n] == ignore_index) continue;
      const int64_t v0 = sg * seg_len, v1 = std::min(V, v0 + seg_len);
      const S *z, *zr;
      row_ptrs(n, &z, &zr);
      parts[(size_t)item] = seg_fn(z, zr, v0, v1, inv_temp[n], want_argmax);
    }
  });
  run_parallel(th, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int64_t y = labels[n];
      if (y == ignore_index) {
        write(n, zeros);
        continue;
      }
      FwdPart row = parts[(size_t)(n * nseg)];
      for (int64_t sg = 1; sg < nseg; ++sg) row = merge_parts(row, parts[(size_t)(n * nseg + sg)], kl);
      const S *z, *zr;
      row_ptrs(n, &z, &zr);
      double o[kNumOut] = {};
      finish_row<D>(z, zr, V, inv_temp[n], y, row, want_mean, o);
      write(n, o);
    }
  });
}

// ---------------------------------------------------------------- backward

struct RowGrad {
  float it, lse, lse_lo, H, c, e;  // log p_v = (x_v - lse) - lse_lo
  float k, rlse, kl;     // KL term (k = 0 without it)
  int64_t y;             // label if in [0, V), else -1 (no one-hot term)
  PfGradCoef<float> coef;  // the fast paths' factored form of the same gradient
};

enum : int { kGradPlain = 0, kGradEntropy = 1, kGradKl = 2 };

// Exact per-element gradient in double for [a, b) of one row. In place (g == z) each
// element is read before it is written.
template <class D, int MODE>
void exact_grad_range(const typename D::S* z, const typename D::S* zr, typename D::S* g, int64_t a, int64_t b,
                      const RowGrad& r) {
  for (int64_t v = a; v < b; ++v) {
    const double x = (double)(D::load(z, v) * r.it);
    const double logp = (x - (double)r.lse) - (double)r.lse_lo;
    const double p = exp(logp);
    const double oh = v == r.y ? 1.0 : 0.0;
    double gv;
    if (MODE == kGradKl) {
      const double logq = (double)(D::load(zr, v) * r.it) - (double)r.rlse;
      gv = pf_grad_elem_kl<double>(p, logp, logq, oh, r.c, r.e, r.H, r.k, r.kl, r.it);
    } else if (MODE == kGradEntropy) {
      gv = pf_grad_elem<double>(p, logp, oh, r.c, r.e, r.H, r.it);
    } else {
      gv = pf_grad_elem_noent<double>(p, oh, r.c, r.it);
    }
    D::store(g, v, (float)gv);
  }
}

// Every element but the label's: the factored form (fewer operations per element).
template <int MODE>
PF_INLINE float fast_grad(float x, float xr, const RowGrad& r) {
  const float logp = (x - r.lse) - r.lse_lo;  // x - lse is exact where p is not negligible
  const float p = pf_exp_poly(logp);  // 0 for x = -inf
  const float lpc = pf_exp_poly_arg(logp);
  if (MODE == kGradKl) return pf_grad_fast_kl<float>(p, lpc, xr - r.rlse, 0.0f, r.coef);
  return pf_grad_fast<float>(p, lpc, 0.0f, r.coef);
}

// The label's element: the literal formula in double, so that c * (1 - p) keeps its
// precision when p ~ 1 (a float p is only good to 6e-8 absolute). Once per row.
template <int MODE>
PF_INLINE float label_grad(float x, float xr, const RowGrad& r) {
  const double logp = ((double)x - (double)r.lse) - (double)r.lse_lo;
  const double p = exp(logp);
  if (MODE == kGradKl)
    return (float)pf_grad_elem_kl<double>(p, logp, (double)xr - (double)r.rlse, 1.0, r.c, r.e, r.H, r.k, r.kl, r.it);
  if (MODE == kGradEntropy) return (float)pf_grad_elem<double>(p, logp, 1.0, r.c, r.e, r.H, r.it);
  return (float)pf_grad_elem_noent<double>(p, 1.0, r.c, r.it);
}

// One read of the row, one write of the gradient. Rows reach this only with finite
// per-row scalars and |lse| < 2^64, so every x - lse is exact enough and no per-element
// classification is needed (a NaN x could only come with a NaN lse).
template <class D, int MODE>
PF_INLINE void bwd_segment_impl(const typename D::S* z, const typename D::S* zr, typename D::S* g, int64_t v0,
                                int64_t v1, const RowGrad& r) {
  constexpr bool KL = MODE == kGradKl;
  const RowGrad rr = r;  // local copy: provably not aliased by the output
  const bool has_y = rr.y >= v0 && rr.y < v1;
  // read before the loop: in place, z[y] is overwritten by it
  const float xy = has_y ? D::load(z, rr.y) * rr.it : 0.0f;
  const float xry = (has_y && KL) ? D::load(zr, rr.y) * rr.it : 0.0f;
  if (std::is_same<D, F32>::value && rr.it == 1.0f) {  // x = z exactly
    const float* zs = reinterpret_cast<const float*>(z) + v0;
    const float* zrs = KL ? reinterpret_cast<const float*>(zr) + v0 : nullptr;
    float* gs = reinterpret_cast<float*>(g) + v0;
    const int64_t n = v1 - v0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gs[i] = fast_grad<MODE>(zs[i], KL ? zrs[i] : 0.0f, rr);
  } else if (std::is_same<D, F32>::value) {
    const float* zs = reinterpret_cast<const float*>(z) + v0;
    const float* zrs = KL ? reinterpret_cast<const float*>(zr) + v0 : nullptr;
    float* gs = reinterpret_cast<float*>(g) + v0;
    const int64_t n = v1 - v0;
    // omp simd: in place (gs == zs) each element is read before it is written, in the
    // same iteration, so there is no cross-iteration dependence despite the aliasing
    const uint32_t zero = opaque_zero();  // x rounded as in the forward (see mul_rn)
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      gs[i] = fast_grad<MODE>(mul_rn(zs[i], rr.it, zero), KL ? mul_rn(zrs[i], rr.it, zero) : 0.0f, rr);
  } else {
    // 16-bit: widen a chunk into fp32, compute, narrow (uniform-width loops vectorise
    // well); in place, the whole chunk is read before any of it is written
    alignas(64) float bx[kChunk];
    alignas(64) float bxr[KL ? kChunk : 1];
    for (int64_t c0 = v0; c0 < v1; c0 += kChunk) {
      const int n = (int)std::min<int64_t>(kChunk, v1 - c0);
      prefetch_range(z, c0 + kPrefetchAhead, std::min(v1, c0 + kPrefetchAhead + kChunk));
      if (KL) prefetch_range(zr, c0 + kPrefetchAhead, std::min(v1, c0 + kPrefetchAhead + kChunk));
      widen<D>(z + c0, bx, n, rr.it);
      if (KL) widen<D>(zr + c0, bxr, n, rr.it);
#pragma omp simd
      for (int i = 0; i < n; ++i) bx[i] = fast_grad<MODE>(bx[i], KL ? bxr[i] : 0.0f, rr);
      typename D::S* gc = g + c0;
#pragma omp simd
      for (int i = 0; i < n; ++i) D::store(gc, i, bx[i]);
    }
  }
  if (has_y) D::store(g, rr.y, label_grad<MODE>(xy, xry, rr));
}

template <class D>
PF_INLINE void zero_segment_impl(typename D::S* g, int64_t v0, int64_t v1) {
#pragma omp simd
  for (int64_t v = v0; v < v1; ++v) g[v] = 0;  // +0.0 is all-zero bits in every dtype
}

#define PF_BWD_VARIANT(NAME, D, MODE)                                                                      \
  PF_CLONES void NAME(const void* z, const void* zr, void* g, int64_t v0, int64_t v1, const RowGrad& r) { \
    bwd_segment_impl<D, MODE>(static_cast<const D::S*>(z), static_cast<const D::S*>(zr),                \
                              static_cast<D::S*>(g), v0, v1, r);                                          \
  }
PF_BWD_VARIANT(bwd_f32_plain, F32, kGradPlain)
PF_BWD_VARIANT(bwd_f32_ent, F32, kGradEntropy)
PF_BWD_VARIANT(bwd_f32_kl, F32, kGradKl)
PF_BWD_VARIANT(bwd_bf16_plain, BF16, kGradPlain)
PF_BWD_VARIANT(bwd_bf16_ent, BF16, kGradEntropy)
PF_BWD_VARIANT(bwd_bf16_kl, BF16, kGradKl)
PF_BWD_VARIANT(bwd_f16_plain, F16, kGradPlain)
PF_BWD_VARIANT(bwd_f16_ent, F16, kGradEntropy)
PF_BWD_VARIANT(bwd_f16_kl, F16, kGradKl)
#undef PF_BWD_VARIANT

PF_CLONES void zero_f32(void* g, int64_t v0, int64_t v1) { zero_segment_impl<F32>(static_cast<float*>(g), v0, v1); }
PF_CLONES void zero_u16(void* g, int64_t v0, int64_t v1) { zero_segment_impl<BF16>(static_cast<uint16_t*>(g), v0, v1); }

typedef void (*BwdSegmentFn)(const void*, const void*, void*, int64_t, int64_t, const RowGrad&);

template <class D>
void backward_rows(const RowsView& L, const RowsView* R, const BackwardArgs& A, void* grad, const Threading& th) {
  typedef typename D::S S;
  const int64_t N = L.rows, V = L.V;
  S* base = static_cast<S*>(L.data);
  S* gbase = static_cast<S*>(grad);  // nullptr: in place
  const bool has_e = A.grad_entropy != nullptr;
  const bool has_kl = A.grad_kl != nullptr;
  const S* rbase = has_kl ? static_cast<const S*>(R->data) : nullptr;
  const int mode = has_kl ? kGradKl : has_e ? kGradEntropy : kGradPlain;
  static const BwdSegmentFn table[3][3] = {{bwd_f32_plain, bwd_f32_ent, bwd_f32_kl},
                                           {bwd_bf16_plain, bwd_bf16_ent, bwd_bf16_kl},
                                           {bwd_f16_plain, bwd_f16_ent, bwd_f16_kl}};
  const BwdSegmentFn seg_fn = table[L.dtype][mode];
  const auto zero_fn = L.dtype == kF32 ? zero_f32 : zero_u16;
  const Split sp = split_rows(N, V);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(sp.seg_len, 1));

  run_parallel(th, N * sp.nseg, grain, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t n = item / sp.nseg, sg = item % sp.nseg;
      const int64_t v0 = sg * sp.seg_len, v1 = std::min(V, v0 + sp.seg_len);
      S* z = base + row_offset(L, n);
      S* g = gbase ? gbase + n * V : z;
      const int64_t y = A.labels[n];
      if (y == A.ignore_index) {
        zero_fn(g, v0, v1);
        continue;
      }
      const S* zr = has_kl ? rbase + row_offset(*R, n) : nullptr;
      RowGrad r;
      r.it = A.inv_temp[n];
      r.lse = A.lse[n];
      r.lse_lo = A.lse_lo[n];
      r.c = A.grad_logp[n];
      r.e = has_e ? A.grad_entropy[n] : 0.0f;
      r.H = has_e ? A.entropy[n] : 0.0f;
      r.k = has_kl ? A.grad_kl[n] : 0.0f;
      r.rlse = has_kl ? A.ref_lse[n] : 0.0f;
      r.kl = has_kl ? A.kl[n] : 0.0f;
      r.y = (y >= 0 && y < V) ? y : -1;
      r.coef = pf_grad_coef<float>(r.c, r.e, r.H, r.k, r.kl, r.it);
      const bool fast = std::isfinite(r.it) && std::isfinite(r.lse) && std::isfinite(r.lse_lo) && std::isfinite(r.c) &&
                        std::isfinite(r.e) && std::isfinite(r.H) && std::isfinite(r.k) &&
                        std::isfinite(r.rlse) && std::isfinite(r.kl) && std::fabs(r.lse) < PF_HUGE &&
                        std::fabs(r.rlse) < PF_HUGE;
      if (!fast) {  // NaN / +inf / all -inf / huge rows, infinite KL, NaN upstream gradients
        if (mode == kGradKl)
          exact_grad_range<D, kGradKl>(z, zr, g, v0, v1, r);
        else if (mode == kGradEntropy)
          exact_grad_range<D, kGradEntropy>(z, zr, g, v0, v1, r);
        else
          exact_grad_range<D, kGradPlain>(z, zr, g, v0, v1, r);
        continue;
      }
      seg_fn(z, zr, g, v0, v1, r);
    }
  });
}

}  // namespace

// ---------------------------------------------------------------- entry points

void row_forward(const RowsView& L, const RowsView* ref, const ForwardArgs& A, const Threading& th) {
  if (L.rows == 0) return;
  switch (L.dtype) {
    case kF32: forward_rows<F32>(L, ref, A.labels, A.inv_temp, A.ignore_index, A.stats, A.out, th); break;
    case kBF16: forward_rows<BF16>(L, ref, A.labels, A.inv_temp, A.ignore_index, A.stats, A.out, th); break;
    case kF16: forward_rows<F16>(L, ref, A.labels, A.inv_temp, A.ignore_index, A.stats, A.out, th); break;
  }
}

void row_backward(const RowsView& L, const RowsView* ref, const BackwardArgs& args, void* grad,
                  const Threading& th) {
  if (L.rows == 0 || L.V == 0) return;
  switch (L.dtype) {
    case kF32: backward_rows<F32>(L, ref, args, grad, th); break;
    case kBF16: backward_rows<BF16>(L, ref, args, grad, th); break;
    case kF16: backward_rows<F16>(L, ref, args, grad, th); break;
  }
}

void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t huge = (size_t)2 << 20;
  if (bytes < 4 * huge) return;
  const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1);
  const uintptr_t e = ((uintptr_t)p + bytes) & ~(uintptr_t)(huge - 1);
  if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);  // advisory: failure is harmless
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace prefopt_cpu
