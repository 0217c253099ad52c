// Launcher of the forward row kernel (forward_kernel.cuh) and the device probe.
#include "forward_kernel.cuh"
#include "runtime.cuh"

namespace prefopt_cuda {

const char* row_forward(const Rows& L, const Rows* R, const ForwardArgs& A, int device, void* stream) {
  if (L.rows == 0) return nullptr;
  if (const char* err = prepare(device)) return err;
  const unsigned blocks = blocks_for(L.rows);
  const int threads = threads_for(L.V);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto launch = [&](void (*kernel)(FwdParams), const FwdParams& P) { kernel<<<blocks, threads, 0, s>>>(P); };
  dispatch_forward(L, R, A, launch);
  return last_error();
}

const char* probe(int device, int* binary_version) {
  *binary_version = 0;
  if (const char* err = prepare(device)) return err;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, row_forward_kernel<F32, 0>);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return cudaGetErrorString(err);
  }
  *binary_version = attr.binaryVersion;
  return nullptr;
}

}  // namespace prefopt_cuda
