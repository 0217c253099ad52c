"""What an op script declares: :class:`OpSpec` (the op: inputs, the least bytes / exps /
FLOPs it needs, preset shapes), :class:`Provider` (one implementation, a named callable) and
:class:`Case` (one shape, dtype and device); the dtype and shape helpers; the providers of
every prefopt_fast backend (:func:`prefopt_fast_providers`); :func:`load_op`.

Vocabulary used throughout: ``phase`` is one of ``fwd`` (forward with autograd recording,
as in a training step), ``bwd`` (backward of that forward), ``step`` (fwd + bwd, timed
as one) and ``fwd_nograd`` (forward under ``torch.no_grad``, e.g. a reference model).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any, Callable

import torch

PHASES = ("fwd", "bwd", "step", "fwd_nograd")


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation of an op, as the benchmark calls it.

    make: called once per process (imports happen here) and returns ``fn(inputs) ->
        outputs``; ``inputs`` is the dict built by ``OpSpec.make_inputs``; outputs a tensor
        or a tuple of tensors (the differentiable ones get a backward).
    kind: "ours" (prefopt_fast), "baseline" (what users write by hand) or "peer" (other
        libraries).
    backward: False for a forward-only provider (bwd and step are then not measured).
    requires: importable module names; if one is missing the provider is skipped with a note.
    install: how to get the missing requirement (shown in the note).
    check: ``check(case) -> None | reason`` for per-case skips (device, dtype, ...).
    mutates: names of inputs the provider overwrites (e.g. an in-place backward); they are
        restored from a pristine copy (untimed) before every call.
    mem_factor: rough peak extra memory of a step in units of the op's main tensor (the
        logits); only used to skip cases that would not fit in memory.
    slow_setup: the first call takes long (compilation); left out of --quick unless named.
    grad_in_forward: the provider computes its gradient in the forward and its backward only
        hands it out (Liger's chunked losses and cross-entropy): its backward has no bound of
        its own, only its forward and step have one.
    """

    name: str
    make: Callable[[], Callable[[dict], Any]]
    kind: str = "baseline"
    description: str = ""
    backward: bool = True
    requires: tuple = ()
    install: str = ""
    check: Callable[["Case"], str | None] | None = None
    mutates: tuple = ()
    mem_factor: float = 4.0
    slow_setup: bool = False
    grad_in_forward: bool = False


@dataclasses.dataclass
class OpSpec:
    """What a thin op script declares.

    make_inputs(shape, dtype, device, seed) -> dict of tensors (touched: filled with data).
    main_bytes(shape, dtype) -> bytes of the dominant tensor (the logits): sizes the
        calibration buffer and the memory guard.
    bytes_moved(shape, dtype) -> {"fwd": t, "bwd": t}: the least traffic any implementation
        must do, each ``t`` a dict of bytes moved per access pattern, ``{"read", "rw",
        "write"}`` (see calibration.traffic_parts), or a plain number (all read); "step" is
        their sum.
    alloc_bytes(shape, dtype) -> bytes the op's contract makes it allocate fresh per step
        (the logits gradient, unless written in place): their first touch is in the bound
        of providers that do not write in place.
    flops(shape, dtype) -> {"fwd": float, "bwd": float} or None (no GEMM in the op).
    exps(shape, dtype) -> {"fwd": int, "bwd": int} or None: the exps the math needs at the
        least (the exp ceiling of the bound).
    make_shape(tokens, vocab) -> a shape dict; tokens(shape), vocab(shape) -> the two axes.
    presets: preset name -> list of shape dicts ("dry-run", "quick", "default", "full").
    preset_dtypes: preset name -> list of dtype names.
    preset_providers: preset name -> provider names or globs run in that preset when
        --providers is not given (a sweep that would take too long with every provider).
    reference: the provider "x naive" compares against (per dtype, the first of these
        names that has a result).
    notes: lines printed and stored with the results (peers that do not apply, etc.).
    """

    name: str
    module: str
    make_inputs: Callable
    grad_inputs: tuple
    main_bytes: Callable
    bytes_moved: Callable
    make_shape: Callable
    tokens: Callable
    vocab: Callable
    presets: dict
    preset_dtypes: dict
    providers: list
    alloc_bytes: Callable | None = None
    flops: Callable | None = None
    exps: Callable | None = None
    preset_providers: dict = dataclasses.field(default_factory=dict)
    reference: tuple = ("naive",)
    notes: list = dataclasses.field(default_factory=list)
    description: str = ""

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"op {self.name!r} has no provider {name!r}; known: {', '.join(p.name for p in self.providers)}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration: op shape, dtype name and device."""

    shape: tuple  # sorted (key, value) pairs, hashable
    dtype: str
    device: str

    @property
    def shape_dict(self) -> dict:
        return dict(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @staticmethod
    def make(shape: dict, dtype: str, device: str) -> "Case":
        return Case(tuple(shape.items()), canonical_dtype(dtype), device)


def canonical_dtype(name: str) -> str:
    try:
        return DTYPE_NAMES[DTYPES[name]]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of fp32, bf16, fp16") from None


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# --------------------------------------------------------------------------- helpers for op scripts


def missing_modules(provider: Provider) -> list:
    """The modules of ``provider.requires`` that cannot be imported here (cheap: no import)."""
    out = []
    for mod in provider.requires:
        try:
            if importlib.util.find_spec(mod) is None:
                out.append(mod)
        except (ImportError, ValueError):
            out.append(mod)
    return out


def availability(provider: Provider) -> str | None:
    """None if the provider can run here at all, else the note saying why not."""
    missing = missing_modules(provider)
    if missing:
        how = f" ({provider.install})" if provider.install else ""
        return f"not installed: {', '.join(missing)}{how}"
    return None


def needs_cuda(case: Case) -> str | None:
    return None if case.device.startswith("cuda") else "needs a CUDA device"


def prefopt_fast_providers(
    call: Callable, *, inplace: bool = True, known=("torch", "cpu", "triton", "cuda"), mem_factor: float = 1.1
) -> tuple[list, list]:
    """Providers for every prefopt_fast backend available here, and notes for the others.

    call(inputs, backend=name, inplace_backward=bool) runs the op. With ``inplace`` each
    backend also gets a ``+inplace`` provider (inplace_backward=True, mutates the logits).
    """
    notes = []
    try:
        import prefopt_fast

        available = list(prefopt_fast.available_backends())
    except Exception as exc:  # the package or the op may not be there yet
        return [], [f"prefopt_fast: not usable here ({type(exc).__name__}: {exc})"]
    try:  # the dispatcher knows every backend name and why one is unavailable
        from prefopt_fast import _dispatch

        known = tuple(_dispatch.BACKENDS)
    except Exception:
        _dispatch = None
    for name in known:
        if name in available:
            continue
        reason = "not available"
        try:
            reason = _dispatch.why_unavailable(name) or reason
        except Exception:
            pass
        notes.append(f"prefopt_fast.{name}: skipped ({reason})")

    def checker(backend):
        def check(case: Case) -> str | None:
            if backend == "triton" and not case.device.startswith("cuda"):
                return "Triton on CPU runs only in the interpreter: not benchmarked"
            if _dispatch is None:
                return None
            try:
                mod = _dispatch.load_backend(backend)
                probe = torch.zeros(2, 4, dtype=case.torch_dtype, device=case.device)
                return mod.supports(probe)
            except Exception as exc:
                return f"cannot serve these inputs ({type(exc).__name__}: {exc})"

        return check

    providers = []
    for backend in available:
        for inp in (False, True) if inplace else (False,):

            def make(backend=backend, inp=inp):
                return lambda inputs: call(inputs, backend=backend, inplace_backward=inp)

            providers.append(
                Provider(
                    name=f"prefopt_fast.{backend}" + ("+inplace" if inp else ""),
                    make=make,
                    kind="ours",
                    description=f"prefopt_fast, backend={backend!r}" + (", inplace_backward=True" if inp else ""),
                    check=checker(backend),
                    mutates=("logits",) if inp else (),
                    mem_factor=0.1 if inp else mem_factor,
                )
            )
    return providers, notes


def load_op(module: str) -> OpSpec:
    """The OpSpec of ``"pkg.module"`` (its ``OP``) or ``"pkg.module:variant"`` (its
    ``variant_op(variant)``: one script parametrized, e.g. the PPO KL estimator)."""
    name, _, variant = module.partition(":")
    mod = importlib.import_module(name)
    return mod.variant_op(variant) if variant else mod.OP
