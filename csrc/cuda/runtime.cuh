// CUDA runtime helpers of the launchers (not part of the kernels).
#pragma once

#include <cuda_runtime.h>

namespace prefopt_cuda {
namespace {

inline const char* prepare(int device) {
  int cur = -1;
  cudaError_t err = cudaGetDevice(&cur);
  if (err == cudaSuccess && cur != device) err = cudaSetDevice(device);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace
}  // namespace prefopt_cuda
