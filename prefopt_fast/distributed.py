"""Vocabulary-parallel (tensor-parallel) log-probs over ``torch.distributed``.

Each rank of a process group holds a contiguous slice ``[vocab_start, vocab_start + V_r)`` of
the vocabulary: of the logits ``[..., V_r]``, or of the lm_head weight ``[V_r, H]`` (fused-linear
path, hidden states replicated). Nothing new runs over the vocabulary: each rank calls its
backend's row kernels on its shard, with the labels shifted by ``-vocab_start`` so that a label
living on another shard is an out-of-range index (the row contract, ``prefopt_fast._rows``,
then gives every statistic but the log-prob), and the per-token partial statistics are merged
with two all-reduces of ``[k, N]`` tensors (k <= 9, N = tokens): O(tokens), never O(tokens x V).

Merge (per token; r runs over the shards, L_r, H_r, ... the shard's kernel outputs,
m = max_r L_r, e_r = exp(L_r - m), S = sum_r e_r, w_r = e_r / S):

    lse              = m + log S
    logp             = x_y - lse            x_y from the shard holding the label
    entropy          = sum_r w_r H_r - sum_r w_r log w_r              (mixture entropy)
    log_sum_sq_probs = log sum_r exp(2 (L_r - m) + LSSP_r) - 2 log S
    mean_logit       = sum_r V_r MEAN_r / V
    kl               = sum_r w_r (KL_r + log w_r - log w'_r)          (w' the reference weights)
    is_argmax        = the label is the first argmax in its shard, not below the global max, and
                       no earlier shard reaches the global max

all-reduce MAX of (L_r, REF_LSE_r, max_v x_v), then all-reduce SUM of the rest. Terms with
e_r == 0 count 0 (a shard of only -inf logits); NaN propagates through the SUM (gloo's MAX
does not propagate NaN reliably, so nothing relies on it).

Backward: the row kernels' gradient formula needs only lse, the entropy and the KL of the
whole row, so each rank runs ``row_backward`` on its own shard with the GLOBAL statistics and
gets exactly its slice of the full gradient. The outputs are replicated (identical on every
rank) and every rank computes the same loss from them, so every rank receives the same
upstream gradient: no communication in the backward of the from-logits path. The fused-linear
path all-reduces (SUM) the gradient of the replicated hidden states (and of a replicated LoRA
``A``), each rank holding the part of it that flows through its vocabulary slice.

Everything that is not sharded (labels, temperature, the per-token loss inputs) must be
identical on all ranks of the group; the group's ranks must all make the same calls.
"""
import math
import sys
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from . import _validate
from ._dispatch import _load, resolve_backend
from ._rows import (N_OUT, OUT_ARGMAX, OUT_ENTROPY, OUT_KL, OUT_LSE, OUT_LSE_LO, OUT_LSSP, OUT_MEAN, OUT_REF_LSE,
                    STAT_ARGMAX, STAT_ENTROPY, STAT_KL, STAT_LSSP, STAT_MEAN, compute_dtype,
                    lse_pair)

__all__ = ["ShardLayout", "shard_layout", "check_process_group", "check_vocab_parallel_options", "is_dtensor", "vocab_parallel_token_logprobs",
           "vocab_parallel_linear_token_logprobs", "VocabParallelLogProbsFunction",
           "VocabParallelLinearFunction"]

# Kernel-side labels: a row's label is either its index in this shard, _IGNORE (the row is
# ignored everywhere), or V_r (lives on another shard: out of range, never ignore_index).
_IGNORE = -1


# --------------------------------------------------------------------------- layout


class ShardLayout(NamedTuple):
    """Where this rank's vocabulary slice sits: ``[start, start + size)`` of ``vocab``."""

    group: object       # the torch.distributed process group
    rank: int           # rank in ``group``
    world: int
    start: int
    size: int
    vocab: int          # the global vocabulary size


def check_process_group(process_group) -> None:
    """process_group must be a ProcessGroup of an initialized torch.distributed."""
    if process_group is None:
        raise ValueError("process_group is required for vocabulary-parallel log-probs")
    if dist.is_available() and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD "
                        f"or one from torch.distributed.new_group); got {type(process_group).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group needs torch.distributed to be initialized "
                           "(torch.distributed.init_process_group)")


def check_vocab_parallel_options(process_group, vocab_start, vocab_size):
    """``(process_group, vocab_start, vocab_size)`` of a module's constructor, checked once.

    All None: one device (or DTensor inputs, which carry their layout). ``process_group``: a
    ProcessGroup of an initialized torch.distributed; ``vocab_start`` an int >= 0, only with
    ``process_group`` (a DTensor carries its own offsets); ``vocab_size`` an int >= 1 (with
    ``process_group``, or alone to check the global size of DTensor inputs). The layout
    itself (the shards tiling the vocabulary) is checked by every call, across the group.
    """
    if process_group is not None:
        check_process_group(process_group)
    vocab_start = _validate.check_int(vocab_start, "vocab_start", lo=0, optional=True)
    vocab_size = _validate.check_int(vocab_size, "vocab_size", lo=1, optional=True)
    if vocab_start is not None and process_group is None:
        raise ValueError("vocab_start needs process_group: the rank's shard [vocab_start, vocab_start + V_local) "
                         "of the vocabulary is laid out over a process group (DTensor inputs carry their own "
                         "offsets and take no vocab_start)")
    return process_group, vocab_start, vocab_size


def shard_layout(process_group, local_size: int, vocab_start: Optional[int] = None,
                 vocab_size: Optional[int] = None, device=None, what: str = "local_size") -> ShardLayout:
    """Gather every rank's ``(local_size, vocab_start, vocab_size)`` (one all-gather of 3
    int64 per rank) and check that the shards tile ``[0, V)``.

    Without ``vocab_start`` the shards follow the rank order (rank r starts after ranks
    0..r-1; ``rank * local_size`` for even shards). Values are checked after the exchange, so
    a bad value on one rank raises the same error on every rank instead of a hang. ``what``
    names ``local_size`` in errors (e.g. "logits.shape[-1]").
    """
    check_process_group(process_group)
    vocab_start = _validate.check_int(vocab_start, "vocab_start", optional=True)
    vocab_size = _validate.check_int(vocab_size, "vocab_size", optional=True)
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    info = torch.tensor([local_size, vocab_start is not None, vocab_start or 0, vocab_size is not None,
                         vocab_size or 0], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=process_group)
    rows = torch.stack(gathered).tolist()  # host sync: the layout decides every shape below
    sizes = [r[0] for r in rows]
    V = sum(sizes)
    if V < 1:
        raise ValueError(f"the vocabulary shards are all empty: {what} must be >= 1 on at least one rank of "
                         f"process_group; got {sizes}")
    if len({r[1] for r in rows}) != 1 or len({r[3] for r in rows}) != 1:
        raise ValueError("vocab_start and vocab_size must be given on all ranks of process_group or on none")
    if rows[0][3]:
        given = {r[4] for r in rows}
        if given != {V}:
            raise ValueError(f"vocab_size must equal the sum of the local vocabulary sizes {sizes} = {V} "
                             f"on every rank; got {sorted(given)}")
    if rows[0][1]:
        starts = [r[2] for r in rows]
        spans = sorted((s, n) for s, n in zip(starts, sizes) if n > 0)
        pos, ok = 0, all(0 <= s <= V for s in starts)
        for s, n in spans:
            ok = ok and s == pos
            pos = s + n
        if not ok or pos != V:
            raise ValueError("the vocabulary shards [vocab_start, vocab_start + V_local) of the ranks must tile "
                             f"[0, {V}) without gaps or overlaps; got starts {starts} with sizes {sizes}")
    else:
        starts = [sum(sizes[:r]) for r in range(world)]
    return ShardLayout(process_group, rank, world, starts[rank], sizes[rank], V)


# --------------------------------------------------------------------------- DTensor


def is_dtensor(x) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing that module)."""
    if type(x) is torch.Tensor:
        return False
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(x, mod.DTensor)


def _from_dtensor(x, dim: int, name: str):
    """(local tensor, process group of the mesh dim sharding ``dim``, global size of ``dim``).

    Exactly one mesh dimension may shard ``dim`` (the vocabulary); other mesh dimensions may
    shard the leading dims (the rows are then this rank's rows) or replicate, not be Partial.
    """
    from torch.distributed.tensor.placement_types import Partial, Shard

    dim = dim % x.dim()
    mesh_dims = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim % x.dim() == dim]
    if len(mesh_dims) != 1:
        raise ValueError(f"{name} as a DTensor must be sharded (Shard({dim})) on its vocabulary dimension over "
                         f"exactly one mesh dimension; got placements {tuple(x.placements)}")
    if any(isinstance(p, Partial) for p in x.placements):
        raise ValueError(f"{name} as a DTensor must not have Partial placements; got {tuple(x.placements)}")
    return x.to_local(), x.device_mesh.get_group(mesh_dims[0]), x.shape[dim]


def _local(x):
    """A companion input (labels, hidden, LoRA A): a DTensor gives its local tensor."""
    return x.to_local() if is_dtensor(x) else x


# --------------------------------------------------------------------------- the merge


def _kernel_labels(y: torch.Tensor, ignore_index: int, layout: ShardLayout):
    """(kernel labels, owned, shard-before-label) for global labels y [N] int64."""
    ign = y == ignore_index
    end = layout.start + layout.size
    own = ~ign & (y >= layout.start) & (y < end)
    ky = torch.where(own, y - layout.start, torch.where(ign, _IGNORE, layout.size))
    before = ~ign & (y >= end)
    return ky, own, before


def _merge(part, layout: ShardLayout, ignored: torch.Tensor, stats: int):
    """Global row statistics from this shard's ``part`` (dict of [N] tensors, acc dtype):
    L (the shard's lse, or its LSE row with Llo its LSE_LO), XY (x_y, meaningful where
    ``own``), own, before, and per ``stats``: H, S2 (LSSP), MEAN, MX (max_v x_v) and AM
    (kernel ARGMAX), KL and RL (REF_LSE).

    Returns a dict of [N] tensors: lse_m, lse_log_s (fp64: the global lse as max + log of
    the exp-sum, for ``_rows.lse_pair``), logp, and entropy / lssp / mean / argmax / kl /
    ref_lse when asked for (in XY's dtype); ignored rows hold 0. The merge runs in fp64
    (O(N) vectors) and keeps the max apart from log S, so the lse pair loses nothing even at
    |x| ~ 1e30, which the backward's exp((x - lse) - lse_lo) would inherit.
    """
    out_dt = part["XY"].dtype
    dt = torch.float64
    part = {k: v.to(dt) if v.is_floating_point() else v for k, v in part.items()}
    L = part["L"]
    want_ent, want_sq, want_mean = stats & STAT_ENTROPY, stats & STAT_LSSP, stats & STAT_MEAN
    want_arg, want_kl = stats & STAT_ARGMAX, stats & STAT_KL
    zero = torch.zeros((), dtype=dt, device=L.device)

    # round 1: maxima
    mx_rows = [L] + ([part["RL"]] if want_kl else []) + ([part["MX"]] if want_arg else [])
    mx = torch.stack(mx_rows)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=layout.group)
    # a row of only -inf logits everywhere: shift by 0 so exp gives 0, not NaN
    m = torch.where(torch.isneginf(mx[0]), zero, mx[0])
    dL = L - m if "Llo" not in part else (L - m) + part["Llo"]
    e = torch.exp(dL)
    rows = [e, torch.where(part["own"], part["XY"], zero)]
    if want_ent:
        rows.append(torch.where(e == 0, zero, e * (part["H"] - dL)))
    if want_sq:
        rows.append(torch.where(e == 0, zero, torch.exp(2 * dL + part["S2"])))
    if want_mean:
        rows.append(part["MEAN"] * layout.size)
    if want_arg:
        gmax = mx[-1]
        rows.append((part["own"] & (part["AM"] != 0) & (part["XY"] >= gmax)).to(dt))
        rows.append((part["before"] & (part["MX"] >= gmax)).to(dt))
    if want_kl:
        mr = torch.where(torch.isneginf(mx[1]), zero, mx[1])
        dR = part["RL"] - mr
        rows.append(torch.exp(dR))
        rows.append(torch.where(e == 0, zero, e * (part["KL"] + dL - dR)))

    # round 2: sums
    s = torch.stack(rows)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=layout.group)
    it = iter(s)
    S = next(it)
    log_s = torch.log(S)
    res = {"lse_m": m, "lse_log_s": log_s}
    res["logp"] = (next(it) - m) - log_s
    if want_ent:
        res["entropy"] = next(it) / S + log_s
    if want_sq:
        res["lssp"] = torch.log(next(it)) - 2 * log_s
    if want_mean:
        res["mean"] = next(it) / layout.vocab
    if want_arg:
        res["argmax"] = ((next(it) > 0.5) & (next(it) < 0.5)).to(dt)
    if want_kl:
        Sr = next(it)
        res["ref_lse"] = mr + torch.log(Sr)
        res["kl"] = next(it) / S - log_s + torch.log(Sr)
    for k, v in res.items():
        res[k] = v.masked_fill(ignored, 0.0) if k.startswith("lse") else v.masked_fill(ignored, 0.0).to(out_dt)
    return res


def _empty_part(N: int, dt, device, stats: int):
    """The part of a shard without any vocabulary entry (an uneven DTensor split)."""
    full = lambda v: torch.full((N,), v, dtype=dt, device=device)  # noqa: E731
    part = {"L": full(-math.inf), "XY": full(0.0)}
    if stats & STAT_ENTROPY:
        part["H"] = full(0.0)
    if stats & STAT_LSSP:
        part["S2"] = full(0.0)
    if stats & STAT_MEAN:
        part["MEAN"] = full(0.0)
    if stats & STAT_ARGMAX:
        part["MX"], part["AM"] = full(-math.inf), full(0.0)
    if stats & STAT_KL:
        part["KL"], part["RL"] = full(0.0), full(-math.inf)
    return part


def _part_from_rows(out: torch.Tensor, stats: int) -> dict:
    """The row kernels' [N_OUT, N] output as a part (views, no copy)."""
    part = {"L": out[OUT_LSE], "Llo": out[OUT_LSE_LO]}
    if stats & STAT_ENTROPY:
        part["H"] = out[OUT_ENTROPY]
    if stats & STAT_LSSP:
        part["S2"] = out[OUT_LSSP]
    if stats & STAT_MEAN:
        part["MEAN"] = out[OUT_MEAN]
    if stats & STAT_ARGMAX:
        part["AM"] = out[OUT_ARGMAX]
    if stats & STAT_KL:
        part["KL"], part["RL"] = out[OUT_KL], out[OUT_REF_LSE]
    return part


# --------------------------------------------------------------------------- from logits


class VocabParallelLogProbsFunction(torch.autograd.Function):
    """Row kernels on the local shard + the all-reduce merge; backward on the local shard.

    Inputs: logits [..., V_r] (this rank's shard), ref_logits like it or None, kernel labels
    int64 [N] (see ``_kernel_labels``), own / before / ignored bool [N], inv_temp [N].
    Outputs like ``TokenLogProbsFunction``: logp, entropy, kl [N] (replicated, differentiable)
    and the non-differentiable [3, N] rows (log_sum_sq_probs, mean_logit, is_argmax).
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, ky, own, before, ignored, inv_temp, stats: int, inplace: bool,
                backend: str, layout: ShardLayout):
        N = ky.shape[0]
        acc = compute_dtype(logits.dtype)
        if layout.size == 0:
            part = _empty_part(N, acc, logits.device, stats)
        else:
            out = _load(backend).row_forward(logits, ky, inv_temp, _IGNORE, stats,
                                             **({"ref_logits": ref_logits} if ref_logits is not None else {}))
            part = _part_from_rows(out, stats)
            # x_y exactly as the kernels compute it (an O(N) gather; any leading strides)
            idx = torch.where(own, ky, 0).view(*logits.shape[:-1], 1)
            part["XY"] = logits.gather(-1, idx).reshape(-1).to(acc) * inv_temp
            if stats & STAT_ARGMAX:
                # the kernels do not return the row maximum: one more read of the shard, only
                # for is_argmax (a logging statistic)
                part["MX"] = logits.amax(-1).reshape(-1).to(acc) * inv_temp
        part["own"], part["before"] = own, before
        if N:
            res = _merge(part, layout, ignored, stats)
        else:
            res = {k: torch.zeros(0, dtype=acc, device=logits.device)
                   for k in ("lse_m", "lse_log_s", "logp", "entropy", "lssp", "mean", "argmax", "kl", "ref_lse")}
        z = torch.zeros(N, dtype=acc, device=logits.device)
        lse, lse_lo = lse_pair(res["lse_m"], res["lse_log_s"], acc)
        logp = res["logp"]
        entropy, kl, ref_lse = res.get("entropy", z), res.get("kl", z), res.get("ref_lse", z)
        extra = torch.stack([res.get("lssp", z), res.get("mean", z), res.get("argmax", z)])
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(extra)
        ctx.save_for_backward(logits, ky, inv_temp, lse, lse_lo, entropy, ref_logits, ref_lse, kl)
        ctx.meta = (inplace, backend, bool(stats & STAT_ENTROPY), bool(stats & STAT_KL), layout.size)
        return logp, entropy.clone(), kl.clone(), extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_kl, _grad_extra):
        from .ops.token_logprobs import logits_grad

        nones = (None,) * 11
        if grad_logp is None and grad_entropy is None and grad_kl is None:
            return nones
        inplace, backend, has_entropy, has_kl, size = ctx.meta
        if size == 0:
            return (torch.zeros_like(ctx.saved_tensors[0]),) + nones[1:]
        # the global lse / entropy / kl: the kernel then writes this shard's slice of the full gradient
        grad = logits_grad(ctx.saved_tensors, grad_logp, grad_entropy, grad_kl, ignore_index=_IGNORE,
                           inplace=inplace, backend=backend, has_entropy=has_entropy, has_kl=has_kl)
        return (grad,) + nones[1:]


def vocab_parallel_token_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0, stats=(),
                                  ref_logits=None, inplace_backward=False, backend="auto", process_group=None,
                                  vocab_start=None, vocab_size=None):
    """:func:`prefopt_fast.token_logprobs` on a vocabulary shard (what it calls when given
    ``process_group`` or a DTensor).

    ``logits``: this rank's ``[..., V_local]`` slice ``[vocab_start, vocab_start + V_local)``
    of the logits, or a DTensor sharded on its last dimension (then ``process_group`` and
    ``vocab_start`` come from its mesh and placements). ``labels`` are global vocabulary
    indices, identical on every rank. Outputs are replicated on every rank.
    """
    from .ops.token_logprobs import STAT_NAMES, check_stat_request, stat_mask, token_outputs

    if is_dtensor(logits):
        if process_group is not None or vocab_start is not None:
            raise ValueError("a DTensor carries its own process group and shard offsets: "
                             "pass neither process_group nor vocab_start with DTensor logits")
        logits, process_group, dt_vocab = _from_dtensor(logits, -1, "logits")
        vocab_size = dt_vocab if vocab_size is None else vocab_size
        if ref_logits is not None:
            if not is_dtensor(ref_logits):
                raise TypeError("with DTensor logits, ref_logits must be a DTensor sharded the same way")
            ref_logits = _from_dtensor(ref_logits, -1, "ref_logits")[0]
    elif is_dtensor(ref_logits):
        raise TypeError("ref_logits is a DTensor but logits is not; pass both as DTensors or both as local shards")
    labels = _local(labels)
    check_process_group(process_group)
    _validate.check_logits(logits, empty_vocab=True)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    # everything that needs no collective is checked first: a bad tensor must not reach the
    # all-gather of shard_layout (where a device mismatch fails inside the collective)
    _validate.check_index_tensor(labels, "labels", logits.shape[:-1], logits.device, "logits.shape[:-1]")
    names = _validate.parse_names(stats, STAT_NAMES, "stats")
    want_kl = check_stat_request(names, ref_logits, logits, inplace_backward, shard=True)
    inv_temp = _validate.inverse_temperature(
        temperature, labels, compute_dtype(logits.dtype))

    # an empty shard never reaches a kernel; resolve the backend on a dtype/device probe
    be = resolve_backend(backend, logits, need_kl=want_kl)

    layout = shard_layout(process_group, logits.shape[-1], vocab_start, vocab_size, logits.device,
                          what="logits.shape[-1]")
    _validate.check_label_range(labels, layout.vocab, ignore_index, vocab="the global vocabulary size")

    y = labels.reshape(-1).to(torch.int64)
    ky, own, before = _kernel_labels(y, ignore_index, layout)
    logp, entropy, kl, extra = VocabParallelLogProbsFunction.apply(
        logits, ref_logits.detach() if want_kl else None, ky, own, before, y == ignore_index, inv_temp,
        stat_mask(names), inplace_backward, be.NAME, layout)
    return token_outputs(logp, entropy, kl, extra, names, labels.shape)


# --------------------------------------------------------------------------- fused linear


def _linear_part(hidden, weight, bias, u, lora_b, ky, own, inv_temp, cfg):
    """This shard's part, chunk by chunk of tokens: one [chunk, V_r] logits buffer."""
    from .ops.linear_logprobs import _logits_into

    M = hidden.shape[0]
    Vr = weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    stats = cfg.stats
    if Vr == 0:
        return _empty_part(M, acc, hidden.device, stats)
    be = _load(cfg.backend)
    res = torch.zeros(N_OUT, M, dtype=acc, device=hidden.device)
    xy = torch.zeros(M, dtype=acc, device=hidden.device)
    mx = torch.full((M,), -math.inf, dtype=acc, device=hidden.device) if stats & STAT_ARGMAX else None
    n = max(1, min(cfg.chunk, M))
    buf = hidden.new_empty(n * Vr) if M else None
    for s in range(0, M, n):
        e = min(M, s + n)
        z = _logits_into(buf[: (e - s) * Vr].view(e - s, Vr), hidden[s:e], weight, bias,
                         None if u is None else u[s:e], lora_b, cfg)
        y, it = ky[s:e], inv_temp[s:e]
        res[:, s:e] = be.row_forward(z, y, it, _IGNORE, stats)
        xy[s:e] = z.gather(1, torch.where(own[s:e], y, 0).unsqueeze(1)).squeeze(1).to(acc) * it
        if mx is not None:
            mx[s:e] = z.amax(1).to(acc) * it
    part = _part_from_rows(res, stats)
    part["XY"] = xy
    if mx is not None:
        part["MX"] = mx
    return part


class VocabParallelLinearFunction(torch.autograd.Function):
    """Fused-linear log-probs with the lm_head weight sharded on the vocabulary.

    Inputs: hidden [M, H] (replicated; rows with real labels only), weight [V_r, H], bias [V_r]
    or None, lora_a [r, H] (replicated) / lora_b [V_r, r] or None, kernel labels [M], own /
    before [M] bool, inv_temp [M], cfg (``linear_logprobs._Cfg``), layout.
    Outputs: logp, entropy [M] (replicated, differentiable), [3, M] extras.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, ky, own, before, inv_temp, cfg, layout):
        u = torch.mm(hidden, lora_a.t()) if lora_a is not None else None
        part = _linear_part(hidden, weight, bias, u, lora_b, ky, own, inv_temp, cfg)
        part["own"], part["before"] = own, before
        M = hidden.shape[0]
        acc = part["XY"].dtype
        z = torch.zeros(M, dtype=acc, device=hidden.device)
        res = (_merge(part, layout, torch.zeros_like(own), cfg.stats) if M
               else {"lse_m": z, "lse_log_s": z, "logp": z})
        lse, lse_lo = lse_pair(res["lse_m"], res["lse_log_s"], acc)
        logp, entropy = res["logp"], res.get("entropy", z)
        extra = torch.stack([res.get("lssp", z), res.get("mean", z), res.get("argmax", z)])
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(extra)
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b, ky, inv_temp, lse, lse_lo, entropy, u)
        ctx.cfg, ctx.layout = cfg, layout
        return logp, entropy.clone(), extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_extra):
        from .ops.linear_logprobs import _linear_backward

        nones = (None,) * 11
        if grad_logp is None and grad_entropy is None:
            return nones
        hidden, weight, bias, lora_a, lora_b, ky, inv_temp, lse, lse_lo, entropy, u = ctx.saved_tensors
        cfg, layout = ctx.cfg, ctx.layout
        if not cfg.stats & STAT_ENTROPY:
            grad_entropy = None
        need = ctx.needs_input_grad[:5]
        if not any(need):
            return nones
        if weight.shape[0] == 0:
            grads = [None] * 5
            if need[0]:
                grads[0] = torch.zeros_like(hidden)
            if need[1]:
                grads[1] = torch.zeros_like(weight)
            if need[2]:
                grads[2] = torch.zeros_like(bias)
            if need[3]:
                grads[3] = torch.zeros_like(lora_a)
            if need[4]:
                grads[4] = torch.zeros_like(lora_b)
        else:
            grads = list(_linear_backward(hidden, weight, bias, lora_a, lora_b, ky, inv_temp, lse, entropy, u,
                                          grad_logp, grad_entropy, cfg, *need, lse_lo=lse_lo))
        # hidden (and LoRA A) are replicated: their gradient is the sum of every shard's part
        for i in (0, 3):
            if grads[i] is not None:
                dist.all_reduce(grads[i], op=dist.ReduceOp.SUM, group=layout.group)
        return tuple(grads) + (None,) * 6


def vocab_parallel_linear_token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0,
                                         logit_scale=1.0, softcap=None, stats=(), lora=None, chunk_size=None,
                                         backend="auto", process_group=None, vocab_start=None, vocab_size=None):
    """:func:`prefopt_fast.linear_token_logprobs` with the lm_head sharded on the vocabulary
    (what it calls when given ``process_group`` or a DTensor weight).

    ``hidden`` ``[..., H]`` and ``labels`` (global indices) are replicated; ``weight`` is this
    rank's ``[V_local, H]`` rows ``[vocab_start, vocab_start + V_local)`` of the head, or a
    DTensor sharded on dim 0; ``bias`` ``[V_local]`` and LoRA ``B`` ``[V_local, r]`` are sharded
    like it, LoRA ``A`` ``[r, H]`` is replicated. The gradients of ``hidden`` and ``A`` are
    all-reduced (summed) over the group in the backward.
    """
    from .ops.linear_logprobs import _check_inputs, _kept_rows, _make_cfg, _outputs, _stat_names

    if is_dtensor(weight):
        if process_group is not None or vocab_start is not None:
            raise ValueError("a DTensor weight carries its own process group and shard offsets: "
                             "pass neither process_group nor vocab_start with it")
        weight, process_group, dt_vocab = _from_dtensor(weight, 0, "weight")
        vocab_size = dt_vocab if vocab_size is None else vocab_size
        if bias is not None:
            bias = _from_dtensor(bias, 0, "bias")[0] if is_dtensor(bias) else bias
        if lora is not None and isinstance(lora, (tuple, list)) and len(lora) == 3:
            a, b, sc = lora
            lora = (_local(a), _from_dtensor(b, 0, "lora B")[0] if is_dtensor(b) else b, sc)
    hidden, labels = _local(hidden), _local(labels)
    check_process_group(process_group)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    # shapes, dtypes and LoRA of the local shard (which may have no rows); the labels' range
    # needs the global vocabulary: checked after shard_layout, everything else before it
    lora_a, lora_b, scaling = _check_inputs(hidden, weight, labels, bias, lora, ignore_index, shard=True)
    logit_scale, softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
    names = _stat_names(stats)
    inv_temp = _validate.inverse_temperature(temperature, labels, compute_dtype(hidden.dtype))
    be = resolve_backend(backend, hidden)
    layout = shard_layout(process_group, weight.shape[0], vocab_start, vocab_size, hidden.device,
                          what="weight.shape[0]")
    _validate.check_label_range(labels, layout.vocab, ignore_index, vocab="the global vocabulary size")

    flat_h, y, inv_temp, idx = _kept_rows(hidden, labels, inv_temp, ignore_index, logit_scale, softcap)
    if idx is not None:  # labels are replicated: every rank drops the same rows
        flat_h = flat_h.index_select(0, idx)
    cfg = _make_cfg(scaling, logit_scale, softcap, names, chunk_size, y.shape[0], max(1, weight.shape[0]),
                    hidden.dtype, be.NAME)
    ky, own, before = _kernel_labels(y, ignore_index, layout)
    logp, entropy, extra = VocabParallelLinearFunction.apply(
        flat_h if flat_h.is_contiguous() else flat_h.contiguous(), weight, bias, lora_a, lora_b, ky, own, before,
        inv_temp.contiguous(), cfg, layout)
    return _outputs(logp, entropy, extra, names, idx, labels.shape)
