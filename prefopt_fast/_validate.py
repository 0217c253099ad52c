"""Argument checks shared by the public functions: clear errors before any kernel runs."""

import math
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")


def check_logits(logits, name: str = "logits", *, empty_vocab: bool = False) -> None:
    """``empty_vocab``: ``logits`` is a vocabulary shard, which may be empty."""
    check_tensor(logits, name)
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 on backend='torch'); got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V] with at least one dimension; got a 0-d tensor")
    if logits.shape[-1] < 1 and not empty_vocab:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension; got shape {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 in its last (vocabulary) dimension; got strides {tuple(logits.stride())}. "
            "Slicing leading dimensions (e.g. logits[:, :-1]) is fine; a transposed view is not."
        )


def check_like(x, logits: torch.Tensor, name: str, *, empty_vocab: bool = False) -> None:
    """x must be a second logits tensor: same shape, dtype and device, last stride 1.

    ``empty_vocab``: ``logits`` is a vocabulary shard, which may be empty.
    """
    check_tensor(x, name)
    if tuple(x.shape) != tuple(logits.shape):
        raise ValueError(f"{name} must have the shape of logits {tuple(logits.shape)}; got {tuple(x.shape)}")
    if x.dtype != logits.dtype:
        raise TypeError(f"{name} must have the dtype of logits ({logits.dtype}); got {x.dtype}")
    if x.device != logits.device:
        raise ValueError(f"{name} must be on the device of logits ({logits.device}); got {x.device}")
    if not (empty_vocab and x.shape[-1] == 0):
        check_logits(x, name)


def check_int(value, name: str, *, lo: Optional[int] = None, optional: bool = False) -> Optional[int]:
    """``value`` as a Python int (``>= lo`` if given; None allowed with ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}; got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {value!r}")
    return int(value)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_choice(value, choices: Sequence[str], name: str, what: str = "") -> str:
    """A str among ``choices``: TypeError for another type, ValueError for an unknown name."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}{what}; got {value!r}")
    return value


def check_real(
    value,
    name: str,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
    why: str = "",
) -> float:
    """``value`` as a finite Python float inside the given interval, else a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        if lo is None and hi is None:
            rng = "a finite float"
        else:
            left = "-inf" if lo is None else f"{lo:g}"
            right = "inf" if hi is None else f"{hi:g}"
            lb = "(" if (lo_open or lo is None) else "["
            rb = ")" if (hi_open or hi is None) else "]"
            rng = f"a finite float in {lb}{left}, {right}{rb}"
        raise ValueError(f"{name} must be {rng}{why}; got {value!r}")
    return v


def check_index_tensor(x, name: str, shape, device, what: str) -> None:
    """An integer tensor (labels and the like) of ``shape`` on ``device``; ``what`` names the
    tensor it must match (e.g. "logits.shape[:-1]")."""
    check_tensor(x, name)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32); got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}; got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the device of {what.split('.')[0]} ({device}); got {x.device}")


def check_companion(x, name: str, shape, dtype: torch.dtype, device, of: str, shape_desc: str = "") -> None:
    """``x`` is a tensor of ``shape`` with the dtype and device of the tensor named ``of``
    (a bias, a LoRA factor, a second model's head)."""
    check_tensor(x, name)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}{shape_desc}; got {list(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of {of} ({dtype}); got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on the device of {of} ({device}); got {x.device}")


def check_linear_scalars(logit_scale, softcap, chunk_size) -> Tuple[float, Optional[float]]:
    """The fused-linear transform's scalars: (logit_scale, softcap) as floats; chunk_size an int >= 1 or None."""
    logit_scale = check_positive_float(logit_scale, "logit_scale")
    if softcap is not None:
        softcap = check_positive_float(softcap, "softcap")
    check_int(chunk_size, "chunk_size", lo=1, optional=True)
    return logit_scale, softcap


def check_labels(labels, logits: torch.Tensor, ignore_index: int, name: str = "labels") -> None:
    check_index_tensor(labels, name, logits.shape[:-1], logits.device, "logits.shape[:-1]")
    check_label_range(labels, logits.shape[-1], ignore_index, name)


def check_label_range(
    labels: torch.Tensor, V: int, ignore_index: int, name: str = "labels", vocab: str = "the vocabulary size"
) -> None:
    """Every entry of ``labels`` in [0, V) or == ignore_index; ``vocab`` says what V is."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    msg = f"{name} must lie in [0, {V}) ({vocab}) or equal ignore_index={ignore_index}"
    if _compiling():
        torch._assert_async(~bad.any(), msg)
    elif labels.device.type != "meta" and bad.any():  # meta tensors have no values to check
        first = int(labels[bad].reshape(-1)[0])
        raise ValueError(f"{msg}; found {first} ({int(bad.sum())} bad labels)")


def check_positive_float(value, name: str) -> float:
    if _compiling():
        # torch.compile makes a float that changes between calls symbolic: check it as a
        # guard of the graph rather than with Python math, so no value recompiles
        # the message function takes `name` as a default, not from the closure: torch < 2.13
        # cannot trace a closure there (torch 2.11: "Can't extract message from torch._check()")
        torch._check(value > 0, lambda name=name: f"{name} must be a finite float > 0")
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
