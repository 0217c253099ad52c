"""Walking the rows of a strided ``[..., V]`` tensor in 2-D blocks, without copies."""
from typing import Iterator, List, Tuple

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
    return dims


def row_blocks(x: torch.Tensor, max_rows: int) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield ``(row_start, row_stop, view)`` with ``view`` a ``[rows, V]`` view of ``x``.

    Rows follow the row-major order of ``x.shape[:-1]``; each view aliases ``x``'s
    storage, so writing into it writes into ``x``. Works for views such as
    ``logits[:, :-1]`` that no single 2-D view can describe.
    """
    V = x.shape[-1]
    dims = coalesced_dims(x)
    if not dims:
        dims = [(1, V)]
    *outer, (inner, inner_stride) = dims
    base = x.storage_offset()
    row = 0
    for idx in _product([s for s, _ in outer]):
        off = base + sum(i * st for i, (_, st) in zip(idx, outer))
        for r0 in range(0, inner, max_rows):
            r1 = min(r0 + max_rows, inner)
            view = x.as_strided((r1 - r0, V), (inner_stride, 1), off + r0 * inner_stride)
            yield row + r0, row + r1, view
        row += inner


def _product(sizes):
    if not sizes:
        yield ()
        return
    for i in range(sizes[0]):
        for rest in _product(sizes[1:]):
            yield (i,) + rest
