// Torch-free, CUDA-header-free interface of the CUDA row kernels (semantics:
// prefopt_fast/_rows.py). The binding (compiled by the host compiler against the torch
// stable ABI) fills these plain descriptions; the launchers (compiled by nvcc) see only
// raw pointers, sizes, strides and a stream handle.
#pragma once

#include <stdint.h>

#include "row_args.h"

namespace prefopt_cuda {

// RowsView, ForwardArgs, BackwardArgs, DType, kStat*, kOut*, kNumOut, rows_disjoint ... (row_args.h)
using namespace prefopt;
using Rows = prefopt::RowsView;

// Launch on `stream` (a cudaStream_t) of device `device`. Return nullptr on success, else
// a static message (cudaGetErrorString of the launch error, e.g. "CUDA driver version is
// insufficient for CUDA runtime version" or "no kernel image is available ...").
// ref: nullptr, or the reference logits (same rows, V and dtype; own strides) for STAT_KL.
const char* row_forward(const Rows& logits, const Rows* ref, const ForwardArgs& args, int device,
                        void* stream);

// grad: a contiguous [rows, V] buffer of logits.dtype, or nullptr to write over `logits`
// in place. ref: the reference logits when args.grad_kl is given.
const char* row_backward(const Rows& logits, const Rows* ref, const BackwardArgs& args, void* grad,
                         int device, void* stream);

// Can the kernels run on `device`? Loads the module for it without launching anything
// (cudaFuncGetAttributes on a forward kernel): nullptr if they can, else the CUDA error
// (no driver / driver too old for this CUDA version, no device, no kernel image for the
// device's architecture, PTX too new for the driver). *binary_version: the SASS / PTX
// architecture the device will run (e.g. 90), 0 on error.
const char* probe(int device, int* binary_version);

// CUDART_VERSION the launchers were compiled with (e.g. 13000), and the runtime / driver
// versions seen at run time (0 where unknown: no driver).
int cuda_version_built();
int cuda_runtime_version();
int cuda_driver_version();

}  // namespace prefopt_cuda
