"""DeepSpeed ZeRO-3 heads for the fused-linear path: gathered in the forward, gathered again in the backward.

A ZeRO-3 parameter is recognised by DeepSpeed's own attributes (``ds_id``, ``ds_status``,
``ds_shape``): outside its module's forward its local tensor is empty and this rank holds a
flat slice of it (``ds_tensor``). The layout is data-parallel: every rank computes with its
own tokens against the whole head. The fused-linear kernels read the head whole, so
:func:`gathered` all-gathers it (``deepspeed.zero.GatheredParameters``) for the calls inside
the block; what autograd saves of it there (the parameter itself, or a view of it) is
recorded by reference and all-gathered again when the backward reads it, by then the
parameter is an empty partition again (TRL's kernel does the same in its backward). The
gradient of the whole parameter, from this rank's tokens, goes to the parameter through
autograd as for any parameter used inside its module; DeepSpeed's gradient hook (set by
``deepspeed.initialize``) reduce-scatters it, averaged over the ranks, into each rank's
partition. Nothing else is needed from the caller, but DeepSpeed's own rule: the loss is
computed inside the forward of the module ``deepspeed.initialize`` wrapped.

The head is gathered rather than its tokens (the FSDP2 ``gather_tokens`` algorithm): ZeRO-3
partitions the flattened parameter in equal flat slices that do not follow vocabulary rows.
"""

import contextlib
from typing import List, NamedTuple, Optional

import torch

__all__ = ["is_zero3", "gathered"]


def is_zero3(t) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter (it carries DeepSpeed's ``ds_id``)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id")


class _Saved(NamedTuple):
    """What the pack hook keeps of a saved tensor that is (a view of) a gathered ZeRO-3 parameter."""

    param: torch.Tensor
    size: torch.Size
    stride: tuple
    offset: int  # elements from the parameter's first element to the view's


def _extent(t: torch.Tensor):
    """(first, last + 1) byte addresses ``t`` can touch (non-negative strides)."""
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (span + 1) * t.element_size()


def _span_of(p: torch.Tensor):
    """(storage address, first byte, end byte) of a gathered, contiguous parameter, or None."""
    if p.numel() == 0 or not p.is_contiguous():
        return None
    return p.untyped_storage().data_ptr(), p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()


def _match(t, spans) -> Optional[_Saved]:
    """``t`` as a :class:`_Saved` when it lies inside one of the gathered parameters, else None."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.numel() == 0:
        return None
    if any(s < 0 for s in t.stride()):
        return None
    storage = t.untyped_storage().data_ptr()
    lo, hi = _extent(t)
    for p, (p_storage, p_lo, p_hi) in spans:
        if storage == p_storage and t.dtype == p.dtype and p_lo <= lo and hi <= p_hi:
            return _Saved(p, t.shape, t.stride(), (lo - p_lo) // t.element_size())
    return None


def _unpack(saved: _Saved) -> torch.Tensor:
    """The saved view again, on the parameter gathered now (it is an empty partition by the backward)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    p = saved.param
    if p.ds_status == ZeroParamStatus.AVAILABLE:  # e.g. still inside the block, or tied and gathered
        full = p.detach()
    else:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            # keeps the gathered storage alive after the partition: DeepSpeed releases the
            # parameter by re-assigning param.data (free_param), it does not free the storage in
            # place; this tensor is read by the backward of the one node that unpacked it
            full = p.detach()
    return full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.offset)


@contextlib.contextmanager
def gathered(*params):
    """Context manager: the ZeRO-3 parameters among ``params`` whole inside the block, and
    their saved tensors gathered again when the backward reads them (so the backward may run
    after the block). Other tensors and ``None`` pass; without a ZeRO-3 parameter it is a no-op.

    Parameters already gathered (``ds_status`` AVAILABLE: inside their module's forward, tied to
    another module's weight, persistent small ones, or gathered by the caller, as TRL's fused
    LM head does) are not gathered again (DeepSpeed refuses nested gathers of one parameter).
    Inside the block the autograd saved-tensor hooks are this function's: an outer
    ``torch.autograd.graph.saved_tensors_hooks`` (e.g. ``save_on_cpu``) does not apply there.
    """
    zero3: List[torch.Tensor] = list({id(p): p for p in params if is_zero3(p)}.values())
    if not zero3:
        yield
        return
    import deepspeed  # a ZeRO-3 parameter means deepspeed is there
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in zero3 if p.ds_status != ZeroParamStatus.AVAILABLE]
    ctx = deepspeed.zero.GatheredParameters(todo, modifier_rank=None) if todo else contextlib.nullcontext()
    with ctx:
        spans = [(p, s) for p in zero3 for s in [_span_of(p)] if s is not None]

        def pack(t):
            saved = _match(t, spans)
            return t if saved is None else saved

        def unpack(x):
            return _unpack(x) if isinstance(x, _Saved) else x

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
