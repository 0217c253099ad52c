// Host emulation of the CUDA features the row kernels use, so that the kernel code of
// csrc/cuda/*_kernel.cuh compiles with a host compiler and runs on the CPU in tests
// (machines without a GPU). Each thread of a block is a std::thread; __syncthreads and
// warp shuffles are barriers; blocks run one after another (so `__shared__` = static).
// Device intrinsics map to accurate host math (__expf -> expf): results match a GPU up
// to the last bits of the fast exp, the control flow and memory accesses exactly.
// Included by csrc/cuda/common.cuh when PF_CUDA_HOST_EMULATION is defined.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "prefopt_math.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // one block at a time: its threads share these

struct uint3 {
  unsigned x, y, z;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local uint3 blockDim;
inline thread_local uint3 gridDim;

namespace pf_emu {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct Block {
  explicit Block(int threads) : block(threads), slots{std::vector<uint64_t>(threads), std::vector<uint64_t>(threads)} {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new Barrier(32));
  }
  ~Block() {
    for (Barrier* b : warps) delete b;
  }
  Barrier block;
  std::vector<Barrier*> warps;
  // one shuffle value per thread, double-buffered: a lane that writes shuffle k + 2 has
  // passed the barrier of shuffle k + 1, so every lane has read shuffle k
  std::vector<uint64_t> slots[2];
};

inline thread_local Block* block = nullptr;
inline thread_local unsigned shfl_phase = 0;

// Run kernel(P) on a grid of `blocks` x `threads` (a multiple of 32): one host thread per
// CUDA thread, the blocks one after another.
template <class P>
void launch(void (*kernel)(P), unsigned blocks, int threads, const P& params) {
  Block blk(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = uint3{(unsigned)t, 0, 0};
      blockDim = uint3{(unsigned)threads, 1, 1};
      gridDim = uint3{blocks, 1, 1};
      block = &blk;
      shfl_phase = 0;
      for (unsigned b = 0; b < blocks; ++b) {
        blockIdx = uint3{b, 0, 0};
        kernel(params);
        blk.block.wait();  // the block is done (its __shared__ statics are free again)
      }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace pf_emu

inline void __syncthreads() { pf_emu::block->block.wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned /*mask: full warps only*/, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of up to 8 bytes");
  pf_emu::Block* blk = pf_emu::block;
  const unsigned t = threadIdx.x;
  std::vector<uint64_t>& slots = blk->slots[pf_emu::shfl_phase];
  pf_emu::shfl_phase ^= 1u;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  slots[t] = bits;
  blk->warps[t / 32]->wait();
  const uint64_t other = slots[(t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask)];
  T r;
  memcpy(&r, &other, sizeof(T));
  return r;
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __expf(float x) { return expf(x); }
inline float __fmul_rn(float a, float b) { return a * b; }  // (built without FMA contraction)
inline float __uint_as_float(unsigned u) { return pf_bits_f32(u); }
inline unsigned __float_as_uint(float f) { return pf_f32_bits(f); }
inline float __int_as_float(int i) { return pf_bits_f32((uint32_t)i); }

// 16-bit float types as their bits; conversions through prefopt_math.h (round to nearest even)
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{pf_f32_to_bf16(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return pf_f16_to_f32(h.bits); }
inline __half __float2half_rn(float f) { return __half{pf_f32_to_f16(f)}; }
inline float2 __half22float2(const __half2& h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
