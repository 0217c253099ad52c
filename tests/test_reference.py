"""prefopt_fast.reference, the oracle of the other tests, against independent facts.

Every other test compares the package with prefopt_fast.reference; this file checks the
reference itself, so the oracle cannot drift silently: against torch.log_softmax in fp64,
closed forms (uniform rows, KL(p || p) = 0, hand-computed DPO losses), properties of the
estimators (k3 >= 0), and TRL 1.16's own code where it exposes the formula.
"""

import math

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch
import torch.nn.functional as F

from prefopt_fast import reference as R

# ------------------------------------------------------------------ token statistics


def _rows(seed=0, shape=(3, 5), V=17, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, V, shape, generator=g)
    return z, y


def test_logprobs_are_log_softmax_gathered():
    z, y = _rows()
    got = R.token_stats(z, y)["logprobs"]
    want = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    # a row written out by hand: log(e^x_y / sum e^x)
    x = z[0, 0]
    by_hand = float(x[y[0, 0]]) - math.log(sum(math.exp(float(v)) for v in x))
    assert float(got[0, 0]) == pytest.approx(by_hand, abs=1e-12)


def test_lse_entropy_lssp_mean_by_hand():
    z, y = _rows(seed=1)
    st = R.token_stats(z, y)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(st["lse"], torch.log(torch.exp(z).sum(-1)))
    torch.testing.assert_close(st["entropy"], -(p * torch.log(p)).sum(-1))
    torch.testing.assert_close(st["log_sum_sq_probs"], torch.log((p * p).sum(-1)))
    torch.testing.assert_close(st["mean_logit"], z.sum(-1) / z.shape[-1])


def test_temperature_float_and_per_row():
    z, y = _rows(seed=2)
    t = torch.tensor([[0.5], [2.0], [1.5]])
    got = R.token_stats(z, y, temperature=t)["logprobs"]
    want = torch.log_softmax(z / t.double()[..., None], -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(got, want)
    got = R.token_stats(z, y, temperature=0.7)["logprobs"]
    torch.testing.assert_close(got, torch.log_softmax(z / 0.7, -1).gather(-1, y[..., None])[..., 0])


def test_uniform_row():
    V = 50
    z = torch.full((2, V), 3.25, dtype=torch.float64)
    st = R.token_stats(z, torch.tensor([0, 7]))
    torch.testing.assert_close(st["entropy"], torch.full((2,), math.log(V), dtype=torch.float64))
    torch.testing.assert_close(st["logprobs"], torch.full((2,), -math.log(V), dtype=torch.float64))
    torch.testing.assert_close(st["log_sum_sq_probs"], torch.full((2,), -math.log(V), dtype=torch.float64))
    # a tie everywhere: only the first index is the argmax
    assert st["is_argmax"].tolist() == [True, False]


def test_is_argmax_first_index_of_ties():
    z = torch.tensor([[1.0, 5.0, 2.0, 5.0], [1.0, 5.0, 2.0, 5.0], [9.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    st = R.token_stats(z, torch.tensor([1, 3, 0]))
    assert st["is_argmax"].tolist() == [True, False, True]


def test_kl_of_a_distribution_to_itself_is_zero_and_matches_by_hand():
    z, y = _rows(seed=3)
    st = R.token_stats(z, y, ref_logits=z.clone())
    torch.testing.assert_close(st["kl"], torch.zeros_like(st["kl"]), rtol=0, atol=1e-13)
    zr = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    st = R.token_stats(z, y, ref_logits=zr)
    p, q = torch.softmax(z, -1), torch.softmax(zr, -1)
    torch.testing.assert_close(st["kl"], (p * torch.log(p / q)).sum(-1))
    torch.testing.assert_close(st["ref_lse"], torch.logsumexp(zr, -1))
    assert (st["kl"] > 0).all()  # Gibbs' inequality


def test_ignored_rows_are_zero_with_no_gradient():
    z, y = _rows(seed=5)
    y[0, 1] = -100
    y[2, 4] = 7
    z = z.requires_grad_()
    st = R.token_stats(z, y, ignore_index=-100, ref_logits=z.detach() + 1.0)
    for k, v in st.items():
        assert not v[0, 1].any(), k
    (sum(v.sum() for k, v in st.items() if k != "is_argmax")).backward()
    assert (z.grad[0, 1] == 0).all() and (z.grad[0, 0] != 0).any()
    # a custom ignore_index; -100 is then an out-of-range label (NaN log-prob)
    st7 = R.token_stats(z.detach(), y, ignore_index=7)
    assert float(st7["logprobs"][2, 4]) == 0.0 and math.isnan(float(st7["logprobs"][0, 1]))


def test_non_finite_rows():
    V = 6
    z = torch.randn(5, V, dtype=torch.float64)
    z[0, 2] = math.nan  # NaN -> NaN
    z[1, 3] = math.inf  # +inf -> NaN
    z[2, ::2] = -math.inf  # masked vocabulary: p = 0 there
    z[3] = -math.inf  # only -inf: lse -inf, log-prob NaN
    y = torch.tensor([0, 0, 1, 0, V + 3])  # row 4: a label out of range -> NaN log-prob
    st = R.token_stats(z, y)
    ref = torch.log_softmax(z[:4], -1).gather(-1, y[:4, None])[:, 0]
    assert torch.isnan(st["logprobs"][:2]).all() and torch.isnan(st["lse"][:2]).all()
    torch.testing.assert_close(st["logprobs"][:4], ref, equal_nan=True)
    assert torch.isfinite(st["entropy"][2]) and torch.isfinite(st["logprobs"][2])
    finite = z[2][torch.isfinite(z[2])]
    torch.testing.assert_close(st["entropy"][2], -(torch.softmax(finite, 0) * torch.log_softmax(finite, 0)).sum())
    assert float(st["lse"][3]) == -math.inf and math.isnan(float(st["logprobs"][3]))
    assert math.isnan(float(st["logprobs"][4])) and not bool(st["is_argmax"][4])
    assert torch.isfinite(st["entropy"][4])


def test_kl_infinite_where_the_reference_masks_a_likely_token():
    z = torch.zeros(1, 4, dtype=torch.float64)
    zr = torch.tensor([[0.0, -math.inf, 0.0, 0.0]], dtype=torch.float64)
    assert float(R.token_stats(z, torch.tensor([0]), ref_logits=zr)["kl"][0]) == math.inf
    # the other way round: p_v = 0 terms count 0
    st = R.token_stats(zr, torch.tensor([0]), ref_logits=z)
    assert float(st["kl"][0]) == pytest.approx(math.log(4 / 3))


def test_low_precision_inputs_are_upcast_first():
    z, y = _rows(seed=6)
    zb = z.to(torch.bfloat16).requires_grad_()
    lp = R.token_stats(zb, y)["logprobs"]
    assert lp.dtype == torch.float64
    torch.testing.assert_close(lp, torch.log_softmax(zb.detach().double(), -1).gather(-1, y[..., None])[..., 0])
    lp.sum().backward()
    assert zb.grad.dtype == torch.bfloat16
    # dtype=None computes in the storage dtype
    assert R.token_stats(zb.detach(), y, dtype=None)["logprobs"].dtype == torch.bfloat16


def test_gradient_of_logprob_is_onehot_minus_softmax():
    z, y = _rows(seed=7)
    z = z.requires_grad_()
    R.token_stats(z, y)["logprobs"].sum().backward()
    want = F.one_hot(y, z.shape[-1]).double() - torch.softmax(z.detach(), -1)
    torch.testing.assert_close(z.grad, want)


def test_row_backward_is_the_autograd_gradient():
    """row_backward at the exact statistics == autograd of token_stats (log-prob, entropy, KL)."""
    z, y = _rows(seed=13, shape=(6,), V=23)
    z[1, ::3] = -math.inf  # masked vocabulary
    y[1] = 1
    y[4] = -100  # ignored
    zr = z.detach() + torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    zr[1] = zr[1].nan_to_num(neginf=0.0)
    g = torch.Generator().manual_seed(14)
    c, e, k = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    x = z.clone().requires_grad_()
    st = R.token_stats(x, y, ref_logits=zr)
    ((c * st["logprobs"]) + (e * st["entropy"]) + (k * st["kl"])).sum().backward()
    got = R.row_backward(
        z, y, st["lse"].detach(), c, entropy=st["entropy"].detach(), grad_entropy=e, ref_x=zr,
        ref_lse=st["ref_lse"], kl=st["kl"].detach(), grad_kl=k,
    )  # fmt: skip
    torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)
    assert (got[4] == 0).all()
    # a label outside [0, V): the one-hot term is dropped, -c p stays
    lse = torch.logsumexp(z[:1], -1)
    out = R.row_backward(z[:1], torch.tensor([99]), lse, c[:1])
    torch.testing.assert_close(out, -c[:1, None] * torch.softmax(z[:1], -1))


def test_naive_token_logprobs_field_order():
    z, y = _rows(seed=8)
    out = R.naive_token_logprobs(z, y, stats=("mean_logit",))
    assert len(out) == 5 and out[1] is None and out[3] is not None
    torch.testing.assert_close(out[0], R.naive_token_logprobs(z, y))


# ------------------------------------------------------------------ fused linear, sequences


def test_linear_logits_written_out():
    g = torch.Generator().manual_seed(9)
    h = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64)
    b = torch.randn(11, generator=g, dtype=torch.float64)
    A = torch.randn(2, 6, generator=g, dtype=torch.float64)
    Bm = torch.randn(11, 2, generator=g, dtype=torch.float64)
    z = R.linear_logits(h, w, b, lora=(A, Bm, 0.5), logit_scale=2.0, softcap=3.0)
    for n in range(4):
        for v in range(11):
            pre = sum(h[n, k] * w[v, k] for k in range(6)) + b[v]
            pre = pre + 0.5 * sum(sum(h[n, k] * A[r, k] for k in range(6)) * Bm[v, r] for r in range(2))
            want = 3.0 * math.tanh(float(pre) * 2.0 / 3.0)
            assert float(z[n, v]) == pytest.approx(want, abs=1e-12)
    y = torch.tensor([0, 3, -100, 10])
    st = R.linear_token_stats(h, w, y, bias=b, temperature=0.5)
    torch.testing.assert_close(st["logprobs"], R.token_stats(h @ w.T + b, y, temperature=0.5)["logprobs"])


def test_sequence_sums_padded_and_packed():
    z, y = _rows(seed=10, shape=(2, 4), V=9)
    y[0, 0] = y[1, :] = -100
    lp = torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    torch.testing.assert_close(R.sequence_logprobs(z, y), lp.sum(-1))
    torch.testing.assert_close(R.sequence_logprobs(z, y, average=True), torch.stack([lp[0].sum() / 3, lp[1].sum()]))
    cu = torch.tensor([0, 4, 4, 8])
    packed = R.sequence_logprobs(z.reshape(8, 9), y.reshape(8), cu_seqlens=cu)
    torch.testing.assert_close(packed, torch.stack([lp[0].sum(), lp.new_zeros(()), lp[1].sum()]))
    s, n = R.sequence_sums(lp.reshape(8), (y != -100).reshape(8), cu)
    assert n.tolist() == [3, 0, 0]


# ------------------------------------------------------------------ preference heads


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _pair():
    # chosen / rejected / reference sums of one pair, and their by-hand log-ratios
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return t(-10.0), t(-14.0), t(-11.0), t(-12.5)  # r_w = 1, r_l = -1.5


def test_dpo_sigmoid_hinge_ipo_by_hand():
    cw, cl, rw, rl = _pair()
    beta = 0.5
    h = beta * (1.0 - (-1.5))  # 1.25
    loss, m = R.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type="sigmoid")
    assert float(loss) == pytest.approx(-math.log(_sig(h)), abs=1e-14)
    assert float(m["rewards/chosen"]) == pytest.approx(0.5) and float(m["rewards/rejected"]) == pytest.approx(-0.75)
    assert float(m["rewards/margins"]) == pytest.approx(1.25) and float(m["rewards/accuracies"]) == 1.0
    loss, _ = R.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type="hinge")
    assert float(loss) == pytest.approx(0.0)
    loss, _ = R.dpo_loss(cw, cl, rw, rl, beta=0.1, loss_type="hinge")
    assert float(loss) == pytest.approx(1.0 - 0.25)
    L = torch.tensor([2]), torch.tensor([3])
    loss, _ = R.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type="ipo", chosen_lengths=L[0], rejected_lengths=L[1])
    assert float(loss) == pytest.approx((1.0 / 2 - (-1.5) / 3 - 1.0 / (2 * beta)) ** 2)
    # several types: the weighted sum
    loss, _ = R.dpo_loss(cw, cl, rw, rl, beta=beta, loss_type=["sigmoid", "hinge"], loss_weights=[2.0, 3.0])
    assert float(loss) == pytest.approx(2.0 * -math.log(_sig(h)))


def test_dpo_other_types_by_hand():
    cw, cl, rw, rl = _pair()
    b, aw, al = 0.5, 1.0, -1.5
    h = b * (aw - al)
    cases = {
        "robust": ((1 - 0.2) * -math.log(_sig(h)) - 0.2 * -math.log(_sig(-h))) / (1 - 0.4),
        "nca_pair": -math.log(_sig(b * aw)) - 0.5 * math.log(_sig(-b * aw)) - 0.5 * math.log(_sig(-b * al)),
        "bco_pair": -math.log(_sig(b * aw)) - math.log(_sig(-b * al)),
        "sppo_hard": (aw - 1 / (2 * b)) ** 2 + (al + 1 / (2 * b)) ** 2,
        "apo_zero": 1 - _sig(b * aw) + _sig(b * al),
        "apo_down": _sig(b * aw) + 1 - _sig(b * (aw - al)),
        "exo_pair": _sig(h) * math.log(_sig(h) / (1 - 0.2)) + _sig(-h) * math.log(_sig(-h) / 0.2),
        "discopop": (1 - _sig(h / 0.05)) * -math.log(_sig(h)) + _sig(h / 0.05) * math.exp(-h),
        "aot": -(1 - 0.2) * math.log(_sig(b * ((-10 + 14) - (-11 + 12.5)))) - 0.2 * math.log(_sig(-b * 2.5)),
    }
    for t, want in cases.items():
        loss, _ = R.dpo_loss(cw, cl, rw, rl, beta=b, loss_type=t, label_smoothing=0.2)
        assert float(loss) == pytest.approx(want, rel=1e-12), t


def test_f_divergence_scores_by_hand():
    r = torch.tensor([0.3, -1.2], dtype=torch.float64)
    t = torch.exp(r)
    torch.testing.assert_close(R.dpo_scores(r, "forward_kl"), 1 - 1 / t)
    torch.testing.assert_close(R.dpo_scores(r, "js_divergence"), torch.log(2 * t / (1 + t)))
    torch.testing.assert_close(R.dpo_scores(r, "alpha_divergence", 0.3), (t ** (0.3 - 1) - 1) / (0.3 - 1))
    torch.testing.assert_close(R.dpo_scores(r, "alpha_divergence", 1.0), r)


def test_bradley_terry_by_hand():
    rw, rl = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 1.5], dtype=torch.float64)
    loss, m = R.bradley_terry_loss(rw, rl, margin=0.25, center_rewards_coefficient=0.1)
    want = (-math.log(_sig(0.75)) - math.log(_sig(-1.25))) / 2 + 0.1 * (9.0 + 4.0) / 2
    assert float(loss) == pytest.approx(want)
    assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == 0.0 and float(m["max_reward"]) == 2.0


def test_orpo_and_simpo_by_hand():
    cw, cl = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([-6.0], dtype=torch.float64)
    Lw, Ll = torch.tensor([4]), torch.tensor([3])
    xw, xl = -0.5, -2.0
    odds = lambda x: math.exp(x) / (1 - math.exp(x))  # noqa: E731
    lor = math.log(odds(xw) / odds(xl))
    loss, m = R.orpo_loss(cw, cl, Lw, Ll, beta=0.1)
    assert float(m["log_odds_chosen"]) == pytest.approx(lor)
    assert float(loss) == pytest.approx(2.0 / 4 - 0.1 * math.log(_sig(lor)))
    loss, _ = R.simpo_loss(cw, cl, Lw, Ll, beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)
    assert float(loss) == pytest.approx(-math.log(_sig(2.0 * (xw - xl) - 0.5)))


# ------------------------------------------------------------------ policy gradient


def test_kl_estimators():
    g = torch.Generator().manual_seed(11)
    logp = -torch.rand(1000, generator=g, dtype=torch.float64) * 5
    ref = logp + torch.randn(1000, generator=g, dtype=torch.float64) * 2
    k3 = R.kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all()
    assert (R.kl_estimate(logp, logp, "k3") == 0).all()
    d = ref - logp
    torch.testing.assert_close(R.kl_estimate(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(R.kl_estimate(logp, ref, "k2"), (logp - ref) ** 2 / 2)
    torch.testing.assert_close(R.kl_estimate(logp, ref, "abs"), (logp - ref).abs())
    torch.testing.assert_close(R.kl_estimate(logp, ref, "low_var_kl"), (torch.exp(d) - d - 1).clamp(max=10))
    # the estimators are unbiased (k1, k3) for KL(p || q) when tokens are sampled from p
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert float((p * R.kl_estimate(p.log(), q.log(), est)).sum()) == pytest.approx(kl)


def test_aggregations_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(R.aggregate(v, m, "token-mean")) == pytest.approx((1 + 2 + 4) / 3)
    assert float(R.aggregate(v, m, "token-mean", num_tokens=7.0)) == pytest.approx(1.0)
    assert float(R.aggregate(v, m, "seq-mean-token-mean")) == pytest.approx((1.5 + 4) / 2)
    assert float(R.aggregate(v, m, "seq-mean-token-sum")) == pytest.approx((3 + 4) / 2)
    assert float(R.aggregate(v, m, "seq-mean-token-sum-norm", max_length=5)) == pytest.approx(7 / 10)


def test_policy_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)  # ratios e^0.5, e^-1
    mask = torch.tensor([[True, True]])
    r0, r1 = math.exp(0.5), math.exp(-1.0)
    # A > 0: the first ratio is clipped at 1.2, the second is not
    loss, met = R.policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask, clip_eps_low=0.2)
    assert float(loss) == pytest.approx(-(1.2 + r1) / 2)
    assert float(met["clip_ratio/high_mean"]) == 0.5 and float(met["clip_ratio/low_mean"]) == 0.0
    # A < 0: -min(r A, clip(r) A) = max(r, clip(r)) |A|; dual clip caps it at c |A|
    A = torch.tensor([-2.0], dtype=torch.float64)
    loss, met = R.policy_loss(logp, old, A, mask, clip_eps_low=0.2)
    assert float(loss) == pytest.approx((r0 * 2 + 0.8 * 2) / 2)
    assert float(met["clip_ratio/low_mean"]) == 0.5
    loss, _ = R.policy_loss(logp, old, A, mask, clip_eps_low=0.2, dual_clip=1.5)
    assert float(loss) == pytest.approx((1.5 * 2 + 0.8 * 2) / 2)
    # on-policy: ratio 1, loss -A, gradient A per token (the REINFORCE gradient)
    lp = logp.clone().requires_grad_()
    loss, _ = R.policy_loss(lp, None, torch.tensor([3.0], dtype=torch.float64), mask)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-3.0)
    torch.testing.assert_close(lp.grad, torch.full_like(lp, -1.5))
    # KL and entropy terms
    ent = torch.tensor([[0.7, 0.1]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    loss, met = R.policy_loss(
        logp, logp, torch.zeros(1, dtype=torch.float64), mask, entropy=ent, ref_logprobs=ref,
        kl_coef=0.5, kl_estimator="k1", entropy_coef=0.1,
    )  # fmt: skip
    assert float(loss) == pytest.approx(0.5 * (0.0 + -1.0) / 2 - 0.1 * 0.4)
    assert float(met["kl"]) == pytest.approx(-0.5) and float(met["entropy"]) == pytest.approx(0.4)


# ------------------------------------------------------------------ TRL 1.16's own code


def test_token_stats_match_trl_utils():
    utils = expected.require_module("trl", "trl.trainer.utils")
    z, y = _rows(seed=12)
    st = R.token_stats(z, y)
    torch.testing.assert_close(st["logprobs"], utils.selective_log_softmax(z, y))
    torch.testing.assert_close(st["entropy"], utils.entropy_from_logits(z))


def _trainer(cls, **attrs):
    import types

    t = object.__new__(cls)
    t.accelerator = types.SimpleNamespace(device=torch.device("cpu"))
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_cpo_matches_trl_cpo_trainer(loss_type, alpha):
    mod = expected.require_module("trl", "trl.experimental.cpo.cpo_trainer")
    g = torch.Generator().manual_seed(13)
    cw = -torch.rand(6, generator=g, dtype=torch.float64) * 3
    cl = -torch.rand(6, generator=g, dtype=torch.float64) * 3
    ls = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    tr = _trainer(mod.CPOTrainer, beta=0.3, label_smoothing=ls, loss_type=loss_type, simpo_gamma=0.4, alpha=alpha)
    losses, cr, rr = tr.cpo_loss(cw, cl)
    ones = torch.ones(6, dtype=torch.long)  # TRL's ipo / simpo take per-token means already: lengths 1
    loss, m = R.cpo_loss(
        cw, cl, ones, ones, beta=0.3, loss_type=loss_type, label_smoothing=ls, simpo_gamma=0.4, alpha=alpha,
        cpo_alpha=0.0,
    )  # fmt: skip
    torch.testing.assert_close(loss, losses.mean())
    torch.testing.assert_close(m["rewards/chosen"], cr.mean())
    torch.testing.assert_close(m["rewards/rejected"], rr.mean())


def test_orpo_matches_trl_orpo_trainer():
    mod = expected.require_module("trl", "trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(14)
    cw = -torch.rand(6, generator=g, dtype=torch.float64) * 3 - 0.01
    cl = -torch.rand(6, generator=g, dtype=torch.float64) * 3 - 0.01
    tr = _trainer(mod.ORPOTrainer, beta=0.2)
    losses, cr, rr, ratio, log_odds = tr.odds_ratio_loss(cw, cl)  # TRL computes in fp32
    ones = torch.ones(6, dtype=torch.long)
    zero_nll = torch.zeros((), dtype=torch.float64)
    loss, m = R.orpo_loss(cw, cl, ones, ones, beta=0.2, nll_loss=zero_nll)
    torch.testing.assert_close(loss, -losses.mean().double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["log_odds_chosen"], log_odds.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["log_odds_ratio"], ratio.double(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ tools take the reference, not tests/


def test_no_tool_or_benchmark_imports_tests():
    """tools/ and benchmarks/ never put tests/ on sys.path nor import a module of tests/ (their
    oracle is prefopt_fast.reference; the shared rule lives in tools/accuracy_rule.py)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    test_modules = {p.stem for p in (root / "tests").glob("*.py")} | {"reference"}  # tests/cuda_emulation
    bad = []
    for path in sorted([*(root / "tools").glob("*.py"), *(root / "benchmarks").glob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.path.insert", "sys.path.append"):
                if "tests" in ast.unparse(node):
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Import):
                bad += [
                    f"{path.relative_to(root)}:{node.lineno}: import {a.name}"
                    for a in node.names
                    if a.name in test_modules
                ]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in test_modules:
                bad.append(f"{path.relative_to(root)}:{node.lineno}: from {node.module} import ...")
    assert not bad, "\n".join(bad)
