"""The one merge of partial row statistics (prefopt_fast._rows: leaf_partial, combine, finish).

A row cut into vocabulary segments, each run through the row kernels alone, must give the
whole row's statistics: folded pairwise in any order (the fused-linear blocks) and reduced
the way a process group does it (MAX of the references, rescale, SUM: the shards).
"""

import math
import random

import pytest
import torch

import prefopt_fast
from prefopt_fast import _rows
from prefopt_fast._dispatch import load_backend
from prefopt_fast._rows import (
    OUT_ARGMAX,
    OUT_ENTROPY,
    OUT_KL,
    OUT_LOGP,
    OUT_LSSP,
    OUT_MEAN,
    OUT_REF_LSE,
    PARTIAL_SUM_FIELDS,
    STAT_ALL,
)

BACKENDS = [b for b in ("torch", "cpu") if b in prefopt_fast.available_backends()]
IGN = -100


def _leaves(be, x, ref, y, inv_temp, cuts, off=None):
    """One leaf Partial per segment [cuts[i], cuts[i+1]) of the rows x [N, V]."""
    leaves = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        inb = (y >= a) & (y < b)
        yb = torch.where(inb, y - a, b - a)
        seg, rseg = x[:, a:b], ref[:, a:b]
        out = be.row_forward(seg, yb, inv_temp, IGN, STAT_ALL, ref_logits=rseg)
        xy = seg.gather(1, yb.clamp(max=b - a - 1).unsqueeze(1)).squeeze(1).float() * inv_temp
        mx = seg.amax(1).float() * inv_temp
        leaves.append(_rows.leaf_partial(out, STAT_ALL, b - a, xy, inb, mx, y >= b, off))
    return leaves


def _as_group(leaves):
    """What all_reduce_partial computes, without a process group: MAX, rescale, SUM."""
    M = torch.stack([p.m for p in leaves]).amax(0)
    MR = torch.stack([p.mr for p in leaves]).amax(0)
    res = [_rows.rescale(p, M, MR) for p in leaves]
    sums = {f: sum(getattr(p, f) for p in res) for f in PARTIAL_SUM_FIELDS}
    mx = torch.stack([p.mx for p in leaves]).amax(0)
    pre = torch.stack([p.pre for p in leaves]).amax(0)
    return res[0]._replace(mx=mx, pre=pre, **sums)


def _fold(leaves, rng):
    """Pairwise combine in a random tree order (associativity and commutativity)."""
    parts = list(leaves)
    while len(parts) > 1:
        i = rng.randrange(len(parts) - 1)
        a, b = parts[i], parts[i + 1]
        parts[i : i + 2] = [_rows.combine(b, a) if rng.random() < 0.5 else _rows.combine(a, b)]
    return parts[0]


def _rows_input(kind, N, V, g):
    x = torch.randn(N, V, generator=g) * 3
    ref = torch.randn(N, V, generator=g) * 3
    if kind == "huge":
        x = x + 1e30  # log s is lost by an fp64 sum m + log s here
        ref = ref + 1e30
    elif kind == "masked":
        x[:, : V // 2] = -math.inf  # whole segments of -inf
        x[0] = -math.inf  # and a row of only -inf
    elif kind == "ties":
        x = torch.zeros(N, V)  # every entry a tied maximum: only the first is the argmax
    return x, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "huge", "masked", "ties"])
@pytest.mark.parametrize("V", [1, 7, 50])
def test_segments_merge_to_the_whole_row(backend, kind, V):
    be = load_backend(backend)
    g = torch.Generator().manual_seed(V)
    rng = random.Random(V)
    N = 6
    x, ref = _rows_input(kind, N, V, g)
    y = torch.randint(0, V, (N,), generator=g)
    y[1] = 0
    y[2] = V - 1
    inv_temp = torch.full((N,), 0.7)
    whole = be.row_forward(x, y, inv_temp, IGN, STAT_ALL, ref_logits=ref)
    cuts = sorted({0, V, *(rng.randrange(1, V) for _ in range(3) if V > 1)})
    leaves = _leaves(be, x, ref, y, inv_temp, cuts)
    for name, part in (("fold", _fold(leaves, rng)), ("group", _as_group(leaves))):
        r = _rows.finish(part, V)
        want = {
            "logp": whole[OUT_LOGP],
            "entropy": whole[OUT_ENTROPY],
            "log_sum_sq_probs": whole[OUT_LSSP],
            "mean_logit": whole[OUT_MEAN],
            "is_argmax": whole[OUT_ARGMAX],
            "kl": whole[OUT_KL],
            "ref_lse": whole[OUT_REF_LSE],
        }
        # tolerances of fp32 kernels; the merge itself is fp64
        for k, w in want.items():
            got = getattr(r, k).float()
            if k == "is_argmax":  # unspecified on a row of only -inf (its log-prob is NaN)
                live = ~torch.isneginf(x).all(1)
                got, w = got[live], w[live]
            if kind == "huge" and k in ("mean_logit", "ref_lse"):
                torch.testing.assert_close(got, w, rtol=1e-6, atol=0, msg=lambda m: f"{name} {k}: {m}")
                continue
            if kind == "huge" and k == "kl":
                # known limit: REF_LSE has no low part, so a merged KL inherits ulp(|ref lse|)
                # (1e23 here; 2e-6 at logits ~30) -- the whole-row kernel does not
                continue
            torch.testing.assert_close(got, w, rtol=2e-5, atol=2e-5, equal_nan=True, msg=lambda m: f"{name} {k}: {m}")
        hi, lo = _rows.lse_pair(r.lse_m, r.lse_log_s, torch.float32)
        lse64 = torch.logsumexp(x.double() * 0.7, 1)
        if kind == "huge":  # every x_v rounds to the same c: lse = c + log V, log V below ulp(c)
            c = (x[:, 0] * 0.7).double()
            torch.testing.assert_close(
                (hi.double() - c) + lo.double(), torch.full_like(c, math.log(V)), atol=1e-5, rtol=0
            )
        elif kind != "masked":
            torch.testing.assert_close(hi.double() + lo.double(), lse64, rtol=1e-12, atol=1e-5)


def test_nan_propagates_and_identity():
    be = load_backend("torch")
    x = torch.randn(3, 8)
    x[1, 6] = math.nan
    y = torch.tensor([2, 2, 7])
    it = torch.ones(3)
    leaves = _leaves(be, x, x.clone(), y, it, [0, 4, 8])
    r = _rows.finish(_rows.combine(leaves[0], leaves[1]), 8)
    assert torch.isnan(r.logp[1]) and torch.isfinite(r.logp[[0, 2]]).all()
    # the empty Partial is the identity of combine
    e = _rows.empty_partial(3, STAT_ALL, x.device)
    a = _rows.finish(_rows.combine(leaves[0], leaves[1]), 8)
    b = _rows.finish(_rows.combine(e, _rows.combine(leaves[0], leaves[1])), 8)
    for f, u, v in zip(a._fields, a, b):
        torch.testing.assert_close(u, v, equal_nan=True, msg=lambda m: f"{f}: {m}")
