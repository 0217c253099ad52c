"""The ``torch`` backend: the row kernels as chunked pure PyTorch (any device).

The reference implementation and the fallback. Rows are processed in blocks of about
``BLOCK_ELEMS`` elements so each block's temporaries stay in the last-level cache and
nothing of size N x V is ever allocated (besides the gradient itself). Computes in fp32,
or fp64 for fp64 logits (so ``torch.autograd.gradcheck`` can run through it).
"""
from typing import Optional

import torch

from .._blocks import row_blocks
from .._rows import N_OUT, OUT_ARGMAX, OUT_ENTROPY, OUT_LOGP, OUT_LSE, OUT_LSSP, OUT_MEAN
from .._rows import STAT_ARGMAX, STAT_ENTROPY, STAT_LSSP, STAT_MEAN, num_rows

NAME = "torch"
# ~4M elements: 16 MiB of fp32 temporaries per block, inside a 32 MiB L3, and few
# enough blocks that Python overhead stays small next to the memory traffic.
BLOCK_ELEMS = 1 << 22


def is_available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


def supports(logits: torch.Tensor) -> Optional[str]:
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_block(V: int) -> int:
    return max(1, BLOCK_ELEMS // max(V, 1))


def _scaled(z: torch.Tensor, inv_t: torch.Tensor, unit_temp: bool, cdt: torch.dtype) -> torch.Tensor:
    """x = z * inv_t in the compute dtype; aliases z when no conversion is needed."""
    if unit_temp:
        return z if z.dtype == cdt else z.to(cdt)
    return torch.mul(z, inv_t.to(cdt).unsqueeze(1))


def _label_info(y: torch.Tensor, V: int, ignore_index: int):
    ignored = y == ignore_index
    bad = ~ignored & ((y < 0) | (y >= V))
    safe = torch.where(ignored | bad, 0, y)
    return ignored, bad, safe


def _row_forward_impl(logits, labels, inv_temp, ignore_index: int, stats: int) -> torch.Tensor:
    V = logits.shape[-1]
    N = num_rows(logits)
    cdt = compute_dtype(logits.dtype)
    out = torch.zeros(N_OUT, N, dtype=cdt, device=logits.device)
    if N == 0:
        return out
    unit_temp = bool((inv_temp == 1).all())
    nan = float("nan")
    for r0, r1, z in row_blocks(logits, _rows_per_block(V)):
        x = _scaled(z, inv_temp[r0:r1], unit_temp, cdt)
        ignored, bad, y = _label_info(labels[r0:r1], V, ignore_index)
        lse = torch.logsumexp(x, -1)
        # NaN or +inf anywhere in a row makes the whole row NaN, as log_softmax does
        lse = torch.where(torch.isposinf(lse), nan, lse)
        logp = x.gather(1, y.unsqueeze(1)).squeeze(1) - lse
        logp = torch.where(bad, nan, logp)
        o = out[:, r0:r1]
        o[OUT_LOGP] = logp
        o[OUT_LSE] = lse
        if stats & (STAT_ENTROPY | STAT_LSSP):
            logp_all = x - lse.unsqueeze(1)
            p = logp_all.exp()
            if stats & STAT_ENTROPY:
                # p == 0 exactly where logp_all is -inf (or underflows); the finite floor
                # only turns 0 * -inf into 0, it never changes a term that counts
                logp_all.clamp_min_(torch.finfo(cdt).min)
                o[OUT_ENTROPY] = -torch.linalg.vecdot(p, logp_all)
            if stats & STAT_LSSP:
                o[OUT_LSSP] = torch.linalg.vecdot(p, p).log()
        if stats & STAT_MEAN:
            o[OUT_MEAN] = x.mean(-1)
        if stats & STAT_ARGMAX:
            o[OUT_ARGMAX] = (x.argmax(-1) == y).to(cdt)
        o.masked_fill_(ignored.unsqueeze(0), 0.0)
    return out


def _row_backward_impl(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy,
                       ignore_index: int, grad: torch.Tensor) -> None:
    """Write the gradient into ``grad``: a contiguous ``[N, V]`` tensor, or ``logits`` itself."""
    V = logits.shape[-1]
    cdt = compute_dtype(logits.dtype)
    unit_temp = bool((inv_temp == 1).all())
    rows = _rows_per_block(V)
    in_place = grad is logits
    for r0, r1, z in row_blocks(logits, rows):
        g_out = z if in_place else grad[r0:r1]
        ignored, bad, y = _label_info(labels[r0:r1], V, ignore_index)
        c = grad_logp[r0:r1].to(cdt)
        it = inv_temp[r0:r1].to(cdt).unsqueeze(1)
        x = _scaled(z, inv_temp[r0:r1], unit_temp, cdt)
        # work in the output block when it has the compute dtype; x may alias it (in place)
        g = g_out if g_out.dtype == cdt else torch.empty_like(x)
        torch.sub(x, lse[r0:r1].to(cdt).unsqueeze(1), out=g)  # log p
        if grad_entropy is not None:
            e = grad_entropy[r0:r1].to(cdt).unsqueeze(1)
            h = entropy[r0:r1].to(cdt).unsqueeze(1)
            p = g.exp()
            # dL/dx = -p * (c + e * (log p + H)); floor log p so p == 0 gives 0, not 0 * inf
            g.clamp_min_(-1e4).add_(h).mul_(e).add_(c.unsqueeze(1)).mul_(p).neg_()
        else:
            g.exp_().mul_(-c.unsqueeze(1))
        g.scatter_add_(1, y.unsqueeze(1), torch.where(bad, 0.0, c).unsqueeze(1))
        if not unit_temp:
            g.mul_(it)
        g.masked_fill_(ignored.unsqueeze(1), 0.0)
        if g is not g_out:
            g_out.copy_(g)


@torch.library.custom_op("prefopt_fast::torch_row_forward", mutates_args=())
def row_forward_op(logits: torch.Tensor, labels: torch.Tensor, inv_temp: torch.Tensor,
                   ignore_index: int, stats: int) -> torch.Tensor:
    return _row_forward_impl(logits, labels, inv_temp, ignore_index, stats)


@row_forward_op.register_fake
def _(logits, labels, inv_temp, ignore_index, stats):
    return logits.new_empty((N_OUT, labels.shape[0]), dtype=compute_dtype(logits.dtype))


@torch.library.custom_op("prefopt_fast::torch_row_backward", mutates_args=())
def row_backward_op(logits: torch.Tensor, labels: torch.Tensor, inv_temp: torch.Tensor,
                    lse: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor,
                    grad_entropy: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    V = logits.shape[-1]
    grad = torch.empty((num_rows(logits), V), dtype=logits.dtype, device=logits.device)
    _row_backward_impl(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index, grad)
    return grad.view(logits.shape)


@row_backward_op.register_fake
def _(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("prefopt_fast::torch_row_backward_", mutates_args=("logits",))
def row_backward_inplace_op(logits: torch.Tensor, labels: torch.Tensor, inv_temp: torch.Tensor,
                            lse: torch.Tensor, entropy: torch.Tensor, grad_logp: torch.Tensor,
                            grad_entropy: Optional[torch.Tensor], ignore_index: int) -> None:
    _row_backward_impl(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index, logits)


def row_forward(logits, labels, inv_temp, ignore_index: int, stats: int) -> torch.Tensor:
    return row_forward_op(logits, labels, inv_temp, ignore_index, stats)


def row_backward(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy,
                 ignore_index: int, inplace: bool) -> torch.Tensor:
    if inplace:
        row_backward_inplace_op(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index)
        return logits
    return row_backward_op(logits, labels, inv_temp, lse, entropy, grad_logp, grad_entropy, ignore_index)
