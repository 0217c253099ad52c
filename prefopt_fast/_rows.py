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
    set (its content is unspecified otherwise). Rows whose label == ignore_index get 0
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
