"""token_logprobs: per-token log-probs (and row statistics) straight from the logits."""

from typing import NamedTuple, Optional

import torch

from .. import _validate, distributed
from .._dispatch import load_backend, resolve_backend
from .._rows import (
    OUT_ARGMAX,
    OUT_ENTROPY,
    OUT_KL,
    OUT_LOGP,
    OUT_LSE,
    OUT_LSE_LO,
    OUT_LSSP,
    OUT_REF_LSE,
    STAT_ARGMAX,
    STAT_ENTROPY,
    STAT_KL,
    STATS,
    check_inplace_rows,
    compute_dtype,
    empty_partial,
    finish,
    leaf_partial,
    lse_pair,
)
from ..distributed import (
    SHARD_IGNORE,
    ShardLayout,
    all_reduce_partial,
    from_dtensor,
    is_dtensor,
    kernel_labels,
    local_tensor,
)

STAT_NAMES = tuple(STATS)


class TokenLogProbsOutput(NamedTuple):
    """Per-token outputs, each shaped like ``labels``; fields not asked for are None."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None
    is_argmax: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None


class TokenLogProbsFunction(torch.autograd.Function):
    """Row forward kernel in ``forward``, row backward kernel in ``backward``.

    Inputs are flat: labels int64 [N], inv_temp fp32 [N]. Outputs: logp, entropy and kl
    [N] (differentiable w.r.t. logits; entropy / kl are zeros unless asked for) and the
    non-differentiable stats [3, N] (log_sum_sq_probs, mean_logit, is_argmax rows).

    With a ``layout`` (``distributed.ShardLayout``) ``logits`` / ``ref_logits`` are this rank's
    vocabulary shard ``[..., V_r]`` and ``labels`` global indices: the kernels run on the shard,
    its statistics (a ``_rows.Partial``) are merged over the group, and the outputs are the
    whole rows' (replicated). The backward runs the same row kernel on the shard with the
    whole rows' lse / entropy / KL, which gives exactly the shard's slice of the gradient.
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        labels,
        inv_temp,
        ref_logits,
        ignore_index: int,
        stats: int,
        inplace: bool,
        backend: str,
        layout: Optional[ShardLayout] = None,
    ):
        if layout is None:
            out = load_backend(backend).row_forward(
                logits,
                labels,
                inv_temp,
                ignore_index,
                stats,
                **({"ref_logits": ref_logits} if ref_logits is not None else {}),
            )
            # O(N) copies: the autograd outputs must not be views of one buffer
            logp, lse, entropy = out[OUT_LOGP].clone(), out[OUT_LSE].clone(), out[OUT_ENTROPY].clone()
            kl, ref_lse, lse_lo = out[OUT_KL].clone(), out[OUT_REF_LSE].clone(), out[OUT_LSE_LO].clone()
            extra = out[OUT_LSSP : OUT_ARGMAX + 1]  # the three rows are adjacent
        else:
            labels, logp, lse, lse_lo, entropy, kl, ref_lse, extra = _shard_forward(
                logits, labels, inv_temp, ref_logits, ignore_index, stats, backend, layout
            )
            ignore_index = SHARD_IGNORE
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(extra)
        ctx.save_for_backward(logits, labels, inv_temp, lse, lse_lo, entropy, ref_logits, ref_lse, kl)
        empty_shard = layout is not None and layout.size == 0
        ctx.meta = (ignore_index, inplace, backend, bool(stats & STAT_ENTROPY), bool(stats & STAT_KL), empty_shard)
        return logp, entropy, kl, extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_kl, _grad_extra):
        nones = (None,) * 9
        if grad_logp is None and grad_entropy is None and grad_kl is None:
            return nones
        ignore_index, inplace, backend, has_entropy, has_kl, empty_shard = ctx.meta
        if empty_shard:
            return (torch.zeros_like(ctx.saved_tensors[0]),) + nones[1:]
        grad = logits_grad(
            ctx.saved_tensors,
            grad_logp,
            grad_entropy,
            grad_kl,
            ignore_index=ignore_index,
            inplace=inplace,
            backend=backend,
            has_entropy=has_entropy,
            has_kl=has_kl,
        )
        if inplace:
            # The gradient is the logits buffer. Returned as the saved tensor itself, a leaf's
            # AccumulateGrad would see a tensor referenced elsewhere (the leaf) and clone it: a
            # full N x V copy, the very allocation inplace_backward avoids. A fresh alias (new
            # TensorImpl, same storage and strides) is referenced only by the engine, so it
            # becomes .grad as is; a non-leaf's producer receives the same buffer either way.
            grad = grad.detach()
        return (grad,) + nones[1:]


def _shard_forward(logits, labels, inv_temp, ref_logits, ignore_index, stats, backend, layout):
    """The whole rows' statistics from this rank's shard: (kernel labels, logp, lse, lse_lo,
    entropy, kl, ref_lse [N], extra [3, N]), ignored rows 0."""
    N = labels.shape[0]
    acc = compute_dtype(logits.dtype)
    ky, own, after = kernel_labels(labels, ignore_index, layout)
    if layout.size == 0:
        part = empty_partial(N, stats, logits.device)
    else:
        out = load_backend(backend).row_forward(
            logits, ky, inv_temp, SHARD_IGNORE, stats, **({"ref_logits": ref_logits} if ref_logits is not None else {})
        )
        # x_y exactly as the kernels compute it (an O(N) gather; any leading strides)
        idx = torch.where(own, ky, 0).view(*logits.shape[:-1], 1)
        xy = logits.gather(-1, idx).reshape(-1).to(acc) * inv_temp
        # the kernels do not return the row maximum: one more read of the shard, only for
        # is_argmax (a logging statistic)
        mx = logits.amax(-1).reshape(-1).to(acc) * inv_temp if stats & STAT_ARGMAX else None
        part = leaf_partial(out, stats, layout.size, xy, own, mx, after)
    if N:  # the labels are replicated: every rank agrees on N
        part = all_reduce_partial(part, layout)
    r = finish(part, layout.vocab)
    ignored = labels == ignore_index
    z = torch.zeros(N, dtype=acc, device=logits.device)

    def out_row(x):
        return z if x is None else x.masked_fill(ignored, 0.0).to(acc)

    lse, lse_lo = lse_pair(r.lse_m.masked_fill(ignored, 0.0), r.lse_log_s.masked_fill(ignored, 0.0), acc)
    extra = torch.stack([out_row(r.log_sum_sq_probs), out_row(r.mean_logit), out_row(r.is_argmax)])
    return ky, out_row(r.logp), lse, lse_lo, out_row(r.entropy), out_row(r.kl), out_row(r.ref_lse), extra


def logits_grad(
    saved,
    grad_logp,
    grad_entropy,
    grad_kl,
    *,
    ignore_index: int,
    inplace: bool,
    backend: str,
    has_entropy: bool,
    has_kl: bool,
) -> torch.Tensor:
    """The row backward kernel on the saved ``(logits, labels, inv_temp, lse, lse_lo, entropy,
    ref_logits, ref_lse, kl)`` of a forward that ran the row kernels (here, or on a vocabulary
    shard with the global statistics in prefopt_fast.distributed)."""
    logits, labels, inv_temp, lse, lse_lo, entropy, ref_logits, ref_lse, kl = saved
    # Under torch.compile the unused outputs' gradients arrive as zeros, not None; an
    # output that was not computed holds unspecified values and must not be touched.
    if not has_entropy:
        grad_entropy = None
    if not has_kl:
        grad_kl = None
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    kl_args = {}
    if grad_kl is not None:
        kl_args = dict(grad_kl=grad_kl.to(lse.dtype).contiguous(), ref_logits=ref_logits, ref_lse=ref_lse, kl=kl)
    return load_backend(backend).row_backward(
        logits, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy, ignore_index, inplace, **kl_args
    )


def check_stat_request(names, ref_logits, logits, inplace_backward, *, shard: bool = False) -> bool:
    """The stats / ref_logits / inplace_backward combination (``names`` parsed already);
    True when the exact KL is asked for. ``shard``: ``logits`` is a vocabulary shard."""
    _validate.check_bool(inplace_backward, "inplace_backward")
    if inplace_backward:
        check_inplace_rows(logits)  # before anything runs: overlapping rows would be half-written
    want_kl = "kl" in names
    if want_kl and ref_logits is None:
        raise ValueError('stats=("kl",) needs ref_logits: the reference model\'s logits shaped like logits')
    if ref_logits is not None:
        if not want_kl:
            raise ValueError('ref_logits is only used by the "kl" statistic; add "kl" to stats or drop ref_logits')
        _validate.check_like(ref_logits, logits, "ref_logits", empty_vocab=shard)
    return want_kl


def stat_mask(names) -> int:
    """The STAT_* bit mask of the stat names."""
    mask = 0
    for name in names:
        mask |= STATS[name][0]
    return mask


def token_outputs(logp, entropy, kl, extra, names, shape):
    """The public result from the flat [N] outputs: log-probs shaped ``shape``, or with
    ``names`` a TokenLogProbsOutput of them (``extra``: the [3, N] lssp / mean / argmax rows)."""
    logp = logp.reshape(shape)
    if not names:
        return logp
    # marked non-differentiable in the autograd.Function already; detached as well because
    # torch < 2.13 under torch.compile returns such outputs with requires_grad=True
    extra = extra.detach()
    rows = {
        "entropy": entropy,
        "log_sum_sq_probs": extra[0],
        "mean_logit": extra[1],
        "is_argmax": extra[2] != 0,
        "kl": kl,
    }
    return TokenLogProbsOutput(logp, **{n: rows[n].reshape(shape) for n in names})


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature=1.0,
    stats=(),
    ref_logits: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
):
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``, fused.

    Never materializes the softmax: one read of the logits forward, one read and one
    write backward.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 on the torch backend).
            The last dimension must have stride 1; any other strides are read in place,
            so ``logits[:, :-1]`` costs no copy.
        labels: integer tensor of shape ``logits.shape[:-1]``; entries equal to
            ``ignore_index`` give 0 and no gradient.
        temperature: float > 0, or a tensor broadcastable to ``labels.shape`` (per token
            or per sequence). Treated as a constant (no gradient).
        stats: extra per-token outputs computed in the same pass, any of
            ``"entropy"`` (differentiable), ``"log_sum_sq_probs"``, ``"mean_logit"``
            (mean of logits / temperature), ``"is_argmax"`` (label is the first argmax),
            ``"kl"`` (exact KL(pi || pi_ref) over the whole vocabulary; differentiable
            w.r.t. ``logits``; needs ``ref_logits``).
        ref_logits: ``[..., V]`` reference-model logits (same shape and dtype as
            ``logits``, any leading strides) for the ``"kl"`` statistic; never receives
            a gradient.
        inplace_backward: write the gradient over the logits buffer instead of a fresh
            tensor (no N x V allocation; the logits are destroyed by the backward). Leaf
            logits get that buffer as their ``.grad`` (``x.grad`` aliases ``x``), no copy.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``
            (``PREFOPT_BACKEND`` overrides ``"auto"``).
        process_group, vocab_start, vocab_size: vocabulary parallelism (tensor-parallel
            lm_head): ``logits`` (and ``ref_logits``) hold this rank's slice
            ``[vocab_start, vocab_start + V_local)`` of the vocabulary, ``labels`` are global
            indices; ``vocab_start`` defaults to the rank-ordered layout, ``vocab_size`` is
            checked. DTensor logits sharded on the last dimension need none of these. See
            :mod:`prefopt_fast.distributed` and docs/distributed.md.

    Returns:
        float32 log-probs shaped like ``labels`` (float64 for float64 logits) when
        ``stats`` is empty, else a :class:`TokenLogProbsOutput` named tuple.
    """
    sharded = process_group is not None or vocab_start is not None or vocab_size is not None or is_dtensor(logits)
    if sharded:
        logits, ref_logits, labels, process_group, vocab_size = _local_shard(
            logits, ref_logits, labels, process_group, vocab_start, vocab_size
        )
        distributed.check_process_group(process_group)
    _validate.check_logits(logits, empty_vocab=sharded)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    if sharded:
        # everything that needs no collective is checked first: a bad tensor must not reach the
        # all-gather of shard_layout (where a device mismatch fails inside the collective)
        _validate.check_index_tensor(labels, "labels", logits.shape[:-1], logits.device, "logits.shape[:-1]")
    else:
        _validate.check_labels(labels, logits, ignore_index)
    names = _validate.parse_names(stats, STAT_NAMES, "stats")
    want_kl = check_stat_request(names, ref_logits, logits, inplace_backward, shard=sharded)
    inv_temp = _validate.inverse_temperature(temperature, labels, compute_dtype(logits.dtype))
    # an empty shard never reaches a kernel; the backend is resolved on a dtype/device probe
    be = resolve_backend(backend, logits, need_kl=want_kl)
    layout = None
    if sharded:
        layout = distributed.shard_layout(
            process_group, logits.shape[-1], vocab_start, vocab_size, logits.device, what="logits.shape[-1]"
        )
        _validate.check_label_range(labels, layout.vocab, ignore_index, vocab="the global vocabulary size")

    logp, entropy, kl, extra = TokenLogProbsFunction.apply(
        logits,
        labels.reshape(-1).to(torch.int64),
        inv_temp,
        ref_logits.detach() if want_kl else None,
        ignore_index,
        stat_mask(names),
        inplace_backward,
        be.NAME,
        layout,
    )
    return token_outputs(logp, entropy, kl, extra, names, labels.shape)


def _local_shard(logits, ref_logits, labels, process_group, vocab_start, vocab_size):
    """The local tensors of a vocabulary-parallel call: DTensor logits sharded on the last
    dimension bring their process group and global size (and then take neither
    ``process_group`` nor ``vocab_start``; ``ref_logits`` must be sharded the same way).
    Returns (logits, ref_logits, labels, process_group, vocab_size)."""
    if is_dtensor(logits):
        if process_group is not None or vocab_start is not None:
            raise ValueError(
                "a DTensor carries its own process group and shard offsets: "
                "pass neither process_group nor vocab_start with DTensor logits"
            )
        logits, process_group, dt_vocab = from_dtensor(logits, -1, "logits")
        vocab_size = dt_vocab if vocab_size is None else vocab_size
        if ref_logits is not None:
            if not is_dtensor(ref_logits):
                raise TypeError("with DTensor logits, ref_logits must be a DTensor sharded the same way")
            ref_logits = from_dtensor(ref_logits, -1, "ref_logits")[0]
    elif is_dtensor(ref_logits):
        raise TypeError("ref_logits is a DTensor but logits is not; pass both as DTensors or both as local shards")
    return logits, ref_logits, local_tensor(labels), process_group, vocab_size
