"""The row-kernel contract's fp64 reference (prefopt_fast.reference laid out as the output rows
of prefopt_fast._rows), used by the CPU and CUDA kernel tests, and the awkward inputs the CUDA tests feed every implementation: shapes that
exercise each load path, rows with NaN / inf / -inf / huge values, ties, labels ignored or
out of range."""

import math

import torch

from prefopt_fast import reference as R
from prefopt_fast._rows import (
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
    split_lse,
)

# prefopt_fast.reference's statistic -> output row of the contract
ROWS = {
    "logprobs": OUT_LOGP,
    "entropy": OUT_ENTROPY,
    "log_sum_sq_probs": OUT_LSSP,
    "mean_logit": OUT_MEAN,
    "is_argmax": OUT_ARGMAX,
    "kl": OUT_KL,
    "ref_lse": OUT_REF_LSE,
}
IGN = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _x64(z, it):
    """x = z * inv_temp in fp32 (as the contract says), then fp64; [N, V]."""
    return (z.reshape(-1, z.shape[-1]).float() * it[:, None].float()).double()


def ref_forward(z, y, it, ignore=IGN, zr=None):
    """fp64 [N_OUT, N], every statistic (KL rows only with zr): prefopt_fast.reference's
    token statistics of x = fl32(z * inv_temp), laid out as the row contract's outputs. LSE
    and LSE_LO are the fp32 pair of the exact lse (their fp64 sum is the lse to ~fp64)."""
    z, y, it = z.cpu(), y.cpu(), it.cpu()
    st = R.token_stats(_x64(z, it), y, ignore_index=ignore, ref_logits=None if zr is None else _x64(zr.cpu(), it))
    out = torch.zeros(N_OUT, y.shape[0], dtype=torch.float64)
    for name, row in ROWS.items():
        if name in st:
            out[row] = st[name].double()
    hi, lo = split_lse(st["lse"], torch.float32)
    out[OUT_LSE], out[OUT_LSE_LO] = hi.double(), lo.double()
    out[:, y == ignore] = 0
    return out


def ref_backward(z, y, it, lse, H, c, e=None, ignore=IGN, zr=None, k=None, rlse=None, kl=None, lse_lo=None):
    """fp64 [N, V] gradient of the contract's formula (lse + lse_lo the row's logsumexp):
    prefopt_fast.reference.row_backward at x = fl32(z * inv_temp), times inv_temp."""
    z, y, it = z.cpu(), y.cpu(), it.cpu()
    d = lambda t: None if t is None else t.cpu().double()  # noqa: E731
    g = R.row_backward(
        _x64(z, it),
        y,
        d(lse) + (0.0 if lse_lo is None else d(lse_lo)),
        d(c),
        entropy=d(H) if e is not None else None,
        grad_entropy=d(e),
        ref_x=None if k is None else _x64(zr.cpu(), it),
        ref_lse=d(rlse) if k is not None else None,
        kl=d(kl) if k is not None else None,
        grad_kl=d(k),
        ignore_index=ignore,
    )
    return g * it.double()[:, None]


def stat_rows(stats, kl=False):
    rows = [OUT_LOGP, OUT_LSE]
    for bit, r in (
        (STAT_ENTROPY, OUT_ENTROPY),
        (STAT_LSSP, OUT_LSSP),
        (STAT_MEAN, OUT_MEAN),
        (STAT_ARGMAX, OUT_ARGMAX),
    ):
        if stats & bit:
            rows.append(r)
    if kl or stats & STAT_KL:
        rows += [OUT_KL, OUT_REF_LSE]
    return rows


def assert_forward(out, ref, stats, rtol=3e-5, atol=3e-5, what=""):
    for r in stat_rows(stats):
        torch.testing.assert_close(
            out[r].cpu().double(),
            ref[r],
            rtol=rtol,
            atol=atol,
            equal_nan=True,
            msg=lambda m, r=r: f"{what} output row {r}: {m}",
        )
    # LSE + LSE_LO: the lse to the accuracy of the fp32 exp-sums, at any magnitude
    lse = out[OUT_LSE].cpu().double() + out[OUT_LSE_LO].cpu().double()
    torch.testing.assert_close(
        lse,
        ref[OUT_LSE] + ref[OUT_LSE_LO],
        rtol=0,
        atol=2e-6,
        equal_nan=True,
        msg=lambda m: f"{what} LSE + LSE_LO: {m}",
    )


def grad_tol(dtype):
    return {torch.float32: 3e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]


def assert_grad(g, ref, dtype, what=""):
    fin = torch.isfinite(ref)
    scale = max(ref[fin].abs().max().item(), 1e-30) if fin.any() else 1.0
    torch.testing.assert_close(
        g.cpu().double().reshape(ref.shape),
        ref,
        rtol=grad_tol(dtype),
        atol=1e-6 * scale,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def make(shape, dtype, scale=3.0, device="cpu"):
    return (torch.randn(shape) * scale).to(dtype).to(device)


def special_rows(dtype, V, big=None):
    """[R, V] rows of the given dtype, each an edge case (V >= 8). ``big``: the huge
    magnitude of row 4 (default: near the dtype's max). Reference logits for the KL take
    a smaller one: with +-3e38 in a reference row, (x - c) - (xr - cr) overflows fp32 and
    the KL comes out +inf (as in the torch backend's fp32 math)."""
    if big is None:
        big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float16: 6e4}[dtype]
    rows = torch.randn(11, V) * 3
    rows[0, V // 3] = math.nan  # NaN -> NaN row
    rows[1, 2] = math.inf  # +inf -> NaN row
    rows[2, ::2] = -math.inf  # -inf entries (p = 0)
    rows[3] = -math.inf  # only -inf -> NaN log-prob
    rows[4, 1] = big  # huge positive
    rows[4, 3] = -big  #   and negative in one row
    rows[5] = rows[5] * 1e-3 + 30.0  # large offset
    rows[6, 5] = 80.0  # a confident row: p ~ 1
    rows[7] = 1.0
    rows[7, [1, V - 2]] = 5.0  # a tie: the first index is the argmax
    rows[8, V - 1] = math.nan  # NaN last, after the max
    rows[8, 0] = math.inf  # and +inf first
    rows[9, : V // 2] = -math.inf  # -inf first half
    rows[10] = rows[10] * 50  # wide spread
    return rows.to(dtype)


def special_labels(V):
    return torch.tensor([V // 3, 2, 0, 1, 1, 4, 5, 1, V - 1, V - 1, V + 7], dtype=torch.int64)
