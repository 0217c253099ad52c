"""The two gradient plans of the fused-linear DPO losses (``plan="recompute"`` / ``"forward"``).

Both against the fp64 reference (materialized logits, ``prefopt_fast.reference``), forward and
backward (hidden, weight, bias, LoRA), on awkward shapes: a vocabulary that is no multiple of
anything, chunks of a few rows (several pair chunks), a pair whose rows are all ignored, a
sequence without a real label; and which plan ``auto`` picks.
"""

import pytest
import torch

import prefopt_fast.ops.linear_logprobs as LL
import prefopt_fast.reference as R
from prefopt_fast.linear import LinearDPOLoss, linear_dpo_loss

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _data(dtype, *, B=3, T=7, H=8, V=37, r=0, bias=False, seed=0, packed=False, empty_pair=True):
    g = torch.Generator().manual_seed(seed)
    d = dict(
        h=torch.randn(2 * B, T, H, generator=g).to(dtype),
        w=(torch.randn(V, H, generator=g) * 0.5).to(dtype),
        y=torch.randint(0, V, (2 * B, T), generator=g),
    )
    d["y"][:, :2] = -100  # prompt
    if empty_pair:
        d["y"][1] = -100  # pair 1: chosen all ignored
        d["y"][B + 1] = -100  # ... and rejected: a pair without a real label
    d["y"][B + 2, 4:] = -100  # padding
    if bias:
        d["b"] = (torch.randn(V, generator=g) * 0.3).to(dtype)
    if r:
        d["a"] = (torch.randn(r, H, generator=g) * 0.3).to(dtype)
        d["lb"] = (torch.randn(V, r, generator=g) * 0.3).to(dtype)
    d["rc"] = torch.randn(B, generator=g) - 20.0
    d["rr"] = torch.randn(B, generator=g) - 20.0
    if packed:
        d["h"] = d["h"].reshape(2 * B * T, H)
        d["y"] = d["y"].reshape(-1)
        d["cu"] = torch.arange(0, 2 * B * T + 1, T)
    return d


def _leaves(d):
    return {k: d[k].clone().requires_grad_(True) for k in ("h", "w", "b", "a", "lb") if k in d}


def _lora(x, scaling):
    return None if "a" not in x else (x["a"], x["lb"], scaling)


def _reference(d, *, scaling=0.5, logit_scale=1.0, temperature=1.0, average=False, **dpo):
    """fp64 loss and gradients of the DPO loss from materialized logits."""
    x = {k: v.detach().double().requires_grad_(True) for k, v in _leaves(d).items()}
    y = d["y"]
    lp = R.linear_token_stats(
        x["h"], x["w"], y, bias=x.get("b"), lora=_lora(x, scaling), logit_scale=logit_scale, temperature=temperature
    )["logprobs"]
    sums, counts = R.sequence_sums(lp, y != -100, d.get("cu"), average=average)
    B = sums.shape[0] // 2
    lt = dpo.get("loss_type", "sigmoid")
    if lt in ("ipo", "sigmoid_norm") or "sft" in lt:
        dpo = dict(dpo, chosen_lengths=counts[:B], rejected_lengths=counts[B:])
    reduction = dpo.pop("reduction", "mean")
    loss, _ = R.dpo_loss(sums[:B], sums[B:], d["rc"].double(), d["rr"].double(), **dpo)
    if reduction == "sum":  # the reference takes the mean over the B pairs
        loss = loss * B
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in x.items()}


def _ours(d, plan, *, scaling=0.5, chunk_size=3, upstream=1.0, **kw):
    x = _leaves(d)
    loss, metrics = linear_dpo_loss(
        x["h"],
        x["w"],
        d["y"],
        bias=x.get("b"),
        lora=_lora(x, scaling),
        ref_chosen_logps=d["rc"],
        ref_rejected_logps=d["rr"],
        cu_seqlens=d.get("cu"),
        chunk_size=chunk_size,
        plan=plan,
        **kw,
    )
    (loss * upstream).backward()
    return loss.detach(), {k: v.grad for k, v in x.items()}, metrics


def _check(got, want, tol, what):
    loss, grads = got[0], got[1]
    assert _rel(loss, want[0]) < tol, f"{what}: loss {float(loss)} vs {float(want[0])}"
    for k, g in want[1].items():
        assert grads[k] is not None, f"{what}: no gradient for {k}"
        assert _rel(grads[k], g) < tol, f"{what}: grad {k} relative error {_rel(grads[k], g):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("plan", ["recompute", "forward"])
@pytest.mark.parametrize("extras", ["plain", "bias+lora"])
def test_plans_match_fp64_reference(dtype, plan, extras):
    kw = dict(bias=True, r=2) if extras == "bias+lora" else {}
    d = _data(dtype, **kw)
    want = _reference(d, beta=0.5)
    _check(_ours(d, plan, beta=0.5), want, TOL[dtype], plan)


@pytest.mark.parametrize(
    "dpo",
    [
        dict(loss_type="ipo", beta=0.3),
        dict(loss_type="sigmoid_norm", beta=2.0),
        dict(loss_type="robust", beta=0.4, label_smoothing=0.2),
        dict(loss_type="hinge", beta=0.05),
        dict(loss_type="apo_zero", beta=0.2, reduction="sum"),
        dict(loss_type=["sigmoid", "sft"], beta=0.2),
    ],
    ids=lambda d: str(d["loss_type"]),
)
def test_forward_plan_loss_types(dpo):
    d = _data(torch.float32, bias=True)
    _check(_ours(d, "forward", **dpo), _reference(d, **dpo), TOL[torch.float32], str(dpo["loss_type"]))


def test_forward_plan_packed_average_scale_temperature_upstream():
    d = _data(torch.float32, packed=True, r=3)
    kw = dict(average=True, logit_scale=0.8, temperature=1.3)
    loss, grads = _reference(d, beta=2.0, **kw)
    got = _ours(d, "forward", beta=2.0, upstream=-2.5, chunk_size=None, **kw)
    _check((got[0], {k: g / -2.5 for k, g in got[1].items()}), (loss, grads), TOL[torch.float32], "packed")


def test_forward_plan_reference_head_and_metrics():
    d = _data(torch.float32, B=3)
    g = torch.Generator().manual_seed(1)
    rh, rw = torch.randn_like(d["h"]), torch.randn(d["w"].shape, generator=g)
    out = {}
    for plan in ("recompute", "forward"):
        x = _leaves(d)
        loss, metrics = linear_dpo_loss(x["h"], x["w"], d["y"], ref_hidden=rh, ref_weight=rw, plan=plan, beta=0.2)
        loss.backward()
        out[plan] = (loss, x["h"].grad, x["w"].grad, metrics)
    a, b = out["recompute"], out["forward"]
    for i in range(3):
        assert _rel(b[i], a[i]) < 1e-5
    for k in a[3]:
        assert torch.allclose(a[3][k], b[3][k], rtol=1e-5, atol=1e-6), k


def _spy(monkeypatch):
    calls = []
    real = LL.LinearForwardGradFunction.apply
    monkeypatch.setattr(LL.LinearForwardGradFunction, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _call(d, grad=True, **kw):
    x = _leaves(d) if grad else {k: d[k] for k in ("h", "w")}
    return linear_dpo_loss(x["h"], x["w"], d["y"], ref_chosen_logps=d["rc"], ref_rejected_logps=d["rr"], **kw)


def test_auto_picks(monkeypatch):
    calls = _spy(monkeypatch)
    d = _data(torch.float32)
    _call(d)
    assert calls == [1], "auto with a gradient to compute: forward plan"
    for kw in (
        dict(softcap=3.0),
        dict(loss_type="aot"),
        dict(reduction="none"),
        dict(plan="recompute"),
    ):
        calls.clear()
        _call(d, **kw)
        assert calls == [], f"auto must take the recompute plan with {kw}"
    calls.clear()
    _call(d, grad=False)
    with torch.no_grad():
        _call(d)
    assert calls == [], "no gradient: recompute plan (the same forward)"
    calls.clear()
    m = LinearDPOLoss(beta=0.1, loss_type="bco_pair", bco_running_mean=True)
    x = _leaves(d)
    m(x["h"], x["w"], d["y"], d["rc"], d["rr"])
    assert calls == []
    LinearDPOLoss(beta=0.1)(x["h"], x["w"], d["y"], d["rc"], d["rr"])
    assert calls == [1]


def test_auto_pair_size_and_reference_free(monkeypatch):
    import prefopt_fast.losses.linear_dpo as LD
    from prefopt_fast.linear import LinearCPOLoss, linear_orpo_loss

    calls = _spy(monkeypatch)
    d = _data(torch.float32)
    monkeypatch.setattr(LD, "MAX_CHUNK_BYTES", 64)  # a pair's logits exceed the cap
    _call(d, chunk_size=1)
    assert calls == [], "auto: a pair larger than the buffer's cap takes the recompute plan"
    _call(d, chunk_size=1, plan="forward")
    assert calls == [1], "plan='forward' takes it anyway"
    monkeypatch.undo()
    calls = _spy(monkeypatch)
    x = _leaves(d)
    LinearCPOLoss(beta=0.2)(x["h"], x["w"], d["y"])
    assert calls == [1]
    nll = torch.tensor(1.5, requires_grad=True)
    linear_orpo_loss(x["h"], x["w"], d["y"], nll_loss=nll)
    assert calls == [1], "an nll_loss requiring grad: recompute plan"


def test_forward_plan_refusals():
    d = _data(torch.float32)
    with pytest.raises(ValueError, match="plan='forward' does not apply softcap"):
        _call(d, softcap=3.0, plan="forward")
    with pytest.raises(ValueError, match="aot"):
        _call(d, loss_type="aot", plan="forward")
    with pytest.raises(ValueError, match="plan must be one of"):
        _call(d, plan="fast")
    with pytest.raises(ValueError, match="plan must be one of"):
        LinearDPOLoss(plan=None)
    loss, _ = _call(d, plan="forward")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_module_matches_function():
    d = _data(torch.float32, bias=True)
    x = _leaves(d)
    m = LinearDPOLoss(beta=0.3, loss_type="ipo", chunk_size=4, plan="forward")
    loss, _ = m(x["h"], x["w"], d["y"], d["rc"], d["rr"], bias=x["b"])
    loss.backward()
    want = _reference(d, beta=0.3, loss_type="ipo")
    _check((loss.detach(), {k: v.grad for k, v in x.items()}), want, TOL[torch.float32], "module")


@pytest.mark.parametrize("head", ["cpo", "simpo", "orpo"])
@pytest.mark.parametrize("plan", ["recompute", "forward"])
def test_reference_free_heads(head, plan):
    import prefopt_fast.linear as pfl

    d = _data(torch.float32, bias=True, empty_pair=False)
    kw = {"cpo": dict(beta=0.3, loss_type="ipo"), "simpo": dict(beta=2.0, simpo_gamma=0.3), "orpo": dict(beta=0.2)}[
        head
    ]
    x = {k: v.detach().double().requires_grad_(True) for k, v in _leaves(d).items()}
    lp = R.linear_token_stats(x["h"], x["w"], d["y"], bias=x["b"])["logprobs"]
    sums, counts = R.sequence_sums(lp, d["y"] != -100)
    B = sums.shape[0] // 2
    want, _ = getattr(R, f"{head}_loss")(sums[:B], sums[B:], counts[:B], counts[B:], **kw)
    want.backward()
    y = _leaves(d)
    got, _ = getattr(pfl, f"linear_{head}_loss")(y["h"], y["w"], d["y"], bias=y["b"], chunk_size=3, plan=plan, **kw)
    got.backward()
    _check(
        (got.detach(), {k: v.grad for k, v in y.items()}),
        (want.detach(), {k: v.grad for k, v in x.items()}),
        2e-5,
        head,
    )


def test_forward_plan_no_real_label():
    d = _data(torch.float32, bias=True)
    d["y"][:] = -100
    want = _reference(d, beta=0.5)
    loss, grads, _ = _ours(d, "forward", beta=0.5)
    assert _rel(loss, want[0]) < 1e-6
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


@pytest.mark.parametrize("B", [3, 7], ids=["2 chunks (half running sum)", "6 chunks (fp32 sum)"])
def test_forward_plan_half_weight_gradient_sums(B):
    d = _data(torch.bfloat16, B=B, T=9, bias=True)
    want = _reference(d, beta=0.5)
    _check(_ours(d, "forward", beta=0.5, chunk_size=1), want, TOL[torch.bfloat16], f"B={B}")
