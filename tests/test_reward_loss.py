"""bradley_terry_loss / BradleyTerryLoss against prefopt_fast.reference (fp64) and TRL's RewardTrainer.compute_loss.

TRL parity: ``RewardTrainer.compute_loss(model, inputs)`` is called on a trainer made with
``object.__new__`` (attributes set by hand) and a fake reward model whose output ``logits``
``[2B, 1]`` are given rewards; gradients are compared w.r.t. those rewards.
"""

import types
from collections import defaultdict

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch

from prefopt_fast import reference as R
from prefopt_fast.losses import BradleyTerryLoss, bradley_terry_loss


def make_rewards(B, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rw = 2.0 * torch.randn(B, generator=g, dtype=torch.float64)
    rl = 2.0 * torch.randn(B, generator=g, dtype=torch.float64)
    margin = torch.rand(B, generator=g, dtype=torch.float64)
    return rw.to(dtype), rl.to(dtype), margin.to(dtype)


def restated(rw, rl, margin, c):
    """prefopt_fast.reference's Bradley-Terry loss and metrics in fp64."""
    return R.bradley_terry_loss(rw, rl, margin=margin, center_rewards_coefficient=c)


@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("c", [None, 0.01])
def test_matches_formula(margin_kind, c):
    for dtype in (torch.float32, torch.bfloat16):
        for B in (1, 6):
            rw, rl, m = make_rewards(B, dtype, seed=B)
            rw, rl = rw.requires_grad_(), rl.requires_grad_()
            margin = {"none": None, "float": 0.3, "tensor": m}[margin_kind]
            loss, metrics = bradley_terry_loss(rw, rl, margin=margin, center_rewards_coefficient=c)
            assert loss.dtype == torch.float32 and loss.dim() == 0
            g = torch.autograd.grad(loss, [rw, rl])
            r64 = [x.detach().double().requires_grad_() for x in (rw, rl)]
            m64 = margin.double() if isinstance(margin, torch.Tensor) else margin
            ref, ref_metrics = restated(*r64, m64, c)
            rg = torch.autograd.grad(ref, r64)
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
            for a, b in zip(g, rg):
                assert a.dtype == dtype
                torch.testing.assert_close(a.double(), b, **tol)
            assert set(metrics) == set(ref_metrics)
            for k, v in metrics.items():
                assert v.dim() == 0 and not v.requires_grad
                torch.testing.assert_close(v.double(), ref_metrics[k].detach(), rtol=1e-5, atol=1e-6, msg=k)


def test_column_rewards_and_strict_accuracy():
    rw = torch.tensor([[1.0], [2.0], [0.0]])
    rl = torch.tensor([[1.0], [1.0], [3.0]])
    loss, m = bradley_terry_loss(rw, rl)
    loss2, _ = bradley_terry_loss(rw[:, 0], rl[:, 0])
    torch.testing.assert_close(loss, loss2)
    assert float(m["accuracy"]) == pytest.approx(1 / 3)  # the tie does not count
    assert float(m["min_reward"]) == 0.0 and float(m["max_reward"]) == 3.0


def test_module():
    rw, rl, m = make_rewards(5, seed=2)
    mod = BradleyTerryLoss(center_rewards_coefficient=0.01)
    a, _ = mod(rw, rl, m)
    b, _ = bradley_terry_loss(rw, rl, margin=m, center_rewards_coefficient=0.01)
    torch.testing.assert_close(a, b)
    assert "0.01" in repr(mod)


def test_nan_in_nan_out():
    rw, rl, _ = make_rewards(3, seed=3)
    rw[0] = float("nan")
    assert torch.isnan(bradley_terry_loss(rw, rl)[0])


def test_bad_inputs():
    rw, rl, m = make_rewards(4, seed=4)
    with pytest.raises(ValueError, match="rejected_rewards"):
        bradley_terry_loss(rw, rl[:3])
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(rw, rl, margin=m[:2])
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(rw, rl, margin=float("nan"))
    with pytest.raises(TypeError, match="chosen_rewards"):
        bradley_terry_loss(rw.long(), rl)
    with pytest.raises(TypeError, match="margin"):
        bradley_terry_loss(rw, rl, margin=m.long())
    with pytest.raises(ValueError, match="chosen_rewards"):
        bradley_terry_loss(rw.reshape(2, 2), rl.reshape(2, 2))
    with pytest.raises(ValueError, match="chosen_rewards"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        bradley_terry_loss(rw, rl, center_rewards_coefficient=-0.1)
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        BradleyTerryLoss(center_rewards_coefficient=float("inf"))
    with pytest.raises(TypeError, match="center_rewards_coefficient"):
        BradleyTerryLoss(center_rewards_coefficient="0.1")


# ----------------------------------------------------------------------------------------------
# against TRL's own code


class _FakeRewardModel(torch.nn.Module):
    def __init__(self, rewards):
        super().__init__()
        self.rewards = rewards

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        return types.SimpleNamespace(logits=self.rewards[:, None])


def _trl_reward_loss(rewards, margin, c):
    reward_trainer = expected.require_module("trl", "trl.trainer.reward_trainer")
    trainer = object.__new__(reward_trainer.RewardTrainer)
    model = _FakeRewardModel(rewards)
    trainer.model = model
    trainer.args = types.SimpleNamespace(center_rewards_coefficient=c)
    trainer.accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    n = rewards.shape[0]
    inputs = {"input_ids": torch.zeros(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = trainer.compute_loss(model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("c", [None, 0.05])
def test_matches_trl(with_margin, c):
    for B in (1, 5):
        rw, rl, m = make_rewards(B, seed=10 + B)
        rewards = torch.cat([rw, rl]).requires_grad_()
        margin = m if with_margin else None
        trl_loss, trl_metrics = _trl_reward_loss(rewards, margin, c)
        (trl_grad,) = torch.autograd.grad(trl_loss, rewards)
        loss, metrics = bradley_terry_loss(rewards[:B], rewards[B:], margin=margin, center_rewards_coefficient=c)
        (grad,) = torch.autograd.grad(loss, rewards)
        torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-7)
        for k, v in metrics.items():
            assert float(v) == pytest.approx(trl_metrics[k], rel=1e-6, abs=1e-6), k
        # the oracle of the other tests follows TRL too
        ref_loss, ref_metrics = R.bradley_terry_loss(
            rewards[:B], rewards[B:], margin=margin, center_rewards_coefficient=c
        )
        (ref_grad,) = torch.autograd.grad(ref_loss, rewards)
        torch.testing.assert_close(ref_loss.float(), trl_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ref_grad, trl_grad, rtol=1e-6, atol=1e-7)
        for k, v in ref_metrics.items():
            assert float(v) == pytest.approx(trl_metrics[k], rel=1e-6, abs=1e-6), k


@pytest.mark.parametrize("c", [None, 0.05])
def test_reduction(c):
    """ "none" is the per-pair loss [B] (centering term per pair): its mean is "mean", its sum "sum"."""
    rw, rl, margin = make_rewards(6, seed=5)
    res = {
        r: bradley_terry_loss(rw, rl, margin=margin, center_rewards_coefficient=c, reduction=r)[0]
        for r in ("mean", "sum", "none")
    }
    assert res["none"].shape == (6,)
    torch.testing.assert_close(res["none"].mean(), res["mean"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res["none"].sum(), res["sum"], rtol=1e-6, atol=1e-6)
    mod = BradleyTerryLoss(center_rewards_coefficient=c, reduction="none")
    torch.testing.assert_close(mod(rw, rl, margin)[0], res["none"])
    with pytest.raises(ValueError, match="reduction must be one of"):
        bradley_terry_loss(rw, rl, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        BradleyTerryLoss(reduction="avg")
