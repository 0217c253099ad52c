"""Launch configurations of the row kernels: one fixed config per kernel and dtype.

No autotuning: ``@triton.autotune`` with several configs needs a GPU, and a fixed config
means one compile per (dtype, flags) variant instead of one per shape.
A tile of 2048 elements at 8 warps gives 8 elements per thread (two 16-byte loads in
fp32, one in fp16/bf16): the forward kernel keeps up to four per-lane fp32 accumulators,
and 16 elements per thread (4096 at 8 warps) measured 80-180 registers instead of 32-92
in the AOT check, i.e. a lower occupancy for a memory-bound kernel.

``BLOCK_V_OVERRIDE`` lets tests shrink the tile (the interpreter costs about 1 ms per
program per tile, and small tiles make small rows cover several tiles and a partial one).
"""
from typing import NamedTuple

import torch


class Config(NamedTuple):
    block_v: int
    num_warps: int


FORWARD = {
    torch.float32: Config(2048, 8),
    torch.float16: Config(2048, 8),
    torch.bfloat16: Config(2048, 8),
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
