"""Argument checks and small numerics shared by the per-sequence loss heads.

Checks only look at Python values, dtypes, shapes and devices, never at tensor values:
a value check would force a device sync and break ``torch.compile(fullgraph=True)``.
"""

import functools
import math
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from .._validate import (
    check_choice,
    check_real,  # noqa: F401  (the heads' float checks, shared with the ops)
)

LN2 = math.log(2.0)

REDUCTIONS = ("mean", "sum", "none")


def check_vector(
    x,
    name: str,
    *,
    like: Optional[Tensor] = None,
    like_name: str = "",
    allow_int: bool = False,
    allow_column: bool = False,
) -> Tensor:
    """A non-empty 1-D tensor ``[B]`` (or ``[B, 1]`` with ``allow_column``), floating unless ``allow_int``.

    With ``like``, it must also have ``like``'s batch size and device. Returns the 1-D view.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype == torch.bool or x.dtype.is_complex or (not allow_int and not x.dtype.is_floating_point):
        kind = "a floating-point or integer" if allow_int else "a floating-point"
        raise TypeError(f"{name} must be {kind} tensor; got {x.dtype}")
    if allow_column and x.dim() == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 1:
        shape = "[B] or [B, 1]" if allow_column else "[B]"
        raise ValueError(f"{name} must have shape {shape} (one value per sequence); got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty (batch size 0)")
    if like is not None:
        if x.shape[0] != like.shape[0]:
            raise ValueError(f"{name} must have the batch size of {like_name} ({like.shape[0]}); got {x.shape[0]}")
        if x.device != like.device:
            raise ValueError(f"{name} must be on the device of {like_name} ({like.device}); got {x.device}")
    return x


def loss_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype a loss head computes in: fp32, or fp64 if any input is fp64 (the heads work
    on [B] vectors, so upcasting is free). Not :func:`prefopt_fast._rows.compute_dtype`, the
    accumulation dtype of the row kernels."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_reduction(reduction) -> str:
    """``"mean"``, ``"sum"`` or ``"none"`` (the per-pair losses ``[B]``)."""
    return check_choice(reduction, REDUCTIONS, "reduction", " (the per-pair losses: their mean, sum, or [B] as is)")


def reduce(per_pair: Tensor, reduction: str) -> Tensor:
    """The mean, the sum, or (``"none"``) the ``[B]`` vector itself."""
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


def renamed_keywords(**renames: str):
    """Accept each old keyword (``old="new"``) for one release, with a DeprecationWarning naming
    the new one; a TypeError if a call gives both. The signature shown is the function's own."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= (deprecated) and {new}=; pass only {new}=")
                    warnings.warn(
                        f"{fn.__name__}({old}=...) is deprecated and will be removed; use {new}=",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap


def clamped_lengths(lengths: Tensor, dtype: torch.dtype) -> Tensor:
    """Completion lengths as ``dtype``, clamped at 1 so an empty completion divides by 1 (as TRL does)."""
    return lengths.to(dtype).clamp(min=1.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2 (Maechler 2012).

    Each branch is fed only the inputs it is accurate and finite for, so the branch
    torch.where discards cannot leak a NaN into the gradient.
    """
    a = torch.log1p(-torch.exp(torch.clamp(x, max=-LN2)))
    b = torch.log(-torch.expm1(torch.clamp(x, min=-LN2)))
    return torch.where(x < -LN2, a, b)


def reward_metrics(
    beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> Dict[str, Tensor]:
    """TRL's preference metrics, batch means as detached 0-d tensors (no host sync).

    The rewards are ``beta * r``; the margin is ``beta * (r_w - r_l)``, the difference taken
    before scaling so it does not cancel two rounded products (``beta r_w - beta r_l``).
    """
    rw, rl = chosen_logratios.detach(), rejected_logratios.detach()
    cr, rr = beta * rw, beta * rl
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
        "rewards/margins": (beta * (rw - rl)).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
