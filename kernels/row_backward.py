"""Backward row kernel: gradient of (log-prob, entropy) with respect to a logits row.

One program per row (1-D grid of N programs). p is recomputed from the saved LSE pair,
p_v = exp((x_v - lse) - lse_lo) (x_v - lse exact where p_v matters):
    grad_v = inv_temp * (c (1[v == y] - p_v) - e p_v (x_v - lse + H)
                         + k p_v (log p_v - log q_v - KL))
(the k-term only with the exact-KL extension, log q_v = xr_v - ref_lse read from the
reference logits), written in the logits dtype into a fresh contiguous buffer or over
the logits themselves (INPLACE). Semantics: ``prefopt_fast._rows``.
"""

import torch
import triton
import triton.language as tl

from .row_forward import FP_FUSION, scale


@triton.jit
def _tile(
    row_ptr,
    ref_row_ptr,
    g_ptr,
    start,
    V,
    y,
    it,
    lse,
    lse_lo,
    h,
    c,
    e,
    ref_lse,
    kl,
    k,
    BLOCK_V: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_ENT: tl.constexpr,
    HAS_KL: tl.constexpr,
):
    offs = start + tl.arange(0, BLOCK_V)
    if MASKED:
        z = tl.load(row_ptr + offs, mask=offs < V, other=0.0)
    else:
        z = tl.load(row_ptr + offs)
    d = (scale(z.to(tl.float32), it) - lse) - lse_lo  # x rounded first: see row_forward.scale
    p = tl.exp(d)
    g = tl.where(offs == y, c, 0.0) - c * p
    if HAS_ENT:
        # p == 0 where x == -inf: the term is 0, not 0 * -inf. A NaN p (NaN row) still
        # reaches g through the c-term, even with c == 0.
        g -= e * tl.where(p > 0, p * (d + h), 0.0)
    if HAS_KL:
        if MASKED:
            zr = tl.load(ref_row_ptr + offs, mask=offs < V, other=0.0)
        else:
            zr = tl.load(ref_row_ptr + offs)
        log_q = scale(zr.to(tl.float32), it) - ref_lse
        g += k * tl.where(p > 0, p * (d - log_q - kl), 0.0)
    g = (g * it).to(g_ptr.dtype.element_ty)
    if MASKED:
        tl.store(g_ptr + offs, g, mask=offs < V)
    else:
        tl.store(g_ptr + offs, g)


@triton.jit
def _zero_tile(g_ptr, start, V, BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], g_ptr.dtype.element_ty)
    if MASKED:
        tl.store(g_ptr + offs, zero, mask=offs < V)
    else:
        tl.store(g_ptr + offs, zero)


@triton.jit(do_not_specialize=["V", "ignore_index"])
def row_backward_kernel(
    logits_ptr,  # *T    base of the logits (T = fp32 / fp16 / bf16)
    row_off_ptr,  # *i64  [N] element offset of each row from logits_ptr
    grad_ptr,  # *T    contiguous [N, V] gradient; == logits_ptr when INPLACE
    labels_ptr,  # *i64  [N]
    inv_temp_ptr,  # *fp32 [N]
    lse_ptr,  # *fp32 [N]
    lse_lo_ptr,  # *fp32 [N] low part of the lse
    ent_ptr,  # *fp32 [N] (read only when HAS_ENT)
    grad_logp_ptr,  # *fp32 [N]
    grad_ent_ptr,  # *fp32 [N] (read only when HAS_ENT)
    ref_ptr,  # *T    base of the reference logits (read only when HAS_KL)
    ref_off_ptr,  # *i64  [N] element offset of each reference row (HAS_KL)
    ref_lse_ptr,  # *fp32 [N] (HAS_KL)
    kl_ptr,  # *fp32 [N] (HAS_KL)
    grad_kl_ptr,  # *fp32 [N] (HAS_KL)
    V,  # vocabulary (row length, stride 1)
    ignore_index,
    BLOCK_V: tl.constexpr,  # tile length, power of two
    ALIGN: tl.constexpr,  # every row offset (logits, grad, reference) is a multiple of ALIGN
    HAS_ENT: tl.constexpr,  # entropy term present
    HAS_KL: tl.constexpr,  # KL term present
    INPLACE: tl.constexpr,  # gradient rows at the logits rows' offsets
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    off = tl.load(row_off_ptr + row)
    if INPLACE:
        g_off = off
    else:
        g_off = row * V  # int64: N * V may exceed 2**31
    if HAS_KL:
        ref_off = tl.load(ref_off_ptr + row)
    else:
        ref_off = off
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
        g_off = tl.multiple_of(g_off, ALIGN)
        ref_off = tl.multiple_of(ref_off, ALIGN)
    row_ptr = logits_ptr + off
    ref_row_ptr = ref_ptr + ref_off
    g_ptr = grad_ptr + g_off
    n_full = V // BLOCK_V
    has_tail = n_full * BLOCK_V < V

    if y == ignore_index:
        # not read; its gradient row is written as zeros
        for i in range(0, n_full):
            _zero_tile(g_ptr, i * BLOCK_V, V, BLOCK_V, False)
        if has_tail:
            _zero_tile(g_ptr, n_full * BLOCK_V, V, BLOCK_V, True)
    else:
        it = tl.load(inv_temp_ptr + row)
        lse = tl.load(lse_ptr + row)
        lse_lo = tl.load(lse_lo_ptr + row)
        c = tl.load(grad_logp_ptr + row)
        if HAS_ENT:
            h = tl.load(ent_ptr + row)
            e = tl.load(grad_ent_ptr + row)
        else:
            h = 0.0
            e = 0.0
        if HAS_KL:
            ref_lse = tl.load(ref_lse_ptr + row)
            kl = tl.load(kl_ptr + row)
            k = tl.load(grad_kl_ptr + row)
        else:
            ref_lse = 0.0
            kl = 0.0
            k = 0.0
        for i in range(0, n_full):
            _tile(
                row_ptr,
                ref_row_ptr,
                g_ptr,
                i * BLOCK_V,
                V,
                y,
                it,
                lse,
                lse_lo,
                h,
                c,
                e,
                ref_lse,
                kl,
                k,
                BLOCK_V,
                False,
                HAS_ENT,
                HAS_KL,
            )
        if has_tail:
            _tile(
                row_ptr,
                ref_row_ptr,
                g_ptr,
                n_full * BLOCK_V,
                V,
                y,
                it,
                lse,
                lse_lo,
                h,
                c,
                e,
                ref_lse,
                kl,
                k,
                BLOCK_V,
                True,
                HAS_ENT,
                HAS_KL,
            )


def launch(
    logits: torch.Tensor,
    row_off: torch.Tensor,
    grad,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy,
    ignore_index: int,
    *,
    block_v: int,
    num_warps: int,
    align: int = 1,
    ref_logits=None,
    ref_row_off=None,
    ref_lse=None,
    kl=None,
    grad_kl=None,
) -> None:
    """Launch over N = labels.numel() rows (enable_fp_fusion=FP_FUSION, as in the AOT check).

    logits [..., V] fp32/fp16/bf16, last stride 1; row_off int64 [N]; grad: a contiguous
    tensor of the shape and dtype of logits, or None to write over ``logits`` in place;
    labels int64 [N]; inv_temp, lse, lse_lo, entropy, grad_logp fp32 [N]; grad_entropy fp32 [N]
    or None (no entropy term). KL term: ``grad_kl`` fp32 [N] with ``ref_logits`` (shape
    and dtype of logits, own strides), ``ref_row_off`` int64 [N], ``ref_lse``, ``kl``
    fp32 [N]; or grad_kl None (no KL term).
    """
    n = labels.numel()
    if n == 0:
        return
    inplace = grad is None
    if inplace:
        grad = logits
    has_ent = grad_entropy is not None
    has_kl = grad_kl is not None
    if has_kl and any(v is None for v in (ref_logits, ref_row_off, ref_lse, kl)):
        raise ValueError("the KL term needs ref_logits, ref_row_off, ref_lse and kl")
    if not has_kl:  # never read
        ref_logits, ref_row_off, ref_lse, kl, grad_kl = logits, row_off, lse, lse, lse
    row_backward_kernel[(n,)](
        logits,
        row_off,
        grad,
        labels,
        inv_temp,
        lse,
        lse_lo,
        entropy if has_ent else lse,
        grad_logp,
        grad_entropy if has_ent else grad_logp,
        ref_logits,
        ref_row_off,
        ref_lse,
        kl,
        grad_kl,
        logits.shape[-1],
        ignore_index,
        BLOCK_V=block_v,
        ALIGN=align,
        HAS_ENT=has_ent,
        HAS_KL=has_kl,
        INPLACE=inplace,
        num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )
