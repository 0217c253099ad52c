// Shared by the CUDA row kernels (forward.cu, backward.cu): element types, loads, row
// addressing, launch helpers. Included by .cu files only (no torch headers anywhere).
//
// Layout of every kernel: a 1-D grid, one block per row (a grid-stride loop when there
// are more rows than blocks launched), 64-bit offsets throughout. A row is swept in
// 16-byte vectors (4 fp32 or 8 bf16/fp16 elements) from its first 16-byte boundary on,
// a few vectors in flight per thread; the few elements before that boundary and after
// the last full vector are loaded one by one. Rows whose tensors are not mutually
// aligned (e.g. a reference or gradient row at another offset mod 16 bytes) are swept
// element by element (still coalesced). fp32 math whatever the storage type. The math
// shared with the CPU kernels comes from prefopt_math.h.
#pragma once

#if defined(PF_CUDA_HOST_EMULATION)
// tests/cuda_emulation: the kernels compiled by a host compiler, threads emulated
#include "cuda_host_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include "prefopt_math.h"
#include "row_kernels_cuda.h"

namespace prefopt_cuda {
namespace {

// kStat* (STAT_* bits), kOut* (OUT_* rows), kNumOut: row_args.h

// Forward variants (a request is rounded up to one of 6 per dtype; unrequested rows are
// written as 0): ENT computes t (entropy); FULL adds q, the mean and the argmax; KL
// reads the reference row too.
enum : int { kFwdEnt = 1, kFwdFull = 2, kFwdKl = 4 };
// Backward variants.
enum : int { kBwdPlain = 0, kBwdEnt = 1, kBwdKl = 2 };

// Block size limit; kernels declare __launch_bounds__(kMaxThreads, 2): at least two
// blocks per SM (<= 128 registers), and ptxas otherwise free: without the minimum it aims
// at ~64 registers and spills on sm_100 / sm_120.
constexpr int kMaxThreads = 256;
constexpr float kInf = __builtin_huge_valf();

// ---------------------------------------------------------------- element types

struct F32 {
  typedef float S;
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float to_f(S v) { return v; }
  static __device__ __forceinline__ S from_f(float f) { return f; }
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// 16-bit types: a 16-byte vector is 8 values, converted two at a time by P's
// unpack2 / pack2 (P derives from Half8<P>).
template <class P>
struct Half8 {
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    P::unpack2(v.x, f);
    P::unpack2(v.y, f + 2);
    P::unpack2(v.z, f + 4);
    P::unpack2(v.w, f + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(P::pack2(f[0], f[1]), P::pack2(f[2], f[3]), P::pack2(f[4], f[5]), P::pack2(f[6], f[7]));
  }
};

struct BF16 : Half8<BF16> {
  typedef uint16_t S;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_f(S v) { return pf_bf16_to_f32(v); }
  static __device__ __forceinline__ S from_f(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* f) {
    f[0] = __uint_as_float(w << 16);  // the lower address holds the low half
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x (low half) = a
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

struct F16 : Half8<F16> {
  typedef uint16_t S;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_f(S v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ S from_f(float f) { return __half_as_ushort(__float2half_rn(f)); }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* f) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w));
    f[0] = v.x;
    f[1] = v.y;
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Read-only data goes through the non-coherent path; an in-place backward writes what
// it reads, so it uses plain loads.
template <bool NC>
__device__ __forceinline__ uint4 ld_vec(const void* p) {
  if (NC) return __ldg(static_cast<const uint4*>(p));
  return *static_cast<const uint4*>(p);
}
template <bool NC>
__device__ __forceinline__ float ld_one(const float* p) {
  if (NC) return __ldg(p);
  return *p;
}
template <bool NC>
__device__ __forceinline__ uint16_t ld_one(const uint16_t* p) {
  if (NC) return __ldg(reinterpret_cast<const unsigned short*>(p));
  return *p;
}

// exp of arguments <= 0 (up to rounding): ex2.approx, relative error ~ |d| * 2^-24 from
// the scaling, below the fp32 rounding of x itself where the terms matter (|d| < ~20);
// exp(-inf) = 0, exp(NaN) = NaN.
__device__ __forceinline__ float fast_exp(float d) { return __expf(d); }

// The shift the accumulators are relative to: the running max, 0 while it is -inf (every
// element so far -inf: they then give exp(-inf - 0) = 0 rather than NaN).
__device__ __forceinline__ float shift_of(float m) { return m == -kInf ? 0.0f : m; }

// ---------------------------------------------------------------- launch helpers

inline int threads_for(int64_t V) { return V >= 8192 ? 256 : V >= 1024 ? 128 : 64; }

// One block per row; more rows than this loop inside the blocks.
inline unsigned blocks_for(int64_t rows) {
  const int64_t cap = (int64_t)1 << 24;
  return (unsigned)(rows < cap ? rows : cap);
}

}  // namespace
}  // namespace prefopt_cuda
