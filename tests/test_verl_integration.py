"""prefopt_fast.integrations.verl against verl 0.9 as shipped (its own implementations), on CPU.

* ``FusedLinearForPPO``: verl's "torch" backend vs "prefopt" -- log-probs, entropy, the
  gradients of the hidden states and the lm_head weight -- on verl's layouts ([T, H] rmpad and
  [B, S, H] padded), fp32 and bf16, temperature != 1, masked losses.
* ``logprobs_from_logits`` / ``entropy_from_logits`` / ``entropy_from_logits_with_chunking``:
  patched vs verl's originals (values, dtypes, gradients).
* a short actor update through verl's model forward (``patch_forward_with_backends`` on a tiny
  random Llama): the loss and every parameter gradient agree between the "torch" and "prefopt"
  backends, and with the from-logits path (the model's logits through the patched helpers).
* the patch itself: idempotent, undone, scoped, reaching modules that imported the helpers by name.

verl's wheel ships no tests for these functions (its tests cover the trainer's config, protocol,
workers and core_algos), so none of its own tests run here.

bf16: verl's torch backend rounds the logits to bf16 before the fp32 softmax; prefopt_fast
accumulates them in fp32. Both are compared with an fp64 reference: prefopt_fast's error must not
exceed verl's (plus a small slack).
"""

import importlib
import warnings

import expected  # noqa: I001  (tests/expected.py: fails in strict mode where verl is missing)
import pytest
import torch

verl = expected.require_module("verl")
transformers = expected.require_module("transformers")

import verl.models.transformers.monkey_patch as verl_monkey_patch  # noqa: E402
import verl.utils.experimental.torch_functional as verl_exp_F  # noqa: E402
import verl.utils.torch_functional as verl_F  # noqa: E402

from prefopt_fast.integrations import verl as pverl  # noqa: E402
from prefopt_fast.integrations import version_guard  # noqa: E402

VERL_FUSED = verl_exp_F.FusedLinearForPPO
VERL_LOGPROBS = verl_F.logprobs_from_logits
VERL_ENTROPY = verl_F.entropy_from_logits
VERL_ENTROPY_CHUNKED = verl_F.entropy_from_logits_with_chunking


@pytest.fixture
def patched():
    with pverl.patched_verl():
        yield
    assert not pverl.is_verl_patched()


def _ref_logits(h, w, temperature):
    return (h.double() @ w.double().T) / temperature


def _ref(h, w, ids, temperature):
    """fp64 log-probs and entropy of ``softmax(h @ w.T / temperature)``."""
    z = _ref_logits(h, w, temperature)
    logp = z.log_softmax(-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _close_or_better(got, verl_out, ref, rtol, atol):
    """fp32: ``got`` equals verl's output. Lower precision: ``got`` is at most as far from the fp64
    reference as verl's output is, plus the tolerance."""
    got, verl_out, ref = got.double(), verl_out.double(), ref.double()
    if rtol == 0:
        torch.testing.assert_close(got, verl_out, rtol=1e-5, atol=1e-5)
        return
    err_got = (got - ref).abs().max().item()
    err_verl = (verl_out - ref).abs().max().item()
    assert err_got <= err_verl + atol + rtol * ref.abs().max().item(), (err_got, err_verl)


CASES = [
    # (leading shape of the hidden states, H, V, dtype, temperature)
    ((37,), 24, 131, torch.float32, 1.0),  # rmpad [T, H], odd sizes
    ((1, 29), 16, 100, torch.float32, 0.7),  # rmpad as verl's forward passes it: [1, total_nnz, H]
    ((3, 11), 32, 257, torch.float32, 1.3),  # padded [B, S, H]
    ((2, 9), 32, 130, torch.bfloat16, 0.6),
    ((45,), 8, 64, torch.bfloat16, 1.0),
]


@pytest.mark.parametrize("lead,H,V,dtype,temperature", CASES)
def test_fused_linear_matches_verl_torch_backend(patched, lead, H, V, dtype, temperature):
    g = torch.Generator().manual_seed(hash((lead, H, V)) % 2**31)
    h0 = torch.randn(*lead, H, generator=g).to(dtype)
    w0 = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    ids = torch.randint(0, V, lead, generator=g, dtype=torch.int32)  # verl casts to int64 itself
    mask = (torch.rand(lead, generator=g) > 0.3).float()
    g_lp, g_ent = torch.randn(lead, generator=g), torch.randn(lead, generator=g)

    outs = {}
    for backend in ("torch", "prefopt"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, ent = verl_exp_F.FusedLinearForPPO(impl_backend=backend)(h, w, ids, temperature=temperature)
        assert lp.shape == ent.shape == ids.shape
        # a masked PPO-like objective touching both outputs
        ((lp * g_lp * mask).sum() + (ent.float() * g_ent * mask).sum()).backward()
        outs[backend] = (lp, ent, h.grad, w.grad)
    t, p = outs["torch"], outs["prefopt"]
    assert p[0].dtype == t[0].dtype == torch.float32
    assert p[1].dtype == t[1].dtype == dtype
    assert p[2].dtype == t[2].dtype == dtype and p[3].dtype == t[3].dtype == dtype

    ids64 = ids.long()
    ref_lp, ref_ent = _ref(h0, w0, ids64, temperature)
    # reference gradients in fp64
    hr, wr = h0.double().requires_grad_(), w0.double().requires_grad_()
    lr_, er_ = _ref(hr, wr, ids64, temperature)
    ((lr_ * g_lp.double() * mask.double()).sum() + (er_ * g_ent.double() * mask.double()).sum()).backward()
    rtol, atol = (0, 0) if dtype == torch.float32 else (2e-2, 2e-2)
    _close_or_better(p[0], t[0], ref_lp, rtol, atol)
    _close_or_better(p[1], t[1], ref_ent, rtol, atol)
    _close_or_better(p[2], t[2], hr.grad, rtol, atol)
    _close_or_better(p[3], t[3], wr.grad, rtol, atol)


def test_fused_linear_only_one_output_used(patched):
    """verl uses the entropy only when asked for it: a backward through the log-probs alone."""
    g = torch.Generator().manual_seed(1)
    h0, w0 = torch.randn(2, 5, 8, generator=g), torch.randn(40, 8, generator=g)
    ids = torch.randint(0, 40, (2, 5), generator=g)
    grads = []
    for backend in ("torch", "prefopt"):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, _ = verl_exp_F.FusedLinearForPPO(impl_backend=backend)(h, w, ids, temperature=0.9)
        lp.sum().backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_fused_linear_bad_shapes(patched):
    fl = verl_exp_F.FusedLinearForPPO(impl_backend="prefopt")
    with pytest.raises(ValueError, match="hidden_states must be 2D or 3D"):
        fl(torch.randn(1, 2, 3, 4), torch.randn(5, 4), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids shape"):
        fl(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):  # verl's own check
        verl_exp_F.FusedLinearForPPO(impl_backend="prefop")


# --------------------------------------------------------------------------- from logits


@pytest.mark.parametrize(
    "shape,dtype",
    [((53, 131), torch.float32), ((3, 7, 100), torch.float32), ((41, 96), torch.bfloat16), ((2, 5, 64), torch.float16)],
)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_logprobs_from_logits_matches_verl(patched, shape, dtype, inplace_backward):
    g = torch.Generator().manual_seed(shape[0])
    base = (torch.randn(shape, generator=g) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    gout = torch.randn(shape[:-1], generator=g)
    res = {}
    for name, fn in (("verl", VERL_LOGPROBS), ("prefopt", verl_F.logprobs_from_logits)):
        leaf = base.clone().requires_grad_()
        logits = leaf / 0.8  # verl divides by the temperature first: a non-leaf, as in its engines
        out = fn(logits, labels, inplace_backward=inplace_backward)
        (out.float() * gout).sum().backward()
        res[name] = (out, leaf.grad)
    assert res["prefopt"][0].dtype == res["verl"][0].dtype  # verl's PyTorch path: the logits' dtype
    assert res["prefopt"][0].shape == labels.shape
    z = base.double() / 0.8
    ref = z.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    zr = z.clone().requires_grad_()
    (zr.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * gout.double()).sum().backward()
    rtol, atol = (0, 0) if dtype == torch.float32 else (2e-2, 2e-2)
    _close_or_better(res["prefopt"][0], res["verl"][0], ref, rtol, atol)
    _close_or_better(res["prefopt"][1], res["verl"][1], zr.grad / 0.8, rtol, atol)


@pytest.mark.parametrize(
    "shape,dtype", [((53, 131), torch.float32), ((3, 7, 100), torch.float32), ((41, 96), torch.bfloat16)]
)
def test_entropy_from_logits_matches_verl(patched, shape, dtype):
    g = torch.Generator().manual_seed(7 + shape[0])
    base = (torch.randn(shape, generator=g) * 2).to(dtype)
    gout = torch.randn(shape[:-1], generator=g)
    fns = [("verl", VERL_ENTROPY, verl_F.entropy_from_logits)]
    if len(shape) == 2:  # verl's chunked variant takes [N, V] only
        fns.append(("chunked", VERL_ENTROPY_CHUNKED, verl_F.entropy_from_logits_with_chunking))
    z = base.double().requires_grad_()
    ref = -(z.log_softmax(-1).exp() * z.log_softmax(-1)).sum(-1)
    (ref * gout.double()).sum().backward()
    for _, orig, new in fns:
        res = []
        for fn in (orig, new):
            leaf = base.clone().requires_grad_()
            out = fn(leaf * 1.0)
            (out.float() * gout).sum().backward()
            res.append((out, leaf.grad))
        assert res[1][0].dtype == res[0][0].dtype and res[1][0].shape == res[0][0].shape
        rtol, atol = (0, 0) if dtype == torch.float32 else (2e-2, 2e-2)
        _close_or_better(res[1][0], res[0][0], ref, rtol, atol)
        _close_or_better(res[1][1], res[0][1], z.grad, rtol, atol)


def test_float64_falls_back_to_verl(patched, monkeypatch):
    monkeypatch.setattr(pverl, "_warned", set())
    logits = torch.randn(4, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = verl_F.logprobs_from_logits(logits, labels)
        ent = verl_F.entropy_from_logits(logits)
    torch.testing.assert_close(out, VERL_LOGPROBS(logits, labels))
    torch.testing.assert_close(ent, VERL_ENTROPY(logits))
    assert out.dtype == torch.float64
    assert [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)] == [
        "prefopt_fast.integrations.verl: dtype torch.float64 is not float32 / bfloat16 / float16; "
        "using verl's own implementation for these calls"
    ]


# --------------------------------------------------------------------------- the patch


def test_patch_unpatch_scope():
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl  # imported the helper by name

    assert fsdp_impl.logprobs_from_logits is VERL_LOGPROBS
    assert not pverl.is_verl_patched()
    pverl.patch_verl()
    pverl.patch_verl()  # idempotent
    try:
        assert verl_exp_F.FusedLinearForPPO is pverl.PrefoptFusedLinearForPPO
        assert verl_monkey_patch.patch_forward_with_backends is pverl._patch_forward_with_backends
        assert verl_F.logprobs_from_logits is pverl.logprobs_from_logits
        assert fsdp_impl.logprobs_from_logits is pverl.logprobs_from_logits
        with pverl.patched_verl():
            pass
        assert pverl.is_verl_patched()  # a context does not undo patch_verl
    finally:
        pverl.unpatch_verl()
    pverl.unpatch_verl()
    assert verl_exp_F.FusedLinearForPPO is VERL_FUSED
    assert verl_F.logprobs_from_logits is VERL_LOGPROBS and fsdp_impl.logprobs_from_logits is VERL_LOGPROBS
    assert verl_F.entropy_from_logits is VERL_ENTROPY
    with pverl.patched_verl():
        with pverl.patched_verl():
            assert verl_F.entropy_from_logits is pverl.entropy_from_logits
        assert pverl.is_verl_patched()
    assert verl_F.entropy_from_logits is VERL_ENTROPY


def test_untested_verl_version_warns(monkeypatch):
    monkeypatch.setattr(version_guard, "_warned", set())
    monkeypatch.setattr(pverl, "_VERL_VERSION", "0.10.0")
    try:
        with pytest.warns(
            version_guard.UntestedVersionWarning, match=r"tested with verl >= 0\.9, < 0\.10; verl 0\.10\.0"
        ):
            pverl.patch_verl()
        assert pverl.is_verl_patched()
    finally:
        pverl.unpatch_verl()


def test_missing_verl_internal_is_named(monkeypatch):
    missing = "verl.utils.torch_functional.no_such_helper"
    monkeypatch.setattr(pverl, "VERL_INTERNALS", (*pverl.VERL_INTERNALS, missing))
    with pytest.raises(RuntimeError, match=r"needs verl\.utils\.torch_functional\.no_such_helper, which verl"):
        pverl.patch_verl()
    assert not pverl.is_verl_patched()


def test_env_var_patches_on_import(monkeypatch):
    """PREFOPT_VERL_PATCH=1: importing the module patches (how Ray workers get it, through
    VERL_USE_EXTERNAL_MODULES; checked by hand in a fresh process, too slow for CI: verl's import)."""
    monkeypatch.setenv("PREFOPT_VERL_PATCH", "1")
    importlib.reload(pverl)
    try:
        assert pverl.is_verl_patched() and verl_F.logprobs_from_logits is pverl.logprobs_from_logits
    finally:
        pverl.unpatch_verl()
    assert verl_F.logprobs_from_logits is VERL_LOGPROBS
    monkeypatch.delenv("PREFOPT_VERL_PATCH")
    importlib.reload(pverl)
    assert not pverl.is_verl_patched()


# --------------------------------------------------------------------------- through verl's model forward


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    # a fresh subclass per model: patch_forward_with_backends sets model.__class__.forward
    cls = type("TinyLlamaForCausalLM", (LlamaForCausalLM,), {})
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = cls(cfg).float()
    model.config._attn_implementation = "sdpa"
    return model


def _actor_step(model, batch, use_fused, backend):
    """One verl-style actor micro-step: log-probs (+ entropy) from the model, the vanilla PPO
    policy loss (verl's, or prefopt_vanilla for the prefopt backend) minus an entropy bonus (token-mean over the response mask), backward."""
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn
    from verl.workers.config import ActorConfig

    model.zero_grad(set_to_none=True)
    temperature = 0.7
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    if use_fused:
        out = model(input_ids=ids, position_ids=pos, temperature=temperature, return_dict=True, shift_labels=labels)
        log_prob, entropy = out.log_probs, out.entropy
    else:
        logits = model(input_ids=ids, position_ids=pos, return_dict=True).logits / temperature
        log_prob = verl_F.logprobs_from_logits(logits, labels, inplace_backward=False)
        entropy = verl_F.entropy_from_logits(logits)
    mask = batch["mask"]
    cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, rollout_n=1)
    # the prefopt backend's run also takes the prefopt policy loss
    pg_loss, _ = get_policy_loss_fn("prefopt_vanilla" if backend == "prefopt" else "vanilla")(
        batch["old_log_prob"], log_prob, batch["advantages"], mask, loss_agg_mode="token-mean", config=cfg
    )
    loss = pg_loss - 0.01 * agg_loss(entropy, mask, "token-mean")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["rmpad", "padded"])
def test_actor_update_through_verl_forward(patched, layout, monkeypatch):
    g = torch.Generator().manual_seed(3)
    if layout == "rmpad":  # verl's use_remove_padding: the sequences packed into [1, total_nnz]
        lens = [7, 5, 9]
        ids = torch.randint(0, 128, (1, sum(lens)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    else:
        ids = torch.randint(0, 128, (2, 10), generator=g)
        pos = torch.arange(10).expand(2, 10)
    labels = torch.roll(ids, shifts=-1, dims=-1)
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "labels": labels,
        "mask": (torch.rand(ids.shape, generator=g) > 0.25).float(),
        "advantages": torch.randn(ids.shape, generator=g),
        "old_log_prob": torch.log(torch.rand(ids.shape, generator=g) * 0.02 + 0.001),
    }
    calls = []
    fused = pverl._fused_linear
    monkeypatch.setattr(pverl, "_fused_linear", lambda *a: calls.append(a[0].shape) or fused(*a))
    results = {}
    for backend in ("torch", "prefopt"):
        model = _tiny_llama(0)
        verl_monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
        assert model._verl_fused_kernels_backend == backend
        results[backend] = _actor_step(model, batch, True, backend)
    assert calls == [(*ids.shape, 32)]  # the prefopt backend ran once, on verl's layout
    # the from-logits path (verl's model forward unpatched), through the patched helpers
    results["logits"] = _actor_step(_tiny_llama(0), batch, False, None)
    loss_t, grads_t = results["torch"]
    for name in ("prefopt", "logits"):
        loss, grads = results[name]
        torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-6)
        assert grads.keys() == grads_t.keys()
        for k in grads_t:
            torch.testing.assert_close(grads[k], grads_t[k], rtol=1e-4, atol=1e-6, msg=k)


def test_unknown_backend_still_skipped(patched, capsys):
    model = _tiny_llama(0)
    before = type(model).forward
    verl_monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="nope")
    assert type(model).forward is before and "Skipping monkey patch" in capsys.readouterr().out


# --------------------------------------------------------------------------- policy losses


def _actor_config(**kw):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **kw)


@pytest.mark.parametrize(
    "cfg_kw,info,weights",
    [
        ({"clip_ratio": 0.2}, {}, False),
        ({"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.28, "clip_ratio_c": 2.0}, {}, True),
        ({"clip_ratio": 0.3}, {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 8}, True),
        ({"clip_ratio": 0.2}, {"dp_size": 3, "batch_num_tokens": 70, "global_batch_size": 11}, False),
        ({"clip_ratio": 0.2}, {"loss_scale_factor": 16}, False),
    ],
)
@pytest.mark.parametrize(
    "mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
@pytest.mark.parametrize("loss", ["vanilla", "gspo"])
def test_prefopt_policy_loss_matches_verls(patched, cfg_kw, info, weights, mode, loss):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    fn = get_policy_loss_fn(f"prefopt_{loss}")
    assert fn is getattr(pverl, f"compute_policy_loss_prefopt_{loss}")
    theirs = get_policy_loss_fn(loss)
    g = torch.Generator().manual_seed(11)
    B, T = 4, 9
    old = torch.randn(B, T, generator=g) - 2
    lp0 = old + torch.randn(B, T, generator=g) * 0.4
    lp0[0, 1], lp0[1, 2] = old[0, 1] + 25.0, old[1, 2] - 30.0  # beyond verl's +-20 log-ratio clamp
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # an empty sequence
    mask[0, 1] = mask[1, 2] = True
    w = torch.rand(B, T, generator=g) + 0.5 if weights else None
    res = []
    for f in (theirs, fn):
        config = _actor_config(**cfg_kw)
        config.global_batch_info.update(info)
        lp = lp0.clone().requires_grad_()
        loss, metrics = f(old, lp, adv, mask, mode, config, w)
        loss.backward()
        res.append((loss.detach(), metrics, lp.grad))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res[1][2], res[0][2], rtol=1e-6, atol=1e-8)
    assert res[1][1].keys() == res[0][1].keys()
    for k in res[0][1]:
        assert res[1][1][k] == pytest.approx(res[0][1][k], rel=1e-6, abs=1e-7), k


def test_prefopt_vanilla_needs_verls_global_sizes(patched):
    """dp_size > 1 without the global normalizer is refused, as verl's agg_loss refuses it."""
    g = torch.Generator().manual_seed(2)
    old, lp, adv = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    config = _actor_config()
    config.global_batch_info.update({"dp_size": 2})
    with pytest.raises(ValueError, match="batch_num_tokens"):
        pverl.compute_policy_loss_prefopt_vanilla(old, lp, adv, mask, "token-mean", config)
    with pytest.raises(ValueError, match="global_batch_size"):
        pverl.compute_policy_loss_prefopt_vanilla(old, lp, adv, mask, "seq-mean-token-sum", config)


def test_policy_loss_registration_undone():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    assert "prefopt_vanilla" not in POLICY_LOSS_REGISTRY
    with pverl.patched_verl():
        assert POLICY_LOSS_REGISTRY["prefopt_vanilla"] is pverl.compute_policy_loss_prefopt_vanilla
        assert "vanilla" in POLICY_LOSS_REGISTRY
    assert "prefopt_vanilla" not in POLICY_LOSS_REGISTRY
