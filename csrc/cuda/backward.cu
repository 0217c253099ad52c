// Launcher of the backward row kernel (backward_kernel.cuh) and the CUDA versions.
#include "backward_kernel.cuh"
#include "runtime.cuh"

namespace prefopt_cuda {

const char* row_backward(const Rows& L, const Rows* R, const BackwardArgs& A, void* grad, int device,
                         void* stream) {
  if (L.rows == 0 || L.V == 0) return nullptr;
  if (const char* err = prepare(device)) return err;
  const unsigned blocks = blocks_for(L.rows);
  const int threads = threads_for(L.V);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto launch = [&](void (*kernel)(BwdParams), const BwdParams& P) { kernel<<<blocks, threads, 0, s>>>(P); };
  dispatch_backward(L, R, A, grad, launch);
  return last_error();
}

int cuda_version_built() { return CUDART_VERSION; }

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

}  // namespace prefopt_cuda
