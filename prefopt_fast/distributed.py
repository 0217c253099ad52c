"""Vocabulary-parallel (tensor-parallel) log-probs over ``torch.distributed``: the layouts.

This module holds what is not an op: the layout of a vocabulary over a process group
(:class:`ShardLayout`, :func:`shard_layout`, the checks), DTensor unpacking, and the
collective form of the one merge of partial row statistics (:func:`all_reduce_partial`). The
ops sit one layer up and import this module, never the reverse: ``token_logprobs`` and
``linear_token_logprobs`` run the same autograd Function with or without a ``ShardLayout``
(docs/design.md, "Layers").

Each rank of a process group holds a contiguous slice ``[vocab_start, vocab_start + V_r)`` of
the vocabulary: of the logits ``[..., V_r]``, or of the lm_head weight ``[V_r, H]`` (fused-linear
path, hidden states replicated). Nothing new runs over the vocabulary: each rank calls its
backend's row kernels on its shard, with the labels shifted by ``-vocab_start`` so that a label
living on another shard is an out-of-range index (the row contract, ``prefopt_fast._rows``,
then gives every statistic but the log-prob). Its shard's statistics are a ``_rows.Partial``,
and the group merges the Partials exactly as the fused-linear path merges its vocabulary
blocks (``_rows.combine``), with all-reduces of ``[k, N]`` fp64 tensors (k <= 9, N = tokens):
O(tokens), never O(tokens x V). NaN propagates through the SUM (gloo's MAX does not propagate
NaN reliably, so nothing relies on it).

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

import sys
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import _validate
from ._rows import PARTIAL_MAX_FIELDS, PARTIAL_SUM_FIELDS, Partial, rescale

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
    "all_reduce_partial",
    "gather_parameter",
    "is_replicated_on",
    "gather_tokens",
    "take_rows",
    "scale_grad",
    "dp_group_sizes",
    "sharded_head_algorithm",
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
    """(kernel labels, owned, label-after-shard) for global labels y [N] int64: a row's kernel
    label is its index in this shard, SHARD_IGNORE, or ``layout.size`` (out of range: the label
    lives on another shard)."""
    ign = y == ignore_index
    end = layout.start + layout.size
    own = ~ign & (y >= layout.start) & (y < end)
    ky = torch.where(own, y - layout.start, torch.where(ign, SHARD_IGNORE, layout.size))
    after = ~ign & (y >= end)
    return ky, own, after


def all_reduce_partial(p: Partial, layout: ShardLayout) -> Partial:
    """The Partial of the whole vocabulary from every rank's ``p`` (its shard's): the merge of
    ``prefopt_fast._rows`` (``combine``) done by the group at once. One all-reduce MAX of the
    references and maxima, each rank rescales to them, one all-reduce SUM of the rest; with
    per-rank offsets ``p.off`` (fused-linear fp32 tiles) a first all-reduce MAX agrees on one,
    and each rank moves its relative fields to it. Every rank gets the same result.
    O(tokens) bytes, never O(tokens x V)."""
    group = layout.group
    if p.off is not None:
        O = p.off.clone()
        dist.all_reduce(O, op=dist.ReduceOp.MAX, group=group)
        delta = p.off - O  # <= 0, exact where the offsets are close
        p = p._replace(
            m=p.m + delta,
            xy=p.xy + delta * p.own,
            mx=None if p.mx is None else p.mx + delta,
            pre=None if p.pre is None else p.pre + delta,
            mr=None if p.mr is None else p.mr + delta,
            off=O,
        )
    max_fields = [f for f in PARTIAL_MAX_FIELDS if getattr(p, f) is not None]
    mx = torch.stack([getattr(p, f) for f in max_fields])
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    top = dict(zip(max_fields, mx))
    p = rescale(p, top["m"], top.get("mr"))
    if "mx" in top:
        p = p._replace(mx=top["mx"], pre=top["pre"])
    # ``own`` only served the offset move above: not reduced (it stays this rank's)
    sum_fields = [f for f in PARTIAL_SUM_FIELDS if f != "own" and getattr(p, f) is not None]
    sm = torch.stack([getattr(p, f) for f in sum_fields])
    dist.all_reduce(sm, op=dist.ReduceOp.SUM, group=group)
    return p._replace(**dict(zip(sum_fields, sm)))


# --------------------------------------------------------------------------- data-parallel sharded parameters


def _dp_group_of(x, name: str):
    """The process group over which the DTensor ``x`` (a parameter under FSDP2) is sharded on
    dim 0: a 1-D mesh, ``Shard(0)`` (or ``Replicate``: no group)."""
    from torch.distributed.tensor.placement_types import Replicate, Shard

    if x.device_mesh.ndim != 1:
        raise ValueError(
            f"{name} is a DTensor on a {x.device_mesh.ndim}-D mesh with placements {tuple(x.placements)}: a "
            "data-parallel sharded head is supported on a 1-D mesh (FSDP2 fully_shard); for tensor "
            "parallelism pass hidden (and labels) as DTensors replicated on the weight's mesh"
        )
    (p,) = x.placements
    if isinstance(p, Replicate):
        return None
    if not (isinstance(p, Shard) and p.dim % x.dim() == 0):
        raise ValueError(
            f"{name} as a DTensor of a data-parallel sharded head must be Shard(0) (FSDP2) or Replicate; "
            f"got placements {tuple(x.placements)}"
        )
    return x.device_mesh.get_group(0)


class _GatherRows(torch.autograd.Function):
    """Forward: the whole tensor from every rank's dim-0 shard (uneven shards allowed).
    Backward: the gradient summed over the group and divided by its size (FSDP2's default
    reduction of a parameter's gradient over the data-parallel ranks), this rank's rows."""

    @staticmethod
    def forward(ctx, local, group, sizes):
        rank, world = dist.get_rank(group), len(sizes)
        ctx.group, ctx.start, ctx.n, ctx.world = group, sum(sizes[:rank]), sizes[rank], world
        return _all_gather_rows(local, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.n].div_(ctx.world), None, None


def gather_parameter(x, name: str):
    """A DTensor parameter of a data-parallel sharded model (FSDP2: ``Shard(0)`` over a 1-D mesh)
    as the whole tensor, differentiably: its gradient comes back as this rank's shard of the
    gradient averaged over the data-parallel ranks, as FSDP2 delivers it. A plain tensor (or
    None) is returned as is. One all-gather of the tensor (O(size)) forward, one all-reduce of
    its gradient backward."""
    if x is None or not is_dtensor(x):
        return x
    local = x.to_local()
    group, sizes = dp_group_sizes(x, name, local.shape[0])
    return local if group is None else _GatherRows.apply(local, group, sizes)


def _all_sizes(n: int, group, device):
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return torch.cat(out).tolist()


def is_replicated_on(x, mesh) -> bool:
    """True for a DTensor on ``mesh`` with every placement Replicate."""
    from torch.distributed.tensor.placement_types import Replicate

    return is_dtensor(x) and x.device_mesh == mesh and all(isinstance(p, Replicate) for p in x.placements)


class _GatherTokens(torch.autograd.Function):
    """Forward: every rank's rows (dim 0, uneven counts) concatenated in rank order. Backward:
    this rank's rows of the gradient, which the caller makes identical on every rank."""

    @staticmethod
    def forward(ctx, local, group, sizes):
        ctx.start, ctx.n = sum(sizes[: dist.get_rank(group)]), local.shape[0]
        return _all_gather_rows(local, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start : ctx.start + ctx.n], None, None


class _TakeRows(torch.autograd.Function):
    """Forward: this rank's rows of a tensor replicated on every rank. Backward: every rank's
    gradient of its own rows, summed over the group (an all-reduce of [rows, ...]), so that the
    replicated computation behind it sees the upstream gradient of all rows on every rank."""

    @staticmethod
    def forward(ctx, full, group, start: int, n: int):
        ctx.group, ctx.start, ctx.n, ctx.shape = group, start, n, full.shape
        return full[start : start + n].clone()

    @staticmethod
    def backward(ctx, grad):
        g = grad.new_zeros(ctx.shape)
        g[ctx.start : ctx.start + ctx.n] = grad
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _all_gather_rows(local, group, sizes):
    top = max(sizes)
    pad = local.new_zeros((top, *local.shape[1:]))
    pad[: local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in range(len(sizes))]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def gather_tokens(local, group, sizes, differentiable: bool = True):
    """Every rank's rows of ``local`` (dim 0; ``sizes`` the counts per rank), concatenated in
    rank order. Differentiable: the backward keeps this rank's rows of a gradient that the
    computation in between makes identical on every rank (see ``take_rows``)."""
    if local is None:
        return None
    if differentiable and local.requires_grad:
        return _GatherTokens.apply(local, group, sizes)
    return _all_gather_rows(local.detach(), group, sizes)


def take_rows(full, group, start: int, n: int):
    """Rows ``[start, start + n)`` of ``full`` (replicated on the group); backward: all-reduce."""
    if full is None:
        return None
    return _TakeRows.apply(full, group, start, n) if full.requires_grad else full[start : start + n]


def scale_grad(x, factor: float):
    """``x``, with its gradient multiplied by ``factor`` (FSDP2's averaging over the ranks)."""
    return x if x is None or not x.requires_grad else _ScaleGrad.apply(x, factor)


def dp_group_sizes(x, name: str, n: int):
    """(group, every rank's n) of a data-parallel sharded DTensor parameter ``x``: one all-gather."""
    group = _dp_group_of(x, name)
    if group is None:
        return None, None
    return group, [int(s) for s in _all_sizes(n, group, x.to_local().device)]


SHARDED_HEAD_ALGORITHMS = ("auto", "gather_weight", "gather_tokens")


def sharded_head_algorithm(vocab: int, token_counts, lora: bool) -> str:
    """How a data-parallel sharded head (FSDP2) is computed: ``"gather_weight"`` (all-gather the
    head, O(V x H) bytes per rank) or ``"gather_tokens"`` (all-gather the hidden states,
    O(world x N x H), each rank computing its vocabulary shard for every token). ``auto`` (the
    default; ``PREFOPT_SHARDED_HEAD`` overrides) picks the fewer bytes: tokens when
    ``world * max(N_r) < V``. LoRA factors take ``gather_weight``. Every rank decides alike
    (``token_counts`` is exchanged)."""
    import os

    choice = os.environ.get("PREFOPT_SHARDED_HEAD", "auto")
    if choice not in SHARDED_HEAD_ALGORITHMS:
        raise ValueError(f"PREFOPT_SHARDED_HEAD must be one of {SHARDED_HEAD_ALGORITHMS}; got {choice!r}")
    if lora:
        return "gather_weight"
    if choice != "auto":
        return choice
    return "gather_tokens" if len(token_counts) * max(token_counts) < vocab else "gather_weight"
