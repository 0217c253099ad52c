"""Launch configurations of the row kernels: one fixed config per kernel and dtype.

No autotuning: ``@triton.autotune`` with several configs needs a GPU, and a fixed config
means one compile per (dtype, flags) variant instead of one per shape.

Forward: 2048-element tiles at 16 warps, 4 elements per thread. The forward kernel keeps
up to six per-lane fp32 accumulators (sums for LSE, entropy, sum p^2, mean and, with the
KL extension, the reference LSE and the KL sum). At 8 elements per thread the AOT check
measured up to 126 registers and a spill on sm_80 (ENTROPY+KL); at 4 per thread 26-96
registers (26-48 without KL) and no spill. Backward: no accumulators, 2048-element tiles
at 8 warps, 8 elements per thread (one or two 16-byte loads), 28-64 registers, no spill.
"""

from typing import NamedTuple

import torch


class Config(NamedTuple):
    block_v: int
    num_warps: int


FORWARD = {
    torch.float32: Config(2048, 16),
    torch.float16: Config(2048, 16),
    torch.bfloat16: Config(2048, 16),
}
BACKWARD = {
    torch.float32: Config(2048, 8),
    torch.float16: Config(2048, 8),
    torch.bfloat16: Config(2048, 8),
}

BLOCK_V_OVERRIDE = None  # int (power of two) or None


def forward_config(dtype: torch.dtype) -> Config:
    cfg = FORWARD[dtype]
    return cfg._replace(block_v=BLOCK_V_OVERRIDE) if BLOCK_V_OVERRIDE else cfg


def backward_config(dtype: torch.dtype) -> Config:
    cfg = BACKWARD[dtype]
    return cfg._replace(block_v=BLOCK_V_OVERRIDE) if BLOCK_V_OVERRIDE else cfg


def row_alignment(logits: torch.Tensor, *, with_contiguous_copy: bool = False) -> int:
    """ALIGN constexpr: elements per 16 bytes if every row of ``logits`` starts at a
    multiple of that many elements from ``data_ptr()``, else 1.

    With ``with_contiguous_copy`` the rows of a contiguous tensor shaped like
    ``logits`` (the backward's fresh gradient) must be aligned too, i.e. V as well.
    The base pointer's own 16-byte alignment is specialized by Triton itself.
    """
    a = 16 // logits.element_size()
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]):
        if size > 1 and stride % a:
            return 1
    if with_contiguous_copy and logits.shape[-1] % a:
        return 1
    return a
