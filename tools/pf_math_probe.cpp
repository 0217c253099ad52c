// Evaluates the shared math of csrc/prefopt_math.h on a fixed grid of inputs and prints
// every result's bits, one per line. tests/test_cuda_build.py compiles this file twice,
// with g++ (as the CPU kernels are) and with nvcc as a .cu (PF_HD = __host__ __device__,
// the CUDA kernels' view of the header), and requires identical output; nvcc also
// compiles the kernel below for the device, i.e. the same functions as device code.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "prefopt_math.h"

template <typename T>
struct Sink;

template <>
struct Sink<float> {
  static void put(const char* what, float v) { printf("%s %08x\n", what, (unsigned)pf_f32_bits(v)); }
};
template <>
struct Sink<double> {
  static void put(const char* what, double v) {
    uint64_t u;
    memcpy(&u, &v, 8);
    printf("%s %016llx\n", what, (unsigned long long)u);
  }
};

// One evaluation of (nearly) every function, on inputs derived from a and b; results
// written to out[] (host: printed; device: stored).
template <typename T>
PF_HD void evaluate(T a, T b, T* out, int* n) {
  int k = 0;
  PfLseAcc<T> x = pf_lse_empty<T>(a);
  x.s = T(1) + b * b;
  x.t = b;
  x.q = T(0.5) + b * b;
  PfLseAcc<T> y = pf_lse_empty<T>(b);
  y.s = T(2);
  y.t = -a * T(0.25);
  y.q = T(1.5);
  PfLseAcc<T> m = pf_lse_merge(x, y);
  out[k++] = m.m;
  out[k++] = m.s;
  out[k++] = m.t;
  out[k++] = m.q;
  PfLseAcc<T> r = pf_lse_rescale(x, (a > b ? a : b) + T(3));
  out[k++] = r.s;
  out[k++] = r.t;
  out[k++] = pf_lse_value(m);
  out[k++] = pf_lse_entropy(m);
  out[k++] = pf_lse_log_sum_sq(m);
  out[k++] = pf_kl_rebase(b, x.s, T(0.75), T(0.25));
  out[k++] = pf_kl_value(a * T(0.1), x.s, y.s);
  out[k++] = pf_log_sigmoid(a - b);
  const T p = pf_exp(-(a > T(0) ? a : -a));
  const T lp = -(a > T(0) ? a : -a);
  out[k++] = pf_grad_elem(p, lp, T(1), b, a, T(0.5), T(0.8));
  out[k++] = pf_grad_elem(p, lp, T(0), b, a, T(0.5), T(0.8));
  out[k++] = pf_grad_elem_kl(p, lp, lp - T(0.3), T(1), b, a, T(0.5), T(0.2), T(0.1), T(0.8));
  out[k++] = pf_grad_elem_noent(p, T(0), b, T(0.8));
  PfGradCoef<T> c = pf_grad_coef(b, a, T(0.5), T(0.2), T(0.1), T(0.8));
  out[k++] = pf_grad_fast(p, lp, T(0), c);
  out[k++] = pf_grad_fast_kl(p, lp, lp - T(0.3), T(0), c);
  *n = k;
}

PF_HD float evaluate16(float a, float* out, int* n) {
  int k = 0;
  out[k++] = pf_bf16_to_f32(pf_f32_to_bf16(a));
  out[k++] = pf_f16_to_f32(pf_f32_to_f16(a));
  out[k++] = pf_exp_poly(a);
  out[k++] = pf_exp_poly_arg(a * 40.0f);
  *n = k;
  return out[0];
}

#if defined(__CUDACC__)
// The same functions compiled for the device (not launched: no GPU needed).
__global__ void probe_kernel(const float* in, float* outf, double* outd) {
  int n = 0;
  const int i = threadIdx.x;
  evaluate<float>(in[2 * i], in[2 * i + 1], outf + 32 * i, &n);
  evaluate<double>((double)in[2 * i], (double)in[2 * i + 1], outd + 32 * i, &n);
  evaluate16(in[2 * i], outf + 32 * i + 24, &n);
}
#endif

int main() {
  const float inputs[] = {0.0f, 0.0f,  1.5f, -2.25f, -7.0f, 3.0f,    30.0f, 29.5f,
                          -88.0f, 1e-3f, 1e4f, -1e4f, 0.125f, 65504.0f, 3.4e38f, -3.4e38f};
  const int n_in = (int)(sizeof(inputs) / sizeof(inputs[0])) / 2;
  for (int i = 0; i < n_in; ++i) {
    float of[32];
    double od[32];
    int n = 0;
    char name[64];
    evaluate<float>(inputs[2 * i], inputs[2 * i + 1], of, &n);
    for (int j = 0; j < n; ++j) {
      snprintf(name, sizeof(name), "f32[%d].%d", i, j);
      Sink<float>::put(name, of[j]);
    }
    evaluate<double>((double)inputs[2 * i], (double)inputs[2 * i + 1], od, &n);
    for (int j = 0; j < n; ++j) {
      snprintf(name, sizeof(name), "f64[%d].%d", i, j);
      Sink<double>::put(name, od[j]);
    }
    for (int h = 0; h < 2; ++h) {
      evaluate16(inputs[2 * i + h], of, &n);
      for (int j = 0; j < n; ++j) {
        snprintf(name, sizeof(name), "h16[%d.%d].%d", i, h, j);
        Sink<float>::put(name, of[j]);
      }
    }
  }
  return 0;
}
