// The CUDA row kernels (csrc/cuda/*_kernel.cuh) built for the host with
// cuda_host_emulation.h, behind C entry points for ctypes (tests/test_cuda_emulated.py).
// Same dispatch (dispatch_forward / dispatch_backward) as the real launchers; the grid
// size may be forced smaller than the row count to exercise the grid-stride loop.
#include "backward_kernel.cuh"
#include "forward_kernel.cuh"

using namespace prefopt_cuda;

extern "C" {

// threads / blocks <= 0: what the CUDA launcher would use
void emu_row_forward(const Rows* L, const Rows* R, const ForwardArgs* A, int threads, int blocks) {
  if (L->rows == 0) return;
  const int t = threads > 0 ? threads : threads_for(L->V);
  const unsigned b = blocks > 0 ? (unsigned)blocks : blocks_for(L->rows);
  auto launch = [&](void (*kernel)(FwdParams), const FwdParams& P) { pf_emu::launch(kernel, b, t, P); };
  dispatch_forward(*L, R, *A, launch);
}

void emu_row_backward(const Rows* L, const Rows* R, const BackwardArgs* A, void* grad, int threads, int blocks) {
  if (L->rows == 0 || L->V == 0) return;
  const int t = threads > 0 ? threads : threads_for(L->V);
  const unsigned b = blocks > 0 ? (unsigned)blocks : blocks_for(L->rows);
  auto launch = [&](void (*kernel)(BwdParams), const BwdParams& P) { pf_emu::launch(kernel, b, t, P); };
  dispatch_backward(*L, R, *A, grad, launch);
}

int emu_sizeof_rows() { return (int)sizeof(Rows); }
int emu_sizeof_forward_args() { return (int)sizeof(ForwardArgs); }
int emu_sizeof_backward_args() { return (int)sizeof(BackwardArgs); }
}
