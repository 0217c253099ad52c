// Standalone driver of the CPU row kernels for AddressSanitizer + UndefinedBehaviorSanitizer.
//
// Built by tests/test_sanitizer.py as ONE translation unit with csrc/cpu/row_kernels.cpp
// (and so csrc/prefopt_math.h), -fsanitize=address,undefined, and run once. It calls the
// C entry points of csrc/cpu/row_kernels.h on awkward inputs:
//   - rows that are strided views inside a bigger buffer: everything of the buffer that is
//     not a row is POISONED (ASan reports any read or write of it), and checked unchanged
//     afterwards (catches writes ASan's 8-byte granules cannot see);
//   - every buffer allocated with its exact size (a read one past the end is reported);
//   - V = 1, 2, 7, around the 2048-element chunk, long rows split into segments across
//     threads (V >= 65536, few rows), zero rows;
//   - labels out of range (-1, V, V + 1000, INT64_MIN, INT64_MAX), ignored rows, an
//     ignore_index inside [0, V);
//   - NaN, +inf, -inf, rows of only -inf, -inf everywhere but the label, 1e30 / 3e38 in
//     fp32, fp16 overflow to inf;
//   - every statistic set (KL with a reference of different strides), backward without
//     and with entropy and KL terms, NaN upstream gradients, fresh and in-place.
// Light value checks ride along: ignored rows are zero, out-of-range labels give a NaN
// log-prob, log-probs of finite rows are <= 0, the in-place gradient equals the fresh one
// bit for bit, and one vs three threads give the same log-probs and gradients.
// Prints "OK <n> cases" and exits 0; any sanitizer report aborts with a non-zero status.
#include "row_kernels.cpp"  // NOLINT: the kernels and their math, in this translation unit

#include <sanitizer/asan_interface.h>

#include <cinttypes>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

using namespace prefopt_cpu;

namespace {

int g_threads = 1;
int g_failures = 0;
int g_cases = 0;

// torch's parallel_for contract as the kernels use it: [begin, end) split into at most
// g_threads contiguous ranges, each on its own thread (the caller runs the first).
void pfor(int64_t begin, int64_t end, int64_t grain, RangeFn fn, void* ctx) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  int64_t parts = std::min<int64_t>(g_threads, std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
  parts = std::max<int64_t>(1, std::min(parts, n));
  std::vector<std::thread> pool;
  const int64_t step = (n + parts - 1) / parts;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t b = begin + p * step, e = std::min(end, b + step);
    if (b < e) pool.emplace_back([=] { fn(b, e, ctx); });
  }
  fn(begin, std::min(end, begin + step), ctx);
  for (auto& t : pool) t.join();
}

Threading threading() { return Threading{pfor, g_threads}; }

#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (!(cond)) {                                                  \
      std::fprintf(stderr, "CHECK failed at line %d: %s: ", __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                            \
      std::fprintf(stderr, "\n");                                   \
      ++g_failures;                                                 \
    }                                                               \
  } while (0)

size_t elem_size(int dt) { return dt == kF32 ? 4 : 2; }

uint16_t to_bf16(float f) { return pf_f32_to_bf16(f); }
uint16_t to_f16(float f) { return pf_f32_to_f16(f); }

// A [lead..., V] view inside an exactly sized heap buffer; bytes outside the rows poisoned.
struct View {
  int dtype;
  int64_t V;
  std::vector<int64_t> sizes, strides;  // leading dims, in elements
  int64_t offset;                       // storage offset of the first row
  size_t bytes = 0;
  unsigned char* buf = nullptr;
  std::vector<unsigned char> snapshot;  // the gap bytes, to check they are untouched
  std::vector<char> in_row;             // per byte: part of a row

  int64_t rows() const {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    return n;
  }
  int64_t row_off(int64_t n) const {
    int64_t off = 0;
    for (int d = (int)sizes.size() - 1; d >= 0; --d) {
      off += (n % sizes[d]) * strides[d];
      n /= sizes[d];
    }
    return offset + off;
  }
  void* row_ptr(int64_t n) const { return buf + (size_t)row_off(n) * elem_size(dtype); }

  void alloc() {
    int64_t extent = offset + V;
    for (size_t d = 0; d < sizes.size(); ++d)
      if (sizes[d] > 0) extent += (sizes[d] - 1) * strides[d];
    if (rows() == 0) extent = offset + 1;
    bytes = (size_t)extent * elem_size(dtype);
    buf = static_cast<unsigned char*>(std::malloc(bytes));
    std::mt19937 rng(1234);
    for (size_t i = 0; i < bytes; ++i) buf[i] = (unsigned char)(rng() & 0xff);
    in_row.assign(bytes, 0);
    for (int64_t n = 0; n < rows(); ++n) {
      const size_t b = (size_t)row_off(n) * elem_size(dtype);
      std::memset(&in_row[b], 1, (size_t)V * elem_size(dtype));
    }
  }
  void set(int64_t n, int64_t v, float x) {
    void* p = row_ptr(n);
    if (dtype == kF32) static_cast<float*>(p)[v] = x;
    else if (dtype == kBF16) static_cast<uint16_t*>(p)[v] = to_bf16(x);
    else static_cast<uint16_t*>(p)[v] = to_f16(x);
  }
  float get(int64_t n, int64_t v) const {
    const void* p = row_ptr(n);
    if (dtype == kF32) return static_cast<const float*>(p)[v];
    if (dtype == kBF16) return pf_bf16_to_f32(static_cast<const uint16_t*>(p)[v]);
    return pf_f16_to_f32(static_cast<const uint16_t*>(p)[v]);
  }
  // Poison everything but the rows; remember the gap bytes.
  void protect() {
    snapshot.assign(buf, buf + bytes);
    ASAN_POISON_MEMORY_REGION(buf, bytes);
    for (int64_t n = 0; n < rows(); ++n) ASAN_UNPOISON_MEMORY_REGION(row_ptr(n), (size_t)V * elem_size(dtype));
  }
  void unprotect_and_check(const char* what) {
    ASAN_UNPOISON_MEMORY_REGION(buf, bytes);
    size_t changed = 0;
    for (size_t i = 0; i < bytes; ++i)
      if (!in_row[i] && buf[i] != snapshot[i]) ++changed;
    CHECK(changed == 0, "%s: %zu bytes outside the rows were written", what, changed);
  }
  RowsView rows_view() const {
    RowsView L;
    std::memset(&L, 0, sizeof(L));
    L.data = buf + (size_t)offset * elem_size(dtype);
    L.dtype = dtype;
    L.V = V;
    L.rows = rows();
    L.nlead = (int)sizes.size();
    for (size_t d = 0; d < sizes.size(); ++d) {
      L.lead_sizes[d] = sizes[d];
      L.lead_strides[d] = strides[d];
    }
    return L;
  }
  ~View() { if (buf) { ASAN_UNPOISON_MEMORY_REGION(buf, bytes); std::free(buf); } }
};

template <class T>
T* exact(size_t n) {  // exactly n elements (at least one byte so malloc gives a real block)
  return static_cast<T*>(std::malloc(std::max<size_t>(n, 1) * sizeof(T)));
}

enum Fill { kRandom, kNonFinite, kHuge };

void fill(View& z, std::mt19937& rng, float scale, Fill how, const int64_t* labels, int64_t ignore_index) {
  std::normal_distribution<float> nd(0.0f, scale);
  const int64_t N = z.rows(), V = z.V;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) z.set(n, v, nd(rng));
  if (how == kRandom) return;
  const float inf = INFINITY;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t y = labels[n];
    const bool yok = y >= 0 && y < V && y != ignore_index;
    switch (n % 8) {
      case 0: z.set(n, (n * 7) % V, NAN); break;                   // NaN somewhere
      case 1: z.set(n, (n * 3) % V, inf); break;                   // +inf somewhere
      case 2: for (int64_t v = 0; v < V; ++v) z.set(n, v, -inf); break;  // only -inf
      case 3:                                                        // -inf except the label
        for (int64_t v = 0; v < V; ++v) z.set(n, v, -inf);
        if (yok) z.set(n, y, 1.5f);
        break;
      case 4:                                                        // huge magnitudes
        if (how == kHuge || z.dtype != kF16) {
          z.set(n, 0, z.dtype == kF16 ? 60000.0f : 1e30f);
          if (V > 1) z.set(n, V - 1, z.dtype == kF16 ? -60000.0f : -3e38f);
        }
        break;
      case 5:                                                        // -inf in half the entries
        for (int64_t v = 0; v < V; v += 2) if (v != y) z.set(n, v, -inf);
        break;
      case 6: if (z.dtype == kF16 && V > 1) z.set(n, 1, 70000.0f); break;  // fp16 overflow -> inf
      default: break;
    }
  }
}

struct Case {
  const char* name;
  int dtype;
  int64_t V;
  std::vector<int64_t> sizes, strides;  // strides empty: contiguous
  int64_t offset;
  Fill fill;
  int64_t ignore_index;
};

// One forward + three backward flavours, fresh and in place, at the current thread count.
// Returns logp and the fresh gradient (as float) for the cross-thread comparison.
void run_case(const Case& c, int stats, std::vector<float>* logp_out, std::vector<float>* grad_out) {
  ++g_cases;
  View z{c.dtype, c.V, c.sizes, c.strides, c.offset};
  if (z.strides.empty()) {  // contiguous
    z.strides.assign(z.sizes.size(), 0);
    int64_t s = c.V;
    for (int d = (int)z.sizes.size() - 1; d >= 0; --d) {
      z.strides[d] = s;
      s *= z.sizes[d];
    }
  }
  z.alloc();
  const int64_t N = z.rows(), V = c.V;
  std::mt19937 rng(42 + (unsigned)V);

  int64_t* labels = exact<int64_t>((size_t)N);
  float* inv_temp = exact<float>((size_t)N);
  const int64_t bad[] = {-1, V, V + 1000, INT64_MIN, INT64_MAX};
  for (int64_t n = 0; n < N; ++n) {
    labels[n] = (int64_t)(rng() % (uint64_t)V);
    if (n % 5 == 3) labels[n] = c.ignore_index;
    if (n % 7 == 5) labels[n] = bad[(n / 7) % 5];
    inv_temp[n] = (n % 3 == 0) ? 1.0f : 0.5f + (float)(n % 4);
  }
  fill(z, rng, 3.0f, c.fill, labels, c.ignore_index);

  // the reference logits: same shape and dtype, their own (contiguous, offset 1) layout
  View zr{c.dtype, V, c.sizes, {}, 1};
  zr.strides.assign(zr.sizes.size(), 0);
  {
    int64_t s = V + 1;  // one element of padding per row
    for (int d = (int)zr.sizes.size() - 1; d >= 0; --d) {
      zr.strides[d] = s;
      s *= zr.sizes[d];
    }
  }
  zr.alloc();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) zr.set(n, v, z.get(n, v) + 0.25f * (float)((v % 5) - 2));
  if (N > 2) zr.set(2 % N, 0, -INFINITY);  // q_v = 0 somewhere: an infinite KL where p_v > 0

  const bool kl = (stats & kStatKl) != 0;
  const RowsView L = z.rows_view();
  const RowsView R = zr.rows_view();
  float* out = exact<float>((size_t)kNumOut * (size_t)N);
  z.protect();
  zr.protect();
  ForwardArgs F;
  F.labels = labels;
  F.inv_temp = inv_temp;
  F.ignore_index = c.ignore_index;
  F.stats = stats;
  F.out = out;
  row_forward(L, kl ? &R : nullptr, F, threading());
  z.unprotect_and_check(c.name);
  zr.unprotect_and_check(c.name);

  std::vector<int> row_nonfinite(N, 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v)
      if (!std::isfinite(z.get(n, v))) row_nonfinite[n] = 1;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t y = labels[n];
    const float lp = out[n];
    if (y == c.ignore_index) {
      for (int r = 0; r < kNumOut; ++r) CHECK(out[(size_t)r * N + n] == 0.0f, "%s: ignored row %" PRId64 " out[%d]", c.name, n, r);
    } else if (y < 0 || y >= V) {
      CHECK(std::isnan(lp), "%s: out-of-range label row %" PRId64 " logp %g", c.name, n, lp);
    } else if (!row_nonfinite[n]) {
      CHECK(lp <= 0.0f && std::isfinite(lp), "%s: row %" PRId64 " logp %g", c.name, n, lp);
    }
  }
  if (logp_out) logp_out->assign(out, out + N);

  // backward: three flavours, each fresh then in place
  float* lse = exact<float>((size_t)N);
  float* lse_lo = exact<float>((size_t)N);
  float* ent = exact<float>((size_t)N);
  float* klv = exact<float>((size_t)N);
  float* rlse = exact<float>((size_t)N);
  float* gl = exact<float>((size_t)N);
  float* ge = exact<float>((size_t)N);
  float* gk = exact<float>((size_t)N);
  for (int64_t n = 0; n < N; ++n) {
    lse[n] = out[(size_t)kOutLse * N + n];
    lse_lo[n] = out[(size_t)kOutLseLo * N + n];
    ent[n] = (stats & kStatEntropy) ? out[(size_t)kOutEntropy * N + n] : 0.0f;
    klv[n] = kl ? out[(size_t)kOutKl * N + n] : 0.0f;
    rlse[n] = kl ? out[(size_t)kOutRefLse * N + n] : 0.0f;
    gl[n] = (n % 11 == 4) ? NAN : 0.5f - (float)(n % 3);  // a NaN upstream gradient too
    ge[n] = 0.25f * (float)(n % 4) - 0.3f;
    gk[n] = (n % 2) ? 0.7f : 0.0f;
  }
  const size_t gbytes = (size_t)N * (size_t)V * elem_size(c.dtype);
  for (int flavour = 0; flavour < 3; ++flavour) {
    if (flavour == 2 && !kl) continue;
    BackwardArgs A;
    std::memset(&A, 0, sizeof(A));
    A.labels = labels;
    A.inv_temp = inv_temp;
    A.lse = lse;
    A.lse_lo = lse_lo;
    A.entropy = flavour >= 1 ? ent : lse;
    A.grad_logp = gl;
    A.grad_entropy = flavour >= 1 ? ge : nullptr;
    A.ignore_index = c.ignore_index;
    if (flavour == 2) {
      A.grad_kl = gk;
      A.ref_lse = rlse;
      A.kl = klv;
    }
    unsigned char* grad = static_cast<unsigned char*>(std::malloc(std::max<size_t>(gbytes, 1)));
    z.protect();
    zr.protect();
    row_backward(L, flavour == 2 ? &R : nullptr, A, grad, threading());
    z.unprotect_and_check(c.name);
    zr.unprotect_and_check(c.name);
    for (int64_t n = 0; n < N; ++n) {
      if (labels[n] != c.ignore_index) continue;
      for (size_t b = 0; b < (size_t)V * elem_size(c.dtype); ++b)
        CHECK(grad[(size_t)n * V * elem_size(c.dtype) + b] == 0, "%s: ignored row %" PRId64 " has a gradient", c.name, n);
    }
    if (flavour == 0 && grad_out) {
      grad_out->resize((size_t)N * V);
      View tmp{c.dtype, V, {N}, {V}, 0};
      tmp.buf = grad;
      tmp.bytes = gbytes;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t v = 0; v < V; ++v) (*grad_out)[(size_t)n * V + v] = tmp.get(n, v);
      tmp.buf = nullptr;
    }
    // in place over a copy of the logits: must equal the fresh gradient bit for bit
    if (rows_disjoint(L)) {
      std::vector<unsigned char> saved(z.buf, z.buf + z.bytes);
      z.protect();
      zr.protect();
      row_backward(L, flavour == 2 ? &R : nullptr, A, nullptr, threading());
      z.unprotect_and_check(c.name);
      zr.unprotect_and_check(c.name);
      for (int64_t n = 0; n < N; ++n) {
        const int ok = std::memcmp(z.row_ptr(n), grad + (size_t)n * V * elem_size(c.dtype), (size_t)V * elem_size(c.dtype)) == 0;
        CHECK(ok, "%s: in-place gradient of row %" PRId64 " differs from the fresh one (flavour %d)", c.name, n, flavour);
      }
      std::memcpy(z.buf, saved.data(), z.bytes);
    }
    std::free(grad);
  }
  for (void* p : {(void*)labels, (void*)inv_temp, (void*)out, (void*)lse, (void*)lse_lo, (void*)ent, (void*)klv,
                  (void*)rlse, (void*)gl, (void*)ge, (void*)gk})
    std::free(p);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

}  // namespace

int main() {
  const int dtypes[] = {kF32, kBF16, kF16};
  std::vector<Case> cases;
  for (int dt : dtypes) {
    for (int64_t V : {1, 2, 7, 33, 2047, 2048, 2049, 4097}) {
      cases.push_back({"contiguous", dt, V, {9}, {}, 0, kRandom, -100});
      cases.push_back({"contiguous non-finite", dt, V, {16}, {}, 0, kNonFinite, -100});
    }
    for (int64_t V : {1, 5, 300, 2049}) {
      // logits[:, :-1] of [2, 4, V + 3] with storage offset 3: rows not coalescable
      cases.push_back({"shifted view", dt, V, {2, 3}, {4 * (V + 3), V + 3}, 3, kNonFinite, -100});
      // [3, 2] leading dims transposed, rows V + 2 apart
      cases.push_back({"transposed view", dt, V, {3, 2}, {V + 2, 3 * (V + 2)}, 1, kHuge, -100});
      // logits[::2]
      cases.push_back({"step-2 view", dt, V, {5}, {2 * V}, 0, kRandom, 3 < V ? 3 : -100});
    }
    // few long rows: split into segments across threads (V >= 2 * 32768)
    cases.push_back({"long rows", dt, 2 * 32768 + 77, {2}, {}, 0, kNonFinite, -100});
    cases.push_back({"long strided row", dt, 3 * 32768 + 5, {1}, {3 * 32768 + 40}, 7, kHuge, -100});
    cases.push_back({"zero rows", dt, 17, {0}, {}, 0, kRandom, -100});
    cases.push_back({"zero rows, two dims", dt, 17, {3, 0}, {}, 0, kRandom, -100});
  }
  const int stat_sets[] = {0, kStatEntropy, kStatEntropy | kStatLssp | kStatMean | kStatArgmax, 31};
  for (const Case& c : cases) {
    for (int stats : stat_sets) {
      std::vector<float> lp1, g1, lp3, g3;
      g_threads = 1;
      run_case(c, stats, &lp1, &g1);
      g_threads = 3;
      run_case(c, stats, &lp3, &g3);
      // NaN payloads compare as bits too: the same code path gives the same bits
      CHECK(same_bits(lp1, lp3), "%s (V=%" PRId64 ", dtype %d, stats %d): log-probs differ between 1 and 3 threads",
            c.name, c.V, c.dtype, stats);
      CHECK(same_bits(g1, g3), "%s (V=%" PRId64 ", dtype %d, stats %d): gradients differ between 1 and 3 threads",
            c.name, c.V, c.dtype, stats);
    }
  }
  if (g_failures) {
    std::printf("FAILED %d checks in %d cases\n", g_failures, g_cases);
    return 1;
  }
  std::printf("OK %d cases\n", g_cases);
  return 0;
}
