"""dpo_loss / DPOLoss: every loss type against prefopt_fast.reference (fp64) and against TRL.

prefopt_fast.reference is written from the formulas (papers + TRL 1.16's DPOTrainer) and
shares no code with prefopt_fast.losses.dpo; tests/test_reference.py checks it against
hand-computed values.

TRL parity: TRL 1.16 computes the DPO losses only inside ``DPOTrainer._compute_loss(model,
inputs)``, from a model forward. We drive that method on a trainer made with
``object.__new__`` (no model loading, no dataset) whose few attributes are set by hand, and a
fake model returning given per-token log-probs; ``precompute_ref_log_probs=True`` makes it
read the reference log-probs from the inputs. Gradients are compared with respect to those
per-token log-probs.
"""

import types
import warnings
from collections import defaultdict

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch

from prefopt_fast import reference as R
from prefopt_fast.losses import DPO_LOSS_TYPES, F_DIVERGENCES, DPOLoss, dpo_loss
from prefopt_fast.losses.dpo import F_DIVERGENCE_LOSS_TYPES

BETA = 0.3
# label_smoothing per type where it matters (0 elsewhere)
LS = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}


# ----------------------------------------------------------------------------------------------
# data


def make_batch(B, dtype=torch.float32, seed=0, scale=2.0):
    """Policy/reference sums like real ones (tens of nats) with log-ratios of a few nats."""
    g = torch.Generator().manual_seed(seed)
    cw = -(torch.rand(B, generator=g, dtype=torch.float64) * 40 + 5)
    cl = -(torch.rand(B, generator=g, dtype=torch.float64) * 40 + 5)
    rw = cw + scale * torch.randn(B, generator=g, dtype=torch.float64)
    rl = cl + scale * torch.randn(B, generator=g, dtype=torch.float64)
    Lw = torch.randint(0, 13, (B,), generator=g)
    Ll = torch.randint(0, 13, (B,), generator=g)
    Lw[0] = max(int(Lw[0]), 3)  # the batch has chosen tokens (sft)
    return [x.to(dtype) for x in (cw, cl, rw, rl)] + [Lw, Ll]


def _leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)


def _check_against_reference(types_, weights, batch, *, with_ref=True, pair_weights=None, delta=None, **kw):
    """Forward, gradients and metrics of dpo_loss vs prefopt_fast.reference in fp64."""
    cw, cl, rw, rl, Lw, Ll = batch
    dtype = cw.dtype
    cw, cl, rw, rl = _leaves(cw, cl, rw, rl)
    loss, metrics = dpo_loss(
        cw,
        cl,
        rw if with_ref else None,
        rl if with_ref else None,
        beta=kw.get("beta", BETA),
        loss_type=list(types_),
        loss_weights=list(weights),
        label_smoothing=kw.get("ls", 0.0),
        chosen_lengths=Lw,
        rejected_lengths=Ll,
        f_divergence=kw.get("f", "reverse_kl"),
        f_alpha=kw.get("a", 0.5),
        discopop_tau=kw.get("tau", 0.05),
        bco_delta=delta,
        pair_weights=pair_weights,
    )
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = torch.autograd.grad(loss, [cw, cl, rw, rl] if with_ref else [cw, cl], allow_unused=True)

    c64 = [x.detach().double().requires_grad_(True) for x in (cw, cl, rw, rl)]
    ref, rm = R.dpo_loss(
        c64[0],
        c64[1],
        c64[2] if with_ref else None,
        c64[3] if with_ref else None,
        beta=kw.get("beta", BETA),
        loss_type=list(types_),
        loss_weights=list(weights),
        label_smoothing=kw.get("ls", 0.0),
        chosen_lengths=Lw,
        rejected_lengths=Ll,
        f_divergence=kw.get("f", "reverse_kl"),
        f_alpha=kw.get("a", 0.5),
        discopop_tau=kw.get("tau", 0.05),
        bco_delta=delta,
        pair_weights=None if pair_weights is None else pair_weights.double(),
    )
    ref_grads = torch.autograd.grad(ref, c64 if with_ref else c64[:2], allow_unused=True)

    tol = _tol(dtype)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for x, g, rg in zip((cw, cl, rw, rl), grads, ref_grads):
        g = torch.zeros_like(x) if g is None else g  # sft ignores the rejected side
        rg = torch.zeros_like(g, dtype=torch.float64) if rg is None else rg
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), rg, **tol)
    assert set(metrics) == set(rm)
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad, k
        torch.testing.assert_close(v.double(), rm[k], rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------------------
# against the reference


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_each_loss_type_matches_formula(loss_type):
    for dtype in (torch.float32, torch.bfloat16):
        for B in (1, 5):
            batch = make_batch(B, dtype, seed=B)
            _check_against_reference([loss_type], [1.0], batch, ls=LS.get(loss_type, 0.0))


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_reference_free_is_zero_reference(loss_type):
    batch = make_batch(4, seed=7)
    _check_against_reference([loss_type], [1.0], batch, with_ref=False, ls=LS.get(loss_type, 0.0))


def test_fp64_inputs_stay_fp64():
    batch = make_batch(3, torch.float64, seed=3)
    _check_against_reference(["sigmoid", "ipo"], [1.0, 0.5], batch)


@pytest.mark.parametrize("f", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_match_formula(f):
    # small log-ratios: forward_kl's 1 - exp(-r) and alpha's t^(a-1) stay moderate
    batch = make_batch(5, seed=11, scale=0.7)
    for loss_type in sorted(F_DIVERGENCE_LOSS_TYPES):
        _check_against_reference([loss_type], [1.0], batch, f=f, a=0.3, ls=LS.get(loss_type, 0.0))


@pytest.mark.parametrize("a", [0.5, 1.0, 1.7])
def test_alpha_divergence_coefficients(a):
    batch = make_batch(5, seed=12, scale=0.5)
    _check_against_reference(["sigmoid"], [1.0], batch, f="alpha_divergence", a=a)


def test_alpha_one_is_reverse_kl():
    cw, cl, rw, rl, _, _ = make_batch(4, seed=2)
    a = dpo_loss(cw, cl, rw, rl, f_divergence="alpha_divergence", f_alpha=1.0)
    b = dpo_loss(cw, cl, rw, rl)
    torch.testing.assert_close(a[0], b[0])


def test_several_types_with_weights():
    batch = make_batch(5, seed=4)
    types_ = ["sigmoid", "bco_pair", "sft", "ipo", "robust"]
    _check_against_reference(types_, [0.8, 0.2, 1.0, 0.3, 0.5], batch, ls=0.1)
    # default weights are all 1
    cw, cl, rw, rl, Lw, Ll = batch
    a, _ = dpo_loss(cw, cl, rw, rl, loss_type=["sigmoid", "hinge"])
    b = dpo_loss(cw, cl, rw, rl, loss_type="sigmoid")[0] + dpo_loss(cw, cl, rw, rl, loss_type="hinge")[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss_type", ["sigmoid", "sft", "ipo", "bco_pair", "discopop"])
def test_pair_weights(loss_type):
    batch = make_batch(5, seed=5)
    w = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.1
    _check_against_reference([loss_type], [1.0], batch, pair_weights=w)


@pytest.mark.parametrize("ls", [0.0, 0.25, 0.49])
def test_robust_label_smoothing(ls):
    _check_against_reference(["robust"], [1.0], make_batch(5, seed=6), ls=ls)


@pytest.mark.parametrize("ls", [1e-3, 0.3, 0.9])
def test_exo_label_smoothing(ls):
    _check_against_reference(["exo_pair"], [1.0], make_batch(5, seed=6), ls=ls)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("ls", [0.0, 0.5, 1.0])
def test_aot_label_smoothing(loss_type, ls):
    _check_against_reference([loss_type], [1.0], make_batch(5, seed=6), ls=ls)


def test_sigmoid_ignores_label_smoothing_with_a_warning():
    cw, cl, rw, rl, _, _ = make_batch(4, seed=8)
    with pytest.warns(UserWarning, match="label_smoothing"):
        a, _ = dpo_loss(cw, cl, rw, rl, label_smoothing=0.3)
    b, _ = dpo_loss(cw, cl, rw, rl)
    torch.testing.assert_close(a, b)


def test_robust_with_zero_smoothing_is_sigmoid():
    cw, cl, rw, rl, _, _ = make_batch(4, seed=9)
    torch.testing.assert_close(dpo_loss(cw, cl, rw, rl, loss_type="robust")[0], dpo_loss(cw, cl, rw, rl)[0])


@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0])
def test_discopop_tau(tau):
    _check_against_reference(["discopop"], [1.0], make_batch(5, seed=10), tau=tau)


def test_discopop_finite_where_the_naive_product_overflows():
    # h = beta * delta = -100: exp(-h) overflows fp32 while sigmoid(h / tau) underflows to 0;
    # the limit of the loss is -log sigmoid(h) = 100 with gradient -beta on chosen.
    cw = torch.tensor([-1000.0], requires_grad=True)
    cl = torch.tensor([-0.0])
    loss, _ = dpo_loss(cw, cl, beta=0.1, loss_type="discopop")
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(100.0))
    torch.testing.assert_close(cw.grad, torch.tensor([-0.1]))


@pytest.mark.parametrize("delta", [0.0, 0.37, -1.2])
def test_bco_delta(delta):
    _check_against_reference(["bco_pair"], [1.0], make_batch(5, seed=13), delta=delta)
    # a 0-d tensor works the same
    cw, cl, rw, rl, _, _ = make_batch(5, seed=13)
    a = dpo_loss(cw, cl, rw, rl, loss_type="bco_pair", bco_delta=torch.tensor(delta))[0]
    b = dpo_loss(cw, cl, rw, rl, loss_type="bco_pair", bco_delta=delta)[0]
    torch.testing.assert_close(a, b)


def test_bco_running_mean_module():
    mod = DPOLoss(beta=BETA, loss_type="bco_pair", bco_running_mean=True)
    means = []
    for seed in range(3):
        cw, cl, rw, rl, _, _ = make_batch(4, seed=seed)
        means.append((BETA * torch.cat([cw - rw, cl - rl])).mean())
        loss, _ = mod(cw, cl, rw, rl)
        expected = torch.stack(means).mean()  # running mean of batch means, current batch included
        torch.testing.assert_close(mod.bco_mean, expected.float())
        ref, _ = dpo_loss(cw, cl, rw, rl, beta=BETA, loss_type="bco_pair", bco_delta=float(expected))
        torch.testing.assert_close(loss, ref)
    assert int(mod.bco_count) == 3
    mod.eval()
    before = mod.bco_mean.clone()
    mod(cw, cl, rw, rl)
    torch.testing.assert_close(mod.bco_mean, before)  # eval mode does not update
    assert "bco_mean" in mod.state_dict()


def test_metrics_accuracy_is_strict():
    c = torch.tensor([-3.0, -2.0, -5.0])
    r = torch.tensor([-3.0, -4.0, -1.0])  # tie, win, loss
    _, m = dpo_loss(c, r)
    assert float(m["rewards/accuracies"]) == pytest.approx(1 / 3)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1 * (-10 / 3))
    assert float(m["rewards/margins"]) == pytest.approx(0.1 * (-2 / 3), rel=1e-6)
    assert float(m["logps/rejected"]) == pytest.approx(-8 / 3)


def test_rewards_use_logratios_not_f_scores():
    cw, cl, rw, rl, _, _ = make_batch(4, seed=14, scale=0.5)
    _, m = dpo_loss(cw, cl, rw, rl, f_divergence="forward_kl")
    _, m0 = dpo_loss(cw, cl, rw, rl)
    for k in m:
        torch.testing.assert_close(m[k], m0[k])


def test_empty_completions_divide_by_one():
    cw = torch.tensor([-0.0, -6.0])
    cl = torch.tensor([-4.0, -0.0])
    Lw = torch.tensor([0, 3])
    Ll = torch.tensor([2, 0])
    loss, _ = dpo_loss(cw, cl, loss_type="sigmoid_norm", chosen_lengths=Lw, rejected_lengths=Ll, beta=1.0)
    per = -torch.nn.functional.logsigmoid(torch.tensor([0.0 - (-2.0), -2.0 - 0.0]))
    torch.testing.assert_close(loss, per.mean())
    # sft with no chosen token at all gives 0, not NaN
    loss, _ = dpo_loss(torch.zeros(2), cl, loss_type="sft", chosen_lengths=torch.zeros(2, dtype=torch.long))
    assert float(loss) == 0.0


def test_float_lengths_accepted():
    cw, cl, rw, rl, Lw, Ll = make_batch(4, seed=15)
    a = dpo_loss(cw, cl, rw, rl, loss_type="ipo", chosen_lengths=Lw, rejected_lengths=Ll)[0]
    b = dpo_loss(cw, cl, rw, rl, loss_type="ipo", chosen_lengths=Lw.float(), rejected_lengths=Ll.double())[0]
    torch.testing.assert_close(a, b)


def test_nan_in_nan_out():
    cw, cl, rw, rl, Lw, Ll = make_batch(3, seed=16)
    cw = cw.clone()
    cw[1] = float("nan")
    for lt in DPO_LOSS_TYPES:
        loss, _ = dpo_loss(
            cw, cl, rw, rl, loss_type=lt, label_smoothing=LS.get(lt, 0.0), chosen_lengths=Lw, rejected_lengths=Ll
        )
        assert torch.isnan(loss), lt


def test_module_matches_functional():
    cw, cl, rw, rl, Lw, Ll = make_batch(5, seed=17)
    kw = dict(beta=0.2, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1])
    mod = DPOLoss(**kw)
    assert "loss_weights" in repr(mod)
    a, ma = mod(cw, cl, rw, rl, chosen_lengths=Lw, rejected_lengths=Ll)
    b, mb = dpo_loss(cw, cl, rw, rl, chosen_lengths=Lw, rejected_lengths=Ll, **kw)
    torch.testing.assert_close(a, b)
    assert ma.keys() == mb.keys()
    assert not list(mod.parameters())
    assert mod.beta == 0.2 and mod.loss_type == ["sigmoid", "ipo"] and mod.loss_weights == [1.0, 0.1]
    with pytest.raises(AttributeError):
        mod.beta = 0.5  # the validated config is read-only


def test_module_warns_once_at_construction():
    cw, cl, rw, rl, _, _ = make_batch(3, seed=18)
    with pytest.warns(UserWarning, match="label_smoothing"):
        mod = DPOLoss(label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mod(cw, cl, rw, rl)


# ----------------------------------------------------------------------------------------------
# bad input


def _good():
    cw, cl, rw, rl, Lw, Ll = make_batch(3, seed=0)
    return cw, cl, rw, rl, Lw, Ll


def test_unknown_loss_type_lists_valid_ones():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="loss_type") as e:
        dpo_loss(cw, cl, rw, rl, loss_type="dpo")
    for t in DPO_LOSS_TYPES:
        assert repr(t) in str(e.value)
    with pytest.raises(ValueError, match="'kto_pair'"):
        dpo_loss(cw, cl, rw, rl, loss_type=["sigmoid", "kto_pair"])
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(cw, cl, rw, rl, loss_type=[])
    with pytest.raises(TypeError, match="loss_type"):
        dpo_loss(cw, cl, rw, rl, loss_type=3)
    with pytest.raises(ValueError, match="loss_type"):
        DPOLoss(loss_type="simpo")


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_beta(beta):
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(cw, cl, rw, rl, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=beta)


def test_beta_type():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(TypeError, match="beta"):
        dpo_loss(cw, cl, rw, rl, beta=True)
    with pytest.raises(TypeError, match="beta"):
        dpo_loss(cw, cl, rw, rl, beta="0.1")


@pytest.mark.parametrize(
    "loss_type, ls",
    [
        ("robust", 0.5),
        ("robust", 0.7),
        ("robust", -0.1),
        ("exo_pair", 0.0),
        ("exo_pair", 1.0),
        ("aot", 1.5),
        ("aot_unpaired", -0.2),
        ("sigmoid", 1.5),
        ("sigmoid", -0.1),
        (["sigmoid", "robust"], 0.6),
    ],
)
def test_bad_label_smoothing(loss_type, ls):
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(cw, cl, rw, rl, loss_type=loss_type, label_smoothing=ls)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(loss_type=loss_type, label_smoothing=ls)


def test_exo_error_names_the_type():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(cw, cl, rw, rl, loss_type="exo_pair")  # TRL also refuses eps = 0


def test_mismatched_batch_sizes():
    cw, cl, rw, rl, Lw, Ll = _good()
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo_loss(cw, cl[:2], rw, rl)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(cw, cl, rw[:2], rl)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(cw, cl, rw, torch.cat([rl, rl]))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(cw, cl, rw, rl, loss_type="ipo", chosen_lengths=Lw[:1], rejected_lengths=Ll)
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(cw, cl, rw, rl, loss_type="ipo", chosen_lengths=Lw, rejected_lengths=Ll[:2])
    with pytest.raises(ValueError, match="pair_weights"):
        dpo_loss(cw, cl, rw, rl, pair_weights=torch.ones(4))


def test_bad_shapes():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="chosen_logps"):
        dpo_loss(cw[:, None], cl[:, None])
    with pytest.raises(ValueError, match="chosen_logps"):
        dpo_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="chosen_logps"):
        dpo_loss(torch.tensor(1.0), torch.tensor(1.0))


@pytest.mark.parametrize(
    "loss_type, missing",
    [
        ("ipo", "chosen_lengths"),
        ("ipo", "rejected_lengths"),
        ("sigmoid_norm", "rejected_lengths"),
        ("sft", "chosen_lengths"),
        (["sigmoid", "sft"], "chosen_lengths"),
    ],
)
def test_missing_lengths(loss_type, missing):
    cw, cl, rw, rl, Lw, Ll = _good()
    kw = dict(chosen_lengths=Lw, rejected_lengths=Ll)
    kw[missing] = None
    with pytest.raises(ValueError, match=missing):
        dpo_loss(cw, cl, rw, rl, loss_type=loss_type, **kw)


def test_sft_needs_only_chosen_lengths():
    cw, cl, rw, rl, Lw, _ = _good()
    dpo_loss(cw, cl, rw, rl, loss_type="sft", chosen_lengths=Lw)


def test_loss_weights_length():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(cw, cl, rw, rl, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights"):
        DPOLoss(loss_type="sigmoid", loss_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"loss_weights\[1\]"):
        dpo_loss(cw, cl, rw, rl, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, float("nan")])


def test_non_float_inputs():
    cw, cl, rw, rl, Lw, Ll = _good()
    with pytest.raises(TypeError, match="chosen_logps"):
        dpo_loss(cw.long(), cl)
    with pytest.raises(TypeError, match="rejected_logps"):
        dpo_loss(cw, [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="ref_rejected_logps"):
        dpo_loss(cw, cl, rw, rl.int())
    with pytest.raises(TypeError, match="chosen_lengths"):
        dpo_loss(cw, cl, loss_type="sft", chosen_lengths=Lw > 0)
    with pytest.raises(TypeError, match="pair_weights"):
        dpo_loss(cw, cl, pair_weights=torch.ones(3, dtype=torch.long))


def test_half_a_reference():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(cw, cl, rw, None)


def test_bad_f_divergence():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="f_divergence") as e:
        dpo_loss(cw, cl, rw, rl, f_divergence="kl")
    for f in F_DIVERGENCES:
        assert f in str(e.value)
    with pytest.raises(ValueError, match="nca_pair"):
        dpo_loss(cw, cl, rw, rl, loss_type=["sigmoid", "nca_pair"], f_divergence="js_divergence")
    with pytest.raises(ValueError, match="f_alpha"):
        dpo_loss(cw, cl, rw, rl, f_divergence="alpha_divergence", f_alpha=float("nan"))


def test_bad_discopop_tau():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(cw, cl, rw, rl, loss_type="discopop", discopop_tau=0.0)


def test_pair_weights_refused_with_sorting_losses():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(cw, cl, rw, rl, loss_type="aot", pair_weights=torch.ones(3))


def test_bco_delta_only_for_bco():
    cw, cl, rw, rl, _, _ = _good()
    with pytest.raises(ValueError, match="bco_delta"):
        dpo_loss(cw, cl, rw, rl, bco_delta=0.1)
    with pytest.raises(ValueError, match="bco_delta"):
        dpo_loss(cw, cl, rw, rl, loss_type="bco_pair", bco_delta=torch.zeros(2))
    with pytest.raises(ValueError, match="bco_running_mean"):
        DPOLoss(loss_type="sigmoid", bco_running_mean=True)


# ----------------------------------------------------------------------------------------------
# against TRL's own code


class _FakeLM(torch.nn.Module):
    """Stands in for the policy: returns fixed per-token outputs whatever the input ids."""

    def __init__(self, per_token_logps, log_sum_sq_probs):
        super().__init__()
        self.per_token_logps = per_token_logps
        self.log_sum_sq_probs = log_sum_sq_probs

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        shape = self.per_token_logps.shape
        return types.SimpleNamespace(
            log_probs=self.per_token_logps,
            log_sum_sq_probs=self.log_sum_sq_probs,
            entropy=torch.zeros(shape),
            mean_logits=torch.zeros(shape),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )


def _trl_dpo(
    per_token,
    completion_mask,
    ref_chosen,
    ref_rejected,
    *,
    loss_type,
    loss_weights=None,
    beta=BETA,
    label_smoothing=0.0,
    f_divergence="reverse_kl",
    f_alpha=0.5,
    discopop_tau=0.05,
    lssp=None,
):
    """TRL 1.16 DPOTrainer._compute_loss on given per-token log-probs -> (loss, logged metrics)."""
    dpo_trainer = expected.require_module("trl", "trl.trainer.dpo_trainer")
    trainer = object.__new__(dpo_trainer.DPOTrainer)
    n, t = completion_mask.shape
    shift_mask = completion_mask[:, 1:]
    # a real LM gives 0 log-prob at label -100 positions, and TRL sums over all positions
    model = _FakeLM(per_token * shift_mask, lssp if lssp is not None else torch.zeros(n, t - 1))
    # __init__ state that _compute_loss reads, as DPOTrainer.__init__ would set it from a DPOConfig
    trainer.model = model
    trainer.accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer.args = types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None)
    trainer.beta = beta
    trainer.loss_types = list(loss_type)
    trainer.loss_weights = loss_weights or [1.0] * len(loss_type)
    trainer.label_smoothing = label_smoothing
    trainer.f_divergence_type = f_divergence
    trainer.f_alpha_divergence_coef = f_alpha
    trainer.use_weighting = lssp is not None
    trainer.ld_alpha = None
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _token_batch(B, T=9, seed=0, empty=True):
    """Per-token log-probs [2B, T-1] (leaf), completion mask [2B, T], reference sums [2B]."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        prompt = int(torch.randint(1, 3, (), generator=g))
        length = int(torch.randint(0 if empty else 1, T - prompt + 1, (), generator=g))
        mask[i, prompt : prompt + length] = 1
    mask[0, 1:4] = 1  # at least one chosen token
    per_token = -(torch.rand(2 * B, T - 1, generator=g) * 4.0)
    sums = (per_token * mask[:, 1:]).sum(1)
    ref = sums + 1.5 * torch.randn(2 * B, generator=g)
    return per_token.requires_grad_(True), mask, ref


TRL_CASES = [dict(loss_type=[t], label_smoothing=LS.get(t, 0.0)) for t in DPO_LOSS_TYPES]
TRL_CASES += [
    dict(loss_type=[t], f_divergence=f, label_smoothing=LS.get(t, 0.0), f_alpha=0.3)
    for f in ("forward_kl", "js_divergence", "alpha_divergence")
    for t in sorted(F_DIVERGENCE_LOSS_TYPES)
]
TRL_CASES += [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type=["robust", "ipo", "apo_zero"], loss_weights=[1.0, 0.05, 2.0], label_smoothing=0.3),
    dict(loss_type=["discopop"], discopop_tau=0.7),
    dict(loss_type=["aot_unpaired"], label_smoothing=0.0, beta=1.3),
    dict(loss_type=["sigmoid"], f_divergence="alpha_divergence", f_alpha=1.0),
]


def _case_id(c):
    s = "+".join(c["loss_type"])
    if c.get("f_divergence", "reverse_kl") != "reverse_kl":
        s += "-" + c["f_divergence"]
    return s


@pytest.mark.parametrize("case", TRL_CASES, ids=[_case_id(c) for c in TRL_CASES])
def test_matches_trl(case):
    for B in (1, 3):
        for with_ref in (True, False):
            _compare_with_trl(case, B, with_ref)


def _compare_with_trl(case, B, with_ref):
    per_token, mask, ref = _token_batch(B, seed=B + 17 * len(case["loss_type"]))
    if not with_ref:
        ref = torch.zeros_like(ref)  # TRL 1.16 has no reference-free flag: zeros is what it means
        # keep the log-ratios (now the whole log-probs) moderate: with forward_kl, 1 - exp(-r) at
        # r = -20 makes TRL's discopop overflow to inf * 0 = NaN where ours stays finite
        per_token = (0.1 * per_token).detach().requires_grad_(True)
    trl_loss, trl_metrics = _trl_dpo(per_token, mask, ref[:B], ref[B:], **case)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    kw = dict(case)
    kw["loss_type"] = kw["loss_type"] if len(kw["loss_type"]) > 1 else kw["loss_type"][0]
    kw.setdefault("beta", BETA)
    sums = (per_token * mask[:, 1:]).sum(1)
    lengths = mask.sum(1)
    loss, metrics = dpo_loss(
        sums[:B],
        sums[B:],
        ref[:B] if with_ref else None,
        ref[B:] if with_ref else None,
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        **kw,
    )
    (grad,) = torch.autograd.grad(loss, per_token)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-6)
    for k, v in metrics.items():
        assert k in trl_metrics, k
        assert float(v) == pytest.approx(trl_metrics[k], rel=1e-5, abs=1e-6), k
    # the oracle of the other tests follows TRL too
    sums = (per_token * mask[:, 1:]).sum(1)
    ref_loss, _ = R.dpo_loss(
        sums[:B],
        sums[B:],
        ref[:B] if with_ref else None,
        ref[B:] if with_ref else None,
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        **kw,
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, per_token)
    torch.testing.assert_close(ref_loss.float(), trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_grad.float(), trl_grad, rtol=1e-5, atol=1e-6)


# not "sft": TRL 1.16 multiplies its expanded (stride-0) sft loss in place and raises for B > 1
@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo", "apo_down"]])
def test_matches_trl_weighting(loss_type):
    """TRL's use_weighting (WPO) == pair_weights computed from the same per-token statistics."""
    B = 3
    per_token, mask, ref = _token_batch(B, seed=5)
    lssp = -torch.rand(per_token.shape, generator=torch.Generator().manual_seed(3)) * 2.0
    trl_loss, _ = _trl_dpo(per_token, mask, ref[:B], ref[B:], loss_type=loss_type, lssp=lssp)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    shift = mask[:, 1:]
    with torch.no_grad():  # WPO weight: exp of the mean of (logp - log sum p^2) over the completion
        w = torch.exp(((per_token - lssp) * shift).sum(1) / shift.sum(1).clamp(min=1))
    pair_weights = w[:B] * w[B:]
    sums = (per_token * shift).sum(1)
    lengths = mask.sum(1)
    loss, _ = dpo_loss(
        sums[:B],
        sums[B:],
        ref[:B],
        ref[B:],
        beta=BETA,
        loss_type=loss_type,
        chosen_lengths=lengths[:B],
        rejected_lengths=lengths[B:],
        pair_weights=pair_weights,
    )
    (grad,) = torch.autograd.grad(loss, per_token)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_traces_with_torch_compile_fullgraph():
    cw, cl, rw, rl, Lw, Ll = make_batch(4, seed=21)
    cw.requires_grad_(True)
    kw = dict(
        loss_type=["sigmoid", "ipo", "sft", "discopop", "aot"],
        loss_weights=[1.0, 0.1, 1.0, 1.0, 1.0],
        chosen_lengths=Lw,
        rejected_lengths=Ll,
    )
    compiled = torch.compile(lambda *a: dpo_loss(*a, **kw), fullgraph=True)
    loss, metrics = compiled(cw, cl, rw, rl)
    ref, ref_metrics = dpo_loss(cw, cl, rw, rl, **kw)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, cw)[0], torch.autograd.grad(ref, cw)[0])
    mod = torch.compile(DPOLoss(loss_type="bco_pair", bco_running_mean=True), fullgraph=True)
    mod(cw, cl, rw, rl)


# ----------------------------------------------------------------------------------------------
# reduction, the caller's loss_type


@pytest.mark.parametrize(
    "loss_type, weights",
    [("sigmoid", None), (["sigmoid", "ipo", "sft"], [1.0, 0.3, 0.5]), (["robust", "bco_pair"], [0.7, 1.0])],
)
def test_reduction(loss_type, weights):
    """ "none" is the per-pair loss [B]: its mean is "mean", its sum is "sum" (pair_weights included)."""
    cw, cl, rw, rl, Lw, Ll = make_batch(5, seed=41)
    pw = torch.rand(5, generator=torch.Generator().manual_seed(3)) + 0.5
    kw = dict(
        loss_type=loss_type,
        loss_weights=weights,
        label_smoothing=0.1 if "robust" in loss_type else 0.0,
        chosen_lengths=Lw,
        rejected_lengths=Ll,
        pair_weights=pw,
    )
    res = {}
    for r in ("mean", "sum", "none"):
        x = [t.clone().requires_grad_() for t in (cw, cl)]
        loss, m = dpo_loss(*x, rw, rl, reduction=r, **kw)
        res[r] = (loss, m, x)
    per_pair = res["none"][0]
    assert per_pair.shape == (5,)
    torch.testing.assert_close(per_pair.mean(), res["mean"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_pair.sum(), res["sum"][0], rtol=1e-6, atol=1e-6)
    g = torch.autograd.grad(res["mean"][0], res["mean"][2])
    gn = torch.autograd.grad(per_pair.mean(), res["none"][2])
    for a, b in zip(g, gn):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    mod = DPOLoss(loss_type=loss_type, loss_weights=weights, reduction="none", label_smoothing=kw["label_smoothing"])
    out, _ = mod(cw, cl, rw, rl, chosen_lengths=Lw, rejected_lengths=Ll, pair_weights=pw)
    torch.testing.assert_close(out, per_pair.detach())
    assert mod.reduction == "none" and "reduction='none'" in repr(mod)


def test_bad_reduction_names_the_argument():
    cw, cl, rw, rl, _, _ = make_batch(2, seed=42)
    with pytest.raises(ValueError, match="reduction must be one of"):
        dpo_loss(cw, cl, rw, rl, reduction="batchmean")
    with pytest.raises(TypeError, match="reduction must be a str"):
        DPOLoss(reduction=1)


@pytest.mark.parametrize("loss_type", ["sigmoid", ("sigmoid", "ipo"), ["hinge", "sft"]])
def test_module_keeps_the_callers_loss_type(loss_type):
    """A str stays a str, a list a list (a copy: the module's config cannot be changed through it)."""
    mod = DPOLoss(loss_type=loss_type)
    assert mod.loss_type == loss_type and type(mod.loss_type) is type(loss_type)
    if isinstance(loss_type, list):
        mod.loss_type.append("ipo")
        assert mod.loss_type == loss_type
