"""The row-kernel contract shared by every backend.

Every backend implements the same two row kernels over a logits tensor ``[..., V]``
whose last dimension has stride 1 (any other strides, never copied):

``row_forward(logits, labels, inv_temp, ignore_index, stats) -> out``
    labels   int64 [N] contiguous (N = logits.numel() // V, rows in row-major order
             of ``logits.shape[:-1]``)
    inv_temp fp32  [N] contiguous, 1 / temperature per row
    stats    int bit mask of STAT_* (which optional statistics to compute)
    out      fp32 [N_OUT, N] contiguous, rows indexed by OUT_*:
             x_v = z_v * inv_temp            (fp32 math whatever the logits dtype)
             LSE     = log sum_v exp x_v
             LOGP    = x_y - LSE
             ENTROPY = LSE - sum_v p_v x_v   (terms with p_v == 0 count 0)
             LSSP    = log sum_v p_v^2
             MEAN    = (1 / V) sum_v x_v
             ARGMAX  = 1.0 if y is the first index of max_v x_v else 0.0
    LOGP and LSE are always written; an optional row is written only when its bit is
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

``row_backward(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy,
               ignore_index, inplace) -> grad``
    lse, entropy, grad_logp fp32 [N] contiguous; grad_entropy fp32 [N] or None
    (None: no entropy term; ``entropy`` is then unused and may be ``lse``).
    grad[n, v] = inv_temp * (c * (1[v == y] - p_v) - e * p_v * (x_v - lse + H))
    with p_v = exp(x_v - lse), c = grad_logp[n], e = grad_entropy[n], H = entropy[n];
    the e-term is 0 where p_v == 0. Ignored rows get an all-zero gradient row. A label
    outside [0, V) (not ignore_index) drops the 1[v == y] term and keeps the rest.
    Written in logits.dtype: into a fresh contiguous tensor shaped like logits, or,
    with inplace=True, over the logits buffer itself (and ``logits`` is returned).
    KL extension: optional keywords ``grad_kl`` fp32 [N], ``ref_logits``, ``ref_lse``,
    ``kl`` (all given, or all None) add
        inv_temp * k * p_v * (log p_v - log q_v - KL),   k = grad_kl[n]
    to grad[n, v] (0 where p_v == 0). No gradient flows to ref_logits.
"""
import torch

STAT_ENTROPY = 1
STAT_LSSP = 2
STAT_MEAN = 4
STAT_ARGMAX = 8
STAT_KL = 16
STAT_ALL = STAT_ENTROPY | STAT_LSSP | STAT_MEAN | STAT_ARGMAX | STAT_KL

OUT_LOGP, OUT_LSE, OUT_ENTROPY, OUT_LSSP, OUT_MEAN, OUT_ARGMAX, OUT_KL, OUT_REF_LSE = range(8)
N_OUT = 8

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
            f"pass inplace_backward=False, or {name}.contiguous()")


def num_rows(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n
