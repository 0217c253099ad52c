"""A name means what it means in the trainer it comes from: ppo_loss / policy_loss under
``convention="verl"`` against verl 0.9's ``core_algos`` (restated below from its source, and,
where verl imports, verl's own functions), and the names TRL and verl give two formulas.

The restatements (``verl_*``) follow verl 0.9.1's ``agg_loss`` (dp_size 1), ``kl_penalty``,
``compute_policy_loss_vanilla`` and ``compute_policy_loss_gspo`` line by line; they share no code
with prefopt_fast. Ground truth runs in fp64; the library runs on fp32 / bf16 inputs.
"""

import math

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch

from prefopt_fast import PolicyLoss, policy_loss, ppo_loss
from prefopt_fast.losses import LOSS_AGG_MODES
from prefopt_fast.losses.ppo import VERL_KL_ESTIMATORS

# ----------------------------------------------------------------------------------------------
# verl 0.9.1, restated


def verl_agg(loss_mat, mask, mode, loss_scale_factor=None):
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = (loss_mat * mask).sum(-1)
        seq_mask = (mask.sum(-1) > 0).to(loss_mat.dtype)  # exclude fully masked sequences
        loss = (seq_losses * seq_mask).sum() / seq_mask.sum()
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    seq_n = mask.sum(-1)
    seq_losses = (loss_mat * mask).sum(-1) / (seq_n + 1e-8)
    seq_mask = (seq_n > 0).to(loss_mat.dtype)
    return (seq_losses * seq_mask).sum() / seq_mask.sum()


def verl_kl(logp, ref, name):
    base = name[:-1] if name.endswith("+") else name
    if base in ("kl", "k1"):
        fwd = logp - ref
    elif base == "abs":
        fwd = (logp - ref).abs()
    elif base in ("mse", "k2"):
        fwd = 0.5 * (logp - ref).square()
    else:  # low_var_kl, k3
        kl = torch.clamp(ref - logp, min=-20, max=20)
        fwd = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not name.endswith("+") or name in ("mse", "k2"):
        return fwd
    bwd = 0.5 * (logp - ref).square()
    return bwd - bwd.detach() + fwd.detach()


def _masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def verl_vanilla(old, logp, adv, mask, mode, eps_low=0.2, eps_high=0.2, c=3.0, w=None, scale=None):
    m = mask.to(logp.dtype)
    nkl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(nkl)
    ppo_kl = _masked_mean(-nkl, m)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * c
    c2 = torch.min(l3, c1)
    lower = _masked_mean(torch.gt(c1, l3).to(m.dtype) * (adv < 0).to(m.dtype), m)
    pg = torch.where(adv < 0, c2, c1)
    if w is not None:
        pg = pg * w
    return verl_agg(pg, mask, mode, scale), {"ppo_kl": ppo_kl, "pg_clipfrac_lower": lower}


def verl_gspo(old, logp, adv, mask, mode, eps_low=0.2, eps_high=0.2):
    m = mask.to(logp.dtype)
    nkl = logp - old
    L = m.sum(-1).clamp(min=1)
    seq = (nkl * m).sum(-1) / L
    log_r = torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0)
    r = torch.exp(log_r)
    pg = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - eps_low, 1 + eps_high))
    return verl_agg(pg, mask, mode), {"ppo_kl": _masked_mean(-nkl, m), "pg_clipfrac_lower": torch.zeros(())}


def verl_actor(logp, old, adv, mask, mode, *, ref=None, kl_type="low_var_kl", kl_coef=0.0, ent=None, ent_coef=0.0,
               gspo=False, scale=None, **clip):  # fmt: skip
    """verl's workers/utils/losses.py ppo_loss: pg + kl_coef * agg(kl) - ent_coef * agg(H)."""
    if gspo:
        loss, met = verl_gspo(old, logp, adv, mask, mode, **clip)
    else:
        loss, met = verl_vanilla(old, logp, adv, mask, mode, scale=scale, **clip)
    if ent is not None:
        loss = loss - ent_coef * verl_agg(ent, mask, mode, scale)
    if ref is not None:
        loss = loss + kl_coef * verl_agg(verl_kl(logp, ref, kl_type), mask, mode, scale)
    return loss, met


# ----------------------------------------------------------------------------------------------
# data: a fully masked sequence, log-ratios and reference gaps beyond +-20, zero advantages


def make(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4 - 0.05
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :] = True
    mask[2, :] = False  # a fully masked sequence
    lr = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    lr[0, :4] = torch.tensor([25.0, -25.0, 1.6, -1.5], dtype=torch.float64)  # beyond verl's +-20 clamp
    lr[1, :3] = torch.tensor([30.0, 0.3, -30.0], dtype=torch.float64)
    old = logp - lr
    d = torch.randn(B, T, generator=g, dtype=torch.float64)
    d[0, 4], d[1, 4], d[3, 0] = 5.0, 25.0, -25.0  # k3 above verl's value clamp; beyond the log clamp
    ref = logp + d
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[0, :4] = torch.tensor([-0.5, 0.7, -1.2, -0.9], dtype=torch.float64)
    adv[1, 1] = 0.0
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, ent=ent)


def _lib(data, dtype, **kw):
    """policy_loss on ``dtype`` inputs; returns (loss, metrics, d loss / d logp in fp64)."""
    logp = data["logp"].detach().clone().to(dtype).requires_grad_(True)
    cast = {k: data[k].to(dtype) for k in ("old", "ref", "adv", "ent")}
    loss, met = policy_loss(
        logp, cast["old"], cast["adv"], data["mask"], entropy=cast["ent"], ref_logps=cast["ref"], **kw
    )
    loss.backward()
    return loss, met, logp.grad.double()


def _truth(data, **kw):
    logp = data["logp"].clone().requires_grad_(True)
    kw = {"ent": data["ent"], "ref": data["ref"], **kw}
    loss, met = verl_actor(logp, data["old"], data["adv"], data["mask"], **kw)
    loss.backward()
    return loss.detach(), met, logp.grad


TOL = {torch.float64: (1e-7, 1e-9), torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-2, 5e-3)}


def _check(data, dtype, lib_kw, verl_kw):
    loss, met, grad = _lib(data, dtype, **lib_kw)
    t_loss, t_met, t_grad = _truth(data, **verl_kw)
    rtol, atol = TOL[dtype]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach().double(), t_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, t_grad, rtol=rtol, atol=atol * max(1.0, float(t_grad.abs().max())))
    for k in ("ppo_kl", "pg_clipfrac_lower"):
        torch.testing.assert_close(met[k].double(), t_met[k].double(), rtol=rtol, atol=atol, msg=k)


DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_verl_aggregation_matches_verl(mode, dtype):
    data = make()
    kw = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_eps_high=0.28)
    _check(
        data,
        dtype,
        dict(convention="verl", loss_agg_mode=mode, **kw),
        dict(mode=mode, kl_type="k3", kl_coef=0.1, ent_coef=0.01, eps_high=0.28),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("est", ["k1", "k2", "k3", "abs", "low_var_kl", *VERL_KL_ESTIMATORS])
def test_verl_kl_estimators_match_verl(est, dtype):
    data = make(seed=1)
    _check(
        data,
        dtype,
        dict(convention="verl", kl_coef=0.3, kl_estimator=est, loss_agg_mode="seq-mean-token-mean"),
        dict(mode="seq-mean-token-mean", kl_type=est, kl_coef=0.3),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verl_sum_norm_scale_and_is_weights(dtype):
    data = make(seed=2)
    w = torch.rand(4, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    loss, met, grad = _lib(
        data, dtype, convention="verl", loss_agg_mode="seq-mean-token-sum-norm", max_length=16, is_weights=w.to(dtype)
    )
    m = data["mask"]
    logp = data["logp"].clone().requires_grad_(True)
    t_loss, _ = verl_vanilla(data["old"], logp, data["adv"], m, "seq-mean-token-sum-norm", w=w, scale=16)
    t_loss.backward()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss.detach().double(), t_loss.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad, logp.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_gspo_matches_verl(mode, dtype):
    data = make(seed=4)
    data["old"] = data["logp"] - torch.randn(4, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    data["old"][0] = data["logp"][0] - 12.0  # a sequence ratio beyond verl's log clamp at 10
    _check(
        data,
        dtype,
        dict(convention="verl", loss_agg_mode=mode, importance_sampling_level="sequence", clip_eps_high=0.3),
        dict(mode=mode, gspo=True, eps_high=0.3, ref=None, ent_coef=0.0),
    )


def test_verl_dual_clip_default_and_metrics():
    assert PolicyLoss(convention="verl").config.dual_clip == 3.0  # verl's clip_ratio_c, always on
    assert PolicyLoss(convention="verl", dual_clip=5.0).config.dual_clip == 5.0
    assert PolicyLoss(convention="verl", importance_sampling_level="sequence").config.dual_clip is None  # its gspo
    assert PolicyLoss(convention="trl", loss_agg_mode="grpo").config.dual_clip is None
    assert PolicyLoss().config.dual_clip is None
    data = make()
    _, met, _ = _lib(data, torch.float64, convention="verl")
    assert float(met["pg_clipfrac_lower"]) > 0  # the batch has tokens beyond the dual clip
    _, met, _ = _lib(data, torch.float64)  # no dual clip: verl's metric is 0
    assert float(met["pg_clipfrac_lower"]) == 0.0


# ----------------------------------------------------------------------------------------------
# the four places where one name had two formulas, in numbers


def _one(logp, old, adv, mask=None, **kw):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return policy_loss(t(logp), t(old), t(adv), None if mask is None else torch.tensor(mask), **kw)


def test_seq_mean_token_sum_norm_is_verls_not_dr_grpo():
    # two sequences, the second empty; per-token loss -A r = -1 at r = 1 (on-policy)
    logp, adv, mask = [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], [1.0, 1.0], [[1, 1, 0], [0, 0, 0]]
    verl, _ = _one(logp, logp, adv, mask, loss_agg_mode="seq-mean-token-sum-norm")
    assert float(verl) == pytest.approx(-2.0 / 1 / 3)  # sum S_b / (non-empty sequences) / T
    verl8, _ = _one(logp, logp, adv, mask, loss_agg_mode="seq-mean-token-sum-norm", max_length=8)
    assert float(verl8) == pytest.approx(-2.0 / 8)  # max_length is verl's loss_scale_factor
    trl, _ = _one(logp, logp, adv, mask, loss_agg_mode="dr_grpo", max_length=8)
    assert float(trl) == pytest.approx(-2.0 / (2 * 8))  # TRL: sum / (B * max_completion_length)


@pytest.mark.parametrize(
    "verl_name,trl_name", [("seq-mean-token-mean", "grpo"), ("seq-mean-token-sum", "luspo")], ids=["mean", "sum"]
)
def test_seq_means_skip_empty_sequences_in_verl_only(verl_name, trl_name):
    logp, adv, mask = [[-1.0, -1.0], [-1.0, -1.0], [-2.0, -2.0]], [1.0, 1.0, 1.0], [[1, 1], [0, 0], [1, 0]]
    per_seq = {"mean": [-1.0, -1.0], "sum": [-2.0, -1.0]}["mean" if "mean" in verl_name[9:] else "sum"]
    verl, _ = _one(logp, logp, adv, mask, loss_agg_mode=verl_name)
    trl, _ = _one(logp, logp, adv, mask, loss_agg_mode=trl_name)
    assert float(verl) == pytest.approx(sum(per_seq) / 2)
    assert float(trl) == pytest.approx(sum(per_seq) / 3)


def test_k3_means_the_conventions_formula():
    # d = log ref - log pi = 5: Schulman's k3 = e^5 - 6 = 142.41; verl's k3 (low_var_kl) clamps it to 10
    logp, ref = [[-6.0]], [[-1.0]]
    kw = dict(kl_coef=1.0, kl_estimator="k3", ref_logps=torch.tensor(ref, dtype=torch.float64))
    _, trl = _one(logp, logp, [0.0], loss_agg_mode="grpo", convention="trl", **kw)
    _, verl = _one(logp, logp, [0.0], convention="verl", **kw)
    _, default = _one(logp, logp, [0.0], **kw)
    assert float(trl["kl"]) == pytest.approx(math.exp(5) - 6)
    assert float(default["kl"]) == pytest.approx(math.exp(5) - 6)  # documented: None means TRL's k3
    assert float(verl["kl"]) == pytest.approx(10.0)


def test_log_ratio_clamp_is_verls_only():
    # r = e^25, A < 0, a dual clip far away: verl's ratio is e^20, TRL's e^25
    kw = dict(dual_clip=1e12)
    verl, vm = _one([[0.0]], [[-25.0]], [-1.0], convention="verl", **kw)
    trl, tm = _one([[0.0]], [[-25.0]], [-1.0], loss_agg_mode="bnpo", convention="trl", **kw)
    assert float(verl) == pytest.approx(math.exp(20.0))
    assert float(trl) == pytest.approx(math.exp(25.0))
    assert float(vm["ppo_kl"]) == -20.0 and float(tm["ppo_kl"]) == -25.0
    # a zero advantage at a log-ratio past fp32's exp range: finite in verl's convention
    lp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.tensor([[-100.0, -1.0]]), torch.tensor([[0.0, 1.0]]), convention="verl")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_verl_kl_spellings_need_the_verl_convention():
    data = make(seed=3)
    lp = data["logp"]
    for est in ("kl", "mse", "k2+"):
        with pytest.raises(ValueError, match="convention='verl'"):
            policy_loss(lp, lp, torch.zeros(4, dtype=torch.float64), data["mask"], ref_logps=data["ref"],
                        kl_coef=0.1, kl_estimator=est)  # fmt: skip


def test_straight_through_value_and_gradient():
    # k3+: the value of verl's k3, the gradient of k2 (d/dlogp 0.5 (logp - ref)^2 = logp - ref)
    lp = torch.tensor([[-6.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.5]], dtype=torch.float64)
    _, m = policy_loss(lp, None, torch.zeros(1, dtype=torch.float64), ref_logps=ref, kl_estimator="k3+",
                       kl_coef=1.0, convention="verl")  # fmt: skip
    loss, _ = policy_loss(lp, None, torch.zeros(1, dtype=torch.float64), ref_logps=ref, kl_estimator="k3+",
                          kl_coef=1.0, convention="verl", loss_agg_mode="seq-mean-token-sum")  # fmt: skip
    loss.backward()
    d = 0.5
    assert float(m["kl"]) == pytest.approx((10.0 + (math.exp(-d) + d - 1)) / 2)
    torch.testing.assert_close(lp.grad, (lp - ref).detach())


# ----------------------------------------------------------------------------------------------
# verl's own functions (where verl imports)


def _core():
    expected.require_module("verl")
    import importlib

    return importlib.import_module("verl.trainer.ppo.core_algos")


def _actor_config(**kw):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **kw)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_against_verl_vanilla_and_agg_loss(mode):
    core = _core()
    data = make(seed=6)
    cfg = _actor_config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    logp = data["logp"].clone().requires_grad_(True)
    pg, met = core.compute_policy_loss_vanilla(
        data["old"], logp, data["adv"], data["mask"], loss_agg_mode=mode, config=cfg
    )
    ent = core.agg_loss(data["ent"], data["mask"], mode)
    kl = core.agg_loss(core.kl_penalty(logp, data["ref"], "k3+"), data["mask"], mode)
    want = pg - 0.01 * ent + 0.1 * kl
    want.backward()
    loss, m, grad = _lib(
        data,
        torch.float64,
        convention="verl",
        loss_agg_mode=mode,
        clip_eps_high=0.28,
        kl_coef=0.1,
        kl_estimator="k3+",
        entropy_coef=0.01,
    )
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-7, atol=1e-9)
    for k in ("ppo_kl", "pg_clipfrac_lower"):
        assert float(m[k]) == pytest.approx(met[f"actor/{k}"], rel=1e-7, abs=1e-12)


@pytest.mark.parametrize(
    "est", ["k1", "k2", "k3", "abs", "low_var_kl", *VERL_KL_ESTIMATORS, "kl", "mse", "kl+", "k2+", "mse+"]
)
def test_against_verl_kl_penalty(est):
    core = _core()
    data = make(seed=7)
    logp = data["logp"].clone().requires_grad_(True)
    want = core.agg_loss(core.kl_penalty(logp, data["ref"], est), data["mask"], "token-mean")
    want.backward()
    lp = data["logp"].clone().requires_grad_(True)
    _, m = policy_loss(lp, lp.detach(), torch.zeros(4, dtype=torch.float64), data["mask"], ref_logps=data["ref"],
                       kl_coef=1.0, kl_estimator=est, convention="verl")  # fmt: skip
    loss, _ = policy_loss(lp, lp.detach(), torch.zeros(4, dtype=torch.float64), data["mask"], ref_logps=data["ref"],
                          kl_coef=1.0, kl_estimator=est, convention="verl")  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(lp.grad, logp.grad, rtol=1e-7, atol=1e-9)


def test_against_verl_gspo():
    core = _core()
    data = make(seed=8)
    data["old"][0] = data["logp"][0] - 12.0
    cfg = _actor_config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.3)
    logp = data["logp"].clone().requires_grad_(True)
    want, met = core.compute_policy_loss_gspo(
        data["old"], logp, data["adv"], data["mask"], loss_agg_mode="seq-mean-token-mean", config=cfg
    )
    want.backward()
    loss, m, grad = _lib(
        data,
        torch.float64,
        convention="verl",
        loss_agg_mode="seq-mean-token-mean",
        importance_sampling_level="sequence",
        clip_eps_high=0.3,
    )
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-7, atol=1e-9)
    assert float(m["ppo_kl"]) == pytest.approx(met["actor/ppo_kl"], rel=1e-7)
    assert float(m["pg_clipfrac_lower"]) == met["actor/pg_clipfrac_lower"] == 0.0


# ----------------------------------------------------------------------------------------------
# from the logits: the fused path gives the same verl loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ppo_loss_from_logits_verl(dtype):
    g = torch.Generator().manual_seed(9)
    B, T, V = 3, 5, 24
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1] = -100  # a fully masked sequence
    labels[0, 3:] = -100
    x64 = logits.double().requires_grad_(True)
    lp64 = torch.log_softmax(x64, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    keep = labels != -100
    old = (lp64.detach() - torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    old[0, 0] = float(lp64[0, 0].detach()) - 24.0  # past the clamp
    ref = (lp64.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 3).float()
    adv = torch.randn(B, generator=g)
    for mode in ("seq-mean-token-sum-norm", "seq-mean-token-mean"):
        z = logits.clone().requires_grad_(True)
        loss, _ = ppo_loss(z, labels, old, adv, ref_logps=ref, kl_coef=0.2, kl_estimator="k3", loss_agg_mode=mode,
                           convention="verl", backend="torch")  # fmt: skip
        loss.backward()
        x64.grad = None
        lp = torch.where(keep, lp64, 0.0)
        want, _ = verl_actor(lp, old.double(), adv.double()[:, None], keep, mode, ref=ref.double(), kl_type="k3",
                             kl_coef=0.2)  # fmt: skip
        want.backward(retain_graph=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(loss.detach().double(), want.detach(), rtol=tol, atol=tol * 0.1)
        torch.testing.assert_close(z.grad.double(), x64.grad, rtol=tol, atol=tol * 0.1)


def test_linear_ppo_loss_passes_the_convention():
    from prefopt_fast.linear import LinearPPOLoss, linear_ppo_loss

    g = torch.Generator().manual_seed(10)
    B, T, H, V = 2, 4, 8, 16
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[1] = -100
    old = -torch.rand(B, T, generator=g) * 3 - 40.0  # log-ratios beyond verl's clamp
    ref = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    kw = dict(ref_logps=ref, kl_coef=0.1, kl_estimator="k3+", loss_agg_mode="seq-mean-token-sum-norm")
    z = (h @ w.T).requires_grad_(True)
    want, wm = ppo_loss(z, y, old, adv, convention="verl", backend="torch", **kw)
    hh = h.clone().requires_grad_(True)
    got, gm = linear_ppo_loss(hh, w, y, old, adv, convention="verl", backend="torch", **kw)
    torch.testing.assert_close(got, want)
    assert gm.keys() == wm.keys() and float(gm["ppo_kl"]) == pytest.approx(float(wm["ppo_kl"]), rel=1e-5)
    _, om = linear_ppo_loss(h, w, y, old, adv, convention=None, backend="torch", dual_clip=3.0,
                            **dict(kw, kl_estimator="low_var_kl"))  # fmt: skip
    assert float(gm["ppo_kl"]) == -20.0 and float(om["ppo_kl"]) < -20.0  # verl's log-ratio clamp
    mod = LinearPPOLoss(convention="verl", backend="torch", **{k: v for k, v in kw.items() if k != "ref_logps"})
    assert "convention='verl'" in repr(mod)
    torch.testing.assert_close(mod(h, w, y, old, adv, ref_logps=ref)[0], want)
