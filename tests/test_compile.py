"""torch.compile(fullgraph=True) traces the package and matches eager.

token_logprobs (forward and backward) on every backend, and a new temperature value does not
recompile; then EVERY public function and module of ``prefopt_fast.__all__`` (CASES below),
forward and backward, on the torch and cpu backends; a public name without a case fails
``test_every_public_name_has_a_compile_case``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss(backend, temperature):
    from prefopt_fast import token_logprobs

    def f(full, labels, w1, w2):
        # the causal shift inside the compiled region: a strided view, never copied
        out = token_logprobs(full[:, :-1], labels, stats=("entropy",), temperature=temperature, backend=backend)
        return (out.logprobs * w1).sum() + (out.entropy * w2).sum(), out.logprobs, out.entropy

    return f


def _inputs(device, dtype=torch.float32, B=2, T=7, V=300):
    full = (torch.randn(B, T, V) * 2).to(dtype).to(device)
    y = torch.randint(0, V, (B, T - 1), device=device)
    y[0, :2] = -100
    w1 = torch.randn(B, T - 1, device=device)
    w2 = torch.randn(B, T - 1, device=device)
    return full, y, w1, w2


def _run(f, full, y, w1, w2):
    x = full.clone().requires_grad_()
    loss, logp, h = f(x, y, w1, w2)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), logp.detach(), h.detach(), g


@pytest.mark.parametrize("temperature", ["float", "tensor"])
def test_compile_fullgraph_matches_eager(backend, device, temperature):
    full, y, w1, w2 = _inputs(device)
    t = 0.8 if temperature == "float" else (torch.rand(full.shape[0], 1, device=device) + 0.5)
    f = _loss(backend, t)
    eager = _run(f, full, y, w1, w2)
    compiled = _run(torch.compile(f, fullgraph=True), full, y, w1, w2)
    for name, a, b in zip(("loss", "logprobs", "entropy", "grad"), compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_compile_bf16_inplace_backward(backend, device):
    """bf16 logits and inplace_backward=True through the compiled graph."""
    from prefopt_fast import token_logprobs

    def f(h, labels, w):
        logits = h * 1.0  # a non-leaf buffer the in-place backward may overwrite
        out = token_logprobs(logits, labels, inplace_backward=True, backend=backend)
        return (out * w).sum()

    full, y, w1, _ = _inputs(device, torch.bfloat16)
    y = torch.randint(0, full.shape[-1], full.shape[:-1], device=device)
    w = torch.randn(full.shape[:-1], device=device)

    def run(fn):
        h = full.clone().requires_grad_()
        loss = fn(h, y, w)
        loss.backward()
        return loss.detach(), h.grad

    a = run(torch.compile(f, fullgraph=True))
    b = run(f)
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=2**-7)


def _temperature_fn(backend):
    from prefopt_fast import token_logprobs

    def f(x, labels, t):
        return token_logprobs(x[:, :-1], labels, temperature=t, backend=backend).sum()

    return f


def test_no_recompile_per_float_temperature(backend, device):
    """A runtime hyper-parameter: new float temperatures reuse the compiled graph (after
    at most the one automatic-dynamic recompile that turns the float into a SymFloat),
    and the traced graph stays whole (fullgraph=True) with a symbolic temperature."""
    from torch._dynamo.testing import CompileCounter

    full, y, _, _ = _inputs(device)
    f = _temperature_fn(backend)
    cnt = CompileCounter()
    cf = torch.compile(f, fullgraph=True, backend=cnt)
    outs = {t: cf(full, y, t) for t in (0.5, 0.6, 0.7, 1.3, 2.0)}
    assert cnt.frame_count <= 2, f"recompiled per float temperature: {cnt.frame_count} frames"
    for t, o in outs.items():
        torch.testing.assert_close(o, f(full, y, t), atol=1e-4, rtol=1e-5)


def test_no_recompile_per_tensor_temperature(backend, device):
    from torch._dynamo.testing import CompileCounter

    full, y, _, _ = _inputs(device)
    f = _temperature_fn(backend)
    cnt = CompileCounter()
    cf = torch.compile(f, fullgraph=True, backend=cnt)
    for t in (0.5, 0.7, 1.3):
        temp = torch.full((full.shape[0], 1), t, device=device)
        torch.testing.assert_close(cf(full, y, temp), f(full, y, temp), atol=1e-4, rtol=1e-5)
    assert cnt.frame_count == 1, f"recompiled per tensor temperature value: {cnt.frame_count} frames"


# ----------------------------------------------------------------------------- every public name
#
# Each public function and module of the package, compiled with fullgraph=True (backend
# "aot_eager": dynamo, the fake implementations and AOT autograd; no codegen, so it stays fast),
# forward and backward, against eager on the same inputs. A case builds
# (fn, leaves): fn(*leaves) returns any pytree of tensors (loss, metrics, TokenLogProbsOutput, dicts);
# the backward runs through a fixed weighted sum of every float output that has a gradient.

from typing import Callable, Dict, NamedTuple, Tuple  # noqa: E402

from torch.utils._pytree import tree_flatten  # noqa: E402

import prefopt_fast as pf  # noqa: E402

B, T, V, H = 2, 5, 37, 8
IGN = -100


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _y(b=B, t=T, seed=1):
    y = torch.randint(0, V, (b, t), generator=_g(seed))
    y[0, :2] = IGN
    y[-1, -1] = IGN
    return y


def _z(b=B, t=T, seed=2):
    return torch.randn(b, t, V, generator=_g(seed)) * 2


def _vec(n=B, seed=3):
    return -30 * torch.rand(n, generator=_g(seed))


def _hw(b=B, t=T, seed=4):
    g = _g(seed)
    return torch.randn(b, t, H, generator=g), torch.randn(V, H, generator=g) / 2


class Case(NamedTuple):
    build: Callable[[str], Tuple[Callable, tuple]]  # backend -> (fn, leaves that get a gradient)
    takes_backend: bool = True


def _token_logprobs(be):
    y, ref = _y(), _z(seed=5)
    temp = torch.rand(B, 1, generator=_g(6)) + 0.5
    stats = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax", "kl")
    return (lambda x: pf.token_logprobs(x, y, temperature=temp, stats=stats, ref_logits=ref, backend=be)), (_z(),)


def _sequence_logprobs(be):
    y, cu = _y().reshape(-1), torch.tensor([0, 3, 3, B * T])
    return (lambda x: pf.sequence_logprobs(x, y, cu_seqlens=cu, average=True, temperature=0.9, backend=be)), (
        _z().reshape(B * T, V),
    )


def _pair_logprobs(be):
    y, ref = _y(2 * B), _z(2 * B, seed=5)
    return (lambda x: pf.pair_logprobs(x, y, ref_logits=ref, backend=be)), (_z(2 * B),)


def _logits_dpo_loss(be):
    y, ref = _y(2 * B), _z(2 * B, seed=5)
    return (
        lambda x: pf.logits_dpo_loss(
            x, y, ref_logits=ref, beta=0.2, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], backend=be
        )
    ), (_z(2 * B),)


def _ppo_inputs():
    g = _g(7)
    old = torch.randn(B, T, generator=g) * 0.1 - 3
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    ref_lp = torch.randn(B, T, generator=g) * 0.1 - 3
    return old, adv, mask, ref_lp


def _ppo_loss(be):
    old, adv, mask, _ = _ppo_inputs()
    y, ref = _y(), _z(seed=5)
    return (
        lambda x: pf.ppo_loss(
            x,
            y,
            old,
            adv,
            loss_mask=mask,
            ref_logits=ref,
            kl_coef=0.05,
            kl_estimator="full",
            entropy_coef=0.01,
            clip_eps_high=0.28,
            dual_clip=3.0,
            backend=be,
        )
    ), (_z(),)


def _policy_inputs():
    g = _g(12)
    return torch.randn(B, T, generator=g) * 0.1 - 3, torch.rand(B, T, generator=g) + 0.5


def _policy_loss(_):
    old, adv, mask, ref_lp = _ppo_inputs()
    return (
        lambda lp, h: pf.policy_loss(
            lp,
            old,
            adv,
            mask,
            entropy=h,
            ref_logps=ref_lp,
            kl_coef=0.1,
            kl_estimator="low_var_kl",
            kl_ratio_correction=True,
            entropy_coef=0.01,
            clip_eps_high=0.28,
            dual_clip=3.0,
            loss_agg_mode="seq-mean-token-mean",
        )
    ), _policy_inputs()


def _policy_loss_verl(_):
    """convention="verl": the log-ratio clamp, the default dual clip, a straight-through KL."""
    old, adv, mask, ref_lp = _ppo_inputs()
    return (
        lambda lp, h: pf.policy_loss(
            lp,
            old,
            adv,
            mask,
            entropy=h,
            ref_logps=ref_lp,
            kl_coef=0.1,
            kl_estimator="k3+",
            entropy_coef=0.01,
            loss_agg_mode="seq-mean-token-sum-norm",
            convention="verl",
        )
    ), _policy_inputs()


def _mod_policy_trl_objectives(_):
    """TRL's vespo (a detached sequence weight) and sapo (a sigmoid gate) in one graph."""
    vespo = pf.PolicyLoss(loss_agg_mode="vespo", convention="trl", entropy_coef=0.01)
    sapo = pf.PolicyLoss(loss_agg_mode="sapo", loss_type_args=dict(sapo_temperature_neg=2.0))
    old, adv, mask, _ = _ppo_inputs()

    def f(lp, h):
        a, _ = vespo(lp, old, adv, mask, entropy=h, global_num_tokens=9.0)
        b, _ = sapo(lp, old, adv, mask)
        return a + b, {}

    return f, _policy_inputs()


def _mod_policy(_):
    m = pf.PolicyLoss(
        kl_coef=0.1,
        kl_estimator="full",
        entropy_coef=0.01,
        loss_agg_mode="dr_grpo",
        max_length=T,
        importance_sampling_level="sequence",
    )
    old, adv, mask, _ = _ppo_inputs()
    kl = torch.rand(B, T, generator=_g(13))
    return (lambda lp, h: m(lp, old, adv, mask, entropy=h, kl=kl)), _policy_inputs()


def _dpo_loss(_):
    lengths, rc, rr = torch.tensor([3, 4]), _vec(seed=8), _vec(seed=9)
    return (
        lambda c, r: pf.dpo_loss(
            c, r, rc, rr, beta=0.1, loss_type=["sigmoid", "ipo"], chosen_lengths=lengths, rejected_lengths=lengths + 1
        )
    ), (_vec(seed=10), _vec(seed=11))


def _cpo_loss(_):
    return (
        lambda c, r: pf.cpo_loss(
            c, r, torch.tensor([3, 4]), torch.tensor([2, 5]), loss_type="simpo", alpha=0.1, nll_loss=c.mean().neg()
        )
    ), (_vec(seed=10), _vec(seed=11))


def _simpo_loss(_):
    return (
        lambda c, r: pf.simpo_loss(
            c, r, torch.tensor([3, 4]), torch.tensor([2, 5]), cpo_alpha=0.5, nll_loss=c.mean().neg(), reduction="none"
        )
    ), (_vec(seed=10), _vec(seed=11))


def _orpo_loss(_):
    return (lambda c, r: pf.orpo_loss(c, r, torch.tensor([3, 4]), torch.tensor([2, 5]), nll_loss=c.mean().neg())), (
        _vec(seed=10) / 10,
        _vec(seed=11) / 10,
    )


def _bradley_terry_loss(_):
    margin = torch.rand(B, generator=_g(12))
    return (lambda c, r: pf.bradley_terry_loss(c, r, margin=margin, center_rewards_coefficient=0.01)), (
        torch.randn(B, generator=_g(10)),
        torch.randn(B, generator=_g(11)),
    )


def _linear_token_logprobs(be):
    h, w = _hw()
    y = _y()
    g = _g(13)
    bias, la, lb = torch.randn(V, generator=g), torch.randn(3, H, generator=g) / 4, torch.randn(V, 3, generator=g) / 4
    stats = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
    return (
        lambda h, w, b, a, lb: pf.linear_token_logprobs(
            h,
            w,
            y,
            bias=b,
            lora=(a, lb, 0.5),
            softcap=5.0,
            logit_scale=1.3,
            temperature=0.9,
            stats=stats,
            chunk_size=3,
            backend=be,
        )
    ), (h, w, bias, la, lb)


def _linear_sequence_logprobs(be):
    h, w = _hw()
    y, cu = _y().reshape(-1), torch.tensor([0, 4, 4, B * T])
    return (
        lambda h, w: pf.linear_sequence_logprobs(
            h, w, y, cu_seqlens=cu, average=True, logit_scale=1.2, chunk_size=4, backend=be
        )
    ), (h.reshape(B * T, H), w)


def _linear_pair_logprobs(be):
    h, w = _hw(2 * B)
    ref_h, ref_w = _hw(2 * B, seed=14)
    y = _y(2 * B)
    return (lambda h, w: pf.linear_pair_logprobs(h, w, y, ref_hidden=ref_h, ref_weight=ref_w, backend=be)), (h, w)


def _linear_dpo_loss(be):
    h, w = _hw(2 * B)
    ref_h = h + 0.1 * torch.randn(h.shape, generator=_g(15))
    y = _y(2 * B)
    return (
        lambda h, w: pf.linear_dpo_loss(
            h, w, y, ref_hidden=ref_h, ref_weight=w.detach(), beta=0.2, softcap=10.0, backend=be
        )
    ), (h, w)


def _linear_cpo_loss(be):
    h, w = _hw(2 * B)
    y = _y(2 * B)
    return (
        lambda h, w: pf.linear_cpo_loss(
            h, w, y, loss_type="simpo", alpha=0.1, label_smoothing=0.1, chunk_size=3, reduction="none", backend=be
        )
    ), (h, w)


def _linear_simpo_loss(be):
    h, w = _hw(2 * B)
    y, cu = _y(2 * B).reshape(-1), torch.tensor([0, 4, 5, 12, 2 * B * T])
    return (
        lambda h, w: pf.linear_simpo_loss(h, w, y, cu_seqlens=cu, beta=2.0, simpo_gamma=1.0, softcap=10.0, backend=be)
    ), (h.reshape(2 * B * T, H), w)


def _linear_orpo_loss(be):
    h, w = _hw(2 * B)
    y = _y(2 * B)
    return (lambda h, w: pf.linear_orpo_loss(h, w, y, beta=0.2, logit_scale=0.5, reduction="sum", backend=be)), (h, w)


def _linear_ppo_loss(be):
    h, w = _hw()
    y = _y()
    old, adv, mask, ref_lp = _ppo_inputs()
    return (
        lambda h, w: pf.linear_ppo_loss(
            h,
            w,
            y,
            old,
            adv,
            loss_mask=mask,
            ref_logps=ref_lp,
            kl_coef=0.1,
            entropy_coef=0.01,
            loss_agg_mode="grpo",
            chunk_size=3,
            backend=be,
        )
    ), (h, w)


# modules: constructed outside the compiled region, called inside it
def _mod_dpo(_):
    m = pf.DPOLoss(beta=0.2, loss_type=["sigmoid", "robust"], label_smoothing=0.1)
    rc, rr = _vec(seed=8), _vec(seed=9)
    return (lambda c, r: m(c, r, rc, rr)), (_vec(seed=10), _vec(seed=11))


def _mod_dpo_bco(_):
    m = pf.DPOLoss(beta=0.2, loss_type="bco_pair", bco_delta=0.05)
    rc, rr = _vec(seed=8), _vec(seed=9)
    return (lambda c, r: m(c, r, rc, rr)), (_vec(seed=10), _vec(seed=11))


def _mod_dpo_bco_running_mean(_):
    """A module with state: the BCO running mean (buffers updated in the forward)."""
    m = pf.DPOLoss(beta=0.2, loss_type="bco_pair", bco_running_mean=True)
    rc, rr = _vec(seed=8), _vec(seed=9)

    def f(c, r):
        loss, metrics = m(c, r, rc, rr)
        return loss, metrics, m.bco_mean * 1.0, m.bco_count * 1

    return f, (_vec(seed=10), _vec(seed=11))


def _mod_logits_dpo(be):
    m = pf.LogitsDPOLoss(beta=0.2, loss_type="sigmoid", temperature=0.9, backend=be)
    y, rc, rr = _y(2 * B), _vec(seed=8), _vec(seed=9)
    return (lambda x: m(x, y, rc, rr)), (_z(2 * B),)


def _mod_bradley_terry(_):
    m = pf.BradleyTerryLoss(center_rewards_coefficient=0.01)
    return (lambda c, r: m(c, r, margin=0.5)), (torch.randn(B, generator=_g(10)), torch.randn(B, generator=_g(11)))


def _mod_ppo(be):
    m = pf.PPOLoss(
        kl_coef=0.1,
        kl_estimator="k3",
        entropy_coef=0.01,
        loss_agg_mode="dr_grpo",
        max_length=T,
        importance_sampling_level="sequence",
        backend=be,
    )
    old, adv, mask, ref_lp = _ppo_inputs()
    y = _y()
    return (lambda x: m(x, y, old, adv, loss_mask=mask, ref_logps=ref_lp)), (_z(),)


def _mod_sequence_logprobs(be):
    m = pf.SequenceLogProbs(average=True, temperature=0.8, backend=be)
    y = _y()
    return (lambda x: m(x, y)), (_z(),)


def _mod_linear_sequence_logprobs(be):
    m = pf.LinearSequenceLogProbs(softcap=4.0, chunk_size=3, backend=be)
    y = _y()
    return (lambda h, w, b: m(h, w, y, bias=b)), (*_hw(), torch.randn(V, generator=_g(16)))


def _mod_linear_dpo(be):
    m = pf.LinearDPOLoss(beta=0.2, loss_type="hinge", chunk_size=3, backend=be)
    h, w = _hw(2 * B)
    y, rc, rr = _y(2 * B), _vec(seed=8), _vec(seed=9)
    return (lambda h, w: m(h, w, y, rc, rr)), (h, w)


def _mod_linear_cpo(be):
    m = pf.LinearCPOLoss(beta=0.2, loss_type="hinge", cpo_alpha=0.5, chunk_size=3, backend=be)
    h, w = _hw(2 * B)
    y = _y(2 * B)
    return (lambda h, w: m(h, w, y)), (h, w)


def _mod_linear_simpo(be):
    m = pf.LinearSimPOLoss(beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0, reduction="none", backend=be)
    h, w = _hw(2 * B)
    y = _y(2 * B)
    return (lambda h, w, b: m(h, w, y, bias=b)), (h, w, torch.randn(V, generator=_g(16)))


def _mod_linear_orpo(be):
    m = pf.LinearORPOLoss(beta=0.1, temperature=0.9, backend=be)
    h, w = _hw(2 * B)
    y = _y(2 * B)
    return (lambda h, w: m(h, w, y)), (h, w)


def _mod_linear_ppo(be):
    m = pf.LinearPPOLoss(kl_coef=0.1, kl_estimator="k2", clip_eps_high=0.28, loss_agg_mode="dapo", backend=be)
    old, adv, mask, ref_lp = _ppo_inputs()
    y = _y()
    return (lambda h, w: m(h, w, y, None, adv, loss_mask=mask, ref_logps=ref_lp, global_num_tokens=7.0)), _hw()


CASES: Dict[str, Case] = {
    "token_logprobs": Case(_token_logprobs),
    "sequence_logprobs": Case(_sequence_logprobs),
    "pair_logprobs": Case(_pair_logprobs),
    "logits_dpo_loss": Case(_logits_dpo_loss),
    "ppo_loss": Case(_ppo_loss),
    "dpo_loss": Case(_dpo_loss, takes_backend=False),
    "policy_loss": Case(_policy_loss, takes_backend=False),
    "PolicyLoss": Case(_mod_policy, takes_backend=False),
    "policy_loss(verl)": Case(_policy_loss_verl, takes_backend=False),
    "PolicyLoss(vespo, sapo)": Case(_mod_policy_trl_objectives, takes_backend=False),
    "cpo_loss": Case(_cpo_loss, takes_backend=False),
    "simpo_loss": Case(_simpo_loss, takes_backend=False),
    "orpo_loss": Case(_orpo_loss, takes_backend=False),
    "bradley_terry_loss": Case(_bradley_terry_loss, takes_backend=False),
    "linear_token_logprobs": Case(_linear_token_logprobs),
    "linear_sequence_logprobs": Case(_linear_sequence_logprobs),
    "linear_pair_logprobs": Case(_linear_pair_logprobs),
    "linear_dpo_loss": Case(_linear_dpo_loss),
    "linear_cpo_loss": Case(_linear_cpo_loss),
    "linear_simpo_loss": Case(_linear_simpo_loss),
    "linear_orpo_loss": Case(_linear_orpo_loss),
    "linear_ppo_loss": Case(_linear_ppo_loss),
    "DPOLoss": Case(_mod_dpo, takes_backend=False),
    "DPOLoss(bco_delta)": Case(_mod_dpo_bco, takes_backend=False),
    "DPOLoss(bco_running_mean)": Case(_mod_dpo_bco_running_mean, takes_backend=False),
    "LogitsDPOLoss": Case(_mod_logits_dpo),
    "BradleyTerryLoss": Case(_mod_bradley_terry, takes_backend=False),
    "PPOLoss": Case(_mod_ppo),
    "SequenceLogProbs": Case(_mod_sequence_logprobs),
    "LinearSequenceLogProbs": Case(_mod_linear_sequence_logprobs),
    "LinearDPOLoss": Case(_mod_linear_dpo),
    "LinearCPOLoss": Case(_mod_linear_cpo),
    "LinearSimPOLoss": Case(_mod_linear_simpo),
    "LinearORPOLoss": Case(_mod_linear_orpo),
    "LinearPPOLoss": Case(_mod_linear_ppo),
}

# public callables that take no tensors: nothing to trace
NO_TENSORS = {
    "available_backends": "lists the backends of this process",
    "build_info": "reports how the extension was built",
    "default_chunk_size": "integer arithmetic on Python ints (the fused-linear chunk rule)",
    "TokenLogProbsOutput": "the NamedTuple the log-prob functions return (traced as their output)",
}


def _weights(outs):
    """Fixed weights per float output, the same in both runs."""
    g = _g(99)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]


def _fwd_bwd(fn, leaves):
    leaves = [x.clone().requires_grad_() for x in leaves]
    outs, _ = tree_flatten(fn(*leaves))
    tensors = [o for o in outs if isinstance(o, torch.Tensor)]
    diff = [o for o in tensors if o.requires_grad]
    assert diff, "no output carries a gradient"
    total = sum((o.double() * w).sum() for o, w in zip(diff, _weights(diff)))
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [o.detach() for o in tensors], grads, [x for x in outs if not isinstance(x, torch.Tensor)]


def _compare(name, build, be, dynamo_backend="aot_eager", tol=1e-5):
    """Eager and compiled runs, each on a fresh build (a stateful module starts from the same state)."""
    fn, leaves = build(be)
    eager = _fwd_bwd(fn, leaves)
    fn, leaves = build(be)
    compiled = _fwd_bwd(torch.compile(fn, fullgraph=True, backend=dynamo_backend), leaves)
    assert len(compiled[0]) == len(eager[0]), f"{name}: {len(compiled[0])} outputs compiled, {len(eager[0])} eager"
    for i, (a, b) in enumerate(zip(compiled[0], eager[0])):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{name} output {i}: {m}")
    for i, (a, b) in enumerate(zip(compiled[1], eager[1])):
        assert (a is None) == (b is None), f"{name}: gradient {i} is None in one run only"
        if a is not None:
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{name} grad {i}: {m}")
    assert compiled[2] == eager[2], f"{name}: non-tensor outputs differ"
    assert any(g is not None for g in eager[1]), f"{name}: no gradient reached the inputs"


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.takes_backend])
def test_public_name_compiles_fullgraph(name, backend):
    """fullgraph=True forward and backward of every public function and module that touches the
    vocabulary, on the torch and cpu backends, against eager."""
    _compare(name, CASES[name].build, backend)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.takes_backend])
def test_public_loss_head_compiles_fullgraph(name):
    """The loss heads over per-sequence values (no vocabulary, no backend)."""
    _compare(name, CASES[name].build, None)


def test_every_public_name_has_a_compile_case():
    """A new public function or module must get a case in CASES (or say in NO_TENSORS why it has
    nothing to trace)."""
    callables = {n for n in pf.__all__ if callable(getattr(pf, n))}
    covered = {n.split("(")[0] for n in CASES} | set(NO_TENSORS)
    assert callables <= covered, f"public names without a torch.compile test: {sorted(callables - covered)}"
    assert set(NO_TENSORS) <= callables, f"stale NO_TENSORS entries: {sorted(set(NO_TENSORS) - callables)}"
    modules = {n for n in callables if isinstance(getattr(pf, n), type) and issubclass(getattr(pf, n), torch.nn.Module)}
    assert modules <= set(CASES), f"modules without a compile case: {sorted(modules - set(CASES))}"


def test_fused_linear_ops_opcheck():
    """The two torch.library ops of the fused-linear path (what compiled graphs call): schema,
    fake implementation and real one agree (torch.library.opcheck), with and without ignored
    rows, LoRA and bias, the reference head of the exact KL, fp32 and bf16."""
    from prefopt_fast._rows import STAT_ENTROPY, STAT_KL, STAT_MEAN
    from prefopt_fast.ops import linear_logprobs as LL

    for dt, ignored, with_ref in (
        (torch.float32, True, False),
        (torch.bfloat16, False, False),
        (torch.float32, False, True),
    ):
        h, w = (x.reshape(-1, H).to(dt) if x.dim() == 3 else x.to(dt) for x in _hw())
        y = _y().reshape(-1) if ignored else _y().reshape(-1).clamp(min=0)
        it = torch.full((B * T,), 1.1)
        g = _g(13)
        bias, la, lb = (
            torch.randn(V, generator=g).to(dt),
            (torch.randn(3, H, generator=g) / 4).to(dt),
            (torch.randn(V, 3, generator=g) / 4).to(dt),
        )
        ref = (None, None, None)
        stats = STAT_ENTROPY | STAT_MEAN
        if with_ref:
            ref = (torch.randn(B * T, 5, generator=g).to(dt), torch.randn(V, 5, generator=g).to(dt), None)
            stats |= STAT_KL
        opts = (IGN, 0.5, 1.0, 3.0, stats, 4, "cpu")
        fwd = (h, w, bias, la, lb, y, it, *ref, *opts)
        torch.library.opcheck(
            torch.ops.prefopt_fast.linear_forward.default, fwd, test_utils=("test_schema", "test_faketensor")
        )
        rows = LL._linear_forward_impl(*fwd)
        grad_kl = torch.randn(B * T) if with_ref else None
        bwd = (h, w, bias, la, lb, y, it, *ref, rows, torch.randn(B * T), torch.randn(B * T), grad_kl, *opts)
        bwd = bwd + (True, True, False, True, True)
        torch.library.opcheck(
            torch.ops.prefopt_fast.linear_backward.default, bwd, test_utils=("test_schema", "test_faketensor")
        )


@pytest.mark.slow
def test_inductor_linear_dpo_loss():
    """The default backend (inductor) once, on the fused-linear DPO loss."""
    if not pf.available_backends() or "cpu" not in pf.available_backends():
        pytest.skip("the cpu backend is not built")
    _compare("linear_dpo_loss (inductor)", CASES["linear_dpo_loss"].build, "cpu", dynamo_backend="inductor", tol=1e-4)
