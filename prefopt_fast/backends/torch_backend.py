"""The ``torch`` backend: the row kernels as chunked pure PyTorch (any device).

The reference implementation and the fallback. Rows are processed in blocks of about
``BLOCK_BYTES`` of temporaries so each block stays in the last-level cache and nothing of
size N x V is ever allocated (besides the gradient itself). Computes in fp32, or fp64 for
fp64 logits (so ``torch.autograd.gradcheck`` can run through it).

The common call (log-probs, maybe mean / argmax: what every training step runs) takes a
lean path: per block only the passes over the block (forward: max, x - m, exp, sum;
backward: x - lse, exp, one multiply, the label column), every per-row quantity computed
once for all N rows before or after the loop. The entropy / KL statistics take the
general path.
"""

from typing import Optional

import torch

from .._blocks import row_blocks
from .._rows import (
    N_OUT,
    OUT_ARGMAX,
    OUT_ENTROPY,
    OUT_KL,
    OUT_LOGP,
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
    compute_dtype,
    lse_pair,
    num_rows,
)

NAME = "torch"
SUPPORTS_KL = True
# Bytes of compute-dtype temporaries per block (1 Mi fp32 elements): the block stays in the
# last-level cache across the few passes made over it, and there are few enough blocks
# (each costs ~10 small op launches) that Python overhead stays small next to the traffic.
BLOCK_BYTES = 1 << 22
LOG2E = 1.4426950408889634  # exp(t) = exp2(t * log2 e): ATen's exp2 is ~3x faster than exp on CPU


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def supports(logits: torch.Tensor) -> Optional[str]:
    return None


def _rows_per_block(V: int, dtype: torch.dtype) -> int:
    """Rows per block: about BLOCK_BYTES of ``dtype`` (the compute dtype), at least one row."""
    return max(1, BLOCK_BYTES // (max(V, 1) * torch.empty((), dtype=dtype).element_size()))


class _Scratch:
    """Block-sized buffers reused across the blocks of one call: fresh memory costs page
    faults on every touch, which would cost more than the arithmetic."""

    def __init__(self, rows: int, V: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, V), dtype, device
        self.bufs = {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        if name not in self.bufs:
            self.bufs[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self.bufs[name][:rows]


def _scaled(z: torch.Tensor, inv_t: torch.Tensor, unit_temp: bool, out: torch.Tensor) -> torch.Tensor:
    """x = z * inv_t in the compute dtype (out's); aliases z when no conversion is needed."""
    if unit_temp:
        return z if z.dtype == out.dtype else out.copy_(z)
    return torch.mul(z, inv_t.to(out.dtype).unsqueeze(1), out=out)


def _label_info(y: torch.Tensor, V: int, ignore_index: int):
    ignored = y == ignore_index
    bad = ~ignored & ((y < 0) | (y >= V))
    safe = torch.where(ignored | bad, 0, y)
    return ignored, bad, safe


def _masked_dot(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_v p_v * v_v per row, where terms with p_v == 0 count 0 (even if v_v is inf)."""
    return torch.linalg.vecdot(p, torch.where(p > 0, v, 0.0))


def _log_softmax(x: torch.Tensor, out: torch.Tensor):
    """(log softmax of x into out, lse hi [rows], lse lo [rows]). One fused vectorized pass
    (torch.logsumexp on CPU is several times slower: it materializes x - max and its exp)."""
    ls = torch.ops.aten._log_softmax.out(x, -1, False, out=out)
    m = x.amax(-1)
    # log_softmax is (x - m) - log s, so at the argmax it is -log s exactly: lse = m + log s,
    # summed in fp64 and split into an fp32 (hi, lo) pair (the backward's (x - hi) - lo
    # keeps p's precision at any magnitude). An all -inf row keeps lse = -inf (a vocabulary
    # shard may be fully masked); NaN or +inf in a row gives NaN, as log_softmax does.
    log_s = -ls.amax(-1)
    return (ls, *lse_pair(m, log_s, m.dtype))


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """exp in place, as exp2(t * log2 e): one cheap extra pass, and exp2 is several times
    faster than exp on CPU. The product's rounding is relative to t (t = x - max or x - lse
    is already small), so p = exp(t) keeps about fp32 precision where it is not tiny."""
    return t.mul_(LOG2E).exp2_()


def _row_forward_lean(logits, labels, inv_temp, ignore_index: int, stats: int, unit_temp: bool, out) -> None:
    """The forward without entropy / log_sum_sq_probs / KL, into ``out`` [N_OUT, N]."""
    V = logits.shape[-1]
    N = out.shape[1]
    cdt = out.dtype
    ignored, bad, y = _label_info(labels, V, ignore_index)
    y = y.unsqueeze(1)
    m = torch.empty(N, dtype=cdt, device=logits.device)
    s = torch.empty_like(m)
    d_y = torch.empty(N, 1, dtype=cdt, device=logits.device)
    rows = _rows_per_block(V, cdt)
    t_buf = _Scratch(rows, V, cdt, logits.device)
    direct = unit_temp and logits.dtype == cdt  # x is the logits block: read it, never write it
    for r0, r1, (z,) in row_blocks([logits], rows):
        t = t_buf("t", r1 - r0)
        x = z if direct else _scaled(z, inv_temp[r0:r1], unit_temp, t)
        if stats & STAT_MEAN:
            torch.mean(x, -1, out=out[OUT_MEAN, r0:r1])
        if stats & STAT_ARGMAX:
            out[OUT_ARGMAX, r0:r1] = (x.argmax(-1) == y[r0:r1, 0]).to(cdt)
        torch.amax(x, -1, out=m[r0:r1])
        torch.sub(x, m[r0:r1].unsqueeze(1), out=t)
        torch.gather(t, 1, y[r0:r1], out=d_y[r0:r1])  # x_y - m, rounded as log_softmax rounds it
        torch.sum(_exp_(t), -1, out=s[r0:r1])
    # an all -inf row: m = -inf, x - m = NaN, so s and log p are NaN (as log_softmax's), lse -inf;
    # NaN or +inf in a row gives NaN
    log_s = s.log()
    out[OUT_LOGP] = torch.where(bad, float("nan"), d_y.squeeze(1) - log_s)
    out[OUT_LSE], out[OUT_LSE_LO] = lse_pair(m, log_s, cdt)
    if stats & STAT_ARGMAX:
        out[OUT_ARGMAX].masked_fill_(bad, 0.0)
    out.masked_fill_(ignored.unsqueeze(0), 0.0)


def _row_forward_impl(logits, labels, inv_temp, ignore_index: int, stats: int, ref_logits=None) -> torch.Tensor:
    V = logits.shape[-1]
    N = num_rows(logits)
    cdt = compute_dtype(logits.dtype)
    out = torch.zeros(N_OUT, N, dtype=cdt, device=logits.device)
    if N == 0:
        return out
    unit_temp = bool((inv_temp == 1).all())
    if not stats & (STAT_ENTROPY | STAT_LSSP | STAT_KL):
        _row_forward_lean(logits, labels, inv_temp, ignore_index, stats, unit_temp, out)
        return out
    with_kl = bool(stats & STAT_KL)
    tensors = [logits, ref_logits] if with_kl else [logits]
    rows = _rows_per_block(V, cdt)
    scratch = _Scratch(rows, V, cdt, logits.device)
    for r0, r1, blocks in row_blocks(tensors, rows):
        b = r1 - r0
        it = inv_temp[r0:r1]
        x = _scaled(blocks[0], it, unit_temp, scratch("x", b))
        ls, lse, lse_lo = _log_softmax(x, scratch("ls", b))
        ignored, bad, y = _label_info(labels[r0:r1], V, ignore_index)
        o = out[:, r0:r1]
        o[OUT_LOGP] = torch.where(bad, float("nan"), ls.gather(1, y.unsqueeze(1)).squeeze(1))
        o[OUT_LSE] = lse
        o[OUT_LSE_LO] = lse_lo
        if stats & (STAT_ENTROPY | STAT_LSSP | STAT_KL):
            p = ls.exp()
            if stats & STAT_ENTROPY:
                o[OUT_ENTROPY] = -_masked_dot(p, ls)
            if stats & STAT_LSSP:
                o[OUT_LSSP] = torch.linalg.vecdot(p, p).log()
            if with_kl:
                xr = _scaled(blocks[1], it, unit_temp, scratch("xr", b))
                log_q, ref_lse, _ = _log_softmax(xr, scratch("lq", b))
                o[OUT_KL] = _masked_dot(p, ls - log_q)
                o[OUT_REF_LSE] = ref_lse
        if stats & STAT_MEAN:
            o[OUT_MEAN] = x.mean(-1)
        if stats & STAT_ARGMAX:
            o[OUT_ARGMAX] = (~bad & (x.argmax(-1) == y)).to(cdt)
        if ignored.any():
            o.masked_fill_(ignored.unsqueeze(0), 0.0)
    return out


def _row_backward_lean(logits, labels, inv_temp, lse, lse_lo, grad_logp, ignore_index: int, grad, unit_temp):
    """The gradient of the log-probs alone: inv_t * c * (onehot(y) - p) per row, c = grad_logp.

    p = exp((x - hi) - lo) = exp(x - hi) * exp(-lo): the row factor -c * inv_t * exp(-lo)
    is computed once per row (in fp64), so a block takes x - hi, exp and one multiply, then
    the label column and the ignored rows."""
    V = logits.shape[-1]
    N = num_rows(logits)
    if N == 0:
        return
    cdt = compute_dtype(logits.dtype)
    in_place = grad is logits
    ignored, bad, y = _label_info(labels, V, ignore_index)
    y = y.unsqueeze(1)
    c = grad_logp.to(torch.float64) * inv_temp.to(torch.float64)
    scale = (-c * torch.exp(-lse_lo.to(torch.float64))).to(cdt).unsqueeze(1)
    c_y = torch.where(bad, 0.0, c).to(cdt).unsqueeze(1)  # + c * inv_t at the label (none for a bad one)
    hi = lse.to(cdt).unsqueeze(1)
    it = inv_temp.to(cdt).unsqueeze(1)
    ign_rows = torch.nonzero(ignored).squeeze(1)
    ign_list = ign_rows.tolist()  # one sync per call: which blocks hold ignored rows
    rows = _rows_per_block(V, cdt)
    g_buf = _Scratch(rows, V, cdt, logits.device)
    k = 0
    for r0, r1, (z,) in row_blocks([logits], rows):
        g_out = z if in_place else grad[r0:r1]
        g = g_out if g_out.dtype == cdt else g_buf("g", r1 - r0)
        if unit_temp and z.dtype == cdt:
            torch.sub(z, hi[r0:r1], out=g)  # g may be z itself (in place): elementwise, safe
        else:
            x = _scaled(z, it[r0:r1, 0], unit_temp, g)
            x.sub_(hi[r0:r1])
        _exp_(g).mul_(scale[r0:r1])
        g.scatter_add_(1, y[r0:r1], c_y[r0:r1])
        k0 = k
        while k < len(ign_list) and ign_list[k] < r1:
            k += 1
        if k > k0:  # whatever the row held (NaN, inf), an ignored row's gradient is 0
            g.index_fill_(0, ign_rows[k0:k] - r0, 0.0)
        if g is not g_out:
            g_out.copy_(g)


def _row_backward_impl(
    logits,
    labels,
    inv_temp,
    lse,
    lse_lo,
    entropy,
    grad_logp,
    grad_entropy,
    ignore_index: int,
    grad: torch.Tensor,
    grad_kl=None,
    ref_logits=None,
    ref_lse=None,
    kl=None,
) -> None:
    """Write the gradient into ``grad``: a contiguous ``[N, V]`` tensor, or ``logits`` itself."""
    V = logits.shape[-1]
    cdt = compute_dtype(logits.dtype)
    unit_temp = bool((inv_temp == 1).all())
    in_place = grad is logits
    with_kl = grad_kl is not None
    if grad_entropy is None and not with_kl:
        _row_backward_lean(logits, labels, inv_temp, lse, lse_lo, grad_logp, ignore_index, grad, unit_temp)
        return
    tensors = [logits, ref_logits] if with_kl else [logits]
    rows = _rows_per_block(V, cdt)
    scratch = _Scratch(rows, V, cdt, logits.device)
    for r0, r1, blocks in row_blocks(tensors, rows):
        b = r1 - r0
        z = blocks[0]
        g_out = z if in_place else grad[r0:r1]
        ignored, bad, y = _label_info(labels[r0:r1], V, ignore_index)
        c = grad_logp[r0:r1].to(cdt).unsqueeze(1)
        x = _scaled(z, inv_temp[r0:r1], unit_temp, scratch("x", b))
        # work in the output block when it has the compute dtype; x may alias it (in place)
        g = g_out if g_out.dtype == cdt else scratch("g", b)
        # p from the given lse (not a fresh softmax): a vocabulary shard gets the global lse
        torch.sub(x, lse[r0:r1].to(cdt).unsqueeze(1), out=g)
        g.sub_(lse_lo[r0:r1].to(cdt).unsqueeze(1))  # log p = (x - hi) - lo
        if grad_entropy is None and not with_kl:
            g.exp_().mul_(-c)  # the common case: three passes over a cached block
        else:
            # dL/dx = p * (-c - e (log p + H) + k (log p - log q - KL)); 0 where p == 0
            p = g.exp()
            inner = -c.expand_as(g).clone()
            if grad_entropy is not None:
                e = grad_entropy[r0:r1].to(cdt).unsqueeze(1)
                inner -= e * (g + entropy[r0:r1].to(cdt).unsqueeze(1))
            if with_kl:
                k = grad_kl[r0:r1].to(cdt).unsqueeze(1)
                xr = _scaled(blocks[1], inv_temp[r0:r1], unit_temp, scratch("xr", b))
                log_q = xr - ref_lse[r0:r1].to(cdt).unsqueeze(1)
                # k == 0 contributes nothing, even on a row whose KL is +inf
                inner += torch.where(k != 0, k * (g - log_q - kl[r0:r1].to(cdt).unsqueeze(1)), 0.0)
            g.copy_(torch.where(p == 0, 0.0, p * inner))  # NaN p (a NaN row) stays NaN
        g.scatter_add_(1, y.unsqueeze(1), torch.where(bad.unsqueeze(1), 0.0, c))
        if not unit_temp:
            g.mul_(inv_temp[r0:r1].to(cdt).unsqueeze(1))
        if ignored.any():
            g.masked_fill_(ignored.unsqueeze(1), 0.0)
        if g is not g_out:
            g_out.copy_(g)


@torch.library.custom_op("prefopt_fast::torch_row_forward", mutates_args=())
def row_forward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    ignore_index: int,
    stats: int,
    ref_logits: Optional[torch.Tensor],
) -> torch.Tensor:
    return _row_forward_impl(logits, labels, inv_temp, ignore_index, stats, ref_logits)


@row_forward_op.register_fake
def _(logits, labels, inv_temp, ignore_index, stats, ref_logits):
    return logits.new_empty((N_OUT, labels.shape[0]), dtype=compute_dtype(logits.dtype))


@torch.library.custom_op("prefopt_fast::torch_row_backward", mutates_args=())
def row_backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    ignore_index: int,
    grad_kl: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    ref_lse: Optional[torch.Tensor],
    kl: Optional[torch.Tensor],
) -> torch.Tensor:
    grad = torch.empty((num_rows(logits), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
    _row_backward_impl(
        logits,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        grad,
        grad_kl,
        ref_logits,
        ref_lse,
        kl,
    )
    return grad.view(logits.shape)


@row_backward_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("prefopt_fast::torch_row_backward_", mutates_args=("logits",))
def row_backward_inplace_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    ignore_index: int,
    grad_kl: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    ref_lse: Optional[torch.Tensor],
    kl: Optional[torch.Tensor],
) -> None:
    _row_backward_impl(
        logits,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        logits,
        grad_kl,
        ref_logits,
        ref_lse,
        kl,
    )


def row_forward(logits, labels, inv_temp, ignore_index: int, stats: int, ref_logits=None) -> torch.Tensor:
    return row_forward_op(logits, labels, inv_temp, ignore_index, stats, ref_logits)


def row_backward(
    logits,
    labels,
    inv_temp,
    lse,
    lse_lo,
    entropy,
    grad_logp,
    grad_entropy,
    ignore_index: int,
    inplace: bool,
    grad_kl=None,
    ref_logits=None,
    ref_lse=None,
    kl=None,
) -> torch.Tensor:
    args = (
        logits,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy,
        grad_logp,
        grad_entropy,
        ignore_index,
        grad_kl,
        ref_logits,
        ref_lse,
        kl,
    )
    if inplace:
        row_backward_inplace_op(*args)
        return logits
    return row_backward_op(*args)
