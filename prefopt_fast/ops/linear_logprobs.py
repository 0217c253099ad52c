"""Fused-linear log-probs: straight from hidden states and the lm_head, never materializing the logits.

    z = (hidden @ weight.T + bias + scaling * (hidden @ A.T) @ B.T) * logit_scale
    z = softcap * tanh(z / softcap)                     (when softcap is given)
    x = z / temperature                                 (the row kernels' inv_temp)

(the transform of TRL 1.16's fused LM head). The vocabulary is touched only by the row
kernels of the backend the dispatcher picks (``prefopt_fast._rows``), run on one tile of
logits at a time in a reusable buffer. Rows whose label is ``ignore_index`` are dropped
first (an O(N * H) gather of the hidden rows of the real labels); the M remaining tokens
are cut into token tiles of up to ``TOKEN_TILE`` (4096) tokens, the vocabulary into blocks
that fill the chunk budget (``[token_tile, vocab_block]`` tiles: the GEMMs keep all the
tokens of a tile as their long dimension and each weight block is read once per tile,
where ``[chunk_size, V]`` row chunks would re-read the whole weight per chunk with a short,
inefficient GEMM).

forward
    per tile: one GEMM into the buffer, bias / LoRA / softcap in place, ``row_forward`` on
    the block (a label outside it is an out-of-range index, which the row contract allows);
    the per-block statistics merge exactly into the full-row ones (online log-sum-exp in
    fp64, cancellation-free entropy merge, see ``_linear_forward``); fp32 tiles are first
    shifted per row by their first block's max, so no fp32 lse of the logits' magnitude
    costs precision. Only per-token statistics are kept.
backward
    per tile: recompute the logits, ``row_backward`` in place over them (it needs only the
    full-row lse / entropy of the forward), chain through the softcap, then the gradient
    GEMMs. Products are accumulated in fp32 whatever the input dtype (fp32 accumulators,
    cast at the end): a gradient spread over several tiles is summed by fp32-output GEMMs
    (``torch.addmm(..., out_dtype=float32)`` on CUDA); where the device has none (the CPU)
    half-precision inputs take two passes instead, each of which produces its gradient
    blocks in one GEMM apiece (see ``_backward_plan``), so no partial product is ever
    rounded to the half dtype. No weight-gradient GEMM runs when the weight does not require
    grad (likewise for the hidden states, the bias and the LoRA factors).

forward-gradient plan (``linear_sequence_forward_grad``, used by the pairwise losses' ``plan=``)
    for a scalar loss of per-sequence sums whose coefficient dL/dlogp of a row is known once
    the rows of its group (pair) are: chunks of whole groups, each one GEMM into a
    ``[rows, V]`` buffer, the row kernels, the coefficients from the head, ``row_backward``
    in place, then the hidden and weight gradient GEMMs; the backward scales them. 3 GEMMs
    instead of 4; the buffer is the chunk budget below, raised to the largest group's rows.

Chunk-size rule. ``chunk_size`` (tokens) sets the byte budget of the logits buffer to that
of ``chunk_size`` full rows: ``chunk_size * V * itemsize``. ``chunk_size=None`` takes
``clamp(M * V * itemsize / 16, 16 MiB, 256 MiB)`` bytes (M = tokens with a real label,
itemsize of the hidden dtype): 1/16 of the logits it replaces, but at least 16 MiB (all of
them when they are smaller) and at most 256 MiB. The backward fits the second buffer of the
softcap chain in the same budget. Vocabulary blocks are never narrower than
``MIN_VOCAB_BLOCK`` (256) columns. So the peak extra memory is one buffer of the budget,
per-token vectors, and the fp32 gradient accumulators: ``[M, H]`` for the hidden gradient
(the size of the hidden states' gradient; small next to the logits when H << V), ``[V, r]``
and ``[M, r]`` for LoRA, and ``[V, H]`` for a half-precision weight gradient only when more
than ``TOKEN_TILE`` tokens take several token tiles on a device with fp32-output GEMMs.
"""

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import _validate, distributed
from .._dispatch import load_backend, resolve_backend
from .._rows import (
    OUT_LOGP,
    OUT_LSE,
    OUT_LSE_LO,
    STAT_ARGMAX,
    STAT_ENTROPY,
    STAT_KL,
    STATS,
    Partial,
    combine,
    compute_dtype,
    empty_partial,
    finish,
    leaf_partial,
    lse_pair,
)
from ..distributed import (
    ShardLayout,
    all_reduce_partial,
    check_vocab_parallel_options,
    from_dtensor,
    is_dtensor,
    local_tensor,
)
from .token_logprobs import TokenLogProbsOutput, stat_mask, token_outputs

__all__ = [
    "linear_token_logprobs",
    "linear_sequence_logprobs",
    "LinearSequenceLogProbs",
    "default_chunk_size",
    "linear_sequence_forward_grad",
]


_MiB = 1 << 20
MIN_CHUNK_BYTES = 16 * _MiB
MAX_CHUNK_BYTES = 256 * _MiB
CHUNK_FRACTION = 16
# Tokens per tile. Up to this many tokens the weight gradient of each vocabulary block is
# one GEMM (no [V, H] accumulator); more tokens take several tiles.
TOKEN_TILE = 4096
# Vocabulary blocks are never narrower than this (tiny GEMMs waste more time than the few
# KiB they save): at most MIN_VOCAB_BLOCK * (TOKEN_TILE * (itemsize + 4) + 4 * H) bytes.
MIN_VOCAB_BLOCK = 256
# Labels handed to the row kernels are always >= 0 (ignored rows were dropped), and a
# vocabulary block marks "label elsewhere" with an out-of-range index: -1 can never match.
_KERNEL_IGNORE = -1


def default_chunk_size(num_tokens: int, vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk for ``chunk_size=None`` (see the module docstring)."""
    num_tokens = _validate.check_int(num_tokens, "num_tokens", lo=0)
    vocab = _validate.check_int(vocab, "vocab", lo=1)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype; got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (that of hidden); got {dtype}")
    item = dtype.itemsize
    row = max(1, vocab * item)
    budget = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, num_tokens * row // CHUNK_FRACTION))
    return max(1, min(max(num_tokens, 1), budget // row))


class _Cfg(NamedTuple):
    scaling: float  # LoRA scaling
    logit_scale: float
    softcap: Optional[float]
    stats: int  # STAT_* mask
    chunk: int  # the buffer's budget, in full rows of logits (chunk_size)
    backend: str


# --------------------------------------------------------------------------- GEMM helpers

_FP32_OUT_MM = {}  # device type -> whether addmm(out_dtype=float32) works for half inputs


def _fp32_out_mm(device: torch.device) -> bool:
    if device.type not in _FP32_OUT_MM:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
                acc = torch.zeros(1, 1, dtype=torch.float32, device=device)
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
                ok = True
            except (RuntimeError, TypeError):
                ok = False
        _FP32_OUT_MM[device.type] = ok
    return _FP32_OUT_MM[device.type]


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * a @ b`` with the products in acc's (fp32 / fp64) precision.

    Rounding each tile's product to bf16 before summing biases training, so half inputs use
    an fp32-output GEMM (the backward plans around devices without one: ``_backward_plan``);
    the fp32-copy fallback is only a safety net.
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    elif _fp32_out_mm(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, alpha=alpha, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), alpha=alpha)


def _logits_into(
    z: torch.Tensor, h: torch.Tensor, w: torch.Tensor, bias, u, lora_b, cfg: _Cfg, t: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Write the (pre-temperature) logits of ``h`` [n, H] against ``w`` [v, H] into ``z`` [n, v].

    Without softcap ``logit_scale`` is folded into the row kernels' inverse temperature, so
    ``z`` holds the raw projection. With softcap ``z`` ends up holding softcap * tanh(.);
    when ``t`` (a second [n, v] buffer) is given the raw projection is left in ``t`` for the
    backward's chain factor. Returns the tensor the row kernels must read.
    """
    raw = z if t is None else t
    torch.mm(h, w.t(), out=raw)
    if bias is not None:
        raw.add_(bias)
    if u is not None:
        raw.addmm_(u, lora_b.t(), alpha=cfg.scaling)
    if cfg.softcap is not None:
        torch.mul(raw, cfg.logit_scale / cfg.softcap, out=z)
        z.tanh_().mul_(cfg.softcap)
    return z


def _ref_logits_into(zr, ref, t0: int, t1: int, v0: int, v1: int, cfg: _Cfg) -> torch.Tensor:
    """The reference head's (pre-temperature) logits of tokens [t0, t1) and vocabulary rows
    [v0, v1) into ``zr``: the policy's transform (bias, logit_scale, softcap), no LoRA."""
    rh, rw, rb = ref
    return _logits_into(zr, rh[t0:t1], rw[v0:v1], None if rb is None else rb[v0:v1], None, None, cfg)


def _forward_tiles(M: int, V: int, item: int, cfg: _Cfg, bufs: int = 1) -> Tuple[int, int]:
    """(token tile, vocabulary block) of the forward: ``bufs`` tile buffers (2 with a reference
    head) in the chunk's byte budget."""
    mc = max(1, min(M, TOKEN_TILE))
    budget = max(1, min(cfg.chunk, M)) * V * item
    vb = max(max(1, min(V, MIN_VOCAB_BLOCK)), min(V, budget // (mc * item * bufs)))
    return mc, vb


def _linear_forward(hidden, weight, bias, u, lora_b, labels, inv_temp, cfg: _Cfg, ref=None):
    """The Partial (``_rows.Partial``) of the vocabulary of ``weight`` [V, H], one [token tile,
    vocabulary block] tile at a time, and the per-row shift subtracted from fp32 tiles.

    ``labels`` [M]: indices into ``weight``'s rows; one outside [0, V) (the label lives on
    another vocabulary shard) is an out-of-range index for every block, and the blocks before
    or after it are told apart by its sign. The row kernels see one block of each row; each
    block's outputs are a leaf Partial, folded with ``_rows.combine`` (the same merge a process
    group does over its shards).

    fp32 tiles are first shifted per row by the max of the row's first block: the kernels'
    fp32 lse then has the magnitude of the logits' spread, not of the logits, so neither the
    merge weights exp(L_b - m) nor the backward's exp(x - lse) inherit ulp(|lse|) as a relative
    error (at logits ~30 that was ~30x plain PyTorch's). Half tiles are not shifted: a
    rounding of z - c to the half dtype would cost more than it saves. Returns
    ``(partial, shift)``: the Partial relative to ``off = shift * inv_temp`` (fp64), shift
    [M] in the compute dtype (None for half tiles).

    ``ref``: ``(ref_hidden [M, H_ref], ref_weight [V, H_ref], ref_bias [V] or None)``, a reference
    head for the exact KL (STAT_KL): its tile goes through the same transform (no LoRA) and the
    same shift, and reaches the kernels as ``ref_logits``.
    """
    M, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc_dt = compute_dtype(hidden.dtype)
    be = load_backend(cfg.backend)
    want_arg = bool(cfg.stats & STAT_ARGMAX)

    shift = torch.zeros(M, dtype=acc_dt, device=dev) if hidden.dtype == torch.float32 else None
    mc, vb = _forward_tiles(M, V, hidden.element_size(), cfg, 1 if ref is None else 2)
    buf = hidden.new_empty(mc * vb) if M and V else None
    rbuf = hidden.new_empty(mc * vb) if M and V and ref is not None else None
    tiles = []
    for t0 in range(0, M, mc):
        t1 = min(M, t0 + mc)
        m = t1 - t0
        h_c = hidden[t0:t1]
        u_c = None if u is None else u[t0:t1]
        y, it = labels[t0:t1], inv_temp[t0:t1]
        off = None
        acc = None
        for v0 in range(0, V, vb):
            v1 = min(V, v0 + vb)
            z = buf[: m * (v1 - v0)].view(m, v1 - v0)
            _logits_into(
                z,
                h_c,
                weight[v0:v1],
                None if bias is None else bias[v0:v1],
                u_c,
                None if lora_b is None else lora_b[v0:v1],
                cfg,
            )
            zr = None
            if ref is not None:
                zr = rbuf[: m * (v1 - v0)].view(m, v1 - v0)
                _ref_logits_into(zr, ref, t0, t1, v0, v1, cfg)
            if shift is not None:
                if v0 == 0:
                    c = z.amax(1)
                    shift[t0:t1] = torch.where(torch.isfinite(c), c, 0.0)
                    off = shift[t0:t1].double() * it.double()
                z.sub_(shift[t0:t1].unsqueeze(1))
                if zr is not None:
                    zr.sub_(shift[t0:t1].unsqueeze(1))
            inb = (y >= v0) & (y < v1)
            yb = torch.where(inb, y - v0, v1 - v0)  # "elsewhere": out of range, never the ignore index
            out = be.row_forward(z, yb, it, _KERNEL_IGNORE, cfg.stats, **({} if zr is None else {"ref_logits": zr}))
            # x_y exactly as the kernels compute it: the tile's value times inv_temp
            xy = z.gather(1, yb.clamp(max=v1 - v0 - 1).unsqueeze(1)).squeeze(1).to(acc_dt) * it
            mx = z.amax(1).to(acc_dt) * it if want_arg else None  # max_v x_v, as the kernels round it
            leaf = leaf_partial(out, cfg.stats, v1 - v0, xy, inb, mx, y >= v1, off)
            acc = leaf if acc is None else combine(acc, leaf)
        if acc is None:  # an empty vocabulary shard
            off = None if shift is None else torch.zeros(m, dtype=torch.float64, device=dev)
            acc = empty_partial(m, cfg.stats, dev, off)
        tiles.append(acc)
    del buf, rbuf
    if not tiles:
        part = empty_partial(
            0, cfg.stats, dev, None if shift is None else torch.zeros(0, dtype=torch.float64, device=dev)
        )
    elif len(tiles) == 1:
        part = tiles[0]
    else:
        part = Partial(*(None if f is None else torch.cat([t[i] for t in tiles]) for i, f in enumerate(tiles[0])))
    return part, shift


# --------------------------------------------------------------------------- the ops and the autograd Function

# The tiled forward and backward are two functions over all N rows, _linear_forward_impl and
# _linear_backward_impl, each also registered as a torch.library op (prefopt_fast::linear_forward,
# prefopt_fast::linear_backward). Dropping the ignored rows, the per-call chunk size, the tile
# loops and the backend's row kernels all depend on the labels' VALUES (how many rows are
# real); under torch.compile the ops hide that: dynamo sees one opaque call with fixed-shape
# [N] outputs (the fake implementations below), so the public functions trace with
# fullgraph=True. Eager calls the same functions directly (_call): no dispatcher overhead, and
# dispatch modes (FlopCounterMode, memory probes) still see every GEMM inside.


def _kept_index(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """int64 [M]: the rows of ``labels`` [N] with a real label; None when all N are real."""
    real = labels != ignore_index
    if bool(real.all()):
        return None
    return real.nonzero().squeeze(1)


def _rows_of(x: Optional[torch.Tensor], idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if x is None or idx is None:
        return x
    return x.index_select(0, idx)


def _kept_ref(ref_hidden, ref_weight, ref_bias, idx):
    """The reference head ``(ref_hidden [M, H_ref] contiguous, ref_weight, ref_bias)`` of the kept rows, or None."""
    if ref_hidden is None:
        return None
    rh = _rows_of(ref_hidden, idx)
    return (rh if rh.is_contiguous() else rh.contiguous()), ref_weight, ref_bias


def _op_cfg(scaling, logit_scale, softcap, stats: int, chunk_size, M: int, V: int, dtype, backend: str) -> _Cfg:
    chunk = chunk_size if chunk_size is not None else default_chunk_size(M, V, dtype)
    return _Cfg(scaling, logit_scale, softcap, stats, chunk, backend)


# rows of the forward op's one output [N_ROWS, N]: the public outputs, then what the backward needs
R_LOGP, R_ENTROPY, R_EXTRA, R_KL, R_LSE, R_LSE_LO, R_SHIFT, R_REF_LSE = 0, 1, 2, 5, 6, 7, 8, 9
N_ROWS = 10


def _linear_forward_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    ref_hidden: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    ignore_index: int,
    scaling: float,
    logit_scale: float,
    softcap: Optional[float],
    stats: int,
    chunk_size: Optional[int],
    backend: str,
) -> torch.Tensor:
    """Per-row statistics of ``hidden`` [N, H] (all rows; ignored ones are dropped here), as one
    [N_ROWS, N] tensor in the compute dtype, 0 on ignored rows: logp, entropy, the three extras
    (log_sum_sq_probs, mean_logit, is_argmax), lse, lse_lo, and the shift subtracted from the
    row's fp32 logits (0 for half inputs)."""
    return _linear_forward_rows(
        hidden,
        weight,
        bias,
        lora_a,
        lora_b,
        labels,
        inv_temp,
        ref_hidden,
        ref_weight,
        ref_bias,
        ignore_index,
        scaling,
        logit_scale,
        softcap,
        stats,
        chunk_size,
        backend,
        None,
    )


def _linear_forward_rows(
    hidden,
    weight,
    bias,
    lora_a,
    lora_b,
    labels,
    inv_temp,
    ref_hidden,
    ref_weight,
    ref_bias,
    ignore_index,
    scaling,
    logit_scale,
    softcap,
    stats,
    chunk_size,
    backend,
    layout: Optional[ShardLayout],
):
    """``_linear_forward_impl`` with an optional vocabulary layout: ``weight`` (``bias``,
    ``lora_b``) then hold this rank's rows of the head, ``labels`` stay global, and the shards'
    Partials are merged over the group before ``finish`` (one device: a group of one)."""
    N = hidden.shape[0]
    idx = _kept_index(labels, ignore_index)
    # the gather of the kept rows lives here, not in autograd: index_select's backward is a
    # scatter-add several times slower than the index_put the backward op does
    h = _rows_of(hidden, idx)
    h = h if h.is_contiguous() else h.contiguous()
    y, it = _rows_of(labels, idx), _rows_of(inv_temp, idx)
    if layout is not None:
        y = y - layout.start  # < 0: the label lies before this shard, >= V_r: after it
    u = torch.mm(h, lora_a.t()) if lora_a is not None else None
    cfg = _op_cfg(
        scaling, logit_scale, softcap, stats, chunk_size, h.shape[0], max(1, weight.shape[0]), hidden.dtype, backend
    )
    ref = _kept_ref(ref_hidden, ref_weight, ref_bias, idx)
    part, shift = _linear_forward(h, weight, bias, u, lora_b, y, it, cfg, ref)
    acc = compute_dtype(hidden.dtype)
    own_off = part.off
    if layout is not None and h.shape[0]:  # the labels are replicated: every rank agrees on M
        part = all_reduce_partial(part, layout)
    r = finish(part, weight.shape[0] if layout is None else layout.vocab)
    lse_m, ref_lse = r.lse_m, r.ref_lse
    if own_off is not None and part.off is not own_off:  # the group's offset -> this rank's shift
        lse_m = lse_m + (part.off - own_off)
        ref_lse = None if ref_lse is None else ref_lse + (part.off - own_off)
    lse, lse_lo = lse_pair(lse_m, r.lse_log_s, acc)
    z = torch.zeros_like(lse)

    def row(x):
        return z if x is None else x.to(acc)

    rows = torch.stack(
        [
            row(r.logp),
            row(r.entropy),
            row(r.log_sum_sq_probs),
            row(r.mean_logit),
            row(r.is_argmax),
            row(r.kl),
            lse,
            lse_lo,
            z if shift is None else shift,
            row(ref_lse),
        ]
    )
    return rows if idx is None else rows.new_zeros(N_ROWS, N).index_copy_(1, idx, rows)


_linear_forward_op = torch.library.custom_op("prefopt_fast::linear_forward", _linear_forward_impl, mutates_args=())


@_linear_forward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    lora_a,
    lora_b,
    labels,
    inv_temp,
    ref_hidden,
    ref_weight,
    ref_bias,
    ignore_index,
    scaling,
    logit_scale,
    softcap,
    stats,
    chunk_size,
    backend,
):
    return hidden.new_empty((N_ROWS, hidden.shape[0]), dtype=compute_dtype(hidden.dtype))


def _linear_backward_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    ref_hidden: Optional[torch.Tensor],
    ref_weight: Optional[torch.Tensor],
    ref_bias: Optional[torch.Tensor],
    rows: torch.Tensor,
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    grad_kl: Optional[torch.Tensor],
    ignore_index: int,
    scaling: float,
    logit_scale: float,
    softcap: Optional[float],
    stats: int,
    chunk_size: Optional[int],
    backend: str,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    need_a: bool,
    need_lb: bool,
) -> List[torch.Tensor]:
    """[grad hidden [N, H], grad weight, grad bias, grad lora_a, grad lora_b]; an empty [0]
    tensor for each gradient not asked for. ``rows``: the forward op's [N_ROWS, N] output."""
    return _linear_backward_rows(
        hidden,
        weight,
        bias,
        lora_a,
        lora_b,
        labels,
        inv_temp,
        ref_hidden,
        ref_weight,
        ref_bias,
        rows,
        grad_logp,
        grad_entropy,
        grad_kl,
        ignore_index,
        scaling,
        logit_scale,
        softcap,
        stats,
        chunk_size,
        backend,
        need_h,
        need_w,
        need_b,
        need_a,
        need_lb,
        None,
    )


def _linear_backward_rows(
    hidden,
    weight,
    bias,
    lora_a,
    lora_b,
    labels,
    inv_temp,
    ref_hidden,
    ref_weight,
    ref_bias,
    rows,
    grad_logp,
    grad_entropy,
    grad_kl,
    ignore_index,
    scaling,
    logit_scale,
    softcap,
    stats,
    chunk_size,
    backend,
    need_h,
    need_w,
    need_b,
    need_a,
    need_lb,
    layout: Optional[ShardLayout],
):
    """``_linear_backward_impl`` with an optional vocabulary layout (see ``_linear_forward_rows``):
    each rank's gradient of the replicated hidden states and LoRA ``A`` is the part that flows
    through its vocabulary slice, summed over the group."""
    idx = _kept_index(labels, ignore_index)
    h = _rows_of(hidden, idx)
    h = h if h.is_contiguous() else h.contiguous()
    y, it, g_logp, g_ent, g_kl = (_rows_of(x, idx) for x in (labels, inv_temp, grad_logp, grad_entropy, grad_kl))
    if layout is not None:
        y = y - layout.start
    k = rows if idx is None else rows.index_select(1, idx)
    shift = k[R_SHIFT] if hidden.dtype == torch.float32 else None
    need = (need_h, need_w, need_b, need_a, need_lb)
    if weight.shape[0] == 0:  # an empty vocabulary shard: no logits, no gradient of its own
        grads = [torch.zeros_like(x) if n else None for x, n in zip((h, weight, bias, lora_a, lora_b), need)]
    else:
        u = torch.mm(h, lora_a.t()) if lora_a is not None else None  # recomputed: O(M H r), saved nothing
        cfg = _op_cfg(
            scaling, logit_scale, softcap, stats, chunk_size, h.shape[0], weight.shape[0], hidden.dtype, backend
        )
        grads = list(
            _linear_backward(
                h,
                weight,
                bias,
                lora_a,
                lora_b,
                y,
                it,
                k[R_LSE],
                k[R_ENTROPY],
                u,
                g_logp,
                g_ent,
                cfg,
                *need,
                shift=shift,
                lse_lo=k[R_LSE_LO],
                kl=None
                if g_kl is None
                else (_kept_ref(ref_hidden, ref_weight, ref_bias, idx), g_kl, k[R_KL], k[R_REF_LSE]),
            )
        )
    if layout is not None:
        for i in (0, 3):  # hidden and LoRA A are replicated: sum every shard's part
            if grads[i] is not None:
                dist.all_reduce(grads[i], op=dist.ReduceOp.SUM, group=layout.group)
    if grads[0] is not None and idx is not None:
        grads[0] = grads[0].new_zeros(hidden.shape[0], grads[0].shape[1]).index_put_((idx,), grads[0])
    return [hidden.new_empty(0) if g is None else g for g in grads]


_linear_backward_op = torch.library.custom_op("prefopt_fast::linear_backward", _linear_backward_impl, mutates_args=())


@_linear_backward_op.register_fake
def _(
    hidden,
    weight,
    bias,
    lora_a,
    lora_b,
    labels,
    inv_temp,
    ref_hidden,
    ref_weight,
    ref_bias,
    rows,
    grad_logp,
    grad_entropy,
    grad_kl,
    ignore_index,
    scaling,
    logit_scale,
    softcap,
    stats,
    chunk_size,
    backend,
    need_h,
    need_w,
    need_b,
    need_a,
    need_lb,
):
    likes = (hidden, weight, bias, lora_a, lora_b)
    return [
        torch.empty(x.shape, dtype=x.dtype, device=x.device) if need else hidden.new_empty(0)
        for need, x in zip((need_h, need_w, need_b, need_a, need_lb), likes)
    ]


def _call(op, impl, *args):
    """``op(*args)`` under torch.compile / torch.export, ``impl(*args)`` (the op's own body) in eager."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


class LinearLogProbsFunction(torch.autograd.Function):
    """Per-token statistics of the transformed ``hidden @ weight.T`` logits, in tiles.

    Inputs: hidden [N, H], weight [V, H], bias [V] or None, lora_a [r, H] / lora_b [V, r] or
    None, labels int64 [N] (``ignore_index`` rows are dropped inside the ops), inv_temp [N]
    (with logit_scale folded in when there is no softcap), the reference head for the exact KL
    (ref_hidden [N, H_ref], ref_weight [V, H_ref], ref_bias [V], or None; no gradient), and the
    Python options (ignore_index, LoRA scaling, logit_scale, softcap, STAT_* mask, chunk_size,
    backend name). Outputs, per row: logp, entropy and kl [N] (differentiable; entropy / kl are
    zeros unless asked for) and the non-differentiable rows [3, N] (log_sum_sq_probs,
    mean_logit, is_argmax); 0 on ignored rows.

    With a ``layout`` (``distributed.ShardLayout``) ``weight``, ``bias``, ``lora_b`` (and the
    reference's weight and bias) are this rank's vocabulary rows, ``hidden``, ``labels`` (global
    indices) and ``lora_a`` replicated: the same tiles and kernels run on the shard, the
    shards' statistics merge over the group (outputs replicated), and the gradients of
    ``hidden`` and ``lora_a`` are summed over it. Without one the forward and backward are
    ``torch.library`` ops (traceable).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        lora_a,
        lora_b,
        labels,
        inv_temp,
        ref_hidden,
        ref_weight,
        ref_bias,
        ignore_index: int,
        scaling: float,
        logit_scale: float,
        softcap,
        stats: int,
        chunk_size,
        backend: str,
        layout: Optional[ShardLayout] = None,
    ):
        opts = (ignore_index, scaling, logit_scale, softcap, stats, chunk_size, backend)
        inputs = (hidden, weight, bias, lora_a, lora_b, labels, inv_temp, ref_hidden, ref_weight, ref_bias)
        if layout is None:
            rows = _call(_linear_forward_op, _linear_forward_impl, *inputs, *opts)
        else:
            rows = _linear_forward_rows(*inputs, *opts, layout)
        # O(N) copies: the autograd outputs must not be views of the saved buffer
        logp, entropy, kl = rows[R_LOGP].clone(), rows[R_ENTROPY].clone(), rows[R_KL].clone()
        extra = rows[R_EXTRA:R_KL].clone()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(extra)
        ctx.save_for_backward(*inputs, rows)
        ctx.opts, ctx.layout = opts, layout
        return logp, entropy, kl, extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, grad_kl, _grad_extra):
        nones = (None,) * 18
        opts = ctx.opts
        # under torch.compile an unused output's gradient arrives as zeros, not None; the
        # entropy / kl outputs are zeros (not functions of the inputs) unless asked for
        if not opts[4] & STAT_ENTROPY:
            grad_entropy = None
        if not opts[4] & STAT_KL:
            grad_kl = None
        if grad_logp is None and grad_entropy is None and grad_kl is None:
            return nones
        need = tuple(bool(n) for n in ctx.needs_input_grad[:5])
        if not any(need):
            return nones
        args = (*ctx.saved_tensors, grad_logp, grad_entropy, grad_kl, *opts, *need)
        if ctx.layout is None:
            grads = _call(_linear_backward_op, _linear_backward_impl, *args)
        else:
            grads = _linear_backward_rows(*args, ctx.layout)
        return tuple(g if n else None for g, n in zip(grads, need)) + nones[5:]


def _backward_plan(
    M: int,
    V: int,
    item: int,
    cfg: _Cfg,
    half_no_fp32_mm: bool,
    acc_over_vocab: bool,
    acc_over_tokens: bool,
    ref_buf: bool = False,
) -> Tuple[str, int, int]:
    """How the backward walks the logits: ``(mode, token tile, vocabulary block)``.

    ``acc_over_vocab``: a gradient summed over the vocabulary is wanted (hidden, LoRA u);
    ``acc_over_tokens``: one summed over the tokens (weight, bias, LoRA B).

    ``"tiles"``: [token tile, vocabulary block] tiles of the byte budget, each tile's logits
    recomputed once; a gradient spread over several tiles is accumulated in fp32 (fp32
    inputs, or half inputs on devices with an fp32-output GEMM).
    ``"two-pass"``: half inputs without an fp32-output GEMM (the CPU), where that
    accumulation would round every tile's product to the half dtype (or cost fp32 GEMMs, 5-8x
    slower there): one pass over [all tokens, vocabulary block] tiles gives each block of the
    weight / bias / LoRA-B gradient in ONE GEMM over all tokens, one pass over [token block,
    whole vocabulary] tiles gives each row block of the hidden / LoRA-u gradient in ONE GEMM
    over the whole vocabulary; every GEMM accumulates in fp32 internally and rounds once. The
    logits are recomputed twice (five GEMMs in all instead of four), all in the half dtype.
    The returned sizes are then (token block of the second pass, vocabulary block of the first).
    """
    softcap_bufs = (2 if cfg.softcap is not None else 1) + (1 if ref_buf else 0)
    budget = max(1, min(cfg.chunk, M)) * V * item  # bytes of chunk_size rows of logits
    floor = max(1, min(V, MIN_VOCAB_BLOCK))
    mc = max(1, min(M, TOKEN_TILE))
    vb = max(floor, min(V, budget // (mc * item * softcap_bufs)))
    needs_acc = (acc_over_vocab and vb < V) or (acc_over_tokens and M > mc)
    if not (half_no_fp32_mm and needs_acc):
        return "tiles", mc, vb
    vb_all = max(floor, min(V, budget // (max(M, 1) * item * softcap_bufs)))
    rows = max(1, min(M, budget // (V * item * softcap_bufs)))
    return "two-pass", rows, vb_all


def _linear_backward(
    hidden,
    weight,
    bias,
    lora_a,
    lora_b,
    labels,
    inv_temp,
    lse,
    entropy,
    u,
    grad_logp,
    grad_entropy,
    cfg: _Cfg,
    need_h,
    need_w,
    need_b,
    need_a,
    need_lb,
    shift=None,
    lse_lo=None,
    kl=None,
):
    """Gradients (hidden [M, H], weight, bias, lora_a, lora_b; None where not needed) of the
    kept rows. ``lse``, ``lse_lo`` [M]: the rows' logsumexp as the row contract's pair
    (``_rows.lse_pair``; lse_lo None: zeros, for fp64 rows). ``shift`` [M]: what the forward
    subtracted from each fp32 row (its ``lse`` is that of the shifted rows); None for
    unshifted rows. ``kl``: ``(ref, grad_kl [M], kl [M], ref_lse [M])`` for the exact-KL term, ref
    the reference head as in ``_linear_forward`` (its tiles recomputed and shifted alike)."""
    M, H = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc_dt = compute_dtype(dt)
    lora = lora_a is not None
    r = lora_a.shape[0] if lora else 0
    s_lora = cfg.scaling
    need_u = lora and (need_h or need_a)  # the gradient of u = hidden @ A.T
    be = load_backend(cfg.backend)

    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.to(lse.dtype).contiguous()
    if lse_lo is None:
        lse_lo = torch.zeros_like(lse)

    half = dt in (torch.float16, torch.bfloat16)
    want_rows = need_h or need_u  # gradients summed over the vocabulary
    want_cols = need_w or need_b or need_lb  # gradients summed over the tokens
    mode, mc, vb = _backward_plan(
        M, V, hidden.element_size(), cfg, half and not _fp32_out_mm(dev), want_rows, want_cols, kl is not None
    )
    if kl is not None:
        ref, grad_kl, kl_rows, ref_lse = kl
        grad_kl = grad_kl.to(lse.dtype).contiguous()
    if mode == "tiles":
        passes = [(mc, vb, want_rows, want_cols)]
    else:
        passes = ([(M, vb, False, True)] if want_cols else []) + ([(mc, V, True, False)] if want_rows else [])

    # accumulators (fp32, or fp64 for fp64 inputs); a result complete in one tile is written directly
    rows_direct = all(p_vb >= V for _, p_vb, rows, _ in passes if rows) and not need_u
    gh = None
    if need_h:
        gh = torch.empty(M, H, dtype=dt, device=dev) if rows_direct else torch.zeros(M, H, dtype=acc_dt, device=dev)
    gu = torch.zeros(M, r, dtype=acc_dt, device=dev) if need_u else None
    gb = torch.zeros(V, dtype=acc_dt, device=dev) if need_b else None
    glb = torch.zeros(V, r, dtype=acc_dt, device=dev) if need_lb else None
    gw = None
    if need_w:  # one token tile over all tokens writes every block of the weight gradient directly
        direct_w = any(cols and p_mc >= M for p_mc, _, _, cols in passes)
        gw = (
            torch.empty(V, H, dtype=weight.dtype, device=dev)
            if direct_w and M
            else torch.zeros(V, H, dtype=acc_dt, device=dev)
        )

    softcap_bufs = 2 if cfg.softcap is not None else 1
    for p_mc, p_vb, rows_here, cols_here in passes:
        if not M:
            break
        n_tok_tiles = -(-M // p_mc)
        n_voc_blocks = -(-V // p_vb)
        size = min(p_mc, M) * p_vb
        buf = hidden.new_empty(size)
        buf2 = hidden.new_empty(size) if softcap_bufs == 2 else None
        rbuf = hidden.new_empty(size) if kl is not None else None
        for t0 in range(0, M, p_mc):
            t1 = min(M, t0 + p_mc)
            m = t1 - t0
            h_c = hidden[t0:t1]
            u_c = None if u is None else u[t0:t1]
            y = labels[t0:t1]
            it, lse_c, lo_c, c_c = inv_temp[t0:t1], lse[t0:t1], lse_lo[t0:t1], grad_logp[t0:t1]
            e_c = None if grad_entropy is None else grad_entropy[t0:t1]
            ent_c = entropy[t0:t1] if e_c is not None else lse_c
            shift_c = None if shift is None else shift[t0:t1].unsqueeze(1)
            for v0 in range(0, V, p_vb):
                v1 = min(V, v0 + p_vb)
                w_b = weight[v0:v1]
                lb_b = None if lora_b is None else lora_b[v0:v1]
                g = buf[: m * (v1 - v0)].view(m, v1 - v0)
                raw = None if buf2 is None else buf2[: m * (v1 - v0)].view(m, v1 - v0)
                _logits_into(g, h_c, w_b, None if bias is None else bias[v0:v1], u_c, lb_b, cfg, t=raw)
                kl_args = {}
                if rbuf is not None:
                    zr = _ref_logits_into(rbuf[: m * (v1 - v0)].view(m, v1 - v0), ref, t0, t1, v0, v1, cfg)
                    if shift_c is not None:
                        zr.sub_(shift_c)
                    kl_args = dict(grad_kl=grad_kl[t0:t1], ref_logits=zr, ref_lse=ref_lse[t0:t1], kl=kl_rows[t0:t1])
                if shift_c is not None:
                    g.sub_(shift_c)  # the forward's rows, which its lse belongs to
                # labels of this block; "elsewhere" is an out-of-range index (drops the one-hot term)
                yb = torch.where((y >= v0) & (y < v1), y - v0, v1 - v0)
                be.row_backward(g, yb, it, lse_c, lo_c, ent_c, c_c, e_c, _KERNEL_IGNORE, True, **kl_args)
                if raw is not None:
                    # d softcap*tanh(scale*r/softcap) / dr = scale / cosh(scale*r/softcap)^2, accurate
                    # in relative terms even in half precision (unlike 1 - tanh^2)
                    raw.mul_(cfg.logit_scale / cfg.softcap).cosh_().square_().reciprocal_().mul_(cfg.logit_scale)
                    g.mul_(raw)
                if cols_here:
                    if need_w:
                        if n_tok_tiles == 1:
                            torch.mm(g.t(), h_c, out=gw[v0:v1])
                        else:
                            _acc_mm(gw[v0:v1], g.t(), h_c)
                    if need_b:
                        gb[v0:v1] += g.sum(0, dtype=acc_dt)
                    if need_lb:
                        if n_tok_tiles == 1:
                            glb[v0:v1].add_(torch.mm(g.t(), u_c), alpha=s_lora)
                        else:
                            _acc_mm(glb[v0:v1], g.t(), u_c, alpha=s_lora)
                if rows_here:
                    if need_h:
                        if rows_direct:
                            torch.mm(g, w_b, out=gh[t0:t1])
                        elif n_voc_blocks == 1:
                            gh[t0:t1] += torch.mm(g, w_b)
                        else:
                            _acc_mm(gh[t0:t1], g, w_b)
                    if need_u:
                        if n_voc_blocks == 1:
                            gu[t0:t1].add_(torch.mm(g, lb_b), alpha=s_lora)
                        else:
                            _acc_mm(gu[t0:t1], g, lb_b, alpha=s_lora)
        g = raw = buf = buf2 = rbuf = kl_args = (
            None  # the views too: the next pass's buffer must not coexist with this one
        )

    grad_h = grad_w = grad_b = grad_a = grad_lb = None
    if need_u:
        if need_h:
            gh.addmm_(gu, lora_a.to(acc_dt))
        if need_a:
            grad_a = torch.mm(gu.t(), hidden.to(acc_dt)).to(lora_a.dtype)
    if need_h:
        grad_h = gh.to(dt)
    if need_w:
        grad_w = gw.to(weight.dtype)
    if need_b:
        grad_b = gb.to(bias.dtype)
    if need_lb:
        grad_lb = glb.to(lora_b.dtype)
    return grad_h, grad_w, grad_b, grad_a, grad_lb


# --------------------------------------------------------------------------- the forward-gradient plan
#
# The recompute plan above keeps only per-row statistics and recomputes the logits in the
# backward: 4 GEMMs (z = h W^T twice, G W, G^T h). When the loss's coefficient of every row,
# c_i = dL/dlogp_i, is known as soon as the rows of a few whole sequences are (a pairwise head
# whose per-pair loss depends on its own pair only, reduced by a mean or a sum over pairs),
# the gradients can be produced in the forward, chunk by chunk: logits of the chunk's rows
# (GEMM 1), its sequences' log-probs, their coefficients from the head, the logits turned
# into dL/dz in place, then G W and G^T h (GEMMs 2, 3). The backward only scales the stored
# gradients by the upstream gradient of the (scalar) loss: 3 GEMMs and no stored logits.
# A chunk holds whole groups (pairs) of sequences, so its buffer is at least the logits of
# the largest group.


def forward_plan_rows(labels: torch.Tensor, ignore_index: int, seq: torch.Tensor, group_of_seq: torch.Tensor):
    """Rows of the forward-gradient plan: ``(order [M], group_rows [G])``: the kept rows (a
    real label) sorted by the group of their sequence (stable), and how many each group has."""
    kept = (labels != ignore_index).nonzero().squeeze(1)
    key = group_of_seq[seq[kept]]
    key, perm = torch.sort(key, stable=True)
    G = int(group_of_seq.max()) + 1 if group_of_seq.numel() else 0
    return kept[perm], torch.bincount(key, minlength=G)


def _pack_groups(group_rows: List[int], budget_rows: int) -> List[Tuple[int, int, int, int]]:
    """Consecutive groups packed into chunks of at most ``budget_rows`` rows (at least one group
    each; empty groups ride along): ``(first group, end group, first row, end row)``."""
    chunks, g0, r0, rows = [], 0, 0, 0
    for g, n in enumerate(group_rows):
        if rows and rows + n > budget_rows:
            chunks.append((g0, g, r0, r0 + rows))
            g0, r0, rows = g, r0 + rows, 0
        rows += n
    if rows:
        chunks.append((g0, len(group_rows), r0, r0 + rows))
    return chunks


def _forward_grad(hidden, weight, bias, lora_a, lora_b, labels, inv_temp, seq, group_of_seq, head, opts, need):
    """The forward-gradient plan over ``hidden`` [N, H]: ``(loss 0-d, values [S], counts [S],
    grads)``. ``values``: per-sequence sums of the log-probs (means with ``average``), fp32;
    ``grads``: (hidden [N, H], weight, bias, lora_a, lora_b) of ``loss``, None where ``need``
    is False. See :class:`LinearForwardGradFunction` for the head."""
    ignore_index, scaling, average, chunk_size, backend = opts
    need_h, need_w, need_b, need_a, need_lb = need
    N, H = hidden.shape
    V = weight.shape[0]
    S = group_of_seq.shape[0]
    dev, dt = hidden.device, hidden.dtype
    acc_dt = compute_dtype(dt)
    be = load_backend(backend)
    order, group_rows = forward_plan_rows(labels, ignore_index, seq, group_of_seq)
    M = order.shape[0]
    counts = torch.zeros(S, dtype=torch.int64, device=dev).index_add_(0, seq[order], torch.ones_like(order))
    denom = counts.clamp(min=1).to(acc_dt)
    h = hidden.index_select(0, order)
    y, it, sq = labels[order], inv_temp[order], seq[order]
    lora = lora_a is not None
    u = torch.mm(h, lora_a.t()) if lora else None
    chunk = chunk_size if chunk_size is not None else default_chunk_size(M, V, dt)
    chunks = _pack_groups(group_rows.tolist(), max(1, chunk))
    one_chunk = len(chunks) <= 1
    half_cpu = dt in (torch.float16, torch.bfloat16) and not _fp32_out_mm(dev)
    # half inputs without an fp32-output GEMM (the CPU): up to _HALF_RUNNING_SUM_MAX_CHUNKS chunks
    # sum the weight gradient in the half dtype by the GEMM itself (addmm: fp32 inside, the
    # running sum rounded once per chunk); more chunks sum products rounded once each in fp32
    half_sum = half_cpu and len(chunks) <= _HALF_RUNNING_SUM_MAX_CHUNKS

    sums = torch.zeros(S, dtype=acc_dt, device=dev)
    gh = torch.empty(M, H, dtype=dt, device=dev) if need_h else None
    gu = torch.empty(M, lora_a.shape[0], dtype=acc_dt, device=dev) if lora and (need_h or need_a) else None
    gw = None
    if need_w:  # one chunk writes the weight gradient in one GEMM; several sum in fp32
        if not chunks:
            gw = torch.zeros(V, H, dtype=weight.dtype, device=dev)
        else:
            gw = torch.empty(V, H, dtype=weight.dtype if one_chunk or half_sum else acc_dt, device=dev)
    gb = torch.zeros(V, dtype=acc_dt, device=dev) if need_b else None
    glb = torch.zeros(V, lora_a.shape[0], dtype=acc_dt, device=dev) if need_lb else None
    rows_max = max([r1 - r0 for _, _, r0, r1 in chunks], default=0)
    buf = hidden.new_empty(rows_max * V) if rows_max else None
    first_w, tmp_h, tmp_f = True, None, None
    for g0, g1, r0, r1 in chunks:
        m = r1 - r0
        h_c, y_c, it_c, s_c = h[r0:r1], y[r0:r1], it[r0:r1], sq[r0:r1]
        u_c = None if u is None else u[r0:r1]
        z = _logits_into(buf[: m * V].view(m, V), h_c, weight, bias, u_c, lora_b, _LOGITS_CFG._replace(scaling=scaling))
        out = be.row_forward(z, y_c, it_c, _KERNEL_IGNORE, 0)
        sums.index_add_(0, s_c, out[OUT_LOGP].to(acc_dt))
        vals = sums / denom if average else sums
        coef = head.coefficients(torch.arange(g0, g1, device=dev), vals.detach()).to(acc_dt)
        c_rows = coef[s_c] / denom[s_c] if average else coef[s_c]
        lse = out[OUT_LSE].contiguous()
        be.row_backward(
            z, y_c, it_c, lse, out[OUT_LSE_LO].contiguous(), lse, c_rows.contiguous(), None, _KERNEL_IGNORE, True
        )
        if need_w:
            if one_chunk or (first_w and gw.dtype == z.dtype):
                torch.mm(z.t(), h_c, out=gw)  # gw's first (or only) term: no zero fill
            elif half_sum:
                # measured (bf16, 16 chunks): 1.9x the recompute plan's error, 1.4x that of the
                # fp32 sum below; up to 4 chunks about the recompute plan's; and 1.2x the GEMM
                # floor where the fp32 sum takes 1.55x (its [V, H] accumulator, add and cast)
                gw.addmm_(z.t(), h_c)
            elif half_cpu:
                # fp32 GEMMs cost 2-3x here: each chunk's product is rounded once to the half
                # dtype and summed in fp32, a vocabulary block at a time through preallocated
                # temporaries (a fresh allocation per block costs more in page faults than the add)
                if tmp_h is None:
                    tmp_h = hidden.new_empty(min(V, _HALF_SUM_BLOCK), H)
                    tmp_f = torch.empty(tmp_h.shape, dtype=acc_dt, device=dev)
                for v0 in range(0, V, _HALF_SUM_BLOCK):
                    v1 = min(V, v0 + _HALF_SUM_BLOCK)
                    tb = torch.mm(z[:, v0:v1].t(), h_c, out=tmp_h[: v1 - v0])
                    if first_w:
                        gw[v0:v1].copy_(tb)
                    else:
                        gw[v0:v1].add_(tmp_f[: v1 - v0].copy_(tb))
            else:  # fp32 inputs, or half ones with an fp32-output GEMM into the fp32 accumulator
                if first_w:
                    gw.zero_()
                _acc_mm(gw, z.t(), h_c)
            first_w = False
        if need_b:
            gb += z.sum(0, dtype=acc_dt)
        if need_lb:
            _acc_mm(glb, z.t(), u_c, alpha=scaling)
        if gu is not None:
            gu[r0:r1] = torch.mm(z, lora_b).to(acc_dt).mul_(scaling)
        if need_h:
            torch.mm(z, weight, out=gh[r0:r1])
    z = buf = tmp_h = tmp_f = None
    values = sums / denom if average else sums
    loss = head.loss(values)

    grad_h = grad_w = grad_b = grad_a = grad_lb = None
    if need_h:
        if gu is not None:
            gh = gh.to(acc_dt).addmm_(gu, lora_a.to(acc_dt)).to(dt)
        grad_h = hidden.new_zeros(N, H).index_copy_(0, order, gh)  # ignored rows: 0
    if need_w:
        grad_w = gw.to(weight.dtype)
    if need_b:
        grad_b = gb.to(bias.dtype)
    if need_a:
        grad_a = torch.mm(gu.t(), h.to(acc_dt)).to(lora_a.dtype)
    if need_lb:
        grad_lb = glb.to(lora_b.dtype)
    return loss, values, counts, (grad_h, grad_w, grad_b, grad_a, grad_lb)


_HALF_RUNNING_SUM_MAX_CHUNKS = 4
# vocabulary rows per half-precision weight-gradient product summed into fp32 (8192 x H temporaries)
_HALF_SUM_BLOCK = 8192
# the transform options _logits_into reads in the forward-gradient plan (no softcap: refused)
_LOGITS_CFG = _Cfg(1.0, 1.0, None, 0, 1, "torch")


class LinearForwardGradFunction(torch.autograd.Function):
    """A scalar loss of per-sequence log-prob sums (or means), its gradients made in the forward.

    Inputs: hidden [N, H], weight [V, H], bias [V] / lora_a [r, H] / lora_b [V, r] or None,
    labels int64 [N], inv_temp [N] (logit_scale folded in; no softcap), seq int64 [N] (the
    sequence of each row, in [0, S)), group_of_seq int64 [S] (the group of each sequence, in
    [0, G); consecutive groups may share a chunk), ``head`` and the options (ignore_index,
    LoRA scaling, average, chunk_size, backend name).

    ``head.coefficients(groups int64 [g], values [S]) -> [S]``: dL/dvalues for the sequences
    of ``groups`` (other entries unused), given the values of at least those sequences
    (entries of groups not yet processed are partial: a head must not read them). It must
    not depend on other groups' values: the plan's exactness rests on it.
    ``head.loss(values [S]) -> 0-d tensor``: the loss (called once, with every value).

    Outputs: the loss (differentiable: its backward scales the stored gradients), the values
    [S] and the int64 counts of real labels [S] (non-differentiable). The backward runs once
    (the stored gradients are handed to autograd) and is not differentiable itself.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, labels, inv_temp, seq, group_of_seq, head, opts):
        need = tuple(bool(n) for n in ctx.needs_input_grad[:5])
        loss, values, counts, grads = _forward_grad(
            hidden, weight, bias, lora_a, lora_b, labels, inv_temp, seq, group_of_seq, head, opts, need
        )
        ctx.mark_non_differentiable(values, counts)
        ctx.grads = list(grads)
        return loss.detach().clone(), values, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_values, _grad_counts):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "the forward-gradient plan (plan='forward') stores its gradients once: backward through it "
                "a second time (retain_graph=True) needs plan='recompute'"
            )
        ctx.grads = None  # handed over: autograd may take them as .grad without a copy
        if grad_loss is None:
            return (None,) * 11
        if not bool(grad_loss == 1):  # scaled in place: the stored gradients are ours to hand out
            grads = [None if g is None else g.mul_(grad_loss) for g in grads]
        out = grads
        return (*out, None, None, None, None, None, None)


def linear_sequence_forward_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    head,
    group_of_seq: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    lora=None,
    ignore_index: int = -100,
    temperature=1.0,
    logit_scale: float = 1.0,
    cu_seqlens: Optional[torch.Tensor] = None,
    average: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
):
    """A scalar loss of the per-sequence log-probs (sums, or means with ``average``), by the
    forward-gradient plan (3 GEMMs; see :class:`LinearForwardGradFunction` for ``head``).

    ``hidden`` padded ``[S, T, H]`` (labels ``[S, T]``) or packed ``[tokens, H]`` with
    ``cu_seqlens`` ``[S + 1]``; ``group_of_seq`` int64 ``[S]``: the group (e.g. the pair) of each
    sequence, nondecreasing chunks of consecutive groups are formed. One device, no softcap
    (the callers refuse those into the recompute plan). ``chunk_size``: the buffer's budget in
    rows of logits as in :func:`linear_token_logprobs`, raised to the largest group's rows.

    Returns ``(loss, values fp32 [S], counts int64 [S])``.
    """
    from .sequence_logprobs import check_sequence_labels

    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    lora_a, lora_b, scaling = check_linear_inputs(hidden, weight, labels, bias, lora, ignore_index)
    logit_scale, _ = _validate.check_linear_scalars(logit_scale, None, chunk_size)
    cu_seqlens = check_sequence_labels(labels, cu_seqlens)
    inv_temp = _fold_logit_scale(
        _validate.inverse_temperature(temperature, labels, compute_dtype(hidden.dtype)), logit_scale, None
    )
    be = resolve_backend(backend, hidden)
    flat_y = labels.reshape(-1).to(torch.int64)
    if cu_seqlens is None:
        T = labels.shape[-1]
        seq = torch.arange(flat_y.shape[0], device=flat_y.device) // max(T, 1)
    else:
        seq = torch.searchsorted(cu_seqlens[1:], torch.arange(flat_y.shape[0], device=flat_y.device), right=True)
    loss, values, counts = LinearForwardGradFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        lora_a,
        lora_b,
        flat_y,
        inv_temp.contiguous(),
        seq,
        group_of_seq,
        head,
        (ignore_index, scaling, bool(average), chunk_size, be.NAME),
    )
    return loss, values, counts


# --------------------------------------------------------------------------- validation


def check_linear_inputs(hidden, weight, labels, bias, lora, ignore_index, *, shard: bool = False):
    """The fused-linear inputs; returns (lora_a, lora_b, scaling). With ``shard`` (the
    vocabulary-parallel path) ``weight`` is a vocabulary shard, which may have no rows, and the
    labels' range is left to the caller (it needs the global vocabulary size)."""
    _validate.check_tensor(hidden, "hidden")
    if hidden.dtype not in _validate.LOGIT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16 (float64 on backend='torch'); got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1; got {list(hidden.shape)}")
    H = hidden.shape[-1]
    _validate.check_tensor(weight, "weight")
    min_rows = 0 if shard else 1
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < min_rows:
        raise ValueError(
            f"weight must have shape [V, H] with H = hidden.shape[-1] = {H} and V >= {min_rows}; "
            f"got {list(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight must have the dtype of hidden ({hidden.dtype}); got {weight.dtype} "
            "(autocast is not applied: cast both to the compute dtype)"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on the device of hidden ({hidden.device}); got {weight.device}")
    V = weight.shape[0]
    if bias is not None:
        _validate.check_companion(bias, "bias", (V,), hidden.dtype, hidden.device, "hidden")
    lora_a = lora_b = None
    scaling = 1.0
    if lora is not None:
        if not isinstance(lora, (tuple, list)) or len(lora) != 3:
            raise TypeError("lora must be a tuple (A, B, scaling) with A [r, H], B [V, r] and a float scaling")
        lora_a, lora_b, scaling = lora
        _validate.check_tensor(lora_a, "lora A")
        if lora_a.dim() != 2 or lora_a.shape[1] != H or lora_a.shape[0] < 1:
            raise ValueError(f"lora A must have shape [r, H] with H = {H}, r >= 1; got {list(lora_a.shape)}")
        r = lora_a.shape[0]
        _validate.check_companion(lora_a, "lora A", (r, H), hidden.dtype, hidden.device, "hidden")
        _validate.check_companion(lora_b, "lora B", (V, r), hidden.dtype, hidden.device, "hidden")
        if isinstance(scaling, torch.Tensor):
            raise TypeError("lora scaling must be a Python float (alpha / r), not a tensor")
        scaling = _validate.check_real(scaling, "lora scaling")
    _validate.check_index_tensor(labels, "labels", hidden.shape[:-1], hidden.device, "hidden.shape[:-1]")
    if not shard:
        _validate.check_label_range(labels, V, ignore_index, vocab="V = weight.shape[0]")
    return lora_a, lora_b, scaling


# --------------------------------------------------------------------------- public API


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature=1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    stats=(),
    lora: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
):
    """Log-probs of ``labels`` under the lm_head logits of ``hidden``, never materializing them.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 on the torch backend).
        weight: ``[V, H]`` lm_head weight, same dtype and device as ``hidden``.
        labels: integers shaped ``hidden.shape[:-1]`` in ``[0, V)``; ``ignore_index`` rows are
            dropped before any matmul and give 0 in every output (and no gradient).
        bias: optional ``[V]``.
        temperature: float > 0 or a tensor broadcastable to ``labels.shape`` (constant).
        logit_scale: float > 0 multiplying the projection (before the softcap).
        softcap: ``softcap * tanh(z / softcap)`` on the scaled logits (Gemma-style), or None.
        stats: any of ``"entropy"`` (differentiable), ``"log_sum_sq_probs"``,
            ``"mean_logit"``, ``"is_argmax"`` (as :func:`prefopt_fast.token_logprobs`; the
            outputs of TRL 1.16's ``ChunkedLogProbFunction``), ``"kl"`` (exact KL(pi || pi_ref)
            over the vocabulary against the reference head; differentiable).
        lora: ``(A, B, scaling)`` with A ``[r, H]``, B ``[V, r]``: adds
            ``scaling * (hidden @ A.T) @ B.T`` to the logits (gradients flow to A and B);
            the merged weight is never formed.
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states ``[..., H_ref]``
            (leading dims of ``hidden``), lm_head ``[V, H_ref]`` and optional bias ``[V]``, for
            ``"kl"`` only: its logits take the same transform (logit_scale, softcap,
            temperature; no LoRA: e.g. the PEFT base model) tile by tile, and get no gradient.
        chunk_size: the logits buffer holds as many bytes as ``chunk_size`` full rows of
            logits (laid out as [token tile, vocabulary block] tiles), or None for the rule
            in the module docstring.
        backend: the row-kernel backend (``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``, ...).
        process_group, vocab_start, vocab_size: vocabulary-parallel head: ``weight``, ``bias``
            and LoRA ``B`` hold this rank's rows ``[vocab_start, vocab_start + V_local)``,
            ``hidden``, ``labels`` and LoRA ``A`` are replicated (a DTensor ``weight`` sharded on
            dim 0 needs none of these); see :mod:`prefopt_fast.distributed`.

    Returns:
        fp32 log-probs shaped like ``labels`` (fp64 for fp64 inputs), or with ``stats`` a
        :class:`prefopt_fast.TokenLogProbsOutput`. Gradients reach ``hidden``,
        ``weight``, ``bias`` and the LoRA factors, accumulated in fp32.
    """
    if is_dtensor(weight) and process_group is None and vocab_start is None and _data_parallel(hidden, weight):
        # FSDP2: this rank's tokens against the whole head, gathered differentiably
        if vocab_size is not None and vocab_size != weight.shape[0]:
            raise ValueError(
                f"vocab_size must equal the weight's global vocabulary {weight.shape[0]}; got {vocab_size}"
            )
        group, counts = distributed.dp_group_sizes(weight, "weight", labels.numel())
        # a LoRA pair or a plain (whole, trainable) bias next to the sharded weight: the head is gathered
        plain_extra = lora is not None or (bias is not None and not is_dtensor(bias))
        if group is not None and distributed.sharded_head_algorithm(weight.shape[0], counts, plain_extra) == (
            "gather_tokens"
        ):
            return _gather_tokens_call(
                hidden,
                weight,
                labels,
                group,
                counts,
                bias=bias,
                ignore_index=ignore_index,
                temperature=temperature,
                logit_scale=logit_scale,
                softcap=softcap,
                stats=stats,
                ref_hidden=ref_hidden,
                ref_weight=ref_weight,
                ref_bias=ref_bias,
                chunk_size=chunk_size,
                backend=backend,
            )
        weight, bias = distributed.gather_parameter(weight, "weight"), distributed.gather_parameter(bias, "bias")
        if isinstance(lora, (tuple, list)) and len(lora) == 3:
            lora = (
                distributed.gather_parameter(lora[0], "lora A"),
                distributed.gather_parameter(lora[1], "lora B"),
                lora[2],
            )
        ref_weight = distributed.gather_parameter(ref_weight, "ref_weight")
        ref_bias = distributed.gather_parameter(ref_bias, "ref_bias")
        vocab_size = None
    sharded = process_group is not None or vocab_start is not None or vocab_size is not None or is_dtensor(weight)
    if sharded:
        hidden, weight, labels, bias, lora, process_group, vocab_size = _local_shard(
            hidden, weight, labels, bias, lora, process_group, vocab_start, vocab_size
        )
        ref_hidden, ref_weight, ref_bias = (
            local_tensor(ref_hidden),
            _local_rows(ref_weight, "ref_weight"),
            _local_rows(ref_bias, "ref_bias"),
        )
        distributed.check_process_group(process_group)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    # shapes, dtypes and LoRA (of the local shard, which may have no rows); on a shard the
    # labels' range needs the global vocabulary: checked after shard_layout, the rest before
    lora_a, lora_b, scaling = check_linear_inputs(hidden, weight, labels, bias, lora, ignore_index, shard=sharded)
    logit_scale, softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
    names = _stat_names(stats)
    want_kl = _check_ref_head(names, hidden, weight, ref_hidden, ref_weight, ref_bias)
    inv_temp = _validate.inverse_temperature(temperature, labels, compute_dtype(hidden.dtype))
    be = resolve_backend(backend, hidden, need_kl=want_kl)
    layout = None
    if sharded:
        layout = distributed.shard_layout(
            process_group, weight.shape[0], vocab_start, vocab_size, hidden.device, what="weight.shape[0]"
        )
        _validate.check_label_range(labels, layout.vocab, ignore_index, vocab="the global vocabulary size")

    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).to(torch.int64)
    inv_temp = _fold_logit_scale(inv_temp, logit_scale, softcap)
    ref_flat = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]) if want_kl else None
    logp, entropy, kl, extra = LinearLogProbsFunction.apply(
        flat_h,
        weight,
        bias,
        lora_a,
        lora_b,
        flat_y,
        inv_temp.contiguous(),
        ref_flat,
        ref_weight.detach() if want_kl else None,
        ref_bias.detach() if want_kl and ref_bias is not None else None,
        ignore_index,
        scaling,
        logit_scale,
        softcap,
        stat_mask(names),
        chunk_size,
        be.NAME,
        layout,
    )
    return token_outputs(logp, entropy, kl, extra, names, labels.shape)


def _gather_tokens_call(
    hidden, weight, labels, group, counts, *, bias, temperature, ref_hidden, ref_weight, ref_bias, **opts
):
    """A data-parallel sharded head (FSDP2) by gathering the tokens instead of the head: every
    rank runs the vocabulary-parallel op on its own weight shard for ALL ranks' tokens (the
    hidden states all-gathered), keeps its own rows of the (replicated) outputs, and in the
    backward the upstream gradients of all rows are summed over the ranks (O(world x N)) so
    the shard's weight gradient is born complete: no weight all-gather, no weight-gradient
    reduction. The weight's gradient is averaged over the ranks (FSDP2's convention)."""
    world, rank = len(counts), torch.distributed.get_rank(group)
    start, n = sum(counts[:rank]), counts[rank]
    H = hidden.shape[-1]
    if isinstance(temperature, torch.Tensor):  # per token: gathered like the tokens
        temperature = distributed.gather_tokens(
            torch.broadcast_to(temperature.to(hidden.device), labels.shape).reshape(-1), group, counts, False
        )
    h_all = distributed.gather_tokens(hidden.reshape(-1, H), group, counts)
    y_all = distributed.gather_tokens(labels.reshape(-1), group, counts, False)
    rh_all = None
    if ref_hidden is not None:
        rh_all = distributed.gather_tokens(ref_hidden.reshape(-1, ref_hidden.shape[-1]), group, counts, False)

    def local(x):
        return None if x is None else distributed.scale_grad(x.to_local(), 1.0 / world)

    # this rank's vocabulary rows, for a reference head given whole (it takes no gradient)
    _, vsizes = distributed.dp_group_sizes(weight, "weight", weight.to_local().shape[0])
    v0, v1 = sum(vsizes[:rank]), sum(vsizes[: rank + 1])

    def ref_rows(x, name):
        if x is None:
            return None
        if is_dtensor(x):
            if distributed.dp_group_sizes(x, name, x.to_local().shape[0])[1] != vsizes:
                raise ValueError(f"{name} as a DTensor must be sharded like weight (Shard(0) on its mesh)")
            return x.to_local().detach()
        return x.detach()[v0:v1]

    out = linear_token_logprobs(
        h_all,
        local(weight),
        y_all,
        bias=local(bias),
        temperature=temperature,
        ref_hidden=rh_all,
        ref_weight=ref_rows(ref_weight, "ref_weight"),
        ref_bias=ref_rows(ref_bias, "ref_bias"),
        process_group=group,
        vocab_size=weight.shape[0],
        **opts,
    )

    def own(x):
        return None if x is None else distributed.take_rows(x, group, start, n).reshape(labels.shape)

    if isinstance(out, TokenLogProbsOutput):
        return TokenLogProbsOutput(*(own(x) for x in out))
    return own(out)


def _data_parallel(hidden, weight) -> bool:
    """The layout a DTensor ``weight`` sharded on the vocabulary has with ``hidden``, never
    guessed from the weight alone: ``hidden`` a plain tensor -> data-parallel (FSDP2: every
    rank its own tokens); ``hidden`` a DTensor replicated on the weight's mesh -> tensor
    (vocabulary) parallel (every rank the same tokens); anything else is refused."""
    if not is_dtensor(hidden):
        return True
    if distributed.is_replicated_on(hidden, weight.device_mesh):
        return False
    raise ValueError(
        f"hidden is a DTensor with placements {tuple(hidden.placements)} and weight a DTensor with placements "
        f"{tuple(weight.placements)}: state the layout. Tensor (vocabulary) parallel, every rank the same "
        "tokens: pass hidden as a DTensor replicated on the weight's mesh (or local shards with "
        "process_group=). Data parallel with a sharded head (FSDP2 fully_shard), every rank its own "
        "tokens: pass hidden as a plain tensor (hidden.to_local())"
    )


def _local_rows(x, name: str):
    """A vocabulary-sharded companion (bias, LoRA B, the reference head): a DTensor gives its local rows."""
    return from_dtensor(x, 0, name)[0] if is_dtensor(x) else x


def _local_shard(hidden, weight, labels, bias, lora, process_group, vocab_start, vocab_size):
    """The local tensors of a vocabulary-parallel call: a DTensor weight sharded on dim 0
    brings its process group and global size (and then takes neither ``process_group`` nor
    ``vocab_start``); bias / LoRA B sharded like it, hidden / labels / LoRA A replicated.
    Returns (hidden, weight, labels, bias, lora, process_group, vocab_size)."""
    if is_dtensor(weight):
        if process_group is not None or vocab_start is not None:
            raise ValueError(
                "a DTensor weight carries its own process group and shard offsets: "
                "pass neither process_group nor vocab_start with it"
            )
        weight, process_group, dt_vocab = from_dtensor(weight, 0, "weight")
        vocab_size = dt_vocab if vocab_size is None else vocab_size
        bias = _local_rows(bias, "bias")
        if lora is not None and isinstance(lora, (tuple, list)) and len(lora) == 3:
            a, b, sc = lora
            lora = (local_tensor(a), _local_rows(b, "lora B"), sc)
    return local_tensor(hidden), weight, local_tensor(labels), bias, lora, process_group, vocab_size


# --------------------------------------------------------------------------- shared with the vocab-parallel path


def _stat_names(stats):
    return _validate.parse_names(stats, tuple(STATS), "stats")


def _check_ref_head(names, hidden, weight, ref_hidden, ref_weight, ref_bias):
    """The reference head of the exact KL: all of ``ref_hidden`` [..., H_ref] (shaped like hidden
    but for the last dim), ``ref_weight`` [V, H_ref] (V and dtype of ``weight``) and optional
    ``ref_bias`` [V], exactly when ``"kl"`` is asked for. True when it is."""
    want_kl = "kl" in names
    given = ref_hidden is not None or ref_weight is not None or ref_bias is not None
    if want_kl and (ref_hidden is None or ref_weight is None):
        raise ValueError(
            'stats=("kl",) in the fused-linear path needs the reference head: ref_hidden (the reference '
            "model's hidden states, shaped like hidden) and ref_weight (its lm_head weight [V, H_ref])"
        )
    if given and not want_kl:
        raise ValueError('ref_hidden / ref_weight / ref_bias are only used by the "kl" statistic; add "kl" to stats')
    if not want_kl:
        return False
    _validate.check_tensor(ref_hidden, "ref_hidden")
    if ref_hidden.dim() != hidden.dim() or tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"ref_hidden must have shape [..., H_ref] with the leading dims of hidden {list(hidden.shape[:-1])}; "
            f"got {list(ref_hidden.shape)}"
        )
    H_ref = ref_hidden.shape[-1]
    _validate.check_companion(ref_hidden, "ref_hidden", ref_hidden.shape, hidden.dtype, hidden.device, "hidden")
    _validate.check_companion(
        ref_weight,
        "ref_weight",
        (weight.shape[0], H_ref),
        hidden.dtype,
        hidden.device,
        "hidden",
        " ([V, H_ref]: the rows of weight, the width of ref_hidden)",
    )
    if ref_bias is not None:
        _validate.check_companion(ref_bias, "ref_bias", (weight.shape[0],), hidden.dtype, hidden.device, "hidden")
    return True


def _fold_logit_scale(inv_temp, logit_scale: float, softcap):
    """Without softcap, x = raw * scale / T: ``logit_scale`` joins the kernels' inverse temperature."""
    if softcap is None and logit_scale != 1.0:
        return inv_temp * logit_scale
    return inv_temp


def linear_sequence_logprobs_and_lengths(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    lora=None,
    average=False,
    cu_seqlens=None,
    chunk_size=None,
    backend="auto",
    process_group=None,
    vocab_start=None,
    vocab_size=None,
):
    """:func:`linear_sequence_logprobs` plus the int64 number of real labels per sequence."""
    from .sequence_logprobs import check_sequence_labels, sequence_totals

    cu_seqlens = check_sequence_labels(labels, cu_seqlens)
    _validate.check_bool(average, "average")
    logp = linear_token_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        lora=lora,
        chunk_size=chunk_size,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )
    return sequence_totals(logp, labels, ignore_index, cu_seqlens, average)


def linear_sequence_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index: int = -100,
    temperature=1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    lora=None,
    average: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-sequence log-probs (sum, or mean with ``average``) from hidden states and the lm_head.

    Args:
        hidden: padded ``[B, T, H]`` (any leading ``[..., T]``) or packed ``[total_tokens, H]``
            with ``cu_seqlens`` (int ``[B + 1]``).
        labels: ``hidden.shape[:-1]`` integers, already shifted; ``ignore_index`` on prompt / padding.
        weight, bias, temperature, logit_scale, softcap, lora, chunk_size, backend, process_group,
            vocab_start, vocab_size: as in :func:`linear_token_logprobs`.
        average: divide by the number of real labels (0 for a sequence without any).

    Returns:
        fp32 ``[B]`` (``labels.shape[:-1]`` when padded).
    """
    return linear_sequence_logprobs_and_lengths(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        lora=lora,
        average=average,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
    )[0]


class LinearSequenceLogProbs(nn.Module):
    """Config-only module around :func:`linear_sequence_logprobs` (the options are its keywords,
    validated here, once; ``process_group``, ``vocab_start``, ``vocab_size``: a
    vocabulary-parallel head, as there).

    ``forward(hidden, weight, labels, *, bias=None, lora=None, cu_seqlens=None) -> [B]``.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        average: bool = False,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        process_group=None,
        vocab_start: Optional[int] = None,
        vocab_size: Optional[int] = None,
    ):
        super().__init__()
        self.ignore_index = _validate.check_int(ignore_index, "ignore_index")
        self.temperature = _validate.check_positive_float(temperature, "temperature")
        self.logit_scale, self.softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
        if not isinstance(average, bool):
            raise TypeError(f"average must be a bool; got {type(average).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str; got {type(backend).__name__}")
        self.average = average
        self.chunk_size = chunk_size
        self.backend = backend
        self.process_group, self.vocab_start, self.vocab_size = check_vocab_parallel_options(
            process_group, vocab_start, vocab_size
        )

    def forward(self, hidden, weight, labels, *, bias=None, lora=None, cu_seqlens=None):
        return linear_sequence_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            lora=lora,
            average=self.average,
            cu_seqlens=cu_seqlens,
            chunk_size=self.chunk_size,
            backend=self.backend,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
            vocab_size=self.vocab_size,
        )

    def extra_repr(self):
        s = f"ignore_index={self.ignore_index}, temperature={self.temperature}, average={self.average}"
        if self.logit_scale != 1.0:
            s += f", logit_scale={self.logit_scale}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        return s
