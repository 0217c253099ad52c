"""The numerical policy of docs/numerics.md, one test per rule, on every backend present.

Sections follow the document: per-row independence and NaN in -> NaN out (1), infinities
(2), rows whose only finite logit is the label (3), fully masked tokens and sequences (4),
huge magnitudes (5), signs: log-probs never positive (6). Accuracy against fp64 uses the
rule of tools/accuracy_rule.py.
"""

import math

import accuracy_rule as bl  # tools/accuracy_rule.py
import pytest
import torch

import prefopt_fast as pf
import prefopt_fast.reference as R
from prefopt_fast import linear as pfl
from prefopt_fast.reference import STAT_NAMES, naive_token_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAN, INF = math.nan, math.inf


def _tl(z, y, backend, **kw):
    return pf.token_logprobs(z, y, backend=backend, **kw)


def _bits_equal(a, b):
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _grad(z, y, backend, w1, w2, **kw):
    zz = z.detach().clone().requires_grad_()
    o = _tl(zz, y, backend, stats=STAT_NAMES, **kw)
    (g,) = torch.autograd.grad((o.logprobs, o.entropy), zz, (w1, w2))
    return o, g


# ------------------------------------------------------------ 1. NaN in -> NaN out


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_nan_stays_in_its_row(backend, device, dtype):
    """NaN in a real row -> NaN in every float output and gradient of that row; the other
    rows are bitwise what they are without the NaN; an ignored row is not read."""
    V = 70
    clean = (torch.randn(7, V) * 3).to(dtype)
    y = torch.randint(0, V, (7,))
    y[6] = -100
    z = clean.clone()
    z[1, (int(y[1]) + 5) % V] = NAN  # away from the label
    z[2, int(y[2])] = NAN  # at the label
    z[3, :] = NAN  # everywhere
    z[6, 4] = NAN  # ignored row
    nan_rows, good = [1, 2, 3], [0, 4, 5]
    w1, w2 = torch.randn(7, device=device), torch.randn(7, device=device)
    y = y.to(device)
    o, g = _grad(z.to(device), y, backend, w1, w2)
    oc, gc = _grad(clean.to(device), y, backend, w1, w2)
    for name in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit"):
        out = getattr(o, name).cpu()
        assert torch.isnan(out[nan_rows]).all(), f"{name}: NaN in, but {out[nan_rows]} out"
        assert _bits_equal(out[good], getattr(oc, name).cpu()[good]), f"{name}: a NaN row changed another row"
        assert out[6] == 0, f"{name}: an ignored row with NaN must give 0"
    ref = naive_token_logprobs(z, y.cpu(), stats=STAT_NAMES)[4]
    assert torch.equal(o.is_argmax.cpu(), ref), "is_argmax of NaN rows follows torch.argmax (NaN is the max)"
    g, gc = g.cpu(), gc.cpu()
    assert _bits_equal(g[good], gc[good]), "a NaN row changed another row's gradient"
    assert (g[6] == 0).all(), "an ignored row gets a zero gradient, NaN or not"


@pytest.mark.parametrize("backend", ("torch", "cpu", "triton", "cuda"), indirect=True)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
def test_nan_row_gradient_is_nan(backend, device, with_entropy):
    """The gradient of a real row holding NaN or +inf is NaN in every entry, with or
    without an entropy term in the backward (a NaN must never turn into a number)."""
    V = 40
    z = torch.randn(4, V)
    y = torch.tensor([1, 2, 3, 4])
    z[0, 7] = NAN
    z[1, 2] = NAN
    z[2, 9] = INF
    zz = z.to(device).requires_grad_()
    o = _tl(zz, y.to(device), backend, stats=("entropy",))
    outs = (o.logprobs, o.entropy) if with_entropy else (o.logprobs,)
    ws = tuple(torch.randn(4, device=device) for _ in outs)
    (g,) = torch.autograd.grad(outs, zz, ws)
    g = g.cpu()
    assert torch.isnan(g[:3]).all(), f"NaN hidden in the gradient: {int((~torch.isnan(g[:3])).sum())} numbers"
    assert torch.isfinite(g[3]).all()


def test_nan_upstream_gradient_stays_in_its_row(backend, device):
    z = torch.randn(5, 40, device=device)
    y = torch.randint(0, 40, (5,), device=device)
    w = torch.randn(5, device=device)
    g_clean = torch.autograd.grad(_tl(z.requires_grad_(), y, backend), z, w)[0]
    w_nan = w.clone()
    w_nan[2] = NAN
    g = torch.autograd.grad(_tl(z, y, backend), z, w_nan)[0].cpu()
    assert torch.isnan(g[2]).all()
    keep = [0, 1, 3, 4]
    assert _bits_equal(g[keep], g_clean.cpu()[keep])


def test_nan_through_the_ops(backend, device):
    """Sequence sums, the DPO / PPO losses and the fused-linear op propagate NaN from real
    tokens and never from masked ones."""
    B, T, V = 4, 5, 30
    z = torch.randn(B, T, V, device=device)
    y = torch.randint(0, V, (B, T), device=device)
    y[:, 0] = -100  # prompt
    z[1, 0, 3] = NAN  # in a prompt token: masked, no effect
    z[2, 3, 7] = NAN  # in a real token of sequence 2
    s = pf.sequence_logprobs(z, y, backend=backend).cpu()
    assert torch.isnan(s[2]) and torch.isfinite(s[[0, 1, 3]]).all()
    loss, metrics = pf.logits_dpo_loss(z, y, beta=0.1, backend=backend)  # pairs (0, 2), (1, 3)
    assert torch.isnan(loss), "a NaN pair must make the batch loss NaN, not vanish"
    z_ok = z.clone()
    z_ok[2, 3, 7] = 0.0
    loss_ok, _ = pf.logits_dpo_loss(z_ok, y, beta=0.1, backend=backend)
    assert torch.isfinite(loss_ok), "NaN in a prompt (ignored) token must not reach the loss"
    lp, _ = pf.ppo_loss(z, y, None, torch.ones(B, device=device), backend=backend)
    assert torch.isnan(lp)
    mask = torch.ones(B, T, device=device)
    mask[2, 3] = 0
    lp_m, _ = pf.ppo_loss(z, y, None, torch.ones(B, device=device), loss_mask=mask, backend=backend)
    assert torch.isfinite(lp_m), "a NaN token that the loss_mask drops must not reach the loss"
    # fused-linear: a NaN hidden row stays in its token; a NaN in the weight reaches every token
    h = torch.randn(6, 8, device=device)
    w = torch.randn(V, 8, device=device)
    yl = torch.randint(0, V, (6,), device=device)
    h[4, 2] = NAN
    out = pfl.linear_token_logprobs(h, w, yl, backend=backend).cpu()
    assert torch.isnan(out[4]) and torch.isfinite(out[[0, 1, 2, 3, 5]]).all()
    w[11, 0] = NAN
    h[4, 2] = 0.0
    assert torch.isnan(pfl.linear_token_logprobs(h, w, yl, backend=backend)).all()


def test_nan_in_the_loss_heads():
    v = torch.tensor([-3.0, -4.0, NAN])
    loss, _ = pf.dpo_loss(v, torch.tensor([-5.0, -1.0, -2.0]))
    assert torch.isnan(loss)
    loss, _ = pf.bradley_terry_loss(torch.tensor([0.5, NAN]), torch.tensor([0.1, 0.2]))
    assert torch.isnan(loss)


# ---------------------------------------------------------------- 2. infinities


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_infinities_follow_float64_log_softmax(backend, device, dtype):
    """+inf -> NaN row; -inf entries are masked vocabulary (p = 0, exact zero gradient, no
    0 * inf); the label at -inf -> log-prob -inf; a row of only -inf -> NaN. Every output's
    non-finite pattern, and is_argmax, equal the float64 reference's."""
    V = 50
    z = torch.randn(8, V) * 2
    y = torch.randint(0, V, (8,))
    z[0, (int(y[0]) + 1) % V] = INF
    z[1, int(y[1])] = INF
    z[2] = -INF
    z[3, torch.rand(V) < 0.5] = -INF
    z[3, int(y[3])] = 1.0
    z[4, int(y[4])] = -INF  # the label is masked
    z[5, :] = -INF
    z[5, [3, 9]] = 2.0
    y[5] = 9
    z = z.to(dtype)
    w1, w2 = torch.randn(8), torch.randn(8)
    o, g = _grad(z.to(device), y.to(device), backend, w1.to(device), w2.to(device))
    zr = z.double().requires_grad_()
    ref = naive_token_logprobs(zr, y, stats=STAT_NAMES)
    (g_ref,) = torch.autograd.grad((ref[0], ref[1]), zr, (w1.double(), w2.double()))
    for name, r in zip(("logprobs",) + STAT_NAMES, ref):
        got = getattr(o, name).cpu()
        if name == "is_argmax":
            assert torch.equal(got, r)
        else:
            assert bl.same_nonfinite(got, r), f"{name}: {got.tolist()} vs fp64 {r.tolist()}"
    g = g.cpu()
    fin = torch.isfinite(o.logprobs.cpu())  # (the NaN rows' gradients: test_nan_row_gradient_is_nan)
    assert bl.same_nonfinite(g[fin], g_ref[fin]), "gradient: non-finite pattern differs from float64 autograd"
    masked = (z == -INF) & ~torch.nn.functional.one_hot(y, V).bool()
    fin_rows = torch.isfinite(o.logprobs.cpu())
    assert (g[masked & fin_rows.unsqueeze(1)] == 0).all(), "gradient at -inf logits must be exactly 0"
    assert o.logprobs.cpu()[4] == -INF


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"], indirect=True)
def test_rows_far_below_zero(backend, device):
    """Logits all around -100 (or x = z / T that low): an ordinary softmax, not a NaN."""
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(3, 300, generator=g) - 100.0).to(device)
    y = torch.tensor([3, 4, 5], device=device)
    got = _tl(z, y, backend).cpu().double()
    ref = R.token_stats(z.cpu(), y.cpu())["logprobs"]
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_scaled_logits_that_overflow_fp32_are_infinite(backend, device):
    """x = z / T is formed in fp32 (as ``logits.float() / T``): 3e38 at T = 0.5 is +inf,
    so the row is NaN: an overflow is never silently clipped."""
    z = torch.randn(3, 20, device=device)
    z[1, 4] = 3e38
    y = torch.tensor([1, 2, 3], device=device)
    out = _tl(z, y, backend, temperature=0.5).cpu()
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


# ----------------------------------------------- 3. only the label is finite


@pytest.mark.parametrize(
    "backend, dtype",
    [pytest.param(b, d, id=f"{b}-{n}") for b in ("torch", "cpu", "triton", "cuda") for n, d in DTYPES.items()],
    indirect=["backend"],
)
def test_rows_where_only_the_label_is_finite(backend, device, dtype):
    """A fully determined token: log-prob, entropy and log_sum_sq_probs exactly 0,
    is_argmax True, and a gradient of exactly 0 everywhere."""
    V = 37
    y = torch.tensor([0, 5, 36, 20], device=device)
    z = torch.full((4, V), -INF, dtype=dtype, device=device)
    z[torch.arange(4), y] = torch.tensor([1.0, -3.0, 1e4, 0.0], dtype=dtype, device=device)
    for temperature in (1.0, torch.tensor([0.5, 1.0, 3.0, 0.7], device=device)):
        w1, w2 = torch.randn(4, device=device), torch.randn(4, device=device)
        o, g = _grad(z, y, backend, w1, w2, temperature=temperature)
        for name in ("logprobs", "entropy", "log_sum_sq_probs"):
            assert (getattr(o, name) == 0).all(), f"{name}: {getattr(o, name).tolist()}"
        assert o.is_argmax.all()
        assert (g == 0).all(), f"gradient of a determined token: {g[g != 0]}"


# -------------------------------------------------------------- 4. fully masked


def test_fully_masked_sequences(backend, device):
    B, T, V = 4, 6, 25
    z = torch.randn(B, T, V, device=device, requires_grad=True)
    y = torch.randint(0, V, (B, T), device=device)
    y[1] = -100  # a sequence without a real label
    for average in (False, True):
        s = pf.sequence_logprobs(z, y, average=average, backend=backend)
        assert s[1] == 0 and torch.isfinite(s).all()
        (g,) = torch.autograd.grad(s.sum(), z)
        assert torch.isfinite(g).all() and (g[1] == 0).all()
    # packed, with a zero-length sequence and an all-ignored one
    zp = torch.randn(7, V, device=device, requires_grad=True)
    yp = torch.randint(0, V, (7,), device=device)
    yp[3:5] = -100
    cu = torch.tensor([0, 3, 3, 5, 7], device=device)
    s = pf.sequence_logprobs(zp, yp, cu_seqlens=cu, average=True, backend=backend)
    assert s[1] == 0 and s[2] == 0 and torch.isfinite(s).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "robust", ["sigmoid", "sft"]])
def test_fully_masked_pairs_give_a_finite_dpo_loss(backend, device, loss_type):
    B, T, V = 2, 5, 25
    z = torch.randn(2 * B, T, V, device=device, requires_grad=True)
    ref = torch.randn(2 * B, T, V, device=device)
    y = torch.randint(0, V, (2 * B, T), device=device)
    y[0] = -100  # pair 0's chosen completion is empty
    kw = dict(beta=0.1, loss_type=loss_type, ref_logits=ref, backend=backend)
    if loss_type == "robust":
        kw["label_smoothing"] = 0.1
    loss, metrics = pf.logits_dpo_loss(z, y, **kw)
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(g).all() and (g[0] == 0).all()
    # the whole batch masked: still finite, zero gradient
    loss, metrics = pf.logits_dpo_loss(z, torch.full_like(y, -100), **kw)
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and (g == 0).all()
    if loss_type == "sigmoid":
        assert torch.isclose(loss, torch.tensor(math.log(2.0), device=device))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_fully_masked_ppo(backend, device, agg):
    B, T, V = 3, 4, 20
    z = torch.randn(B, T, V, device=device, requires_grad=True)
    y = torch.randint(0, V, (B, T), device=device)
    y[1] = -100
    kw = dict(
        loss_agg_mode=agg,
        max_length=T if agg.endswith("norm") else None,
        entropy_coef=0.01,
        kl_coef=0.1,
        ref_logps=-torch.rand(B, T, device=device),
        backend=backend,
    )
    adv = torch.randn(B, device=device)
    loss, metrics = pf.ppo_loss(z, y, None, adv, **kw)
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[1] == 0).all()
    loss, metrics = pf.ppo_loss(z, torch.full_like(y, -100), None, adv, **kw)
    (g,) = torch.autograd.grad(loss, z)
    assert loss == 0 and (g == 0).all() and all(torch.isfinite(v) for v in metrics.values())


# ------------------------------------------------------------ 5. huge magnitudes


def _problem(z, y, temperature=1.0):
    return bl.Problem(
        "token_logprobs",
        dict(logits=z, labels=y, temperature=temperature, ignore_index=-100, stats=bl.TOKEN_STATS, inplace=False),
        grad_wrt=("logits",),
        cotangents={"logprobs": torch.randn(y.shape), "entropy": torch.randn(y.shape)},
    )


HUGE = [(1e4, torch.float32), (1e4, torch.bfloat16), (1e4, torch.float16), (1e30, torch.float32), (3e38, torch.float32)]


def _huge_problem(magnitude, dtype):
    g = torch.Generator().manual_seed(1)
    V = 33
    z = (torch.rand(6, V, generator=g) * 2 - 1) * magnitude
    z[0] = magnitude  # a constant row: log-prob -log V
    z[1, :10] = -magnitude  # mixed signs
    z[2] = torch.randn(V, generator=g)  # small values next to huge rows
    z[3, 5] = magnitude  # one huge entry, the rest ~0
    z[3, 6:] = torch.randn(V - 6, generator=g)
    y = torch.randint(0, V, (6,), generator=g)
    y[3] = 5
    y[4] = int(z[4].argmax())
    temperature = 1.0 if magnitude > 1e30 else 2.0
    return _problem(z.to(dtype), y, temperature)


@pytest.mark.parametrize(
    "backend, magnitude, dtype",
    [pytest.param(b, m, d, id=f"{b}-{m:g}-{str(d)[6:]}") for b in ("torch", "cpu", "triton", "cuda") for m, d in HUGE],
    indirect=["backend"],
)
def test_huge_magnitudes_forward(backend, device, magnitude, dtype):
    """Logits of magnitude 1e4 (every dtype) and up to 3e38 (fp32): every forward output
    within the error rule of plain fp32 PyTorch, log-probs finite and <= 0. (mean_logit of
    rows near +-3e38 overflows the fp32 sum on the torch / triton backends, as plain
    x.float().mean() does: a documented limit, not checked.)"""
    pb = _huge_problem(magnitude, dtype)
    pb.cotangents = {}
    skip = ("mean_logit",) if magnitude > 1e30 and backend != "cpu" else ()
    ref, plain = bl.evaluate(pb, "ref"), bl.evaluate(pb, "plain")
    got = bl.evaluate(pb, "lib", backend, device)
    # row by row: the rows differ in magnitude by up to 30 orders, and a floor at the
    # largest one would hide any error in the others
    for r in range(pb.inputs["labels"].shape[0]):
        row = lambda d: {k: v[r : r + 1] for k, v in d.items() if k not in skip}  # noqa: E731
        bl.check_rule(row(got), row(plain), row(ref), f"row {r}: {pb}")
    lp = got["logprobs"]
    assert (lp <= 0).all() and torch.isfinite(lp).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_huge_magnitudes_gradient(backend, device, dtype):
    """At 1e4 the gradients meet the rule with the floor of backward stability (the
    floor scaled by max|x|, tools/accuracy_rule.py)."""
    pb = _huge_problem(1e4, dtype)
    bl.run_rule(pb, backend, device)


@pytest.mark.parametrize("magnitude", [1e8, 1e30])
def test_gradient_of_tied_maxima_at_huge_magnitudes(backend, device, magnitude):
    V = 33
    z = torch.full((1, V), magnitude, device=device, requires_grad=True)
    y = torch.tensor([4], device=device)
    (g,) = torch.autograd.grad(_tl(z, y, backend), z)
    expected = torch.full((1, V), -1.0 / V)
    expected[0, 4] += 1.0
    torch.testing.assert_close(g.cpu(), expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ 6. signs


def _adversarial_rows(dtype, n_each=8):
    """Rows where rounding could push log p above 0: one logit far above the rest, at
    several magnitudes; near-uniform rows; V = 1 is a separate case."""
    g = torch.Generator().manual_seed(2)
    V = 129
    rows, labels = [], []
    for scale, gap in ((0.01, 0.0), (1.0, 5.0), (3.0, 20.0), (10.0, 60.0), (50.0, 200.0), (200.0, 2000.0)):
        z = torch.randn(n_each, V, generator=g) * scale
        if dtype == torch.float16:
            z = z.clamp(-3e4, 3e4)
            gap = min(gap, 2e4)
        y = torch.randint(0, V, (n_each,), generator=g)
        z[torch.arange(n_each), y] = z.max(1).values + gap
        rows.append(z)
        labels.append(y)
    return torch.cat(rows).to(dtype), torch.cat(labels)


def _sign_violations(backend, device, dtype):
    z, y = _adversarial_rows(dtype)
    z, y = z.to(device), y.to(device)
    worst = {"logprobs": 0.0, "entropy": 0.0, "log_sum_sq_probs": 0.0}
    for temperature in (
        1.0,
        0.05,
        0.7,
        7.0,
        torch.rand(y.shape, generator=torch.Generator().manual_seed(3)).mul(3).add(0.05).to(device),
    ):
        o = _tl(z, y, backend, temperature=temperature, stats=("entropy", "log_sum_sq_probs"))
        worst["logprobs"] = max(worst["logprobs"], float(o.logprobs.max()))
        worst["entropy"] = max(worst["entropy"], float(-o.entropy.min()))
        worst["log_sum_sq_probs"] = max(worst["log_sum_sq_probs"], float(o.log_sum_sq_probs.max()))
    # random rows too, every dtype
    zr = (torch.randn(64, 300, generator=torch.Generator().manual_seed(4)) * 4).to(dtype).to(device)
    yr = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(5)).to(device)
    worst["logprobs"] = max(worst["logprobs"], float(_tl(zr, yr, backend, temperature=0.9).max()))
    return {k: v for k, v in worst.items() if v > 0}


@pytest.mark.parametrize(
    "backend, dtype",
    [pytest.param(b, d, id=f"{b}-{n}") for b in ("torch", "cpu", "triton", "cuda") for n, d in DTYPES.items()],
    indirect=["backend"],
)
def test_logprobs_never_positive(backend, device, dtype):
    """log p <= 0, H >= 0 and log sum p^2 <= 0 exactly, on adversarial and random rows,
    every dtype and temperature."""
    bad = _sign_violations(backend, device, dtype)
    assert not bad, f"sign violations (largest wrong-signed value per output): {bad}"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"], indirect=True)
def test_vocabulary_of_one(backend, device):
    """V = 1: every output is exactly 0, whatever the logit (here +-300 at T = 0.3)."""
    z = torch.randn(4, 3, 1, generator=torch.Generator().manual_seed(6)).to(device) * 100
    y = torch.zeros(4, 3, dtype=torch.long, device=device)
    o = _tl(z.requires_grad_(), y, backend, stats=("entropy", "log_sum_sq_probs"), temperature=0.3)
    assert (o.logprobs == 0).all() and (o.entropy == 0).all() and (o.log_sum_sq_probs == 0).all()
    (g,) = torch.autograd.grad(o.logprobs.sum() + o.entropy.sum(), z)
    assert (g == 0).all()


def test_policy_document_lists_every_section():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "numerics.md").read_text()
    for heading in (
        "NaN in, NaN out",
        "Infinities",
        "Only the label is finite",
        "Fully masked",
        "Huge magnitudes",
        "Signs",
        "Determinism",
    ):
        assert heading in text, f"docs/numerics.md lacks the section {heading!r}"
