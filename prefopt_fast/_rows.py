"""The row-kernel contract shared by every backend.

Every backend implements the same two row kernels over a logits tensor ``[..., V]``
whose last dimension has stride 1 (any other strides, never copied):

``row_forward(logits, labels, inv_temp, ignore_index, stats) -> out``
    labels   int64 [N] contiguous (N = logits.numel() // V, rows in row-major order
             of ``logits.shape[:-1]``)
    inv_temp fp32  [N] contiguous, 1 / temperature per row
    stats    int bit mask of STAT_* (which optional statistics to compute)
    out      fp32 [N_OUT, N] contiguous, rows indexed by OUT_*:
             x_v = z_v * inv_temp            (fp32 math whatever the logits dtype; x is
                                              rounded to fp32 before any use)
             lse     = log sum_v exp x_v = m + log s   (m the row max, s = sum_v exp(x_v - m))
             LSE     = fl32(lse)              (the nearest float, "hi")
             LSE_LO  = fl32(lse - LSE)        (the low part: LSE + LSE_LO is lse to about
                                              fp64 precision, e.g. hi = fl32(m + log s),
                                              lo = fl32((m - hi) + log s) in double or by
                                              TwoSum; 0 where LSE is not finite, and for
                                              fp64 rows on the torch backend)
             LOGP    = x_y - lse              (as (x_y - m) - log s: no cancellation)
             ENTROPY = lse - sum_v p_v x_v   (terms with p_v == 0 count 0)
             LSSP    = log sum_v p_v^2
             MEAN    = (1 / V) sum_v x_v
             ARGMAX  = 1.0 if y is the first index of max_v x_v else 0.0
    LOGP, LSE and LSE_LO are always written; an optional row is written only when its bit is
    set (its content is unspecified otherwise). ARGMAX of a row of only -inf is
    unspecified (its LOGP is NaN). Rows whose label == ignore_index get 0
    in every output. A label outside [0, V) that is not ignore_index gives LOGP = NaN
    and ARGMAX = 0 while every other output is computed as usual (the public API rejects
    such labels; the vocabulary-parallel path relies on this to run a shard whose rows'
    labels live on another shard). Kernels never read out of bounds. Non-finite input follows float64 torch.log_softmax:
    NaN or +inf anywhere in a row -> NaN log-prob; a row of only -inf -> NaN.

Exact KL extension (optional keyword ``ref_logits``: a second ``[..., V]`` tensor with
the same shape and dtype as ``logits``, its own strides, last stride 1; bit STAT_KL):
             q = softmax(xr), xr_v = r_v * inv_temp   (same temperature as the policy)
             KL      = sum_v p_v (log p_v - log q_v) = KL(p || q), terms with p_v == 0
                       count 0; +inf where some p_v > 0 has q_v == 0
             REF_LSE = log sum_v exp xr_v
    Both rows are written only when STAT_KL is set (which needs ref_logits).

``row_backward(logits, labels, inv_temp, lse, lse_lo, entropy, grad_logp, grad_entropy,
               ignore_index, inplace) -> grad``
    lse, lse_lo, entropy, grad_logp fp32 [N] contiguous (lse, lse_lo: the forward's LSE and
    LSE_LO rows, or any fp32 pair whose sum is the row's logsumexp); grad_entropy fp32 [N]
    or None (None: no entropy term; ``entropy`` is then unused and may be ``lse``).
    grad[n, v] = inv_temp * (c * (1[v == y] - p_v) - e * p_v * (log p_v + H))
    with log p_v = (x_v - lse) - lse_lo (x_v - lse is exact where it matters, so p_v keeps
    full fp32 relative precision at any magnitude of x), p_v = exp(log p_v),
    c = grad_logp[n], e = grad_entropy[n], H = entropy[n];
    the e-term is 0 where p_v == 0. Ignored rows get an all-zero gradient row. A label
    outside [0, V) (not ignore_index) drops the 1[v == y] term and keeps the rest.
    Written in logits.dtype: into a fresh contiguous tensor shaped like logits, or,
    with inplace=True, over the logits buffer itself (and ``logits`` is returned).
    KL extension: optional keywords ``grad_kl`` fp32 [N], ``ref_logits``, ``ref_lse``,
    ``kl`` (all given, or all None) add
        inv_temp * k * p_v * (log p_v - log q_v - KL),   k = grad_kl[n]
    to grad[n, v] (0 where p_v == 0), log q_v = xr_v - ref_lse. No gradient flows to
    ref_logits.
"""

import math
from typing import NamedTuple, Optional

import torch

STAT_ENTROPY = 1
STAT_LSSP = 2
STAT_MEAN = 4
STAT_ARGMAX = 8
STAT_KL = 16
STAT_ALL = STAT_ENTROPY | STAT_LSSP | STAT_MEAN | STAT_ARGMAX | STAT_KL

OUT_LOGP, OUT_LSE, OUT_ENTROPY, OUT_LSSP, OUT_MEAN, OUT_ARGMAX, OUT_KL, OUT_REF_LSE, OUT_LSE_LO = range(9)
N_OUT = 9


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype row statistics are computed and returned in for logits of ``dtype``: fp32,
    or fp64 for fp64 logits (the torch backend's, so gradcheck can run through it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_lse(lse: torch.Tensor, dtype: torch.dtype):
    """(LSE, LSE_LO) in ``dtype`` of a logsumexp held in fp64 (e.g. merged over vocabulary
    blocks or shards): hi = fl(lse), lo = fl(lse - hi), 0 where hi is not finite. For fp64
    rows (the torch backend's) lo is 0. O(N)."""
    if dtype == torch.float64:
        return lse.to(dtype), torch.zeros_like(lse, dtype=dtype)
    hi = lse.to(dtype)
    lo = torch.where(torch.isfinite(hi), lse - hi.to(lse.dtype), 0.0).to(dtype)
    return hi, lo


def lse_pair(m: torch.Tensor, log_s: torch.Tensor, dtype: torch.dtype):
    """(LSE, LSE_LO) in ``dtype`` of lse = m + log_s, m a row maximum and log_s the log of
    its exp-sum: hi = fl(m + log s), lo = fl((m - hi) + log s) in fp64. Not
    ``split_lse(m + log s)``: at |m| ~ 1e30 even the fp64 sum drops log s, while m - hi is
    exact when hi rounds to m. m = -inf (a row of only -inf): (-inf, 0). fp64 rows:
    (m + log s, 0). O(N)."""
    if dtype == torch.float64:
        return torch.where(m == float("-inf"), m, m + log_s), torch.zeros_like(m)
    m64, s64 = m.double(), log_s.double()
    hi = torch.where(m == float("-inf"), m.to(dtype), (m64 + s64).to(dtype))
    lo = torch.where(torch.isfinite(hi), (m64 - hi.double()) + s64, 0.0).to(dtype)
    return hi, lo


# public stat name -> (bit, output row)
STATS = {
    "entropy": (STAT_ENTROPY, OUT_ENTROPY),
    "log_sum_sq_probs": (STAT_LSSP, OUT_LSSP),
    "mean_logit": (STAT_MEAN, OUT_MEAN),
    "is_argmax": (STAT_ARGMAX, OUT_ARGMAX),
    "kl": (STAT_KL, OUT_KL),
}


def row_offsets(x: torch.Tensor) -> torch.Tensor:
    """int64 [N]: offset in elements from ``x.data_ptr()`` of each row of ``x[..., V]``.

    O(N) work; lets native and Triton kernels address any strided view (e.g. the
    causal shift ``logits[:, :-1]``) without a copy.
    """
    off = torch.zeros((), dtype=torch.int64, device=x.device)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64, device=x.device) * stride
    return off.reshape(-1)


def rows_disjoint(x: torch.Tensor) -> bool:
    """True if no two rows of ``x[..., V]`` (last stride 1) share memory.

    O(ndim) on the strides, no data touched: sorted by |stride|, every leading dimension
    must step past the span of the smaller ones (sufficient, and exact for the layouts
    that occur: contiguous tensors, slices, transposes, ``expand()`` or ``as_strided``
    views with a zero or short stride fail it).
    """
    if x.numel() == 0:
        return True
    dims = sorted((abs(st), sz) for sz, st in zip(x.shape[:-1], x.stride()[:-1]) if sz > 1)
    span = x.shape[-1]
    for st, sz in dims:
        if st < span:
            return False
        span += st * (sz - 1)
    return True


def check_inplace_rows(logits: torch.Tensor, name: str = "logits") -> None:
    """ValueError unless an in-place backward may write over ``logits`` (rows disjoint)."""
    if not rows_disjoint(logits):
        raise ValueError(
            f"inplace_backward=True writes the gradient over {name}, whose rows overlap in memory "
            f"(shape {tuple(logits.shape)}, strides {tuple(logits.stride())}, e.g. an expand()ed tensor); "
            f"pass inplace_backward=False, or {name}.contiguous()"
        )


def num_rows(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


# --------------------------------------------------------------------------- partial statistics
#
# A row split over vocabulary segments (the tiles of the fused-linear path, the shards of a
# vocabulary-parallel head) is run through the row kernels one segment at a time; each call
# gives the statistics of its segment. They combine into the whole row's with ONE algebra:
# every segment b becomes a Partial in "scaled sum" form about a reference m (a max of the
# segments' lse), e_b = exp(L_b - m):
#
#     s   = sum_b e_b                                   lse     = m + log s
#     ent = sum_b e_b (H_b - (L_b - m))   (terms >= 0)  entropy = ent / s + log s
#     sq  = sum_b exp(2 (L_b - m) + LSSP_b)             lssp    = log sq - 2 log s
#     sumx= sum_b V_b MEAN_b                            mean    = sumx / V
#     xy  = x_y of the segment holding the label        logp    = (xy - m) - log s
#     kl  = sum_b e_b (KL_b + (L_b - m) - (R_b - mr)),  sr = sum_b exp(R_b - mr)
#                                                       kl      = kl / s - log s + log sr
#     own (1 in the segment holding the label), am (it says "first argmax"), mx (max x), pre
#     (max x over the segments wholly before the label)  is_argmax = am & xy >= mx & xy > pre
#
# Moving a Partial to a larger reference (``rescale``) multiplies s by exp(m - M) and adds
# (M - m) s to ent (and likewise for kl): every field is then a plain sum, max or count, so
# two Partials combine by rescaling both to the larger reference and adding (``combine``),
# and a process group combines them with an all-reduce MAX of the references and an
# all-reduce SUM of the rest (prefopt_fast.distributed.all_reduce_partial). ``finish`` turns
# a Partial into the row contract's outputs. All of it in fp64, on [N] vectors.
#
# ``off`` (optional): a per-row offset every field is relative to (the fused-linear path
# subtracts a shift from fp32 tiles so the kernels' fp32 lse keeps the precision of the
# logits' spread, not of their magnitude); the Partials of one fold share it, a process
# group's are reconciled by all_reduce_partial.


class Partial(NamedTuple):
    """Statistics of one or more vocabulary segments of N rows (fp64 [N] tensors; None where
    the statistic was not asked for). See the comment above for the fields."""

    m: torch.Tensor
    s: torch.Tensor
    xy: torch.Tensor
    own: torch.Tensor
    ent: Optional[torch.Tensor] = None
    sq: Optional[torch.Tensor] = None
    sumx: Optional[torch.Tensor] = None
    am: Optional[torch.Tensor] = None
    mx: Optional[torch.Tensor] = None
    pre: Optional[torch.Tensor] = None
    mr: Optional[torch.Tensor] = None
    sr: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    off: Optional[torch.Tensor] = None


# the fields a process group reduces with MAX (references and maxima); the rest are sums
PARTIAL_MAX_FIELDS = ("m", "mx", "pre", "mr")
PARTIAL_SUM_FIELDS = ("s", "xy", "own", "ent", "sq", "sumx", "am", "sr", "kl")

_F64 = torch.float64


def empty_partial(N: int, stats: int, device, off: Optional[torch.Tensor] = None) -> Partial:
    """The Partial of no vocabulary entry at all: the identity of ``combine``."""

    def full(v):
        return torch.full((N,), v, dtype=_F64, device=device)

    return Partial(
        m=full(-math.inf),
        s=full(0.0),
        xy=full(0.0),
        own=full(0.0),
        ent=full(0.0) if stats & STAT_ENTROPY else None,
        sq=full(0.0) if stats & STAT_LSSP else None,
        sumx=full(0.0) if stats & STAT_MEAN else None,
        am=full(0.0) if stats & STAT_ARGMAX else None,
        mx=full(-math.inf) if stats & STAT_ARGMAX else None,
        pre=full(-math.inf) if stats & STAT_ARGMAX else None,
        mr=full(-math.inf) if stats & STAT_KL else None,
        sr=full(0.0) if stats & STAT_KL else None,
        kl=full(0.0) if stats & STAT_KL else None,
        off=off,
    )


def leaf_partial(
    out: torch.Tensor,
    stats: int,
    size: int,
    xy: torch.Tensor,
    own: torch.Tensor,
    mx: Optional[torch.Tensor] = None,
    after: Optional[torch.Tensor] = None,
    off: Optional[torch.Tensor] = None,
) -> Partial:
    """The Partial of one segment of ``size`` entries from the row kernels' ``out``
    [N_OUT, N] (the segment's labels: its own index where ``own``, else out of range).

    ``xy`` [N]: x_y as the kernels compute it (read where ``own``); ``mx`` [N]: max_v x_v of the
    segment and ``after`` [N] bool: the label lies after the segment (both for STAT_ARGMAX).
    The reference is the segment's fp32 LSE, exactly representable, with LSE_LO inside the
    scaled sums: nothing is lost to the magnitude of lse."""
    L = out[OUT_LSE].to(_F64)
    lo = out[OUT_LSE_LO].to(_F64)
    empty = torch.isneginf(L)  # a segment of only -inf logits adds nothing
    zero = torch.zeros((), dtype=_F64, device=L.device)
    e = torch.where(empty, zero, torch.exp(lo))
    ent = sq = sumx = am = mxx = pre = mr = sr = kl = None
    if stats & STAT_ENTROPY:
        ent = torch.where(empty, zero, e * (out[OUT_ENTROPY].to(_F64) - lo))
    if stats & STAT_LSSP:
        sq = torch.where(empty, zero, torch.exp(2 * lo + out[OUT_LSSP].to(_F64)))
    if stats & STAT_MEAN:  # absolute: the offset added back here (the mean needs no more than fp64)
        sumx = out[OUT_MEAN].to(_F64) * size if off is None else (out[OUT_MEAN].to(_F64) + off) * size
    if stats & STAT_ARGMAX:
        am = torch.where(own, out[OUT_ARGMAX].to(_F64), zero)
        mxx = mx.to(_F64)
        pre = torch.where(after, mxx, -math.inf)
    if stats & STAT_KL:
        mr = out[OUT_REF_LSE].to(_F64)
        sr = torch.where(torch.isneginf(mr), zero, torch.ones_like(mr))
        kl = torch.where(empty, zero, e * (out[OUT_KL].to(_F64) + lo))
    return Partial(
        m=torch.where(empty, -math.inf, L),
        s=e,
        xy=torch.where(own, xy.to(_F64), zero),
        own=own.to(_F64),
        ent=ent,
        sq=sq,
        sumx=sumx,
        am=am,
        mx=mxx,
        pre=pre,
        mr=mr,
        sr=sr,
        kl=kl,
        off=off,
    )


def _ref(m: torch.Tensor) -> torch.Tensor:
    # a row of only -inf logits everywhere: reference 0, so that exp(m - M) gives 0, not NaN
    return torch.where(torch.isneginf(m), 0.0, m)


def rescale(p: Partial, M: torch.Tensor, MR: Optional[torch.Tensor] = None) -> Partial:
    """``p`` about the references ``M >= p.m`` (and ``MR >= p.mr`` for the KL fields)."""
    M = _ref(M)
    d = M - p.m
    r = torch.exp(-d)
    live = p.s != 0  # NaN stays live and propagates
    zero = torch.zeros((), dtype=_F64, device=M.device)
    ent = None if p.ent is None else torch.where(live, r * (p.ent + d * p.s), zero)
    sq = None if p.sq is None else p.sq * (r * r)
    mr = sr = kl = None
    if p.kl is not None:
        MR = _ref(MR)
        dr = MR - p.mr
        mr, sr = MR, p.sr * torch.exp(-dr)
        kl = torch.where(live, r * (p.kl + p.s * (dr - d)), zero)
    return p._replace(m=M, s=p.s * r, ent=ent, sq=sq, mr=mr, sr=sr, kl=kl)


def _add(a: Partial, b: Partial) -> Partial:
    """Field-wise sum of two Partials about the same references."""
    fields = {}
    for f in PARTIAL_SUM_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        fields[f] = None if x is None else x + y
    if a.mx is not None:
        fields["mx"] = torch.maximum(a.mx, b.mx)
        fields["pre"] = torch.maximum(a.pre, b.pre)
    return a._replace(**fields)


def combine(a: Partial, b: Partial) -> Partial:
    """The Partial of the union of two disjoint sets of segments (same ``off``)."""
    M = torch.maximum(a.m, b.m)
    MR = None if a.mr is None else torch.maximum(a.mr, b.mr)
    return _add(rescale(a, M, MR), rescale(b, M, MR))


class RowStats(NamedTuple):
    """The whole rows' statistics from ``finish`` (fp64 [N]; None where not asked for).
    ``lse_m``, ``lse_log_s``: lse = lse_m + lse_log_s, kept apart for ``lse_pair``."""

    lse_m: torch.Tensor
    lse_log_s: torch.Tensor
    logp: torch.Tensor
    entropy: Optional[torch.Tensor]
    log_sum_sq_probs: Optional[torch.Tensor]
    mean_logit: Optional[torch.Tensor]
    is_argmax: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    ref_lse: Optional[torch.Tensor]


def finish(p: Partial, vocab: int) -> RowStats:
    """The row contract's statistics of rows of ``vocab`` entries from their Partial (lse and
    logp's parts relative to ``p.off`` when given; mean_logit is absolute)."""
    m = _ref(p.m)
    log_s = torch.log(p.s)
    ent = None if p.ent is None else p.ent / p.s + log_s
    sq = None if p.sq is None else torch.log(p.sq) - 2 * log_s
    mean = None if p.sumx is None else p.sumx / vocab
    arg = None
    if p.am is not None:
        arg = ((p.am > 0.5) & (p.xy >= p.mx) & (p.xy > p.pre)).to(_F64)
    kl = ref_lse = None
    if p.kl is not None:
        log_sr = torch.log(p.sr)
        kl = p.kl / p.s - log_s + log_sr
        ref_lse = _ref(p.mr) + log_sr
    return RowStats(m, log_s, (p.xy - m) - log_s, ent, sq, mean, arg, kl, ref_lse)
