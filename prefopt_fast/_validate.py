"""Argument checks shared by the public functions: clear errors before any kernel runs."""
import math
from numbers import Real
from typing import Sequence, Tuple

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")


def check_logits(logits, name: str = "logits") -> None:
    check_tensor(logits, name)
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16 (float64 on backend='torch'); got {logits.dtype}"
        )
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V] with at least one dimension; got a 0-d tensor")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension; got shape {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 in its last (vocabulary) dimension; got strides {tuple(logits.stride())}. "
            "Slicing leading dimensions (e.g. logits[:, :-1]) is fine; a transposed view is not."
        )


def check_like(x, logits: torch.Tensor, name: str) -> None:
    """x must be a second logits tensor: same shape, dtype and device, last stride 1."""
    check_tensor(x, name)
    if tuple(x.shape) != tuple(logits.shape):
        raise ValueError(f"{name} must have the shape of logits {tuple(logits.shape)}; got {tuple(x.shape)}")
    if x.dtype != logits.dtype:
        raise TypeError(f"{name} must have the dtype of logits ({logits.dtype}); got {x.dtype}")
    if x.device != logits.device:
        raise ValueError(f"{name} must be on the device of logits ({logits.device}); got {x.device}")
    check_logits(x, name)


def check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return value


def check_labels(labels, logits: torch.Tensor, ignore_index: int, name: str = "labels") -> None:
    check_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32); got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}; got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{name} must be on the device of logits ({logits.device}); got {labels.device}")
    V = logits.shape[-1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    msg = f"{name} must lie in [0, {V}) (the vocabulary size) or equal ignore_index={ignore_index}"
    if _compiling():
        torch._assert_async(~bad.any(), msg)
    elif labels.device.type != "meta" and bad.any():  # meta tensors have no values to check
        first = int(labels[bad].reshape(-1)[0])
        raise ValueError(f"{msg}; found {first} ({int(bad.sum())} bad labels)")


def check_positive_float(value, name: str) -> float:
    if _compiling():
        # torch.compile makes a float that changes between calls symbolic: check it as a
        # guard of the graph rather than with Python math, so no value recompiles
        torch._check(value > 0, lambda: f"{name} must be a finite float > 0")
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float > 0; got {value}")
    return value


def inverse_temperature(temperature, labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N] of 1 / temperature per row (fp32; fp64 for fp64 logits), from a float or a
    tensor broadcastable to labels."""
    n = labels.numel()
    if not isinstance(temperature, torch.Tensor):
        t = check_positive_float(temperature, "temperature")
        return torch.full((n,), t, dtype=dtype, device=labels.device).reciprocal()
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"temperature must be a float or a floating-point tensor; got {temperature.dtype}")
    if temperature.device != labels.device:
        raise ValueError(f"temperature must be on the device of logits ({labels.device}); got {temperature.device}")
    try:
        t = torch.broadcast_to(temperature.detach(), labels.shape)
    except RuntimeError:
        raise ValueError(
            f"temperature must be broadcastable to labels.shape = {tuple(labels.shape)}; "
            f"got shape {tuple(temperature.shape)}"
        ) from None
    bad = ~(t > 0) | torch.isinf(t)
    msg = "temperature must be finite and > 0 everywhere"
    if _compiling():
        torch._assert_async(~bad.any(), msg)
    elif bad.any():
        raise ValueError(f"{msg}; found {float(t[bad].reshape(-1)[0])}")
    return (1.0 / t.to(dtype)).reshape(-1).contiguous()


def parse_names(names, valid: Sequence[str], name: str) -> Tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of names from {list(valid)}; got {names!r}") from None
    for s in names:
        if s not in valid:
            raise ValueError(f"{name} entries must be among {list(valid)}; got {s!r}")
    return names
