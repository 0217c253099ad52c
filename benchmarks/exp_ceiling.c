// Calibration loops for the benchmark bound (benchmarks/calibration.py compiles this with
// the system C compiler, -O3 -march=native, and calls it through ctypes).
//
// exp_loop: the compute ceiling of the logits ops. A deliberately cheap fp32 exp, cheaper
// than every exp the benchmarked code uses (prefopt_fast's pf_exp_poly: degree 6 plus
// clamps; PyTorch's Sleef / exp_u20: degree 5 plus range checks): round-to-nearest range
// reduction with one ln2 constant, a degree-5 Taylor polynomial (~20 ulp), 2^n built in
// the exponent bits, no clamps and no special cases. Inputs stay in [-87, 0] so no lane
// ever leaves the normal range. Its throughput, in cache, is an upper bound on the exps per
// second any of those implementations reaches here, so exps / that rate is a lower bound
// on their time.
//
// read_sum: a read-only stream (one of the candidates of the read-bandwidth calibration).
#include <stdint.h>
#include <string.h>

static inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static inline float exp_cheap(float x) {
  const float s = x * 1.44269504088896341f + 12582912.0f;  // n = round(x / ln2) in the low bits
  const float n = s - 12582912.0f;
  const float r = x - n * 0.693147180559945f;
  float p = 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_f32((f32_bits(s) - 0x4b400000u + 127u) << 23);
}

// y[i] = exp(x[i]) for i < n, `reps` times over the same (cache-resident) buffers.
void exp_loop(const float* x, float* y, int64_t n, int64_t reps) {
  for (int64_t k = 0; k < reps; ++k) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = exp_cheap(x[i]);
  }
}

float read_sum(const float* x, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}
