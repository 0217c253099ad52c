"""Walking the rows of strided ``[..., V]`` tensors in 2-D blocks, without copies."""

from typing import Iterator, List, Sequence, Tuple

import torch


def coalesced_dims(x: torch.Tensor) -> List[Tuple[int, int]]:
    """(size, stride) of the leading dims of ``x[..., V]``, merged where memory allows."""
    dims: List[Tuple[int, int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return dims or [(1, x.shape[-1])]


class _RowAddresser:
    """Maps a flat row index of ``x[..., V]`` to a storage offset."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.dims = coalesced_dims(x)
        self.run = self.dims[-1][0]  # rows that share one stride: a 2-D view can span them

    def view(self, r0: int, r1: int) -> torch.Tensor:
        off = self.x.storage_offset()
        rem = r0
        for size, stride in reversed(self.dims):
            off += (rem % size) * stride
            rem //= size
        return self.x.as_strided((r1 - r0, self.x.shape[-1]), (self.dims[-1][1], 1), off)


def row_blocks(tensors: Sequence[torch.Tensor], max_rows: int) -> Iterator[Tuple[int, int, List[torch.Tensor]]]:
    """Yield ``(row_start, row_stop, views)``: one ``[rows, V]`` view per input tensor.

    The tensors share ``shape[:-1]`` (rows in its row-major order) but may have
    different strides; each view aliases its tensor's storage, so writing into it writes
    into the tensor. Works for views such as ``logits[:, :-1]`` that no single 2-D view
    can describe: blocks never cross a break in any tensor's row stride.
    """
    addrs = [_RowAddresser(t) for t in tensors]
    n = 1
    for s in tensors[0].shape[:-1]:
        n *= s
    r0 = 0
    while r0 < n:
        r1 = min(n, r0 + max_rows, *(r0 - r0 % a.run + a.run for a in addrs))
        yield r0, r1, [a.view(r0, r1) for a in addrs]
        r0 = r1
