"""Vocabulary-parallel (tensor-parallel) log-probs over ``torch.distributed``: the layouts.

This module holds what is not an op: the layout of a vocabulary over a process group
(:class:`ShardLayout`, :func:`shard_layout`, the checks), DTensor unpacking, and the
collective merge of per-shard row statistics (:func:`merge_partials`). The ops that use them
sit one layer up and import this module, never the reverse: ``VocabParallelLogProbsFunction``
and ``vocab_parallel_token_logprobs`` in :mod:`prefopt_fast.ops.token_logprobs`,
``VocabParallelLinearFunction`` and ``vocab_parallel_linear_token_logprobs`` in
:mod:`prefopt_fast.ops.linear_logprobs` (docs/design.md, "Layers").

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
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _validate
from ._rows import (
    OUT_ARGMAX,
    OUT_ENTROPY,
    OUT_KL,
    OUT_LSE,
    OUT_LSE_LO,
    OUT_LSSP,
    OUT_MEAN,
    OUT_REF_LSE,
    STAT_ARGMAX,
    STAT_ENTROPY,
    STAT_KL,
    STAT_LSSP,
    STAT_MEAN,
)

__all__ = [
    "ShardLayout",
    "shard_layout",
    "check_process_group",
    "check_vocab_parallel_options",
    "is_dtensor",
    "from_dtensor",
    "local_tensor",
    "SHARD_IGNORE",
    "kernel_labels",
    "merge_partials",
    "empty_part",
    "part_from_rows",
]

# Kernel-side labels: a row's label is either its index in this shard, SHARD_IGNORE (the row is
# ignored everywhere), or V_r (lives on another shard: out of range, never ignore_index).
SHARD_IGNORE = -1


# --------------------------------------------------------------------------- layout


class ShardLayout(NamedTuple):
    """Where this rank's vocabulary slice sits: ``[start, start + size)`` of ``vocab``."""

    group: object  # the torch.distributed process group
    rank: int  # rank in ``group``
    world: int
    start: int
    size: int
    vocab: int  # the global vocabulary size


def check_process_group(process_group) -> None:
    """process_group must be a ProcessGroup of an initialized torch.distributed."""
    if process_group is None:
        raise ValueError("process_group is required for vocabulary-parallel log-probs")
    if dist.is_available() and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD "
            f"or one from torch.distributed.new_group); got {type(process_group).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group needs torch.distributed to be initialized (torch.distributed.init_process_group)"
        )


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
        raise ValueError(
            "vocab_start needs process_group: the rank's shard [vocab_start, vocab_start + V_local) "
            "of the vocabulary is laid out over a process group (DTensor inputs carry their own "
            "offsets and take no vocab_start)"
        )
    return process_group, vocab_start, vocab_size


def shard_layout(
    process_group,
    local_size: int,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    device=None,
    what: str = "local_size",
) -> ShardLayout:
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
    info = torch.tensor(
        [local_size, vocab_start is not None, vocab_start or 0, vocab_size is not None, vocab_size or 0],
        dtype=torch.int64,
        device=device,
    )
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=process_group)
    rows = torch.stack(gathered).tolist()  # host sync: the layout decides every shape below
    sizes = [r[0] for r in rows]
    V = sum(sizes)
    if V < 1:
        raise ValueError(
            f"the vocabulary shards are all empty: {what} must be >= 1 on at least one rank of "
            f"process_group; got {sizes}"
        )
    if len({r[1] for r in rows}) != 1 or len({r[3] for r in rows}) != 1:
        raise ValueError("vocab_start and vocab_size must be given on all ranks of process_group or on none")
    if rows[0][3]:
        given = {r[4] for r in rows}
        if given != {V}:
            raise ValueError(
                f"vocab_size must equal the sum of the local vocabulary sizes {sizes} = {V} "
                f"on every rank; got {sorted(given)}"
            )
    if rows[0][1]:
        starts = [r[2] for r in rows]
        spans = sorted((s, n) for s, n in zip(starts, sizes) if n > 0)
        pos, ok = 0, all(0 <= s <= V for s in starts)
        for s, n in spans:
            ok = ok and s == pos
            pos = s + n
        if not ok or pos != V:
            raise ValueError(
                "the vocabulary shards [vocab_start, vocab_start + V_local) of the ranks must tile "
                f"[0, {V}) without gaps or overlaps; got starts {starts} with sizes {sizes}"
            )
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


def from_dtensor(x, dim: int, name: str):
    """(local tensor, process group of the mesh dim sharding ``dim``, global size of ``dim``).

    Exactly one mesh dimension may shard ``dim`` (the vocabulary); other mesh dimensions may
    shard the leading dims (the rows are then this rank's rows) or replicate, not be Partial.
    """
    from torch.distributed.tensor.placement_types import Partial, Shard

    dim = dim % x.dim()
    mesh_dims = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim % x.dim() == dim]
    if len(mesh_dims) != 1:
        raise ValueError(
            f"{name} as a DTensor must be sharded (Shard({dim})) on its vocabulary dimension over "
            f"exactly one mesh dimension; got placements {tuple(x.placements)}"
        )
    if any(isinstance(p, Partial) for p in x.placements):
        raise ValueError(f"{name} as a DTensor must not have Partial placements; got {tuple(x.placements)}")
    return x.to_local(), x.device_mesh.get_group(mesh_dims[0]), x.shape[dim]


def local_tensor(x):
    """A companion input (labels, hidden, LoRA A): a DTensor gives its local tensor."""
    return x.to_local() if is_dtensor(x) else x


# --------------------------------------------------------------------------- the merge


def kernel_labels(y: torch.Tensor, ignore_index: int, layout: ShardLayout):
    """(kernel labels, owned, shard-before-label) for global labels y [N] int64."""
    ign = y == ignore_index
    end = layout.start + layout.size
    own = ~ign & (y >= layout.start) & (y < end)
    ky = torch.where(own, y - layout.start, torch.where(ign, SHARD_IGNORE, layout.size))
    before = ~ign & (y >= end)
    return ky, own, before


def merge_partials(part, layout: ShardLayout, ignored: torch.Tensor, stats: int):
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


def empty_part(N: int, dt, device, stats: int):
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


def part_from_rows(out: torch.Tensor, stats: int) -> dict:
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
