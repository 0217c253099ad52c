"""DeepSpeed ZeRO-3 heads on the fused-linear path: who gathers the head, and when it cannot be done.

A ZeRO-3 parameter is recognised by DeepSpeed's own attributes (``ds_id``, ``ds_status``):
outside the forward that uses it its local tensor is empty, and this rank holds a flat slice of
it (``ds_tensor``). The layout is data-parallel: every rank computes with its own tokens
against the whole head, so the kernels need the head whole in the forward and the backward.

Training (DeepSpeed 0.19, read and measured): inside the forward of the module
``deepspeed.initialize`` wrapped, a ZeRO-3 parameter read by attribute
(``model.lm_head.weight``, as TRL's fused head, :func:`hf.get_lm_head` and everything built on
it do) is gathered by DeepSpeed's engine and registered as an external parameter of the
running module, which gathers it again in its backward; the whole-shape weight gradient then
reaches the parameter through autograd and DeepSpeed's per-parameter hook reduce-scatters it
(averaged over the ranks) into each rank's partition. prefopt_fast's kernels need nothing more.
A parameter still partitioned when the kernels get it (a reference captured outside that
forward, or a loss computed after it) cannot be trained that way: gathering it here would do
for the forward, but its gradient arrives when the parameter is an empty partition again, and
autograd cannot store a ``[V, H]`` gradient on it (DeepSpeed's
``deepspeed.zero.register_external_parameter(module, param)`` is the way to use such a
reference). :func:`gathered` refuses that case with a clear error.

Without gradients (a reference head under ``torch.no_grad``) a partitioned head is gathered
for the block (``deepspeed.zero.GatheredParameters``, read-only).

The head is gathered rather than its tokens (the FSDP2 ``gather_tokens`` algorithm): ZeRO-3
partitions the flattened parameter in equal flat slices that do not follow vocabulary rows.
"""

import contextlib
from typing import List

import torch

__all__ = ["is_zero3", "gathered"]


def is_zero3(t) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter (it carries DeepSpeed's ``ds_id``)."""
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id")


@contextlib.contextmanager
def gathered(*params):
    """Context manager: the ZeRO-3 parameters among ``params`` whole inside the block.

    Already gathered ones (``ds_status`` AVAILABLE: read inside the engine's forward, gathered
    by the caller, persistent small ones) are left to DeepSpeed, which also gathers them for
    the backward. Partitioned ones are gathered read-only for the block when no gradient can
    reach them (grad mode off, or ``requires_grad=False``); one that would take a gradient
    raises ``RuntimeError`` (see the module docstring). Other tensors and ``None`` pass;
    without a ZeRO-3 parameter this is a no-op.
    """
    zero3: List[torch.Tensor] = list({id(p): p for p in params if is_zero3(p)}.values())
    if not zero3:
        yield
        return
    import deepspeed  # a ZeRO-3 parameter means deepspeed is there
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in zero3 if p.ds_status != ZeroParamStatus.AVAILABLE]
    trained = [p for p in todo if p.requires_grad and torch.is_grad_enabled()]
    if trained:
        ids = ", ".join(str(p.ds_id) for p in trained)
        raise RuntimeError(
            f"the lm_head parameters (ds_id {ids}) are DeepSpeed ZeRO-3 partitions that are not gathered, and a gradient "
            "would reach them: DeepSpeed gathers a parameter read by attribute (model.lm_head.weight) inside the "
            "forward of the module deepspeed.initialize wrapped, and gathers it again for its backward. Read the head "
            "there (hf.get_lm_head / hidden_and_head / sequence_logprobs do) and compute the loss in that forward, or "
            "register a reference kept elsewhere with deepspeed.zero.register_external_parameter(module, param)"
        )
    with deepspeed.zero.GatheredParameters(todo, modifier_rank=None) if todo else contextlib.nullcontext():
        yield
