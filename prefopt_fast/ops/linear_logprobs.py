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

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import _validate, distributed
from .._dispatch import load_backend, resolve_backend
from .._rows import (
    N_OUT,
    OUT_ARGMAX,
    OUT_ENTROPY,
    OUT_LSE,
    OUT_LSE_LO,
    OUT_LSSP,
    OUT_MEAN,
    STAT_ARGMAX,
    STAT_ENTROPY,
    STAT_LSSP,
    STAT_MEAN,
    STATS,
    compute_dtype,
    lse_pair,
    split_lse,
)
from ..distributed import (
    SHARD_IGNORE,
    check_vocab_parallel_options,
    empty_part,
    from_dtensor,
    is_dtensor,
    kernel_labels,
    local_tensor,
    merge_partials,
    part_from_rows,
)
from .token_logprobs import stat_mask, token_outputs

__all__ = [
    "linear_token_logprobs",
    "linear_sequence_logprobs",
    "LinearSequenceLogProbs",
    "default_chunk_size",
    "LINEAR_STAT_NAMES",
]

LINEAR_STAT_NAMES = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")

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


def _forward_tiles(M: int, V: int, item: int, cfg: _Cfg) -> Tuple[int, int]:
    """(token tile, vocabulary block) of the forward: one buffer of the chunk's byte budget."""
    mc = max(1, min(M, TOKEN_TILE))
    budget = max(1, min(cfg.chunk, M)) * V * item
    vb = max(max(1, min(V, MIN_VOCAB_BLOCK)), min(V, budget // (mc * item)))
    return mc, vb


def _linear_forward(hidden, weight, bias, u, lora_b, labels, inv_temp, cfg: _Cfg):
    """Row statistics over the whole vocabulary, one [token tile, vocabulary block] tile at a time.

    The row kernels see a block of each row; their per-block outputs merge exactly into the
    full-row ones (a label outside the block is an out-of-range index: the kernels then
    compute every statistic but the label's). With L_b, H_b the block's log-sum-exp and
    entropy and lse = log sum_b exp L_b:
        H                = sum_b exp(L_b - lse) (H_b + lse - L_b)   (terms >= 0: no cancellation)
        sum_v p_v^2      = sum_b exp(2 (L_b - lse)) exp(LSSP_b)
        mean_v x_v       = sum_b (V_b / V) MEAN_b
        logp             = x_y - lse, x_y read from the tile holding the label
        is_argmax        = first argmax in its block, above every earlier block's max and
                           not below any later block's max
    kept as running sums rescaled whenever lse grows (online log-sum-exp).
    Returns logp [M], lse [M] and lse_lo [M] (the merged fp64 lse as the row contract's pair),
    entropy [M] (zeros unless asked for), [3, M] extras and the per-row shift [M] subtracted
    from fp32 tiles (None otherwise; lse is that of the shifted rows, as the backward must
    see them).
    """
    M, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc_dt = compute_dtype(hidden.dtype)
    # the O(M) merge state is fp64: each merge step would otherwise add an fp32 rounding to
    # lse and to the weights exp(L_b - lse), which the backward's exp(x - lse) inherits
    mdt = torch.float64
    be = load_backend(cfg.backend)
    want_ent = bool(cfg.stats & STAT_ENTROPY)
    want_sq = bool(cfg.stats & STAT_LSSP)
    want_mean = bool(cfg.stats & STAT_MEAN)
    want_arg = bool(cfg.stats & STAT_ARGMAX)

    full = lambda v: torch.full((M,), v, dtype=mdt, device=dev)  # noqa: E731
    lse = full(-math.inf)
    xy = full(math.nan)
    ent = full(0.0)  # sum over blocks so far of exp(L_b - lse) (H_b + lse - L_b), lse the running one
    sq = full(0.0)  # sum_v exp(2 (x_v - lse))
    mean = full(0.0)
    arg_in = full(0.0)  # the kernel's ARGMAX in the label's block
    max_all = full(-math.inf)
    max_before = full(-math.inf)  # max over the blocks that end at or before the label

    # fp32 tiles are shifted per row by the max of the row's first block: the kernels' fp32
    # lse then has the magnitude of the logits' spread, not of the logits, so the merge
    # weights exp(L_b - lse) and the backward's exp(x - lse) do not inherit ulp(|lse|) as a
    # relative error (at logits ~30 that was ~30x plain PyTorch's). Half tiles are not
    # shifted: a rounding of z - c to the half dtype would cost more than it saves.
    shift = torch.zeros(M, dtype=acc_dt, device=dev) if hidden.dtype == torch.float32 else None
    mc, vb = _forward_tiles(M, V, hidden.element_size(), cfg)
    one_block = vb >= V
    buf = hidden.new_empty(mc * vb) if M else None
    for t0 in range(0, M, mc):
        t1 = min(M, t0 + mc)
        m = t1 - t0
        h_c = hidden[t0:t1]
        u_c = None if u is None else u[t0:t1]
        y, it = labels[t0:t1], inv_temp[t0:t1]
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
            if shift is not None:
                if v0 == 0:
                    c = z.amax(1)
                    shift[t0:t1] = torch.where(torch.isfinite(c), c, 0.0)
                z.sub_(shift[t0:t1].unsqueeze(1))
            inb = (y >= v0) & (y < v1)
            yb = y - v0 if one_block else torch.where(inb, y - v0, v1 - v0)
            out = be.row_forward(z, yb, it, _KERNEL_IGNORE, cfg.stats)
            L = out[OUT_LSE].to(mdt) + out[OUT_LSE_LO].to(mdt)  # the block's lse to ~fp64
            # x_y exactly as the kernels compute it: the tile's value times inv_temp
            zy = (z.gather(1, yb.clamp(max=v1 - v0 - 1).unsqueeze(1)).squeeze(1).to(acc_dt) * it).to(mdt)
            xy[t0:t1] = torch.where(inb, zy, xy[t0:t1])
            old = lse[t0:t1]
            new = torch.logaddexp(old, L)
            empty = torch.isneginf(new)  # every logit so far is -inf: nothing to rescale
            r_old = torch.where(empty, 0.0, torch.exp(old - new))
            w = torch.where(empty | torch.isneginf(L), 0.0, torch.exp(L - new))
            if want_ent:
                # H = sum_b w_b (H_b + lse - L_b): every term >= 0, no cancellation at large logits.
                # Moving the reference from old to new: D <- r_old * (D + (new - old)) (the old
                # weights sum to 1), and new - old, new - L as softplus of d = L - old.
                d = L - old
                sp = torch.log1p(torch.exp(-d.abs()))
                first = torch.isneginf(old)  # nothing merged yet (or only -inf): no old part
                no_new = empty | torch.isneginf(L)  # an all -inf block adds nothing
                kept = torch.where(first, 0.0, r_old * (ent[t0:t1] + d.clamp(min=0) + sp))
                term = torch.where(no_new, 0.0, w * (out[OUT_ENTROPY].to(mdt) + (-d).clamp(min=0) + sp))
                ent[t0:t1] = kept + term  # NaN in a row stays NaN
            if want_sq:
                term = torch.where(w > 0, w * w * torch.exp(out[OUT_LSSP].to(mdt)), 0.0)
                sq[t0:t1] = sq[t0:t1] * (r_old * r_old) + term
            lse[t0:t1] = new
            if want_mean:
                mean[t0:t1] += out[OUT_MEAN].to(mdt) * ((v1 - v0) / V)
            if want_arg:
                bm = (z.amax(1).to(acc_dt) * it).to(mdt)  # max_v of x_v, as the kernels round it
                arg_in[t0:t1] = torch.where(inb, out[OUT_ARGMAX].to(mdt), arg_in[t0:t1])
                max_before[t0:t1] = torch.where(y >= v1, torch.maximum(max_before[t0:t1], bm), max_before[t0:t1])
                max_all[t0:t1] = torch.maximum(max_all[t0:t1], bm)
    del buf
    logp = xy - lse
    if shift is not None and want_mean:
        mean += shift.to(mdt) * inv_temp.to(mdt)
    entropy = ent if want_ent else full(0.0)
    extra = torch.zeros(3, M, dtype=acc_dt, device=dev)
    if want_sq:
        extra[0] = torch.log(sq)
    if want_mean:
        extra[1] = mean
    if want_arg:
        extra[2] = ((arg_in != 0) & (xy > max_before) & (xy >= max_all)).to(acc_dt)
    lse_hi, lse_lo = split_lse(lse, acc_dt)
    return logp.to(acc_dt), lse_hi, lse_lo, entropy.to(acc_dt), extra, shift


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


def _op_cfg(scaling, logit_scale, softcap, stats: int, chunk_size, M: int, V: int, dtype, backend: str) -> _Cfg:
    chunk = chunk_size if chunk_size is not None else default_chunk_size(M, V, dtype)
    return _Cfg(scaling, logit_scale, softcap, stats, chunk, backend)


# rows of the forward op's one output [N_ROWS, N]: the public outputs, then what the backward needs
R_LOGP, R_ENTROPY, R_EXTRA, R_LSE, R_LSE_LO, R_SHIFT = 0, 1, 2, 5, 6, 7
N_ROWS = 8


def _linear_forward_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
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
    N = hidden.shape[0]
    idx = _kept_index(labels, ignore_index)
    # the gather of the kept rows lives here, not in autograd: index_select's backward is a
    # scatter-add several times slower than the index_put the backward op does
    h = _rows_of(hidden, idx)
    h = h if h.is_contiguous() else h.contiguous()
    y, it = _rows_of(labels, idx), _rows_of(inv_temp, idx)
    u = torch.mm(h, lora_a.t()) if lora_a is not None else None
    cfg = _op_cfg(scaling, logit_scale, softcap, stats, chunk_size, h.shape[0], weight.shape[0], hidden.dtype, backend)
    logp, lse, lse_lo, entropy, extra, shift = _linear_forward(h, weight, bias, u, lora_b, y, it, cfg)
    rows = torch.cat(
        [
            logp[None],
            entropy[None],
            extra,
            lse[None],
            lse_lo[None],
            torch.zeros_like(lse)[None] if shift is None else shift[None],
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
    rows: torch.Tensor,
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
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
    idx = _kept_index(labels, ignore_index)
    h = _rows_of(hidden, idx)
    h = h if h.is_contiguous() else h.contiguous()
    y, it, g_logp, g_ent = (_rows_of(x, idx) for x in (labels, inv_temp, grad_logp, grad_entropy))
    k = rows if idx is None else rows.index_select(1, idx)
    shift = k[R_SHIFT] if hidden.dtype == torch.float32 else None
    u = torch.mm(h, lora_a.t()) if lora_a is not None else None  # recomputed: O(M H r), saved nothing
    cfg = _op_cfg(scaling, logit_scale, softcap, stats, chunk_size, h.shape[0], weight.shape[0], hidden.dtype, backend)
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
            need_h,
            need_w,
            need_b,
            need_a,
            need_lb,
            shift=shift,
            lse_lo=k[R_LSE_LO],
        )
    )
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
    rows,
    grad_logp,
    grad_entropy,
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
    (with logit_scale folded in when there is no softcap), and the Python options
    (ignore_index, LoRA scaling, logit_scale, softcap, STAT_* mask, chunk_size, backend name).
    Outputs, per row: logp [N], entropy [N] (differentiable; zeros unless asked for) and the
    non-differentiable rows [3, N] (log_sum_sq_probs, mean_logit, is_argmax); 0 on ignored rows.
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
        ignore_index: int,
        scaling: float,
        logit_scale: float,
        softcap,
        stats: int,
        chunk_size,
        backend: str,
    ):
        opts = (ignore_index, scaling, logit_scale, softcap, stats, chunk_size, backend)
        rows = _call(
            _linear_forward_op, _linear_forward_impl, hidden, weight, bias, lora_a, lora_b, labels, inv_temp, *opts
        )
        # O(N) copies: the autograd outputs must not be views of the saved buffer
        logp, entropy, extra = rows[R_LOGP].clone(), rows[R_ENTROPY].clone(), rows[R_EXTRA:R_LSE].clone()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(extra)
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b, labels, inv_temp, rows)
        ctx.opts = opts
        return logp, entropy, extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_extra):
        nones = (None,) * 14
        opts = ctx.opts
        # under torch.compile an unused output's gradient arrives as zeros, not None; the
        # entropy output is zeros (not a function of the inputs) unless it was asked for
        if not opts[4] & STAT_ENTROPY:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return nones
        need = tuple(bool(n) for n in ctx.needs_input_grad[:5])
        if not any(need):
            return nones
        grads = _call(
            _linear_backward_op, _linear_backward_impl, *ctx.saved_tensors, grad_logp, grad_entropy, *opts, *need
        )
        return tuple(g if n else None for g, n in zip(grads, need)) + nones[5:]


def _backward_plan(
    M: int, V: int, item: int, cfg: _Cfg, half_no_fp32_mm: bool, acc_over_vocab: bool, acc_over_tokens: bool
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
    softcap_bufs = 2 if cfg.softcap is not None else 1
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
):
    """Gradients (hidden [M, H], weight, bias, lora_a, lora_b; None where not needed) of the
    kept rows. ``lse``, ``lse_lo`` [M]: the rows' logsumexp as the row contract's pair
    (``_rows.split_lse``; lse_lo None: zeros, for fp64 rows). ``shift`` [M]: what the forward
    subtracted from each fp32 row (its ``lse`` is that of the shifted rows); None for
    unshifted rows. Also used by prefopt_fast.distributed."""
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
        M, V, hidden.element_size(), cfg, half and not _fp32_out_mm(dev), want_rows, want_cols
    )
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
                if shift_c is not None:
                    g.sub_(shift_c)  # the forward's rows, which its lse belongs to
                # labels of this block; "elsewhere" is an out-of-range index (drops the one-hot term)
                yb = y - v0 if n_voc_blocks == 1 else torch.where((y >= v0) & (y < v1), y - v0, v1 - v0)
                be.row_backward(g, yb, it, lse_c, lo_c, ent_c, c_c, e_c, _KERNEL_IGNORE, True)
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
        g = raw = buf = buf2 = None  # the views too: the next pass's buffer must not coexist with this one

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


# --------------------------------------------------------------------------- validation


def _check_inputs(hidden, weight, labels, bias, lora, ignore_index, *, shard: bool = False):
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
            outputs of TRL 1.16's ``ChunkedLogProbFunction``). ``"kl"`` is not available here.
        lora: ``(A, B, scaling)`` with A ``[r, H]``, B ``[V, r]``: adds
            ``scaling * (hidden @ A.T) @ B.T`` to the logits (gradients flow to A and B);
            the merged weight is never formed.
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
        :class:`prefopt_fast.TokenLogProbsOutput` (``kl`` None). Gradients reach ``hidden``,
        ``weight``, ``bias`` and the LoRA factors, accumulated in fp32.
    """
    if process_group is not None or vocab_start is not None or vocab_size is not None or is_dtensor(weight):
        return vocab_parallel_linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=ignore_index,
            temperature=temperature,
            logit_scale=logit_scale,
            softcap=softcap,
            stats=stats,
            lora=lora,
            chunk_size=chunk_size,
            backend=backend,
            process_group=process_group,
            vocab_start=vocab_start,
            vocab_size=vocab_size,
        )
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    lora_a, lora_b, scaling = _check_inputs(hidden, weight, labels, bias, lora, ignore_index)
    logit_scale, softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
    names = _stat_names(stats)
    inv_temp = _validate.inverse_temperature(temperature, labels, compute_dtype(hidden.dtype))
    be = resolve_backend(backend, hidden)

    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).to(torch.int64)
    inv_temp = _fold_logit_scale(inv_temp, logit_scale, softcap)
    logp, entropy, extra = LinearLogProbsFunction.apply(
        flat_h,
        weight,
        bias,
        lora_a,
        lora_b,
        flat_y,
        inv_temp.contiguous(),
        ignore_index,
        scaling,
        logit_scale,
        softcap,
        stat_mask(names),
        chunk_size,
        be.NAME,
    )
    return _outputs(logp, entropy, extra, names, None, labels.shape)


# --------------------------------------------------------------------------- shared with the vocab-parallel path


def _stat_names(stats):
    names = _validate.parse_names(stats, tuple(STATS), "stats")
    if "kl" in names:
        raise ValueError(
            'stats "kl" is not available in the fused-linear path (it would need the reference '
            "model's hidden states and head); use token_logprobs(logits, ..., ref_logits=...) or a "
            "sampled KL estimator on per-token reference log-probs"
        )
    return names


def _kept_rows(hidden, labels, inv_temp, ignore_index: int, logit_scale: float, softcap):
    """The rows the kernels see: (hidden [N, H] (all rows), labels int64 [M], inv_temp [M],
    idx int64 [M] or None) for the M rows with a real label (idx: their rows in [N], None for
    all of them). Without softcap ``inv_temp`` has ``logit_scale`` folded in."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).to(torch.int64)
    idx = _kept_index(flat_y, ignore_index)
    flat_y, inv_temp = _rows_of(flat_y, idx), _rows_of(inv_temp, idx)
    return flat_h, flat_y, _fold_logit_scale(inv_temp, logit_scale, softcap), idx


def _fold_logit_scale(inv_temp, logit_scale: float, softcap):
    """Without softcap, x = raw * scale / T: ``logit_scale`` joins the kernels' inverse temperature."""
    if softcap is None and logit_scale != 1.0:
        return inv_temp * logit_scale
    return inv_temp


def _outputs(logp, entropy, extra, names, idx, shape):
    """The public result from the kept rows' logp, entropy [M] and extras [3, M]: ignored rows
    get 0 in every output."""
    if idx is not None:
        N = math.prod(shape)

        def full(x):
            return x.new_zeros(*x.shape[:-1], N).index_copy(x.dim() - 1, idx, x)

        logp = full(logp)
        if names:
            entropy, extra = full(entropy), full(extra)
    return token_outputs(logp, entropy, None, extra, names, shape)


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


# --------------------------------------------------------------------------- vocabulary-parallel


def _linear_part(hidden, weight, bias, u, lora_b, ky, own, inv_temp, cfg):
    """This shard's part, chunk by chunk of tokens: one [chunk, V_r] logits buffer."""
    M = hidden.shape[0]
    Vr = weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    stats = cfg.stats
    if Vr == 0:
        return empty_part(M, acc, hidden.device, stats)
    be = load_backend(cfg.backend)
    res = torch.zeros(N_OUT, M, dtype=acc, device=hidden.device)
    xy = torch.zeros(M, dtype=acc, device=hidden.device)
    mx = torch.full((M,), -math.inf, dtype=acc, device=hidden.device) if stats & STAT_ARGMAX else None
    n = max(1, min(cfg.chunk, M))
    buf = hidden.new_empty(n * Vr) if M else None
    for s in range(0, M, n):
        e = min(M, s + n)
        z = _logits_into(
            buf[: (e - s) * Vr].view(e - s, Vr), hidden[s:e], weight, bias, None if u is None else u[s:e], lora_b, cfg
        )
        y, it = ky[s:e], inv_temp[s:e]
        res[:, s:e] = be.row_forward(z, y, it, SHARD_IGNORE, stats)
        xy[s:e] = z.gather(1, torch.where(own[s:e], y, 0).unsqueeze(1)).squeeze(1).to(acc) * it
        if mx is not None:
            mx[s:e] = z.amax(1).to(acc) * it
    part = part_from_rows(res, stats)
    part["XY"] = xy
    if mx is not None:
        part["MX"] = mx
    return part


class VocabParallelLinearFunction(torch.autograd.Function):
    """Fused-linear log-probs with the lm_head weight sharded on the vocabulary.

    Inputs: hidden [M, H] (replicated; rows with real labels only), weight [V_r, H], bias [V_r]
    or None, lora_a [r, H] (replicated) / lora_b [V_r, r] or None, kernel labels [M], own /
    before [M] bool, inv_temp [M], cfg (``_Cfg``), layout.
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
        res = (
            merge_partials(part, layout, torch.zeros_like(own), cfg.stats)
            if M
            else {"lse_m": z, "lse_log_s": z, "logp": z}
        )
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
            grads = list(
                _linear_backward(
                    hidden,
                    weight,
                    bias,
                    lora_a,
                    lora_b,
                    ky,
                    inv_temp,
                    lse,
                    entropy,
                    u,
                    grad_logp,
                    grad_entropy,
                    cfg,
                    *need,
                    lse_lo=lse_lo,
                )
            )
        # hidden (and LoRA A) are replicated: their gradient is the sum of every shard's part
        for i in (0, 3):
            if grads[i] is not None:
                dist.all_reduce(grads[i], op=dist.ReduceOp.SUM, group=layout.group)
        return tuple(grads) + (None,) * 6


def vocab_parallel_linear_token_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    stats=(),
    lora=None,
    chunk_size=None,
    backend="auto",
    process_group=None,
    vocab_start=None,
    vocab_size=None,
):
    """:func:`prefopt_fast.linear_token_logprobs` with the lm_head sharded on the vocabulary
    (what it calls when given ``process_group`` or a DTensor weight).

    ``hidden`` ``[..., H]`` and ``labels`` (global indices) are replicated; ``weight`` is this
    rank's ``[V_local, H]`` rows ``[vocab_start, vocab_start + V_local)`` of the head, or a
    DTensor sharded on dim 0; ``bias`` ``[V_local]`` and LoRA ``B`` ``[V_local, r]`` are sharded
    like it, LoRA ``A`` ``[r, H]`` is replicated. The gradients of ``hidden`` and ``A`` are
    all-reduced (summed) over the group in the backward.
    """
    if is_dtensor(weight):
        if process_group is not None or vocab_start is not None:
            raise ValueError(
                "a DTensor weight carries its own process group and shard offsets: "
                "pass neither process_group nor vocab_start with it"
            )
        weight, process_group, dt_vocab = from_dtensor(weight, 0, "weight")
        vocab_size = dt_vocab if vocab_size is None else vocab_size
        if bias is not None:
            bias = from_dtensor(bias, 0, "bias")[0] if is_dtensor(bias) else bias
        if lora is not None and isinstance(lora, (tuple, list)) and len(lora) == 3:
            a, b, sc = lora
            lora = (local_tensor(a), from_dtensor(b, 0, "lora B")[0] if is_dtensor(b) else b, sc)
    hidden, labels = local_tensor(hidden), local_tensor(labels)
    distributed.check_process_group(process_group)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    # shapes, dtypes and LoRA of the local shard (which may have no rows); the labels' range
    # needs the global vocabulary: checked after shard_layout, everything else before it
    lora_a, lora_b, scaling = _check_inputs(hidden, weight, labels, bias, lora, ignore_index, shard=True)
    logit_scale, softcap = _validate.check_linear_scalars(logit_scale, softcap, chunk_size)
    names = _stat_names(stats)
    inv_temp = _validate.inverse_temperature(temperature, labels, compute_dtype(hidden.dtype))
    be = resolve_backend(backend, hidden)
    layout = distributed.shard_layout(
        process_group, weight.shape[0], vocab_start, vocab_size, hidden.device, what="weight.shape[0]"
    )
    _validate.check_label_range(labels, layout.vocab, ignore_index, vocab="the global vocabulary size")

    flat_h, y, inv_temp, idx = _kept_rows(hidden, labels, inv_temp, ignore_index, logit_scale, softcap)
    if idx is not None:  # labels are replicated: every rank drops the same rows
        flat_h = flat_h.index_select(0, idx)
    cfg = _op_cfg(
        scaling,
        logit_scale,
        softcap,
        stat_mask(names),
        chunk_size,
        y.shape[0],
        max(1, weight.shape[0]),
        hidden.dtype,
        be.NAME,
    )
    ky, own, before = kernel_labels(y, ignore_index, layout)
    logp, entropy, extra = VocabParallelLinearFunction.apply(
        flat_h if flat_h.is_contiguous() else flat_h.contiguous(),
        weight,
        bias,
        lora_a,
        lora_b,
        ky,
        own,
        before,
        inv_temp.contiguous(),
        cfg,
        layout,
    )
    return _outputs(logp, entropy, extra, names, idx, labels.shape)
