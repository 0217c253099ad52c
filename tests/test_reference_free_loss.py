"""cpo_loss / simpo_loss / orpo_loss against prefopt_fast.reference (fp64) and against TRL's CPO/ORPO trainers.

TRL parity: TRL 1.16's experimental CPOTrainer / ORPOTrainer compute their losses in
``get_batch_loss_metrics(model, batch)``, from a model forward. We drive it on a trainer
made with ``object.__new__`` and a fake model returning fixed logits ``[2B, T, V]`` (tiny V);
our side turns the same logits into per-sequence sums and lengths with the reference's
log_softmax + gather, so loss, metrics and the gradient w.r.t. the logits are compared
end to end.
"""

import types

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch
import torch.nn.functional as F

from prefopt_fast import reference as R
from prefopt_fast.losses import CPO_LOSS_TYPES, cpo_loss, orpo_loss, simpo_loss


def make_batch(B, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lw = torch.randint(1, 9, (B,), generator=g)
    Ll = torch.randint(1, 9, (B,), generator=g)
    cw = -(torch.rand(B, generator=g, dtype=torch.float64) * 2.0 + 0.2) * Lw
    cl = -(torch.rand(B, generator=g, dtype=torch.float64) * 2.0 + 0.2) * Ll
    return cw.to(dtype), cl.to(dtype), Lw, Ll


# ----------------------------------------------------------------------------------------------
# the fp64 reference (prefopt_fast.reference), with this file's keyword names


def restated_cpo(cw, cl, Lw, Ll, *, beta, loss_type, ls, cpo_alpha, simpo_gamma, alpha):
    loss, _ = R.cpo_loss(
        cw, cl, Lw, Ll, beta=beta, loss_type=loss_type, label_smoothing=ls, cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma, alpha=alpha,
    )  # fmt: skip
    return loss


def restated_orpo(cw, cl, Lw, Ll, *, beta):
    return R.orpo_loss(cw, cl, Lw, Ll, beta=beta)[0]


CPO_CASES = [
    dict(loss_type="sigmoid", ls=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="sigmoid", ls=0.2, cpo_alpha=0.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="hinge", ls=0.0, cpo_alpha=0.5, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="ipo", ls=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0),
    dict(loss_type="simpo", ls=0.1, cpo_alpha=1.0, simpo_gamma=0.7, alpha=0.0),
    dict(loss_type="simpo", ls=0.0, cpo_alpha=0.0, simpo_gamma=1.0, alpha=0.25),
    dict(loss_type="sigmoid", ls=0.0, cpo_alpha=1.0, simpo_gamma=0.5, alpha=-0.3),
]


def _grads(loss, xs):
    gs = torch.autograd.grad(loss, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


@pytest.mark.parametrize("case", CPO_CASES, ids=lambda c: f"{c['loss_type']}-a{c['alpha']}-c{c['cpo_alpha']}")
def test_cpo_matches_formula(case):
    for dtype in (torch.float32, torch.bfloat16):
        for B in (1, 5):
            cw, cl, Lw, Ll = make_batch(B, dtype, seed=B)
            cw, cl = cw.requires_grad_(), cl.requires_grad_()
            loss, metrics = cpo_loss(
                cw,
                cl,
                Lw,
                Ll,
                beta=0.4,
                loss_type=case["loss_type"],
                label_smoothing=case["ls"],
                cpo_alpha=case["cpo_alpha"],
                simpo_gamma=case["simpo_gamma"],
                alpha=case["alpha"],
            )
            c64 = [x.detach().double().requires_grad_() for x in (cw, cl)]
            ref = restated_cpo(
                *c64,
                Lw,
                Ll,
                beta=0.4,
                loss_type=case["loss_type"],
                ls=case["ls"],
                cpo_alpha=case["cpo_alpha"],
                simpo_gamma=case["simpo_gamma"],
                alpha=case["alpha"],
            )
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
            for g, rg in zip(_grads(loss, [cw, cl]), _grads(ref, c64)):
                assert g.dtype == dtype
                torch.testing.assert_close(g.double(), rg, **tol)
            assert {"rewards/chosen", "rewards/accuracies", "logps/chosen", "nll_loss"} <= set(metrics)


def test_simpo_matches_formula_and_cpo():
    for B in (1, 4):
        cw, cl, Lw, Ll = make_batch(B, seed=10 + B)
        cw, cl = cw.requires_grad_(), cl.requires_grad_()
        loss, m = simpo_loss(cw, cl, Lw, Ll, beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
        c64 = [x.detach().double().requires_grad_() for x in (cw, cl)]
        ref, rm = R.simpo_loss(*c64, Lw, Ll, beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0)
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
        for g, rg in zip(_grads(loss, [cw, cl]), _grads(ref, c64)):
            torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m["rewards/chosen"].double(), rm["rewards/chosen"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m["logps/rejected"].double(), rm["logps/rejected"], rtol=1e-5, atol=1e-6)
        assert float(m["nll_loss"]) == 0.0
        # CPO-SimPO
        a, _ = simpo_loss(cw, cl, Lw, Ll, beta=2.0, simpo_gamma=1.0, cpo_alpha=1.0)
        b, _ = cpo_loss(cw, cl, Lw, Ll, beta=2.0, loss_type="simpo", simpo_gamma=1.0, cpo_alpha=1.0)
        torch.testing.assert_close(a, b)


def test_orpo_matches_formula():
    for dtype in (torch.float32, torch.bfloat16):
        for B in (1, 5):
            cw, cl, Lw, Ll = make_batch(B, dtype, seed=20 + B)
            cw, cl = cw.requires_grad_(), cl.requires_grad_()
            loss, m = orpo_loss(cw, cl, Lw, Ll, beta=0.25)
            c64 = [x.detach().double().requires_grad_() for x in (cw, cl)]
            ref = restated_orpo(*c64, Lw, Ll, beta=0.25)
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
            for g, rg in zip(_grads(loss, [cw, cl]), _grads(ref, c64)):
                torch.testing.assert_close(g.double(), rg, **tol)
            assert {"log_odds_ratio", "log_odds_chosen", "nll_loss", "rewards/margins"} <= set(m)


def test_orpo_given_nll_and_extremes():
    cw, cl, Lw, Ll = make_batch(3, seed=3)
    nll = torch.tensor(1.234)
    a, ma = orpo_loss(cw, cl, Lw, Ll, nll_loss=nll)
    b, mb = orpo_loss(cw, cl, Lw, Ll)
    torch.testing.assert_close(a - b, nll - mb["nll_loss"])
    torch.testing.assert_close(mb["nll_loss"], -cw.sum() / Lw.sum())  # default: chosen completion tokens
    assert float(ma["nll_loss"]) == pytest.approx(1.234)
    # near-certain and very unlikely completions: log(1 - exp(x)) stays finite, gradients too
    cw = torch.tensor([-1e-6, -300.0], requires_grad=True)
    cl = torch.tensor([-50.0, -1e-3], requires_grad=True)
    loss, _ = orpo_loss(cw, cl, torch.ones(2), torch.ones(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cw.grad).all() and torch.isfinite(cl.grad).all()


def test_nan_in_nan_out():
    cw, cl, Lw, Ll = make_batch(3, seed=4)
    cw[1] = float("nan")
    assert torch.isnan(cpo_loss(cw, cl, Lw, Ll)[0])
    assert torch.isnan(simpo_loss(cw, cl, Lw, Ll)[0])
    assert torch.isnan(orpo_loss(cw, cl, Lw, Ll)[0])


def test_bad_inputs():
    cw, cl, Lw, Ll = make_batch(3, seed=5)
    with pytest.raises(ValueError, match="loss_type") as e:
        cpo_loss(cw, cl, Lw, Ll, loss_type="robust")
    for t in CPO_LOSS_TYPES:
        assert repr(t) in str(e.value)
    for fn in (cpo_loss, simpo_loss, orpo_loss):
        with pytest.raises(ValueError, match="beta"):
            fn(cw, cl, Lw, Ll, beta=0.0)
        with pytest.raises(ValueError, match="rejected_logps"):
            fn(cw, cl[:2], Lw, Ll)
        with pytest.raises(TypeError, match="chosen_logps"):
            fn(cw.long(), cl, Lw, Ll)
        with pytest.raises(ValueError, match="rejected_lengths"):
            fn(cw, cl, Lw, Ll[:1])
    with pytest.raises(ValueError, match="chosen_lengths"):
        cpo_loss(cw, cl)  # the NLL term (cpo_alpha = 1) needs the chosen token count
    cpo_loss(cw, cl, cpo_alpha=0.0)  # sums only: no lengths needed
    cpo_loss(cw, cl, nll_loss=torch.tensor(0.5))
    with pytest.raises(ValueError, match="rejected_lengths"):
        cpo_loss(cw, cl, Lw, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths"):
        simpo_loss(cw, cl, None, Ll)
    with pytest.raises(ValueError, match="label_smoothing"):
        cpo_loss(cw, cl, Lw, Ll, label_smoothing=1.0)
    with pytest.warns(UserWarning, match="label_smoothing"):
        cpo_loss(cw, cl, Lw, Ll, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="cpo_alpha"):
        cpo_loss(cw, cl, Lw, Ll, cpo_alpha=-1.0)
    with pytest.raises(ValueError, match="nll_loss"):
        orpo_loss(cw, cl, Lw, Ll, nll_loss=torch.ones(3))
    with pytest.raises(TypeError, match="nll_loss"):
        orpo_loss(cw, cl, Lw, Ll, nll_loss=1.0)


# ----------------------------------------------------------------------------------------------
# against TRL's own code


class _FakeLM(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return types.SimpleNamespace(logits=self.logits)


def _preference_batch(B, T=8, V=11, seed=0):
    """Token batch of B pairs: ids, attention masks, labels (-100 on prompt and padding), logits."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, V, (B, T), generator=g)
        attn = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100)
        for b in range(B):
            prompt = int(torch.randint(1, 3, (), generator=g))
            length = int(torch.randint(1, T - prompt + 1, (), generator=g))  # TRL divides by it unclamped
            attn[b, : prompt + length] = 1
            labels[b, prompt : prompt + length] = ids[b, prompt : prompt + length]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_labels": labels})
    logits = (2.0 * torch.randn(2 * B, T, V, generator=g)).requires_grad_(True)
    return batch, logits


def _sums_and_lengths(logits, labels):
    """Per-sequence sums of completion log-probs and completion lengths (causal shift)."""
    lab = labels[:, 1:]
    return R.sequence_logprobs(logits[:, :-1], lab).float(), (lab != -100).sum(1)


def _trainer(cls, **attrs):
    t = object.__new__(cls)
    t.accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    t.is_encoder_decoder = False
    t.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("case", CPO_CASES, ids=lambda c: f"{c['loss_type']}-a{c['alpha']}-c{c['cpo_alpha']}")
def test_cpo_matches_trl(case):
    cpo = expected.require_module("trl", "trl.experimental.cpo")
    for B in (1, 3):
        batch, logits = _preference_batch(B, seed=B)
        trainer = _trainer(
            cpo.CPOTrainer,
            beta=0.4,
            loss_type=case["loss_type"],
            label_smoothing=case["ls"],
            cpo_alpha=case["cpo_alpha"],
            simpo_gamma=case["simpo_gamma"],
            alpha=case["alpha"],
            pad_token_id=0,
        )
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(_FakeLM(logits), batch)
        (trl_grad,) = torch.autograd.grad(trl_loss, logits)

        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        sums, lengths = _sums_and_lengths(logits, labels)
        loss, metrics = cpo_loss(
            sums[:B],
            sums[B:],
            lengths[:B],
            lengths[B:],
            beta=0.4,
            loss_type=case["loss_type"],
            label_smoothing=case["ls"],
            cpo_alpha=case["cpo_alpha"],
            simpo_gamma=case["simpo_gamma"],
            alpha=case["alpha"],
        )
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, trl_grad, rtol=1e-4, atol=1e-6)
        for k, v in metrics.items():
            assert float(v) == pytest.approx(trl_metrics[k], rel=1e-5, abs=1e-5), k


def test_orpo_matches_trl():
    orpo = expected.require_module("trl", "trl.experimental.orpo")
    for B in (1, 4):
        batch, logits = _preference_batch(B, seed=30 + B)
        trainer = _trainer(orpo.ORPOTrainer, beta=0.2, padding_value=0)
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(_FakeLM(logits), batch)
        (trl_grad,) = torch.autograd.grad(trl_loss, logits)

        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        sums, lengths = _sums_and_lengths(logits, labels)
        # TRL's ORPO NLL covers the chosen prompt AND completion: computed here and passed in
        ids, attn = batch["chosen_input_ids"], batch["chosen_attention_mask"]
        full = torch.where(attn == 1, ids, -100)
        nll = F.cross_entropy(logits[:B, :-1].reshape(-1, logits.shape[-1]), full[:, 1:].reshape(-1))
        loss, metrics = orpo_loss(sums[:B], sums[B:], lengths[:B], lengths[B:], beta=0.2, nll_loss=nll)
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, trl_grad, rtol=1e-4, atol=1e-6)
        for k, v in metrics.items():
            assert float(v) == pytest.approx(trl_metrics[k], rel=1e-5, abs=1e-5), k


# ----------------------------------------------------------------------------------------------
# one name and one default per hyper-parameter (TRL's CPOConfig), reduction


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0),
        dict(beta=0.5, simpo_gamma=-0.3, label_smoothing=0.2, cpo_alpha=0.7, alpha=0.25),
        dict(beta=0.3, reduction="none"),
        dict(cpo_alpha=0.4, reduction="sum", nll_loss="given"),
    ],
)
def test_simpo_loss_is_cpo_simpo(kw):
    """simpo_loss(...) == cpo_loss(..., loss_type="simpo"): same names, defaults, value, gradient."""
    cw, cl, Lw, Ll = make_batch(4, seed=31)
    kw = dict(kw)
    if kw.get("nll_loss") == "given":
        kw["nll_loss"] = torch.tensor(1.25)
    outs = []
    for fn, extra in ((simpo_loss, {}), (cpo_loss, dict(loss_type="simpo"))):
        x = [cw.clone().requires_grad_(), cl.clone().requires_grad_()]
        loss, m = fn(*x, Lw, Ll, **kw, **extra)
        outs.append((loss, m, _grads(loss.sum(), x)))
    (a, ma, ga), (b, mb, gb) = outs
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ma.keys() == mb.keys()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=0, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_simpo_defaults_are_cpo_config_defaults():
    import inspect

    sig, cpo = inspect.signature(simpo_loss).parameters, inspect.signature(cpo_loss).parameters
    for name, want in (
        ("beta", 0.1),
        ("simpo_gamma", 0.5),
        ("cpo_alpha", 1.0),
        ("label_smoothing", 0.0),
        ("alpha", 0.0),
    ):
        assert sig[name].default == cpo[name].default == want, name
    assert "gamma" not in sig and "nll_weight" not in sig


def test_simpo_old_keywords_warn_and_map():
    cw, cl, Lw, Ll = make_batch(3, seed=32)
    want, _ = simpo_loss(cw, cl, Lw, Ll, beta=2.0, simpo_gamma=1.0, cpo_alpha=0.3)
    with pytest.warns(DeprecationWarning, match="simpo_gamma"):
        got, _ = simpo_loss(cw, cl, Lw, Ll, beta=2.0, gamma=1.0, cpo_alpha=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning, match="cpo_alpha"):
        got, _ = simpo_loss(cw, cl, Lw, Ll, beta=2.0, simpo_gamma=1.0, nll_weight=0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="simpo_gamma"):
        simpo_loss(cw, cl, Lw, Ll, gamma=1.0, simpo_gamma=1.0)
    with pytest.raises(TypeError, match="cpo_alpha"):
        simpo_loss(cw, cl, Lw, Ll, nll_weight=1.0, cpo_alpha=1.0)


@pytest.mark.parametrize(
    "fn, kw",
    [
        (cpo_loss, dict(loss_type="sigmoid", cpo_alpha=0.5)),
        (cpo_loss, dict(loss_type="ipo", cpo_alpha=0.0)),
        (cpo_loss, dict(loss_type="hinge", nll_loss=torch.tensor(0.75))),
        (simpo_loss, dict(beta=2.0, simpo_gamma=1.0)),
        (orpo_loss, dict(beta=0.25)),
    ],
)
def test_reduction(fn, kw):
    """ "none" is the per-pair loss [B] (a batch-level NLL added to each pair): its mean is
    "mean", its sum is "sum", and each has the gradient of the same reduction."""
    cw, cl, Lw, Ll = make_batch(5, seed=33)
    res = {}
    for r in ("mean", "sum", "none"):
        x = [cw.clone().requires_grad_(), cl.clone().requires_grad_()]
        loss, m = fn(*x, Lw, Ll, reduction=r, **kw)
        res[r] = (loss, m, x)
    per_pair = res["none"][0]
    assert per_pair.shape == (5,)
    torch.testing.assert_close(per_pair.mean(), res["mean"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_pair.sum(), res["sum"][0], rtol=1e-6, atol=1e-6)
    for k in res["mean"][1]:
        torch.testing.assert_close(res["none"][1][k], res["mean"][1][k])
    g_mean = _grads(res["mean"][0], res["mean"][2])
    g_none = _grads(per_pair.mean(), res["none"][2])
    for a, b in zip(g_mean, g_none):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", [cpo_loss, simpo_loss, orpo_loss])
def test_bad_reduction_names_the_argument(fn):
    cw, cl, Lw, Ll = make_batch(2, seed=34)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(cw, cl, Lw, Ll, reduction="avg")
    with pytest.raises(TypeError, match="reduction must be a str"):
        fn(cw, cl, Lw, Ll, reduction=None)
