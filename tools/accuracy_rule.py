"""Plain-PyTorch baselines, float64 references and the error-bound rule of the hardening tests.

Shared by tests/test_properties.py, tests/test_numerics.py and tools/accuracy_table.py (the
tests find it through tests/conftest.py, which puts tools/ on ``sys.path``). The formulas are
those of :mod:`prefopt_fast.reference`, the package's fp64 spec; this module only adapts
them to the problems below and evaluates them in fp64, fp32 or the input dtype.

The error-bound rule
--------------------
For every output O of an op (forward values and gradients), computed by a backend from
inputs stored in dtype d (fp32, bf16 or fp16):

    err(X)  = max_i |X_i - R_i|     over the entries where R is finite
    rule:     err(backend) <= 2 * err(plain) + floor

where

R (reference)
    the op's formula (``SPECS[op].formula``, i.e. prefopt_fast.reference) evaluated in float64 on the
    SAME inputs (bf16 / fp16 / fp32 values upcast exactly); gradients by float64 autograd.
plain (the baseline: "plain PyTorch computing the same thing")
    the same formula as a careful user writes it in plain PyTorch from inputs in dtype d:
    the inputs upcast to float32 at the first operation (``x.float()``; a no-op for fp32),
    e.g. ``torch.log_softmax(logits.float() / T, -1).gather(-1, y)``, the loss heads on those
    fp32 log-probs; gradients by autograd through the upcast, so a logits gradient comes
    back in dtype d, rounded once, exactly like the backend's. The fused-linear ops first
    produce the logits with the lm_head GEMM in dtype d (``hidden @ weight.T + bias``, what
    the model's own ``nn.Linear`` gives), then upcast.
    (Computing log_softmax *in* bf16/fp16 is what TRL's ``selective_log_softmax`` does for
    16-bit logits; its errors are 100-1000x larger, which would make the rule vacuous. The
    accuracy table shows it next to the fp32 baseline as "plain in dtype".)
floor (a tiny absolute floor)
    ``FLOOR_ULPS`` fp32 units in the last place at the reference's magnitude:
    ``FLOOR_ULPS * 2**-23 * max(1, max|R|)`` (about 5e-6 for log-probs of magnitude 10). It
    only matters when the baseline is luckily exact (a scalar loss, a handful of entries):
    two fp32 computations of the same value may then differ by a few ulps either way.
    The magnitude is that of the largest value output of the op (not only of R itself): a
    loss or a metric such as ``rewards/margins`` is a difference of log-prob sums, and its
    rounding is that of the sums (ulp(|S|)), however small the difference comes out.
    For GRADIENTS the floor is multiplied by ``S = max(1, max |logits / T|)`` (for the
    fused-linear op, of the fp64 logits ``hidden @ weight.T + bias``): the gradient of a
    softmax moves by about ``S * u`` relative when the logits move by ``u`` relative, so this
    is the error of the exact gradient at logits perturbed by FLOOR_ULPS ulps (backward
    stability). It is needed because every backend keeps the row's log-sum-exp as ONE fp32
    number (the row contract, ``prefopt_fast._rows``): ``p_v = exp(x_v - lse)`` then carries
    the absolute rounding of lse, ~ulp(S), as a relative error, where ``log_softmax``'s own
    backward, which saves the N x V log-probs, does not (at S ~ 30 the fp32 gradients are
    ~30x less accurate than plain PyTorch's: 3e-6 instead of 1e-7, still far below bf16's
    rounding; tests/test_properties.py keeps that as a known issue).

The output must also be non-finite exactly where R is (NaN where NaN, the same infinities).
Boolean outputs (``is_argmax``) count mismatches instead of an error: mismatches(backend)
<= 2 * mismatches(plain).
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from prefopt_fast import _rows
from prefopt_fast import reference as R

FLOOR_ULPS = 4
EPS32 = 2.0**-23
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORE = -100


# ------------------------------------------------------------------------------ errors


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| over the entries where ref is finite (0.0 if none)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    d = (x - ref).abs()[fin]
    return float("inf") if not torch.isfinite(d).all() else float(d.max())


def error_stats(x: torch.Tensor, ref: torch.Tensor, rel_min: float = 1e-6) -> Dict[str, float]:
    """max / mean absolute error, and max / mean relative error over the entries with
    |ref| >= rel_min (smaller entries only count in the absolute error)."""
    x, ref = x.detach().double().cpu().reshape(-1), ref.detach().double().cpu().reshape(-1)
    fin = torch.isfinite(ref)
    x, ref = x[fin], ref[fin]
    if ref.numel() == 0:
        return dict(max_abs=0.0, mean_abs=0.0, max_rel=0.0, mean_rel=0.0)
    d = (x - ref).abs()
    big = ref.abs() >= rel_min
    rel = d[big] / ref.abs()[big]
    return dict(
        max_abs=float(d.max()),
        mean_abs=float(d.mean()),
        max_rel=float(rel.max()) if rel.numel() else 0.0,
        mean_rel=float(rel.mean()) if rel.numel() else 0.0,
    )


def floor_for(ref: torch.Tensor) -> float:
    fin = ref.detach().double()[torch.isfinite(ref.detach().double())]
    mag = float(fin.abs().max()) if fin.numel() else 0.0
    return FLOOR_ULPS * EPS32 * max(1.0, mag)


def same_nonfinite(x: torch.Tensor, ref: torch.Tensor) -> bool:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.equal(torch.isnan(x), torch.isnan(ref)):
        return False
    inf = torch.isinf(ref)
    return torch.equal(torch.isinf(x), inf) and torch.equal(x[inf], ref[inf])


def check_rule(
    got: Dict[str, torch.Tensor],
    plain: Dict[str, torch.Tensor],
    ref: Dict[str, torch.Tensor],
    context: str = "",
    grad_scale: float = 1.0,
) -> None:
    """Assert the error-bound rule for every output name of ``ref``; ``grad_scale`` is S,
    the factor of the gradients' floor (module docstring)."""
    problems = []
    # one floor for every value output: they derive from the same sums (module docstring)
    value_floor = max(
        [floor_for(r) for n, r in ref.items() if not n.startswith("grad:") and r.dtype != torch.bool] or [0.0]
    )
    for name, r in ref.items():
        g, p = got[name], plain[name]
        if tuple(g.shape) != tuple(r.shape):
            problems.append(f"{name}: shape {tuple(g.shape)} != reference {tuple(r.shape)}")
            continue
        if r.dtype == torch.bool:
            bad_g = int((g.cpu() != r.cpu()).sum())
            bad_p = int((p.cpu() != r.cpu()).sum())
            if bad_g > 2 * bad_p:
                problems.append(f"{name}: {bad_g} mismatches vs fp64 (plain PyTorch: {bad_p})")
            continue
        if not same_nonfinite(g, r):
            problems.append(
                f"{name}: non-finite pattern differs from the fp64 reference "
                f"(got {int((~torch.isfinite(g.detach())).sum())} non-finite, "
                f"reference {int((~torch.isfinite(r.detach())).sum())})"
            )
            continue
        eg, ep = max_abs_err(g, r), max_abs_err(p, r)
        if name.startswith("grad:"):
            fl = floor_for(r) * max(1.0, grad_scale)
        else:
            fl = value_floor
        if not eg <= 2 * ep + fl:
            problems.append(
                f"{name}: max abs err {eg:.3g} > 2 x plain PyTorch's {ep:.3g} + floor {fl:.2g} "
                f"(ratio {eg / max(ep, 1e-300):.3g})"
            )
    if problems:
        raise AssertionError(f"{context}\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- inputs

LAYOUTS = ("contiguous", "shift", "step2", "transpose", "padded_rows")


def strided_view(values: torch.Tensor, layout: str, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """(base, view): ``view`` equals ``values`` (shape [..., V], last stride 1) but lives
    inside a bigger ``base`` with the given layout. ``base`` owns the memory (it is what
    gradients flow to); filler entries of base are random."""
    shape = tuple(values.shape)
    V = shape[-1]
    lead = shape[:-1]
    if layout == "shift" and len(lead) >= 2:  # logits[:, :-1] of [B, T + 1, V]
        base = torch.randn(lead[0], lead[1] + 1, *lead[2:], V, generator=gen).to(values.dtype)
        view_fn = lambda b: b[:, :-1]  # noqa: E731
    elif layout == "step2" and len(lead) >= 1:  # logits[::2]
        base = torch.randn(2 * lead[0], *lead[1:], V, generator=gen).to(values.dtype)
        view_fn = lambda b: b[::2]  # noqa: E731
    elif layout == "transpose" and len(lead) >= 2:  # [T, B, V] seen as [B, T, V]
        base = torch.randn(lead[1], lead[0], *lead[2:], V, generator=gen).to(values.dtype)
        view_fn = lambda b: b.transpose(0, 1)  # noqa: E731
    elif layout == "padded_rows":  # rows V + 5 apart, storage offset 2: unaligned rows
        base = torch.randn(*lead, V + 5, generator=gen).to(values.dtype)
        view_fn = lambda b: b[..., 2 : 2 + V]  # noqa: E731
    else:
        base = values.clone()
        view_fn = lambda b: b  # noqa: E731
    with torch.no_grad():
        view_fn(base).copy_(values)
    return base, view_fn


def random_logits(
    gen: torch.Generator,
    shape,
    dtype,
    *,
    scale: float = 2.0,
    neg_inf_frac: float = 0.0,
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fp32 randn * scale rounded to dtype; ``neg_inf_frac`` of the entries set to -inf,
    never a row's label (so every row keeps a finite label)."""
    z = torch.randn(*shape, generator=gen) * scale
    if neg_inf_frac > 0:
        mask = torch.rand(*shape, generator=gen) < neg_inf_frac
        if labels is not None:
            keep = labels.clamp(min=0).unsqueeze(-1)
            mask.scatter_(-1, keep, False)
        else:
            mask[..., 0] = False
        z = z.masked_fill(mask, -math.inf)
    return z.to(dtype)


def random_labels(
    gen: torch.Generator, shape, V: int, *, ignore_frac: float = 0.2, ignore_index: int = IGNORE
) -> torch.Tensor:
    y = torch.randint(0, V, shape, generator=gen)
    if ignore_frac > 0:
        y = torch.where(torch.rand(shape, generator=gen) < ignore_frac, torch.full_like(y, ignore_index), y)
    return y


def random_temperature(gen: torch.Generator, kind: str, shape):
    """'one' -> 1.0, 'float' -> a float in [0.25, 4], 'token' -> [*shape] tensor, 'seq' -> [B, 1]."""
    if kind == "one":
        return 1.0
    if kind == "float":
        return float(torch.empty(()).uniform_(0.25, 4.0, generator=gen))
    if kind == "token":
        return torch.empty(shape).uniform_(0.25, 4.0, generator=gen)
    if kind == "seq":
        if len(shape) == 0:  # a single row: a 0-d tensor
            return torch.empty(()).uniform_(0.25, 4.0, generator=gen)
        return torch.empty(shape[0], *([1] * (len(shape) - 1))).uniform_(0.25, 4.0, generator=gen)
    raise KeyError(kind)


# ---------------------------------------------------------------------- formulas
# The formulas are prefopt_fast.reference's (the package's fp64 spec, written independently
# of the ops and heads): each op's adapter below calls them with a compute dtype ``cdt``
# (float64: the reference; float32: the plain baseline; the input dtype: "plain in dtype").


def token_formula(z, y, cdt, *, temperature=1.0, ignore_index=IGNORE, want=("logprobs",)):
    """Per-token log-prob and the statistics in ``want`` (prefopt_fast.token_logprobs), in ``cdt``."""
    st = R.token_stats(z, y, ignore_index=ignore_index, temperature=temperature, dtype=cdt)
    return {k: st[k] for k in want}


# ------------------------------------------------------------------------- op specs


@dataclass(repr=False)
class Problem:
    """One op invocation: inputs as the user passes them, the memory owners gradients go to."""

    op: str
    inputs: Dict[str, object]  # tensors (dtype d, maybe strided views) and options
    grad_wrt: Tuple[str, ...] = ()  # float inputs to differentiate
    bases: Dict[str, Tuple[torch.Tensor, Callable]] = field(default_factory=dict)  # name -> (base, view_fn)
    cotangents: Dict[str, torch.Tensor] = field(default_factory=dict)  # output -> weight (fp32)

    def __repr__(self):
        return describe(self)


def _differentiable_inputs(pb: Problem, cdt: Optional[torch.dtype], device=None, non_leaf: bool = False):
    """Fresh leaves for the inputs in ``grad_wrt`` (cdt None: the user's dtype and layout,
    else detached copies upcast to cdt) and the dict of inputs using them, on ``device``.
    ``non_leaf``: strided inputs are views of ``leaf * 1`` (as a layer's output), which
    in-place backward may overwrite."""
    mv = (lambda t: t) if device is None else (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    ins = {k: mv(v) for k, v in pb.inputs.items()}
    wrt = []
    for name in pb.grad_wrt:
        if cdt is None and name in pb.bases:
            base, view_fn = pb.bases[name]
            leaf = mv(base.detach().clone()).requires_grad_()
            ins[name] = view_fn(leaf * 1 if non_leaf else leaf)
        else:
            t = mv(pb.inputs[name].detach())
            leaf = (t.clone() if cdt is None else t.to(cdt)).requires_grad_()
            ins[name] = leaf
        wrt.append(ins[name])
    return ins, wrt


def _vjp(outs: Dict[str, torch.Tensor], pb: Problem, wrt) -> Dict[str, torch.Tensor]:
    terms = []
    for name, w in pb.cotangents.items():
        o = outs[name]
        terms.append((o * w.to(device=o.device, dtype=o.dtype)).sum() if o.dim() else o * float(w))
    if not terms or not wrt:
        return {}
    total = sum(terms)
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return {f"grad:{n}": (torch.zeros_like(x) if g is None else g) for n, x, g in zip(pb.grad_wrt, wrt, grads)}


def chop_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation toward zero (what the Triton interpreter's cast does)."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


MODES = ("ref", "plain", "plain_dtype", "plain_chop", "lib")


def evaluate(pb: Problem, mode: str, backend: Optional[str] = None, device=None) -> Dict[str, torch.Tensor]:
    """Outputs (detached, on the CPU) and gradients of ``pb``. Modes:
    'ref'         the formula in fp64 (the reference);
    'plain'       the formula on inputs upcast to fp32 (the baseline of the rule);
    'plain_dtype' the formula in the input dtype (no upcast; shown in the accuracy table);
    'plain_chop'  as 'plain', but the fp32 gradient is cast to bf16 by truncation instead of
                  rounding: the baseline for the Triton interpreter, whose casts truncate;
    'lib'         prefopt_fast with ``backend`` (inputs moved to ``device``)."""
    spec = SPECS[pb.op]
    if mode == "lib":
        ins, wrt = _differentiable_inputs(pb, None, device, non_leaf=bool(pb.inputs.get("inplace")))
        outs = spec.lib(ins, backend)
    elif mode == "plain_chop":
        ins, wrt = _differentiable_inputs(pb, torch.float32)
        outs = spec.formula(ins, torch.float32, "plain")
    else:
        cdt = {"ref": torch.float64, "plain": torch.float32, "plain_dtype": None}[mode]
        ins, wrt = _differentiable_inputs(pb, cdt if mode == "ref" else None)
        outs = spec.formula(ins, cdt if cdt is not None else spec.input_dtype(ins), mode)
    grads = _vjp(outs, pb, wrt)
    if mode == "plain_chop":
        grads = {
            k: chop_to_bf16(g) if pb.inputs[k[5:]].dtype == torch.bfloat16 else g.to(pb.inputs[k[5:]].dtype)
            for k, g in grads.items()
        }
    res = {k: v.detach().cpu() for k, v in outs.items()}
    res.update({k: v.detach().cpu() for k, v in grads.items()})
    return res


def interpreted_triton(backend: Optional[str]) -> bool:
    import os

    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def baseline_mode(pb: Problem, backend: Optional[str]) -> str:
    """'plain', or 'plain_chop' where the backend is the Triton interpreter on bf16 inputs
    (its fp32 -> bf16 cast truncates; on a GPU the cast rounds and 'plain' applies). The
    fused-linear op keeps 'plain': its gradients leave the row kernels through fp32 GEMMs."""
    if (
        interpreted_triton(backend)
        and pb.op != "linear_token_logprobs"
        and any(pb.inputs[n].dtype == torch.bfloat16 for n in pb.grad_wrt)
    ):
        return "plain_chop"
    return "plain"


@dataclass
class OpSpec:
    lib: Callable  # (inputs, backend) -> dict of outputs
    formula: Callable  # (inputs, cdt, mode) -> dict of outputs
    input_dtype: Callable  # inputs -> the user's storage dtype


def _pf():
    import prefopt_fast

    return prefopt_fast


# token_logprobs --------------------------------------------------------------------

# every statistic of the row contract but the exact KL (which needs a second logits tensor)
TOKEN_STATS = tuple(name for name in _rows.STATS if name != "kl")


def _token_lib(ins, backend):
    o = _pf().token_logprobs(
        ins["logits"],
        ins["labels"],
        temperature=ins["temperature"],
        ignore_index=ins["ignore_index"],
        stats=ins["stats"],
        backend=backend,
        inplace_backward=ins.get("inplace", False),
    )
    if not ins["stats"]:
        return {"logprobs": o}
    return {"logprobs": o.logprobs, **{s: getattr(o, s) for s in ins["stats"]}}


def _upcast_first(z, cdt, mode):
    return z if mode == "plain_dtype" else z.to(cdt)


def _token_formula(ins, cdt, mode):
    z = _upcast_first(ins["logits"], cdt, mode)
    return token_formula(
        z,
        ins["labels"],
        z.dtype,
        temperature=ins["temperature"],
        ignore_index=ins["ignore_index"],
        want=("logprobs",) + tuple(ins["stats"]),
    )


# sequence_logprobs -----------------------------------------------------------------


def _seq_lib(ins, backend):
    s = _pf().sequence_logprobs(
        ins["logits"],
        ins["labels"],
        temperature=ins["temperature"],
        average=ins["average"],
        cu_seqlens=ins.get("cu_seqlens"),
        backend=backend,
    )
    return {"seq": s}


def _seq_formula(ins, cdt, mode):
    z = _upcast_first(ins["logits"], cdt, mode)
    s = R.sequence_logprobs(
        z, ins["labels"], temperature=ins["temperature"], average=ins["average"], cu_seqlens=ins.get("cu_seqlens"),
        dtype=z.dtype,
    )  # fmt: skip
    return {"seq": s}


# logits_dpo_loss --------------------------------------------------------------------

_DPO_METRICS = ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected")


def _fdpo_lib(ins, backend):
    kw = dict(beta=ins["beta"], loss_type=ins["loss_type"], temperature=ins["temperature"], backend=backend)
    if ins["loss_type"] == "robust":
        kw["label_smoothing"] = ins["label_smoothing"]
    if ins.get("ref_logits") is not None:
        kw["ref_logits"] = ins["ref_logits"]
    loss, metrics = _pf().logits_dpo_loss(ins["logits"], ins["labels"], **kw)
    return {"loss": loss, **{k: metrics[k] for k in _DPO_METRICS}}


def _fdpo_formula(ins, cdt, mode):
    z = _upcast_first(ins["logits"], cdt, mode)
    ref = ins.get("ref_logits")
    loss, metrics = R.logits_dpo_loss(
        z,
        ins["labels"],
        None if ref is None else _upcast_first(ref, cdt, mode),
        temperature=ins["temperature"],
        dtype=z.dtype,
        beta=ins["beta"],
        loss_type=ins["loss_type"],
        label_smoothing=ins["label_smoothing"] if ins["loss_type"] == "robust" else 0.0,  # as _fdpo_lib passes it
    )
    return {"loss": loss, **{k: metrics[k] for k in _DPO_METRICS}}


# ppo_loss --------------------------------------------------------------------------


def _ppo_lib(ins, backend):
    kw = dict(
        temperature=ins["temperature"],
        clip_eps_low=ins["clip_low"],
        clip_eps_high=ins["clip_high"],
        kl_coef=ins["kl_coef"],
        kl_estimator=ins["kl_estimator"],
        entropy_coef=ins["entropy_coef"],
        loss_agg_mode=ins["agg"],
        backend=backend,
    )
    if ins["agg"] == "seq-mean-token-sum-norm":
        kw["max_length"] = ins["max_length"]
    if ins["kl_coef"]:
        if ins["kl_estimator"] == "full":
            kw["ref_logits"] = ins["ref_logits"]
        else:
            kw["ref_logps"] = ins["ref_logps"]
    loss, metrics = _pf().ppo_loss(ins["logits"], ins["labels"], ins["old_logps"], ins["advantages"], **kw)
    return {"loss": loss, "entropy": metrics["entropy"]}


def _ppo_formula(ins, cdt, mode):
    z = _upcast_first(ins["logits"], cdt, mode)
    full = ins["kl_estimator"] == "full"
    ref_logits = _upcast_first(ins["ref_logits"], cdt, mode) if ins["kl_coef"] and full else None
    loss, metrics = R.ppo_loss(
        z,
        ins["labels"],
        ins["old_logps"],
        ins["advantages"],
        temperature=ins["temperature"],
        ref_logprobs=ins.get("ref_logps") if ins["kl_coef"] and not full else None,
        ref_logits=ref_logits,
        dtype=z.dtype,
        clip_eps_low=ins["clip_low"],
        clip_eps_high=ins["clip_high"],
        kl_coef=ins["kl_coef"],
        kl_estimator=ins["kl_estimator"],
        entropy_coef=ins["entropy_coef"],
        loss_agg_mode=ins["agg"],
        max_length=ins.get("max_length") if ins["agg"] == "seq-mean-token-sum-norm" else None,
    )
    return {"loss": loss, "entropy": metrics["entropy"]}


# linear_token_logprobs -------------------------------------------------------------


def _linear_lib(ins, backend):
    from prefopt_fast.linear import linear_token_logprobs

    o = linear_token_logprobs(
        ins["hidden"],
        ins["weight"],
        ins["labels"],
        bias=ins.get("bias"),
        temperature=ins["temperature"],
        stats=("entropy",),
        chunk_size=ins["chunk_size"],
        backend=backend,
    )
    return {"logprobs": o.logprobs, "entropy": o.entropy}


def _linear_formula(ins, cdt, mode):
    # ref: the lm_head in fp64; plain: the model's lm_head in the storage dtype, then the upcast
    z = R.linear_logits(ins["hidden"], ins["weight"], ins.get("bias"), dtype=cdt if mode == "ref" else None)
    z = _upcast_first(z, cdt, mode)
    return token_formula(z, ins["labels"], z.dtype, temperature=ins["temperature"], want=("logprobs", "entropy"))


# dpo_loss / bradley_terry_loss (heads on [B] vectors) -------------------------------


def _dpo_lib(ins, backend):
    kw = dict(beta=ins["beta"], loss_type=ins["loss_type"])
    if ins["loss_type"] == "robust":
        kw["label_smoothing"] = ins["label_smoothing"]
    if ins["loss_type"] == "ipo":
        kw.update(chosen_lengths=ins["chosen_lengths"], rejected_lengths=ins["rejected_lengths"])
    loss, metrics = _pf().dpo_loss(
        ins["chosen_logps"], ins["rejected_logps"], ins["ref_chosen_logps"], ins["ref_rejected_logps"], **kw
    )
    return {"loss": loss, **{k: metrics[k] for k in _DPO_METRICS}}


def _dpo_formula(ins, cdt, mode):
    up = lambda t: None if t is None else _upcast_first(t, cdt, mode)  # noqa: E731
    loss, metrics = R.dpo_loss(
        up(ins["chosen_logps"]),
        up(ins["rejected_logps"]),
        up(ins["ref_chosen_logps"]),
        up(ins["ref_rejected_logps"]),
        chosen_lengths=ins["chosen_lengths"],
        rejected_lengths=ins["rejected_lengths"],
        beta=ins["beta"],
        loss_type=ins["loss_type"],
        label_smoothing=ins.get("label_smoothing", 0.0) if ins["loss_type"] == "robust" else 0.0,  # as _dpo_lib
        dtype=None,
    )
    return {"loss": loss, **{k: metrics[k] for k in _DPO_METRICS}}


def _bt_lib(ins, backend):
    loss, metrics = _pf().bradley_terry_loss(
        ins["chosen_rewards"], ins["rejected_rewards"], margin=ins["margin"], center_rewards_coefficient=ins["coef"]
    )
    return {"loss": loss, "margin": metrics["margin"]}


def _bt_formula(ins, cdt, mode):
    m = ins["margin"]
    loss, metrics = R.bradley_terry_loss(
        _upcast_first(ins["chosen_rewards"], cdt, mode),
        _upcast_first(ins["rejected_rewards"], cdt, mode),
        margin=_upcast_first(m, cdt, mode) if isinstance(m, torch.Tensor) else m,
        center_rewards_coefficient=ins["coef"],
        dtype=None,
    )
    return {"loss": loss, "margin": metrics["margin"]}


def _dtype_of(name):
    return lambda ins: ins[name].dtype


SPECS: Dict[str, OpSpec] = {
    "token_logprobs": OpSpec(_token_lib, _token_formula, _dtype_of("logits")),
    "sequence_logprobs": OpSpec(_seq_lib, _seq_formula, _dtype_of("logits")),
    "logits_dpo_loss": OpSpec(_fdpo_lib, _fdpo_formula, _dtype_of("logits")),
    "ppo_loss": OpSpec(_ppo_lib, _ppo_formula, _dtype_of("logits")),
    "linear_token_logprobs": OpSpec(_linear_lib, _linear_formula, _dtype_of("hidden")),
    "dpo_loss": OpSpec(_dpo_lib, _dpo_formula, _dtype_of("chosen_logps")),
    "bradley_terry_loss": OpSpec(_bt_lib, _bt_formula, _dtype_of("chosen_rewards")),
}
# ops whose vocabulary work runs on a row-kernel backend (the heads have none)
BACKEND_OPS = ("token_logprobs", "sequence_logprobs", "logits_dpo_loss", "ppo_loss", "linear_token_logprobs")


# ----------------------------------------------------------------- problem builders


def _logits_problem(gen, shape, dtype, layout, scale, neg_inf_frac, labels):
    values = random_logits(gen, shape, dtype, scale=scale, neg_inf_frac=neg_inf_frac, labels=labels)
    base, view_fn = strided_view(values, layout, gen)
    return base, view_fn, view_fn(base)


def make_token_problem(
    seed: int,
    *,
    shape,
    dtype,
    layout="contiguous",
    scale=2.0,
    ignore_frac=0.2,
    neg_inf_frac=0.0,
    temperature="one",
    stats=TOKEN_STATS,
    ignore_index=IGNORE,
    inplace=False,
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    V = shape[-1]
    y = random_labels(gen, shape[:-1], V, ignore_frac=ignore_frac, ignore_index=ignore_index)
    base, view_fn, z = _logits_problem(gen, shape, dtype, layout, scale, neg_inf_frac, y)
    t = random_temperature(gen, temperature, shape[:-1])
    cot = {"logprobs": torch.randn(shape[:-1], generator=gen)}
    if "entropy" in stats:
        cot["entropy"] = torch.randn(shape[:-1], generator=gen)
    return Problem(
        "token_logprobs",
        dict(logits=z, labels=y, temperature=t, ignore_index=ignore_index, stats=tuple(stats), inplace=inplace),
        grad_wrt=("logits",),
        bases={"logits": (base, view_fn)},
        cotangents=cot,
    )


def make_sequence_problem(
    seed: int, *, B, T, V, dtype, layout="contiguous", packed=False, average=False, scale=2.0, temperature="one"
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    cu = None
    if packed:
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        shape = (int(cu[-1]), V)
        tshape = (int(cu[-1]),)
    else:
        shape = (B, T, V)
        tshape = (B, T)
    y = random_labels(gen, tshape, V, ignore_frac=0.3)
    if not packed and B > 0:
        y[0] = IGNORE  # a fully masked sequence
    # (a packed [total, V] tensor has no second leading dim: "shift" / "transpose" fall back to contiguous)
    base, view_fn, z = _logits_problem(gen, shape, dtype, layout, scale, 0.0, y)
    t = random_temperature(gen, temperature, tshape)
    ins = dict(logits=z, labels=y, temperature=t, average=average)
    if packed:
        ins["cu_seqlens"] = cu
    nseq = B
    return Problem(
        "sequence_logprobs",
        ins,
        grad_wrt=("logits",),
        bases={"logits": (base, view_fn)},
        cotangents={"seq": torch.randn(nseq, generator=gen)},
    )


def _completion_labels(gen, B2, T, V):
    """[2B, T] labels: a prompt of random length (ignored), a completion, padding (ignored)."""
    y = torch.randint(0, V, (B2, T), generator=gen)
    pos = torch.arange(T)
    prompt = torch.randint(0, T, (B2, 1), generator=gen)
    end = torch.randint(0, T + 1, (B2, 1), generator=gen)
    return torch.where((pos >= prompt) & (pos < end), y, torch.full_like(y, IGNORE))


def make_logits_dpo_problem(
    seed: int,
    *,
    B,
    T,
    V,
    dtype,
    layout="contiguous",
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing=0.1,
    with_ref=True,
    scale=2.0,
    temperature="one",
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    y = _completion_labels(gen, 2 * B, T, V)
    base, view_fn, z = _logits_problem(gen, (2 * B, T, V), dtype, layout, scale, 0.0, y)
    ref = None
    if with_ref:
        ref = (z.float() + 0.3 * torch.randn(z.shape, generator=gen)).to(dtype)
    t = random_temperature(gen, temperature, (2 * B, T))
    ins = dict(
        logits=z,
        labels=y,
        ref_logits=ref,
        beta=beta,
        loss_type=loss_type,
        temperature=t,
        label_smoothing=label_smoothing,
    )
    return Problem(
        "logits_dpo_loss",
        ins,
        grad_wrt=("logits",),
        bases={"logits": (base, view_fn)},
        cotangents={"loss": torch.tensor(1.0)},
    )


def make_ppo_problem(
    seed: int,
    *,
    B,
    T,
    V,
    dtype,
    layout="contiguous",
    kl_estimator="k3",
    kl_coef=0.05,
    agg="token-mean",
    entropy_coef=0.01,
    clip=(0.2, 0.28),
    on_policy=False,
    per_token_adv=False,
    scale=2.0,
    temperature="one",
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    y = random_labels(gen, (B, T), V, ignore_frac=0.25)
    base, view_fn, z = _logits_problem(gen, (B, T, V), dtype, layout, scale, 0.0, y)
    t = random_temperature(gen, temperature, (B, T))
    # behaviour / reference log-probs near the policy's (ratios around 1, some clipped)
    lp = token_formula(z.double(), y, torch.float64, temperature=t)["logprobs"].float()
    old = None if on_policy else lp + 0.3 * torch.randn(B, T, generator=gen)
    ref_logps = lp + 0.3 * torch.randn(B, T, generator=gen)
    ref_logits = (z.float() + 0.3 * torch.randn(z.shape, generator=gen)).to(dtype)
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=gen)
    ins = dict(
        logits=z,
        labels=y,
        old_logps=old,
        advantages=adv,
        ref_logps=ref_logps,
        ref_logits=ref_logits,
        temperature=t,
        clip_low=clip[0],
        clip_high=clip[1],
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        agg=agg,
        max_length=T,
    )
    return Problem(
        "ppo_loss", ins, grad_wrt=("logits",), bases={"logits": (base, view_fn)}, cotangents={"loss": torch.tensor(1.0)}
    )


def make_linear_problem(
    seed: int, *, N, H, V, dtype, bias=False, chunk_size=None, ignore_frac=0.2, temperature="one"
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) * (2.0 / math.sqrt(H))).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype) if bias else None
    y = random_labels(gen, (N,), V, ignore_frac=ignore_frac)
    t = random_temperature(gen, temperature, (N,))
    ins = dict(hidden=h, weight=w, bias=b, labels=y, temperature=t, chunk_size=chunk_size)
    wrt = ("hidden", "weight") + (("bias",) if bias else ())
    return Problem(
        "linear_token_logprobs",
        ins,
        grad_wrt=wrt,
        cotangents={"logprobs": torch.randn(N, generator=gen), "entropy": torch.randn(N, generator=gen)},
    )


def make_dpo_problem(
    seed: int, *, B, dtype, loss_type="sigmoid", beta=0.1, label_smoothing=0.1, with_ref=True, magnitude=50.0
) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: (-magnitude * torch.rand(B, generator=gen)).to(dtype)  # noqa: E731
    cw, cl = mk(), mk()
    rw, rl = (mk(), mk()) if with_ref else (None, None)
    lw = torch.randint(0, 40, (B,), generator=gen)
    ll = torch.randint(0, 40, (B,), generator=gen)
    ins = dict(
        chosen_logps=cw,
        rejected_logps=cl,
        ref_chosen_logps=rw,
        ref_rejected_logps=rl,
        chosen_lengths=lw,
        rejected_lengths=ll,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    return Problem("dpo_loss", ins, grad_wrt=("chosen_logps", "rejected_logps"), cotangents={"loss": torch.tensor(1.0)})


def make_bt_problem(seed: int, *, B, dtype, margin="none", coef=None, magnitude=3.0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    rw = (magnitude * torch.randn(B, generator=gen)).to(dtype)
    rl = (magnitude * torch.randn(B, generator=gen)).to(dtype)
    m = None
    if margin == "float":
        m = float(torch.rand((), generator=gen))
    elif margin == "tensor":
        m = torch.rand(B, generator=gen).to(dtype)
    ins = dict(chosen_rewards=rw, rejected_rewards=rl, margin=m, coef=coef)
    return Problem(
        "bradley_terry_loss",
        ins,
        grad_wrt=("chosen_rewards", "rejected_rewards"),
        cotangents={"loss": torch.tensor(1.0)},
    )


def logit_scale(pb: Problem) -> float:
    """S = max(1, max finite |logits / T|) of the problem (1 for the heads on [B] vectors)."""
    ins = pb.inputs
    if pb.op == "linear_token_logprobs":
        z = ins["hidden"].double() @ ins["weight"].double().T
        if ins.get("bias") is not None:
            z = z + ins["bias"].double()
        lead = ins["labels"].shape
    elif "logits" in ins:
        z, lead = ins["logits"].double(), ins["labels"].shape
    else:
        return 1.0
    t = ins["temperature"]
    x = z / (t.double().expand(lead).unsqueeze(-1) if isinstance(t, torch.Tensor) else t)
    fin = x[torch.isfinite(x)]
    return max(1.0, float(fin.abs().max())) if fin.numel() else 1.0


def run_rule(
    pb: Problem,
    backend: Optional[str],
    device=None,
    context: str = "",
    skip: Sequence[str] = (),
    grad_scale: Optional[float] = None,
) -> Dict[str, Dict[str, torch.Tensor]]:
    """Evaluate ``pb`` three ways and assert the rule (outputs in ``skip`` excepted);
    returns the three result dicts."""
    ref = evaluate(pb, "ref")
    plain = evaluate(pb, baseline_mode(pb, backend))
    got = evaluate(pb, "lib", backend, device)
    ref_checked = {k: v for k, v in ref.items() if k not in skip}
    check_rule(
        got,
        plain,
        ref_checked,
        context or f"{pb.op} on backend {backend}: {describe(pb)}",
        grad_scale=logit_scale(pb) if grad_scale is None else grad_scale,
    )
    return dict(ref=ref, plain=plain, lib=got)


def describe(pb: Problem) -> str:
    parts = []
    for k, v in pb.inputs.items():
        if isinstance(v, torch.Tensor):
            parts.append(f"{k}={v.dtype} {tuple(v.shape)} strides {v.stride()}")
        else:
            parts.append(f"{k}={v!r}")
    return f"{pb.op}(" + ", ".join(parts) + ")"


def all_backends() -> Sequence[str]:
    return list(_pf().available_backends())
