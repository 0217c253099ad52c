"""Forward row kernel: log-prob of the label, logsumexp and optional row statistics.

One program per row (1-D grid of N programs); the row is read once in BLOCK_V tiles.
Every tile is shifted by one running scalar ``c`` (the row max so far), so the sums can
be kept per lane and reduced once at the end: the only per-tile reduction is the max.
Per-lane accumulators, relative to the shift c, over the elements x seen so far:
    s = sum e,  t = sum e (x - c),  q = sum e^2,   e = exp(x - c)
so LSE = c + log S, H = log S - T / S, log sum p^2 = log Q - 2 log S (S, T, Q the lane
sums): no cancellation at large magnitudes. With the exact-KL extension the reference
row xr is read alongside, with its own shift cr and sums
    sr = sum exp(xr - cr),  w = sum e ((x - c) - (xr - cr))
so REF_LSE = cr + log SR and KL(p || q) = W / S - log S + log SR.
Semantics: ``prefopt_fast._rows``.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from prefopt_fast import _rows

_OUT_LOGP = tl.constexpr(_rows.OUT_LOGP)
_OUT_LSE = tl.constexpr(_rows.OUT_LSE)
_OUT_ENTROPY = tl.constexpr(_rows.OUT_ENTROPY)
_OUT_LSSP = tl.constexpr(_rows.OUT_LSSP)
_OUT_MEAN = tl.constexpr(_rows.OUT_MEAN)
_OUT_ARGMAX = tl.constexpr(_rows.OUT_ARGMAX)
_OUT_KL = tl.constexpr(_rows.OUT_KL)
_OUT_REF_LSE = tl.constexpr(_rows.OUT_REF_LSE)
_OUT_LSE_LO = tl.constexpr(_rows.OUT_LSE_LO)


def _interpreting() -> bool:
    # the same switch triton.jit reads when this module is imported
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


# x = z * inv_temp must be rounded to fp32 before x - max, x - lse, sum x: contracted into an
# FMA with the subtraction (LLVM and ptxas both do it under enable_fp_fusion) the log-prob
# of a row's maximum came out slightly positive at temperature != 1. mul.rn.f32 is never
# contracted, and is the same FMUL as mul.f32, so the rest of the kernel keeps its FMAs
# (tools/triton_aot_check.py checks the PTX). The interpreter rounds every numpy product;
# ROCm has no PTX, so there contraction is turned off for the whole kernel instead.
_MUL_RN_PTX = tl.constexpr(not _interpreting() and torch.version.hip is None)
FP_FUSION = torch.version.hip is None  # enable_fp_fusion of every launch (and of the AOT check)


@triton.jit
def scale(z, it):
    """fl32(z * it) for fp32 z (any shape) and scalar it, never fused into a later add."""
    if _MUL_RN_PTX:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [z, it], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return z * it


# Compiled flag sets. A request is rounded up to the first set containing it (unrequested
# output rows are unspecified), so the GPU compiles at most 3 variants per dtype (x2 for
# KL) instead of 32; the extra statistics cost a few flops per element of a memory-bound
# kernel. KL is never added unasked: it reads a second tensor.
_STATS4 = _rows.STAT_ENTROPY | _rows.STAT_LSSP | _rows.STAT_MEAN | _rows.STAT_ARGMAX
SUPPORTED_STATS = _STATS4 | _rows.STAT_KL
STAT_VARIANTS = tuple(base | kl for kl in (0, _rows.STAT_KL) for base in (0, _rows.STAT_ENTROPY, _STATS4))


def stats_variant(stats: int) -> int:
    """Smallest compiled flag set containing ``stats`` (bit mask of ``_rows.STAT_*``)."""
    if stats & ~SUPPORTED_STATS:
        raise ValueError(f"stats: unknown bits {stats & ~SUPPORTED_STATS:#x} in {stats:#x}")
    for v in STAT_VARIANTS:
        if stats & ~v == 0 and (v ^ stats) & _rows.STAT_KL == 0:
            return v
    raise AssertionError("unreachable")


def stat_flags(stats: int) -> dict:
    """The kernel's constexpr flags for a bit mask of ``_rows.STAT_*``."""
    return dict(
        ENTROPY=bool(stats & _rows.STAT_ENTROPY),
        LSSP=bool(stats & _rows.STAT_LSSP),
        MEAN=bool(stats & _rows.STAT_MEAN),
        ARGMAX=bool(stats & _rows.STAT_ARGMAX),
        KL=bool(stats & _rows.STAT_KL),
    )


@triton.jit
def _load_tile(ptr, offs, V, it, MASKED: tl.constexpr):
    """x = z * inv_temp in fp32; -inf in the padding lanes, which then add exp(-inf) = 0."""
    if MASKED:
        z = tl.load(ptr + offs, mask=offs < V, other=float("-inf"))
    else:
        z = tl.load(ptr + offs)
    return scale(z.to(tl.float32), it)


@triton.jit
def _shift(m):
    # While every value so far is -inf, shift by 0: exp(-inf - 0) = 0, not NaN.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _tile(
    row_ptr,
    ref_ptr,
    start,
    V,
    it,
    m,
    s,
    t,
    q,
    xsum,
    best_i,
    mr,
    sr,
    w,
    BLOCK_V: tl.constexpr,
    MASKED: tl.constexpr,
    ENTROPY: tl.constexpr,
    LSSP: tl.constexpr,
    MEAN: tl.constexpr,
    ARGMAX: tl.constexpr,
    KL: tl.constexpr,
):
    offs = start + tl.arange(0, BLOCK_V)
    x = _load_tile(row_ptr, offs, V, it, MASKED)
    if ARGMAX:
        # NaN counts as +inf for the argmax, explicitly, so that the result does not
        # depend on whether the hardware max propagates NaN (LSE is NaN either way)
        xa = tl.where(x != x, float("inf"), x)
    else:
        xa = x
    m_tile = tl.max(xa, axis=0)
    m_new = tl.maximum(m, m_tile)
    # NaN or +inf in the row turns s into NaN through exp(NaN) or exp(inf - inf),
    # whether or not the hardware max propagates NaN: LSE and LOGP come out NaN.
    c = _shift(m)
    c_new = _shift(m_new)
    # nothing to rescale while every value so far is -inf (s, t, q, w are 0): exp(c - c_new)
    # would overflow for a first tile far below zero and make 0 * inf = NaN
    alpha = tl.where(m == float("-inf"), 1.0, tl.exp(c - c_new))
    e = tl.exp(x - c_new)
    if ENTROPY:
        # e == 0 where x == -inf: count 0 instead of 0 * -inf
        t = alpha * (t + (c - c_new) * s) + tl.where(e > 0, e * (x - c_new), 0.0)
    if KL:
        xr = _load_tile(ref_ptr, offs, V, it, MASKED)
        mr_new = tl.maximum(mr, tl.max(xr, axis=0))
        cr = _shift(mr)
        cr_new = _shift(mr_new)
        # e > 0 with xr == -inf (q == 0) gives +inf: KL = +inf, as it should
        w = alpha * (w + ((c - c_new) - (cr - cr_new)) * s) + tl.where(e > 0, e * ((x - c_new) - (xr - cr_new)), 0.0)
        sr = sr * tl.where(mr == float("-inf"), 1.0, tl.exp(cr - cr_new)) + tl.exp(xr - cr_new)
        mr = mr_new
    s = s * alpha + e
    if LSSP:
        q = q * (alpha * alpha) + e * e
    if MEAN:
        if MASKED:
            xsum += tl.where(offs < V, x, 0.0)
        else:
            xsum += x
    if ARGMAX:
        # strict >: an earlier tile keeps the first index of the max
        first = tl.min(tl.where(xa == m_tile, offs, 2147483647), axis=0)
        best_i = tl.where(m_tile > m, first, best_i)
    return m_new, s, t, q, xsum, best_i, mr, sr, w


@triton.jit(do_not_specialize=["N", "V", "ignore_index"])
def row_forward_kernel(
    logits_ptr,  # *T    base of the logits (T = fp32 / fp16 / bf16)
    row_off_ptr,  # *i64  [N] element offset of each row from logits_ptr
    ref_ptr,  # *T    base of the reference logits (read only when KL)
    ref_off_ptr,  # *i64  [N] element offset of each reference row (read only when KL)
    labels_ptr,  # *i64  [N]
    inv_temp_ptr,  # *fp32 [N]
    out_ptr,  # *fp32 [N_OUT, N] contiguous
    N,  # rows
    V,  # vocabulary (row length, stride 1)
    ignore_index,
    BLOCK_V: tl.constexpr,  # tile length, power of two
    ALIGN: tl.constexpr,  # every row offset (of both tensors) is a multiple of ALIGN elements
    ENTROPY: tl.constexpr,
    LSSP: tl.constexpr,
    MEAN: tl.constexpr,
    ARGMAX: tl.constexpr,
    KL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    it = tl.load(inv_temp_ptr + row)
    off = tl.load(row_off_ptr + row)
    if KL:
        ref_off = tl.load(ref_off_ptr + row)
    else:
        ref_off = off
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
        ref_off = tl.multiple_of(ref_off, ALIGN)
    row_ptr = logits_ptr + off
    ref_row_ptr = ref_ptr + ref_off
    ignored = y == ignore_index

    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    q = tl.zeros([BLOCK_V], tl.float32)
    xsum = tl.zeros([BLOCK_V], tl.float32)
    best_i = tl.full([], 0, tl.int32)  # a row of only -inf has its argmax at 0, as in torch
    mr = tl.full([], float("-inf"), tl.float32)
    sr = tl.zeros([BLOCK_V], tl.float32)
    w = tl.zeros([BLOCK_V], tl.float32)

    # ignored rows are not read at all
    v_lim = tl.where(ignored, 0, V)
    n_full = v_lim // BLOCK_V
    for i in range(0, n_full):
        m, s, t, q, xsum, best_i, mr, sr, w = _tile(
            row_ptr,
            ref_row_ptr,
            i * BLOCK_V,
            V,
            it,
            m,
            s,
            t,
            q,
            xsum,
            best_i,
            mr,
            sr,
            w,
            BLOCK_V,
            False,
            ENTROPY,
            LSSP,
            MEAN,
            ARGMAX,
            KL,
        )
    if n_full * BLOCK_V < v_lim:
        m, s, t, q, xsum, best_i, mr, sr, w = _tile(
            row_ptr,
            ref_row_ptr,
            n_full * BLOCK_V,
            V,
            it,
            m,
            s,
            t,
            q,
            xsum,
            best_i,
            mr,
            sr,
            w,
            BLOCK_V,
            True,
            ENTROPY,
            LSSP,
            MEAN,
            ARGMAX,
            KL,
        )

    s_row = tl.sum(s, axis=0)
    log_s = tl.log(s_row)
    # lse = shift + log s as an fp32 pair (TwoSum: lse_lo is the exact rounding error of
    # lse), so the backward's (x - lse) - lse_lo keeps p's precision at any magnitude
    c_row = _shift(m)
    lse = c_row + log_s
    b_part = lse - c_row
    lse_lo = (c_row - (lse - b_part)) + (log_s - b_part)
    lse_lo = tl.where((lse - lse) == 0.0, lse_lo, 0.0)  # 0 where lse is not finite
    # masked: an out-of-range label is never read
    in_range = (y >= 0) & (y < V)
    x_y = scale(tl.load(row_ptr + y, mask=in_range & (~ignored), other=0.0).to(tl.float32), it)
    # (x_y - shift) - log s, not x_y - lse: no cancellation of the large shift at |x| >> 1
    logp = tl.where(in_range, (x_y - _shift(m)) - log_s, float("nan"))

    col = out_ptr + row
    stride = N.to(tl.int64)
    tl.store(col + _OUT_LOGP * stride, tl.where(ignored, 0.0, logp))
    tl.store(col + _OUT_LSE * stride, tl.where(ignored, 0.0, lse))
    tl.store(col + _OUT_LSE_LO * stride, tl.where(ignored, 0.0, lse_lo))
    if ENTROPY:
        h = log_s - tl.sum(t, axis=0) / s_row
        tl.store(col + _OUT_ENTROPY * stride, tl.where(ignored, 0.0, h))
    if LSSP:
        lssp = tl.log(tl.sum(q, axis=0)) - 2.0 * log_s
        tl.store(col + _OUT_LSSP * stride, tl.where(ignored, 0.0, lssp))
    if MEAN:
        mean = tl.sum(xsum, axis=0) / V
        tl.store(col + _OUT_MEAN * stride, tl.where(ignored, 0.0, mean))
    if ARGMAX:
        hit = (best_i == y) & (~ignored)
        tl.store(col + _OUT_ARGMAX * stride, tl.where(hit, 1.0, 0.0))
    if KL:
        log_sr = tl.log(tl.sum(sr, axis=0))
        kl = tl.sum(w, axis=0) / s_row - log_s + log_sr
        tl.store(col + _OUT_KL * stride, tl.where(ignored, 0.0, kl))
        tl.store(col + _OUT_REF_LSE * stride, tl.where(ignored, 0.0, _shift(mr) + log_sr))


def launch(
    logits: torch.Tensor,
    row_off: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: torch.Tensor,
    out: torch.Tensor,
    ignore_index: int,
    flags: int,
    *,
    block_v: int,
    num_warps: int,
    align: int = 1,
    ref_logits: Optional[torch.Tensor] = None,
    ref_row_off: Optional[torch.Tensor] = None,
) -> None:
    """Launch over N = labels.numel() rows (enable_fp_fusion=FP_FUSION, as in the AOT check).

    logits [..., V] fp32/fp16/bf16, last stride 1; row_off int64 [N] (see
    ``_rows.row_offsets``); labels int64 [N]; inv_temp fp32 [N]; out fp32 [N_OUT, N]
    contiguous, filled in place. ``flags``: the compiled ``_rows.STAT_*`` bits; with
    STAT_KL, ``ref_logits`` (shape and dtype of logits, own strides) and its row offsets.
    """
    n = labels.numel()
    if n == 0:
        return
    flags = stat_flags(flags)
    if flags["KL"] and (ref_logits is None or ref_row_off is None):
        raise ValueError("STAT_KL needs ref_logits and ref_row_off")
    if not flags["KL"]:
        ref_logits, ref_row_off = logits, row_off  # never read
    row_forward_kernel[(n,)](
        logits,
        row_off,
        ref_logits,
        ref_row_off,
        labels,
        inv_temp,
        out,
        n,
        logits.shape[-1],
        ignore_index,
        BLOCK_V=block_v,
        ALIGN=align,
        **flags,
        num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )
