"""ppo_loss / PPOLoss against prefopt_fast.reference (fp64), its exact KL, and TRL 1.16's GRPOTrainer.

``restated`` is prefopt_fast.reference.ppo_loss: a full ``log_softmax`` over the vocabulary,
then the clipped surrogate, KL estimators and aggregations written from the formulas (it
shares no code with the ops or the heads; tests/test_reference.py checks it by hand).
Gradients w.r.t. the logits are compared through that fp64 path.

TRL parity: TRL 1.16 computes the GRPO loss only inside ``GRPOTrainer._compute_loss(model,
inputs)``. We drive that method unchanged on a trainer made with ``object.__new__`` and a
tiny model patched with TRL's own ``add_fused_lm_head``: its backbone returns our logits as
hidden states and its LM head is the identity, so TRL's own kernel computes the log-probs
and entropies (with its temperature) from the very same logits, and the gradient w.r.t.
those logits is compared. The trainer runs in eval mode (no division by the accumulation
steps; dapo divides by ``num_items_in_batch / num_processes``).
"""

import math
import types
from collections import defaultdict
from contextlib import nullcontext

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch
from torch import nn

from prefopt_fast import reference as R
from prefopt_fast.losses import KL_ESTIMATORS, LOSS_AGG_MODES, TRL_LOSS_TYPES, PPOLoss, ppo_loss
from prefopt_fast.losses.ppo import VERL_KL_ESTIMATORS

IGN = -100


def _supports_kl(backend):
    from prefopt_fast._dispatch import load_backend

    return bool(getattr(load_backend(backend), "SUPPORTS_KL", False))


# ----------------------------------------------------------------------------------------------
# the fp64 reference (prefopt_fast.reference), with this file's keyword names


def ref_logprobs(logits, labels, temperature=1.0):
    """fp64 per-token log-prob of the label (0 at ignored positions)."""
    return R.token_stats(logits, labels, ignore_index=IGN, temperature=temperature)["logprobs"]


def exact_kl(logits, ref_logits, temperature=1.0):
    """fp64 KL(p || q) of every row ([..., V] -> [...]); +inf where p > 0 meets q == 0."""
    rows = torch.zeros(logits.shape[:-1], dtype=torch.long)
    return R.token_stats(logits, rows, ignore_index=IGN, temperature=temperature, ref_logits=ref_logits)["kl"]


def restated(logits, labels, old, adv, *, ref_logps=None, **kw):
    """(loss, metrics) of prefopt_fast.reference.ppo_loss in fp64 (``ref_logps``: its ``ref_logprobs``;
    ``ref_logits`` means the exact KL)."""
    if kw.get("ref_logits") is not None:
        kw.setdefault("kl_estimator", "full")
    return R.ppo_loss(logits, labels, old, adv, ignore_index=IGN, ref_logprobs=ref_logps, **kw)


# ----------------------------------------------------------------------------------------------
# data


def make_batch(B=3, T=6, V=40, device="cpu", dtype=torch.float32, seed=0, spread=0.6):
    """Logits, labels (with padding and an empty sequence), an off-policy old_logps whose ratios
    straddle every clip bound, advantages of both signs, reference log-probs and logits."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2.0).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 4:] = IGN
    if B > 2:
        labels[2, :] = IGN  # a sequence with no completion token
    logp = ref_logprobs(logits, labels)
    noise = torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    # r = exp(noise): e^1.6 (beyond a dual clip of 3), e^-1.5 (clipped low for A < 0), e^1.4 (high for A > 0)
    noise[1, :3] = torch.tensor([1.6, -1.5, 0.05], dtype=torch.float64)
    noise[0, 2] = 1.4
    old = (logp - noise).float()
    old[labels == IGN] = float("nan")  # masked positions are never read
    adv_seq = torch.tensor([0.7, -1.3, 0.4][:B])
    adv_tok = torch.randn(B, T, generator=g)
    adv_tok[0, 2], adv_tok[1, 0], adv_tok[1, 1] = 0.6, -0.9, -0.5  # clipped high, dual-clipped, clipped low
    ref = (logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5).float()
    ref[0, 1] = float(logp[0, 1]) + 4.0  # k3 = e^4 - 5 > 10: low_var_kl's clamp is active
    ref[labels == IGN] = float("-inf")
    ref_logits = (logits.double() + torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    mv = lambda x: x.to(device)  # noqa: E731
    return dict(
        logits=mv(logits),
        labels=mv(labels),
        old=mv(old),
        adv_seq=mv(adv_seq),
        adv_tok=mv(adv_tok),
        ref=mv(ref),
        ref_logits=mv(ref_logits),
    )


def _compare(backend, device, data, *, old="old", adv="adv_seq", dtype_tol=1e-4, grad_tol=None, **kw):
    """Run ppo_loss and the restatement on the same tensors; compare loss, gradient and metrics."""
    logits = data["logits"].detach().clone().requires_grad_(True)
    old_t = None if old is None else data[old]
    adv_t = data[adv]
    lib_kw = dict(kw)
    loss, metrics = ppo_loss(logits, data["labels"], old_t, adv_t, backend=backend, **lib_kw)
    loss.backward()

    x64 = data["logits"].detach().cpu().double().requires_grad_(True)
    cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref_loss, ref_metrics = restated(
        x64, data["labels"].cpu(), None if old_t is None else old_t.cpu(), adv_t.cpu(), **cpu
    )
    ref_loss.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    tol = dict(rtol=dtype_tol, atol=dtype_tol * 0.1)
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss.detach(), **tol)
    gt = dtype_tol if grad_tol is None else grad_tol
    torch.testing.assert_close(
        logits.grad.cpu().double(),
        x64.grad,
        rtol=gt,
        atol=gt * 0.01 if grad_tol is None else gt * float(x64.grad.abs().max()),
    )
    assert set(metrics) == set(ref_metrics), (set(metrics), set(ref_metrics))
    for k, v in ref_metrics.items():
        assert not metrics[k].requires_grad
        torch.testing.assert_close(
            metrics[k].cpu().double(),
            torch.tensor(float(v), dtype=torch.float64),
            **tol,
            msg=lambda m, k=k: f"metric {k}: {m}",
        )
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# every variant against the restatement, on every backend


VARIANTS = {
    "on_policy": dict(old=None),
    "on_policy_token_adv": dict(old=None, adv="adv_tok", entropy_coef=0.05),
    "clip_symmetric": dict(),
    "clip_asymmetric_dapo": dict(clip_eps_low=0.2, clip_eps_high=0.28, adv="adv_tok"),
    "dual_clip": dict(dual_clip=3.0, adv="adv_tok"),
    "dual_clip_below_eps_high": dict(dual_clip=1.1, clip_eps_high=0.3),
    "k1": dict(kl_coef=0.1, kl_estimator="k1", ref_logps="ref"),
    "k2": dict(kl_coef=0.1, kl_estimator="k2", ref_logps="ref"),
    "k3": dict(kl_coef=0.1, kl_estimator="k3", ref_logps="ref"),
    "abs": dict(kl_coef=0.1, kl_estimator="abs", ref_logps="ref"),
    "low_var_kl": dict(kl_coef=0.1, kl_estimator="low_var_kl", ref_logps="ref"),
    "kl_metric_only": dict(kl_coef=0.0, ref_logps="ref"),
    "kl_ratio_correction": dict(kl_coef=0.2, ref_logps="ref", kl_ratio_correction=True, adv="adv_tok"),
    "entropy_token_mean": dict(entropy_coef=0.1),
    "seq_mean_token_mean": dict(loss_agg_mode="seq-mean-token-mean", entropy_coef=0.1),
    "seq_mean_token_sum": dict(loss_agg_mode="seq-mean-token-sum", entropy_coef=0.1),
    "seq_mean_token_sum_norm": dict(loss_agg_mode="seq-mean-token-sum-norm", max_length=8, entropy_coef=0.1),
    "global_num_tokens": dict(global_num_tokens=23.0, entropy_coef=0.1),
    "grpo": dict(loss_agg_mode="grpo", entropy_coef=0.1, kl_coef=0.05, ref_logps="ref"),
    "bnpo": dict(loss_agg_mode="bnpo", entropy_coef=0.1),
    "dr_grpo": dict(loss_agg_mode="dr_grpo", max_length=7, entropy_coef=0.1),
    "dapo": dict(loss_agg_mode="dapo", global_num_tokens=17.0, entropy_coef=0.1, clip_eps_high=0.28),
    "gspo_seq_adv": dict(
        importance_sampling_level="sequence", loss_agg_mode="grpo", clip_eps_low=3e-4, clip_eps_high=4e-4
    ),
    "gspo_token_adv": dict(
        importance_sampling_level="sequence", adv="adv_tok", kl_coef=0.1, ref_logps="ref", kl_ratio_correction=True
    ),
    "gspo_on_policy": dict(importance_sampling_level="sequence", old=None, entropy_coef=0.02),
    "is_weights_token": dict(is_weights="w_tok", kl_coef=0.1, ref_logps="ref"),
    "is_weights_seq": dict(is_weights="w_seq", dual_clip=2.5),
    "loss_mask": dict(
        loss_mask="mask", entropy_coef=0.1, kl_coef=0.1, ref_logps="ref", loss_agg_mode="seq-mean-token-mean"
    ),
    "temperature": dict(temperature=0.7, entropy_coef=0.1, kl_coef=0.1, ref_logps="ref"),
    "temperature_tensor": dict(temperature="temp", entropy_coef=0.1),
}
# Variants of the head alone (plain PyTorch after the row kernels, which VARIANTS covers on
# every backend): run on the torch backend only, to keep the suite short.
HEAD_VARIANTS = {
    # TRL 1.16's other loss types
    "luspo": dict(loss_agg_mode="luspo", entropy_coef=0.1, dual_clip=3.0, adv="adv_tok"),
    "cispo": dict(loss_agg_mode="cispo", clip_eps_high=1.3, global_num_tokens=11.0, kl_coef=0.1, ref_logps="ref"),
    "cispo_seq": dict(loss_agg_mode="cispo", clip_eps_high=1.1, importance_sampling_level="sequence"),
    "sapo": dict(loss_agg_mode="sapo", entropy_coef=0.1, adv="adv_tok"),
    "sapo_args": dict(loss_agg_mode="sapo", loss_type_args=dict(sapo_temperature_pos=2.0, sapo_temperature_neg=0.5)),
    "vespo": dict(loss_agg_mode="vespo", global_num_tokens=13.0, entropy_coef=0.1),
    "vespo_token_adv": dict(loss_agg_mode="vespo", adv="adv_tok", loss_type_args=dict(vespo_k_pos=1.0)),
    # verl's convention: k3 clamped, log-ratio clamp, dual clip 3 by default, straight-through KL
    "verl_k3": dict(convention="verl", kl_coef=0.1, kl_estimator="k3", ref_logps="ref", adv="adv_tok"),
    "verl_k1+": dict(convention="verl", kl_coef=0.1, kl_estimator="k1+", ref_logps="ref"),
    "verl_k3+": dict(
        convention="verl", kl_coef=0.1, kl_estimator="k3+", ref_logps="ref", loss_agg_mode="seq-mean-token-mean"
    ),
    "verl_abs+": dict(convention="verl", kl_coef=0.1, kl_estimator="abs+", ref_logps="ref", entropy_coef=0.1),
    "verl_low_var_kl+": dict(convention="verl", kl_coef=0.1, kl_estimator="low_var_kl+", ref_logps="ref"),
    "verl_sum_norm": dict(convention="verl", loss_agg_mode="seq-mean-token-sum-norm", entropy_coef=0.1),
    "verl_gspo": dict(
        convention="verl", importance_sampling_level="sequence", loss_agg_mode="seq-mean-token-mean", adv="adv_tok"
    ),
    "trl_k3": dict(convention="trl", loss_agg_mode="grpo", kl_coef=0.1, kl_estimator="k3", ref_logps="ref"),
}


def _resolve(data, spec, device):
    kw = dict(spec)
    kw.setdefault("old", "old")
    kw.setdefault("adv", "adv_seq")
    B, T = data["labels"].shape
    g = torch.Generator().manual_seed(1)
    extra = {
        "w_tok": torch.rand(B, T, generator=g) + 0.5,
        "w_seq": torch.rand(B, generator=g) + 0.5,
        "mask": torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]][:B])[:, :T].bool(),
        "temp": torch.rand(B, 1, generator=g) + 0.5,
        "ref": data["ref"],
    }
    for key in ("ref_logps", "is_weights", "loss_mask", "temperature"):
        if isinstance(kw.get(key), str):
            kw[key] = extra[kw[key]].to(device)
    return kw


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_restatement(backend, device, name):
    data = make_batch(device=device)
    _compare(backend, device, data, **_resolve(data, VARIANTS[name], device))


@pytest.mark.parametrize("name", list(HEAD_VARIANTS))
def test_head_variant_matches_restatement(name):
    data = make_batch()
    _compare("torch", "cpu", data, **_resolve(data, HEAD_VARIANTS[name], "cpu"))


def test_every_mode_and_estimator_is_covered():
    variants = {**VARIANTS, **HEAD_VARIANTS}
    used_modes = {v.get("loss_agg_mode", "token-mean") for v in variants.values()}
    assert set(LOSS_AGG_MODES) | set(TRL_LOSS_TYPES) <= used_modes
    used_est = {v["kl_estimator"] for v in variants.values() if "kl_estimator" in v} | {"full"}
    assert set(KL_ESTIMATORS) | set(VERL_KL_ESTIMATORS) <= used_est


def test_clipping_is_exercised():
    """The batch really has tokens clipped low and high, and beyond the dual-clip bound."""
    data = make_batch()
    _, m = ppo_loss(data["logits"], data["labels"], data["old"], data["adv_tok"], backend="torch")
    assert m["clip_ratio/low_mean"] > 0 and m["clip_ratio/high_mean"] > 0
    l3, _ = ppo_loss(data["logits"], data["labels"], data["old"], data["adv_seq"], dual_clip=3.0, backend="torch")
    l0, _ = ppo_loss(data["logits"], data["labels"], data["old"], data["adv_seq"], backend="torch")
    assert float(l3) < float(l0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits(backend, device, dtype):
    """The gradient is written in the logits dtype: compare within its rounding."""
    data = make_batch(device=device, dtype=dtype)
    kw = _resolve(data, dict(entropy_coef=0.1, kl_coef=0.1, ref_logps="ref", dual_clip=3.0), device)
    _compare(backend, device, data, dtype_tol=1e-4, grad_tol=1e-2 if dtype == torch.bfloat16 else 2e-3, **kw)


def test_module_matches_function(backend, device):
    data = make_batch(device=device)
    cfg = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        dual_clip=3.0,
        kl_coef=0.1,
        kl_estimator="k3",
        kl_ratio_correction=True,
        entropy_coef=0.01,
        loss_agg_mode="dr_grpo",
        max_length=8,
        importance_sampling_level="token",
        temperature=0.9,
    )
    mod = PPOLoss(backend=backend, **cfg)
    a, ma = mod(data["logits"], data["labels"], data["old"], data["adv_seq"], ref_logps=data["ref"])
    b, mb = ppo_loss(
        data["logits"], data["labels"], data["old"], data["adv_seq"], ref_logps=data["ref"], backend=backend, **cfg
    )
    torch.testing.assert_close(a, b)
    assert ma.keys() == mb.keys()
    assert "dr_grpo" in repr(mod)


def test_fp64_logits_stay_fp64():
    data = make_batch()
    loss, m = ppo_loss(data["logits"].double(), data["labels"], data["old"], data["adv_seq"], backend="torch")
    assert loss.dtype == torch.float64 and m["ratio"].dtype == torch.float64


def test_global_num_tokens_tensor():
    data = make_batch()
    a, _ = ppo_loss(data["logits"], data["labels"], data["old"], data["adv_seq"], global_num_tokens=11, backend="torch")
    b, _ = ppo_loss(
        data["logits"],
        data["labels"],
        data["old"],
        data["adv_seq"],
        global_num_tokens=torch.tensor(11),
        backend="torch",
    )
    torch.testing.assert_close(a, b)


def test_nan_in_a_kept_token_stays_nan():
    data = make_batch()
    old = data["old"].clone()
    old[1, 1] = float("nan")
    loss, _ = ppo_loss(data["logits"], data["labels"], old, data["adv_seq"], backend="torch")
    assert torch.isnan(loss)


# ----------------------------------------------------------------------------------------------
# the exact KL ("full") against the naive full-softmax KL in fp64


def _masked_logits(B=3, T=5, V=24, seed=3):
    """Rows exercising -inf: policy masked / reference finite; nested masks; disjoint masks
    (the policy puts mass where the reference has none: KL = +inf); a reference masked where the
    policy is too (finite)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * 2
    r = torch.randn(B, T, V, generator=g) * 2
    ninf = float("-inf")
    z[0, 0, :5] = ninf  # policy masked, reference full
    r[0, 1, 3:9] = ninf  # nested: reference mask inside the policy's
    z[0, 1, 2:12] = ninf
    z[1, 0, :6] = ninf  # disjoint masks: KL = +inf
    r[1, 0, 6:10] = ninf
    r[1, 2, : V - 1] = ninf  # reference is one-hot, policy masked elsewhere: finite
    z[1, 2, : V - 1] = ninf
    z[2, 3, 7:] = ninf  # policy near one-hot region, reference full
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = 7  # labels on tokens the policy can emit
    labels[0, 1] = 15
    labels[1, 0] = 8
    labels[1, 2] = V - 1
    labels[2, 3] = 3
    labels[2, 4] = IGN
    return z, r, labels


def test_full_kl_matches_naive(backend, device):
    if not _supports_kl(backend):
        pytest.skip(f"backend {backend!r} has no exact-KL row kernel yet")
    z, r, labels = _masked_logits()
    B, T, V = z.shape
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 0] = False  # the infinite-KL row is masked out: finite loss, zero gradient there
    old = (ref_logprobs(z, labels) - 0.3).float()
    adv = torch.tensor([0.5, -1.0, 1.5])
    for temperature in (1.0, 0.8):
        kw = dict(
            ref_logits=r.to(device),
            kl_coef=0.3,
            kl_estimator="full",
            loss_mask=mask.to(device),
            temperature=temperature,
            entropy_coef=0.05,
        )
        zl = z.clone().to(device).requires_grad_(True)
        loss, m = ppo_loss(zl, labels.to(device), old.to(device), adv.to(device), backend=backend, **kw)
        loss.backward()
        z64 = z.double().requires_grad_(True)
        ref_loss, ref_m = restated(
            z64, labels, old, adv, ref_logits=r, kl_coef=0.3, loss_mask=mask, temperature=temperature, entropy_coef=0.05
        )
        ref_loss.backward()
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss.detach().cpu().double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(zl.grad.cpu().double(), z64.grad, rtol=1e-5, atol=1e-7)
        assert torch.all(zl.grad[1, 0] == 0)
        torch.testing.assert_close(
            m["kl"].cpu().double(), torch.tensor(ref_m["kl"], dtype=torch.float64), rtol=1e-5, atol=1e-6
        )
    # the same row kept: the exact KL is +inf, as the naive one
    kl_naive = exact_kl(z, r)
    assert math.isinf(float(kl_naive[1, 0])) and torch.isfinite(kl_naive[0]).all()
    loss, m = ppo_loss(
        z.to(device),
        labels.to(device),
        old.to(device),
        adv.to(device),
        ref_logits=r.to(device),
        kl_coef=0.3,
        kl_estimator="full",
        backend=backend,
    )
    assert float(loss) == float("inf") and float(m["kl"]) == float("inf")


def test_full_kl_equals_sampled_kl_in_expectation_shape(backend, device):
    """'full' with kl_coef=0 logs the exact KL and leaves the loss and gradient unchanged."""
    if not _supports_kl(backend):
        pytest.skip(f"backend {backend!r} has no exact-KL row kernel yet")
    data = make_batch(device=device)
    z = data["logits"].detach().clone().requires_grad_(True)
    a, ma = ppo_loss(
        z,
        data["labels"],
        data["old"],
        data["adv_seq"],
        ref_logits=data["ref_logits"],
        kl_estimator="full",
        backend=backend,
    )
    a.backward()
    g = z.grad.clone()
    z.grad = None
    b, mb = ppo_loss(z, data["labels"], data["old"], data["adv_seq"], backend=backend)
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(g, z.grad)
    kl = exact_kl(data["logits"].cpu(), data["ref_logits"].cpu())
    keep = (data["labels"] != IGN).cpu()
    torch.testing.assert_close(ma["kl"].cpu().double(), kl[keep].mean(), rtol=1e-5, atol=1e-6)
    assert "kl" not in mb


# ----------------------------------------------------------------------------------------------
# TRL 1.16 GRPOTrainer parity


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = None

    def forward(self, *args, **kwargs):
        return types.SimpleNamespace(last_hidden_state=self.hidden)


class _TinyLM(nn.Module):
    """A causal LM whose backbone returns given hidden states and whose LM head is the identity."""

    def __init__(self, V):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.base_model = _Backbone()
        self.lm_head = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(V))
        self.lm_head.weight.requires_grad_(False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, *args, **kwargs):  # replaced by add_fused_lm_head
        raise NotImplementedError


class _Accelerator:
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return nullcontext()


def _trl_objective_defaults():
    """TRL's own GRPOConfig defaults of the sapo / vespo fields."""
    import dataclasses

    from trl import GRPOConfig

    return {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.name.startswith(("sapo_", "vespo_"))}


def test_trl_objective_defaults_are_trls():
    expected.require("trl")
    from prefopt_fast.losses.ppo import TRL_LOSS_TYPE_ARGS

    assert {k: v for d in TRL_LOSS_TYPE_ARGS.values() for k, v in d.items()} == _trl_objective_defaults()


def _trl_loss(
    logits,
    labels,
    old,
    adv,
    *,
    loss_type,
    beta=0.0,
    epsilon=0.2,
    epsilon_high=None,
    delta=None,
    use_bias_correction_kl=False,
    entropy_coef=0.0,
    importance_sampling_level="token",
    ref=None,
    tool_mask=None,
    is_ratio=None,
    num_items_in_batch=None,
    max_completion_length=None,
    temperature=1.0,
    loss_type_args=None,
):
    """TRL 1.16's own GRPOTrainer._compute_loss on these logits; returns (loss, metrics, logits_grad).
    ``loss_type_args``: GRPOConfig fields of sapo / vespo (TRL's defaults otherwise)."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    B, T, V = logits.shape
    model = _TinyLM(V).eval()
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    leaf = logits.detach().float().clone().requires_grad_(True)
    # hidden position j predicts token j + 1: one prompt token, then the completion
    model.base_model.hidden = torch.cat([leaf, torch.zeros(B, 1, V)], dim=1)

    tr = object.__new__(GRPOTrainer)
    tr.__dict__.update(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=True,
        _entropy_bonus_enabled=entropy_coef != 0.0,
        entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(
            delta=delta,
            use_bias_correction_kl=use_bias_correction_kl,
            steps_per_generation=1,
            entropy_target=0.2,
            **{**_trl_objective_defaults(), **(loss_type_args or {})},
        ),
    )
    completion_mask = (labels != IGN).long()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": labels.clamp(min=0),
        "completion_mask": completion_mask,
        "advantages": adv,
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.nan_to_num(old, nan=0.0)
    if ref is not None:
        inputs["ref_per_token_logps"] = torch.where(labels != IGN, ref, torch.zeros_like(ref))
    if tool_mask is not None:
        inputs["tool_mask"] = tool_mask.long()
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio if is_ratio.dim() == 2 else is_ratio[:, None]
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items_in_batch))
    loss = tr._compute_loss(model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in tr._metrics["eval"].items()}
    return loss.detach(), metrics, leaf.grad


TRL_CASES = {
    "grpo_kl_bias_corr_delta_entropy_toolmask": dict(
        loss_type="grpo", beta=0.04, use_bias_correction_kl=True, delta=3.0, entropy_coef=0.01, tool_mask=True
    ),
    "grpo_on_policy_token_adv": dict(loss_type="grpo", old=False, adv="adv_tok", beta=0.1, use_bias_correction_kl=True),
    "bnpo_asym_kl": dict(loss_type="bnpo", beta=0.04, epsilon_high=0.28),
    "dr_grpo_on_policy_entropy": dict(
        loss_type="dr_grpo", old=False, beta=0.1, entropy_coef=0.05, max_completion_length=8
    ),
    "dapo_global_delta_is_temp": dict(
        loss_type="dapo",
        num_items_in_batch=17,
        delta=2.0,
        epsilon_high=0.28,
        entropy_coef=0.02,
        is_ratio="tok",
        temperature=0.7,
        beta=0.02,
    ),
    "dapo_local": dict(loss_type="dapo", num_items_in_batch="local"),
    "gspo_grpo_bias_corr_is_seq": dict(
        loss_type="grpo",
        importance_sampling_level="sequence",
        beta=0.04,
        use_bias_correction_kl=True,
        is_ratio="seq",
        epsilon=3e-4,
        epsilon_high=4e-4,
    ),
    "gspo_dapo_on_policy_entropy": dict(
        loss_type="dapo",
        importance_sampling_level="sequence",
        old=False,
        num_items_in_batch="local",
        entropy_coef=0.03,
        beta=0.05,
    ),
    "gspo_bnpo_token_adv_delta": dict(loss_type="bnpo", importance_sampling_level="sequence", adv="adv_tok", delta=1.5),
}
# TRL's other objectives: the head alone, on the torch backend (the row kernels are covered above)
TRL_HEAD_CASES = {
    "luspo_gspo_delta_kl_entropy": dict(
        loss_type="luspo", importance_sampling_level="sequence", delta=3.0, beta=0.04, entropy_coef=0.01
    ),
    "luspo_token_adv_toolmask": dict(loss_type="luspo", adv="adv_tok", tool_mask=True, epsilon_high=0.28),
    "cispo_kl_entropy_is": dict(
        loss_type="cispo", epsilon_high=1.3, num_items_in_batch=17, beta=0.04, entropy_coef=0.02, is_ratio="tok"
    ),
    "cispo_seq_on_policy": dict(
        loss_type="cispo", importance_sampling_level="sequence", old=False, epsilon_high=0.9, num_items_in_batch="local"
    ),
    "sapo_entropy_toolmask_kl": dict(
        loss_type="sapo",
        adv="adv_tok",
        tool_mask=True,
        entropy_coef=0.02,
        beta=0.04,
        use_bias_correction_kl=True,
        loss_type_args=dict(sapo_temperature_pos=2.0, sapo_temperature_neg=0.7),
    ),
    "sapo_defaults_is_seq": dict(loss_type="sapo", is_ratio="seq"),
    "vespo_kl_entropy": dict(loss_type="vespo", num_items_in_batch=13, beta=0.02, entropy_coef=0.01),
    "vespo_args_token_adv": dict(
        loss_type="vespo",
        adv="adv_tok",
        num_items_in_batch="local",
        loss_type_args=dict(vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=2.5, vespo_lambda_neg=1.0),
    ),
}
_TRL_GLOBAL = ("dapo", "cispo", "vespo")  # the loss types that divide by TRL's num_items_in_batch normalizer


@pytest.mark.parametrize("name", list(TRL_HEAD_CASES))
def test_matches_trl_grpo_trainer_objectives(name):
    _trl_parity("torch", "cpu", TRL_HEAD_CASES[name])


@pytest.mark.parametrize("name", list(TRL_CASES))
def test_matches_trl_grpo_trainer(backend, device, name):
    _trl_parity(backend, device, TRL_CASES[name])


def _trl_parity(backend, device, case):
    expected.require("trl")
    case = dict(case)
    data = make_batch()  # TRL runs on the CPU tensors
    labels, B, T = data["labels"], *data["labels"].shape
    g = torch.Generator().manual_seed(5)
    old = None if case.pop("old", True) is False else data["old"]
    adv = data[case.pop("adv", "adv_seq")]
    tool_mask = None
    if case.pop("tool_mask", False):
        tool_mask = torch.rand(B, T, generator=g) > 0.25
    is_ratio = case.pop("is_ratio", None)
    if is_ratio == "tok":
        is_ratio = torch.rand(B, T, generator=g) + 0.5
    elif is_ratio == "seq":
        is_ratio = torch.rand(B, generator=g) + 0.5
    nib = case.pop("num_items_in_batch", None)
    if nib == "local":
        nib = float((labels != IGN).sum())
    ref = data["ref"] if case.get("beta", 0.0) != 0.0 else None

    t_loss, t_metrics, t_grad = _trl_loss(
        data["logits"],
        labels,
        old,
        adv,
        ref=ref,
        tool_mask=tool_mask,
        is_ratio=is_ratio,
        num_items_in_batch=nib,
        **case,
    )

    z = data["logits"].detach().clone().to(device).requires_grad_(True)
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    loss, m = ppo_loss(
        z,
        mv(labels),
        mv(old),
        mv(adv),
        ref_logps=mv(ref),
        loss_mask=mv(tool_mask),
        is_weights=mv(is_ratio),
        loss_agg_mode=case["loss_type"],
        kl_coef=case.get("beta", 0.0),
        kl_estimator="k3",
        convention="trl",
        loss_type_args=case.get("loss_type_args"),
        kl_ratio_correction=case.get("use_bias_correction_kl", False),
        clip_eps_low=case.get("epsilon", 0.2),
        clip_eps_high=case.get("epsilon_high"),
        dual_clip=case.get("delta"),
        entropy_coef=case.get("entropy_coef", 0.0),
        importance_sampling_level=case.get("importance_sampling_level", "token"),
        max_length=case.get("max_completion_length"),
        global_num_tokens=nib if case["loss_type"] in _TRL_GLOBAL else None,
        temperature=case.get("temperature", 1.0),
        backend=backend,
    )
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), t_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.cpu(), t_grad, rtol=2e-4, atol=1e-7)
    names = {
        "cispo": {"cispo_clip_ratio"},
        "vespo": {"vespo/phi_seq_mean"},
        "sapo": set(),
    }.get(case["loss_type"], {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"})
    names.add("entropy")
    if ref is not None:
        names.add("kl")
    if case.get("entropy_coef"):
        names.add("policy_loss")
    assert names <= set(t_metrics) and names <= set(m)
    for k in names:
        torch.testing.assert_close(float(m[k]), float(t_metrics[k]), rtol=2e-5, atol=1e-6, msg=k)
    if backend == "torch":  # the oracle of the other tests follows TRL too (once: it runs on the CPU)
        z64 = data["logits"].detach().double().requires_grad_(True)
        r_loss, _ = restated(
            z64,
            labels,
            old,
            adv,
            ref_logps=ref,
            loss_mask=tool_mask,
            is_weights=is_ratio,
            loss_agg_mode=case["loss_type"],
            kl_coef=case.get("beta", 0.0),
            kl_estimator="k3",
            convention="trl",
            loss_type_args=case.get("loss_type_args"),
            kl_ratio_correction=case.get("use_bias_correction_kl", False),
            clip_eps_low=case.get("epsilon", 0.2),
            clip_eps_high=case.get("epsilon_high"),
            dual_clip=case.get("delta"),
            entropy_coef=case.get("entropy_coef", 0.0),
            importance_sampling_level=case.get("importance_sampling_level", "token"),
            max_length=case.get("max_completion_length"),
            global_num_tokens=nib if case["loss_type"] in _TRL_GLOBAL else None,
            temperature=case.get("temperature", 1.0),
        )
        r_loss.backward()
        torch.testing.assert_close(r_loss.detach().float(), t_loss, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(z64.grad.float(), t_grad, rtol=2e-4, atol=1e-7)


def test_trl_delta_is_the_dual_clip_and_clip_metrics_agree():
    """Sanity of the parity set-up: the batch has ratios beyond TRL's delta with A < 0."""
    expected.require("trl")
    data = make_batch()
    t_loss, t_m, _ = _trl_loss(
        data["logits"], data["labels"], data["old"], data["adv_seq"], loss_type="bnpo", delta=3.0
    )
    t_loss0, _, _ = _trl_loss(data["logits"], data["labels"], data["old"], data["adv_seq"], loss_type="bnpo")
    assert float(t_loss) < float(t_loss0)
    assert t_m["clip_ratio/region_mean"] > 0


# ----------------------------------------------------------------------------------------------
# bad input


def _bad_call(**over):
    data = make_batch(B=2, T=4, V=8)
    args = dict(logits=data["logits"], labels=data["labels"], old_logps=data["old"], advantages=data["adv_seq"])
    kw = {k: v for k, v in over.items() if k not in args}
    args.update({k: v for k, v in over.items() if k in args})
    return ppo_loss(args["logits"], args["labels"], args["old_logps"], args["advantages"], backend="torch", **kw)


BAD = [
    (dict(clip_eps_low=-0.1), ValueError, "clip_eps_low"),
    (dict(clip_eps_high=-0.1), ValueError, "clip_eps_high"),
    (dict(clip_eps_low=float("nan")), ValueError, "clip_eps_low"),
    (dict(dual_clip=1.0), ValueError, "dual_clip"),
    (dict(dual_clip=0.5), ValueError, "dual_clip"),
    (dict(dual_clip=1.2, loss_agg_mode="dapo"), ValueError, "dual_clip must be > 1 \\+ clip_eps_high"),
    (dict(kl_estimator="k4"), ValueError, r"kl_estimator must be one of \['k1', 'k2', 'k3', 'abs', 'low_var_kl'"),
    (dict(loss_agg_mode="token-sum"), ValueError, r"loss_agg_mode must be one of .*'dapo'"),
    (
        dict(convention="verl", loss_agg_mode="cispo"),
        ValueError,
        "convention='verl', loss_agg_mode must be one of verl's",
    ),
    (
        dict(convention="trl"),
        ValueError,
        "convention='trl', loss_agg_mode must be one of TRL's.*got verl's 'token-mean'",
    ),
    (dict(convention="openrlhf"), ValueError, r"convention must be one of \['trl', 'verl'\] or None"),
    (dict(kl_estimator="k3+"), ValueError, "verl's straight-through estimator.*convention='verl'"),
    (dict(kl_estimator="k1+", convention="trl", loss_agg_mode="grpo"), ValueError, "convention='verl'"),
    (dict(loss_agg_mode="cispo", dual_clip=3.0), ValueError, "ignores `delta`"),
    (dict(loss_agg_mode="sapo", loss_type_args=dict(vespo_k_pos=1.0)), ValueError, "does not read"),
    (dict(loss_agg_mode="sapo", loss_type_args=dict(sapo_temperature_pos=0.0)), ValueError, "sapo_temperature_pos"),
    (dict(loss_type_args=[1.0]), TypeError, "loss_type_args must be a dict"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level"),
    (dict(kl_coef=0.1, kl_estimator="full"), ValueError, "needs ref_logits"),
    (dict(kl_coef=0.1), ValueError, "needs ref_logps"),
    (dict(kl_coef=-0.1), ValueError, "kl_coef"),
    (dict(kl_ratio_correction=1), TypeError, "kl_ratio_correction"),
    (dict(loss_agg_mode="dr_grpo"), ValueError, "max_length is required"),
    (dict(loss_agg_mode="dr_grpo", max_length=0), ValueError, "max_length must be an int >= 1"),
    (dict(max_length=8), ValueError, "max_length is only used"),
    (dict(global_num_tokens=10, loss_agg_mode="grpo"), ValueError, "global_num_tokens is only used"),
    (dict(global_num_tokens=10, loss_agg_mode="bnpo"), ValueError, "bnpo normalizes by the local"),
    (dict(global_num_tokens=0), ValueError, "global_num_tokens"),
    (dict(logits=torch.zeros(2, 4)), ValueError, r"logits must have shape \[B, T, V\]"),
    (dict(labels=torch.zeros(2, 5, dtype=torch.long)), ValueError, "labels must have shape"),
    (dict(old_logps=torch.zeros(2, 5)), ValueError, r"old_logps must have shape \[B, T\]"),
    (dict(old_logps=torch.zeros(2)), ValueError, r"old_logps must have shape \[B, T\]"),
    (dict(advantages=torch.zeros(3)), ValueError, r"advantages must have shape \[B, T\] = \[2, 4\] or \[B\]"),
    (dict(advantages=torch.zeros(2, 3)), ValueError, "advantages must have shape"),
    (dict(advantages=torch.zeros(2, dtype=torch.long)), TypeError, "advantages must be a floating-point"),
    (dict(ref_logps=torch.zeros(2, 3), kl_coef=0.1), ValueError, "ref_logps must have shape"),
    (dict(ref_logps=torch.zeros(2, 4), kl_estimator="full"), ValueError, "ref_logps is only used by the sampled"),
    (dict(ref_logits=torch.zeros(2, 4, 8)), ValueError, "ref_logits is only used"),
    (dict(ref_logits=torch.zeros(2, 4, 9), kl_estimator="full", kl_coef=0.1), ValueError, "ref_logits must have"),
    (dict(loss_mask=torch.ones(2, 5)), ValueError, "loss_mask must have shape"),
    (dict(is_weights=torch.ones(3)), ValueError, "is_weights must have shape"),
    (dict(is_weights=torch.ones(2, 4, 1)), ValueError, "is_weights must have shape"),
    (dict(old_logps=[0.0]), TypeError, "old_logps must be a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,match", BAD, ids=[f"{i}-{b[2][:24]}" for i, b in enumerate(BAD)])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad_call(**over)


def test_module_validates_in_init():
    with pytest.raises(ValueError, match="dual_clip"):
        PPOLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="max_length is required"):
        PPOLoss(loss_agg_mode="dr_grpo")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        PPOLoss(loss_agg_mode="mean")


# ----------------------------------------------------------------------------------------------
# policy_loss / PolicyLoss: the same head over per-token vectors, bit for bit


def _policy_from_ppo_inputs(
    logits,
    labels,
    backend,
    *,
    loss_mask=None,
    ref_logits=None,
    temperature=1.0,
    kl_estimator="k3",
    kl_coef=0.0,
    ref_logps=None,
    **_,
):
    """What a caller of policy_loss holds: the per-token log-probs, entropies (and exact KL)
    that ppo_loss computes from its logits, and the mask ppo_loss derives from its labels."""
    keep = labels != IGN
    if loss_mask is not None:
        keep = keep & (loss_mask != 0)
    kernel_labels = torch.where(keep, labels, IGN) if loss_mask is not None else labels
    with_kl = kl_estimator == "full" and ref_logits is not None
    from prefopt_fast import token_logprobs

    out = token_logprobs(
        logits,
        kernel_labels,
        ignore_index=IGN,
        temperature=temperature,
        stats=("entropy", "kl") if with_kl else ("entropy",),
        ref_logits=ref_logits if with_kl else None,
        backend=backend,
    )
    mask = keep if loss_mask is None else loss_mask * keep
    return out.logprobs, out.entropy, (out.kl if with_kl else None), mask


def _assert_policy_equals_ppo(backend, data, old, adv, kw, module=False):
    from prefopt_fast.losses import PolicyLoss, policy_loss

    head_kw = {k: v for k, v in kw.items() if k not in ("loss_mask", "ref_logits", "temperature")}
    z1 = data["logits"].detach().clone().requires_grad_(True)
    want, want_m = ppo_loss(z1, data["labels"], old, adv, backend=backend, **kw)
    want.backward()

    z2 = data["logits"].detach().clone().requires_grad_(True)
    logps, entropy, kl, mask = _policy_from_ppo_inputs(z2, data["labels"], backend, **kw)
    tensors = dict(
        entropy=entropy,
        kl=kl,
        ref_logps=head_kw.pop("ref_logps", None),
        is_weights=head_kw.pop("is_weights", None),
        global_num_tokens=head_kw.pop("global_num_tokens", None),
    )
    if module:
        got, got_m = PolicyLoss(**head_kw)(logps, old, adv, mask, **tensors)
    else:
        got, got_m = policy_loss(logps, old, adv, mask, **tensors, **head_kw)
    got.backward()

    assert torch.equal(got.detach(), want.detach()), (float(got), float(want))
    assert got.dtype == want.dtype
    assert list(got_m) == list(want_m)
    for k in want_m:
        assert torch.equal(got_m[k], want_m[k]) or (got_m[k].isnan() and want_m[k].isnan()), k
    assert torch.equal(z2.grad, z1.grad)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_policy_loss_equals_ppo_loss(backend, device, name):
    data = make_batch(device=device)
    kw = _resolve(data, VARIANTS[name], device)
    old = None if kw.pop("old") is None else data["old"]
    adv = data[kw.pop("adv")]
    _assert_policy_equals_ppo(backend, data, old, adv, kw)


@pytest.mark.parametrize("name", list(HEAD_VARIANTS))
def test_policy_loss_equals_ppo_loss_head_variants(name):
    data = make_batch()
    kw = _resolve(data, HEAD_VARIANTS[name], "cpu")
    old = None if kw.pop("old") is None else data["old"]
    adv = data[kw.pop("adv")]
    _assert_policy_equals_ppo("torch", data, old, adv, kw)


def test_policy_loss_full_kl_equals_ppo_loss(backend, device):
    if not _supports_kl(backend):
        pytest.skip(f"backend {backend!r} has no exact-KL row kernel yet")
    data = make_batch(device=device)
    mask = torch.ones_like(data["labels"], dtype=torch.bool)
    mask[1, 2] = False
    for agg in LOSS_AGG_MODES:
        kw = dict(
            ref_logits=data["ref_logits"],
            kl_coef=0.3,
            kl_estimator="full",
            loss_mask=mask,
            temperature=0.8,
            entropy_coef=0.05,
            loss_agg_mode=agg,
            kl_ratio_correction=True,
        )
        if agg == "seq-mean-token-sum-norm":
            kw["max_length"] = 8
        _assert_policy_equals_ppo(backend, data, data["old"], data["adv_tok"], kw)


def test_policy_module_equals_ppo_loss(backend, device):
    data = make_batch(device=device)
    kw = dict(
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        dual_clip=3.0,
        kl_coef=0.1,
        kl_estimator="k3",
        kl_ratio_correction=True,
        entropy_coef=0.01,
        loss_agg_mode="dr_grpo",
        max_length=8,
        importance_sampling_level="sequence",
        ref_logps=data["ref"],
        is_weights=data["adv_tok"].abs(),
    )
    _assert_policy_equals_ppo(backend, data, data["old"], data["adv_seq"], kw, module=True)


def test_policy_loss_without_entropy_and_weighted_mask():
    """No entropy: no bonus allowed, no entropy metric; a float mask weights the tokens as
    ppo_loss's loss_mask does."""
    from prefopt_fast.losses import PolicyLoss, policy_loss

    data = make_batch()
    logps, _, _, keep = _policy_from_ppo_inputs(data["logits"], data["labels"], "torch")
    w = torch.rand(keep.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    loss, m = policy_loss(logps, data["old"], data["adv_seq"], w * keep)
    want, want_m = ppo_loss(data["logits"], data["labels"], data["old"], data["adv_seq"], loss_mask=w, backend="torch")
    assert torch.equal(loss, want) and "entropy" not in m and set(m) == set(want_m) - {"entropy"}
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs entropy"):
        policy_loss(logps, data["old"], data["adv_seq"], entropy_coef=0.1)
    with pytest.raises(ValueError, match="kl is only used by"):
        policy_loss(logps, data["old"], data["adv_seq"], kl=torch.zeros_like(logps))
    with pytest.raises(ValueError, match='"full" needs kl'):
        PolicyLoss(kl_estimator="full", kl_coef=0.1)(logps, data["old"], data["adv_seq"])
    with pytest.raises(ValueError, match=r"logps must have shape \[B, T\]"):
        policy_loss(data["logits"], data["old"], data["adv_seq"])
    assert "dr_grpo" in repr(PolicyLoss(loss_agg_mode="dr_grpo", max_length=4))
