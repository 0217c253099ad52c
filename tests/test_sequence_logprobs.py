"""sequence_logprobs and logits_dpo_loss against prefopt_fast.reference (fp64)."""

import pytest
import torch

import prefopt_fast as pf
from prefopt_fast import reference as R

DTYPES = [torch.float32, torch.bfloat16]


def ref_seq(z, y, ignore_index=-100, temperature=1.0, average=False):
    """fp64 per-sequence sums (means) over the last label dim: prefopt_fast.reference."""
    return R.sequence_logprobs(z, y, ignore_index=ignore_index, temperature=temperature, average=average)


def _batch(B, T, V, dtype, *, empty=(), prompt=2):
    z = (torch.randn(B, T, V) * 2).to(dtype)
    y = torch.randint(0, V, (B, T))
    y[:, :prompt] = -100
    for b in empty:
        y[b] = -100
    return z, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("average", [False, True])
def test_padded_matches_reference(backend, dtype, average):
    z, y = _batch(3, 5, 37, dtype, empty=(1,))
    zl = z.clone().requires_grad_()
    out = pf.sequence_logprobs(zl, y, average=average, backend=backend)
    zr = z.double().requires_grad_()
    ref = ref_seq(zr, y, average=average)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    assert out[1].item() == 0.0  # no real label: 0, not NaN
    w = torch.randn(3)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(zl.grad.double(), zr.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("lengths", [[5, 0, 7, 3], [1], [4, 4]])
def test_packed_equals_padded(backend, lengths):
    V, T = 29, max(lengths)
    B = len(lengths)
    z, y = _batch(B, T, V, torch.float32, prompt=1)
    for b, n in enumerate(lengths):
        y[b, n:] = -100
    rows = [torch.arange(b * T, b * T + n) for b, n in enumerate(lengths)]
    idx = torch.cat(rows)
    zp = z.reshape(B * T, V)[idx].clone().requires_grad_()
    yp = y.reshape(-1)[idx]
    cu = torch.tensor([0] + lengths).cumsum(0)
    zl = z.clone().requires_grad_()
    for average in (False, True):
        padded = pf.sequence_logprobs(zl, y, average=average, backend=backend)
        packed = pf.sequence_logprobs(zp, yp, cu_seqlens=cu, average=average, backend=backend)
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-6)
    w = torch.randn(B)
    (pf.sequence_logprobs(zl, y, backend=backend) * w).sum().backward()
    (pf.sequence_logprobs(zp, yp, cu_seqlens=cu, backend=backend) * w).sum().backward()
    torch.testing.assert_close(zp.grad, zl.grad.reshape(B * T, V)[idx], atol=1e-6, rtol=1e-5)


def test_packed_accepts_int32_offsets():
    z, y = torch.randn(6, 11), torch.randint(0, 11, (6,))
    a = pf.sequence_logprobs(z, y, cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32))
    b = pf.sequence_logprobs(z, y, cu_seqlens=torch.tensor([0, 2, 6]))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "cu, match",
    [
        ([0, 5, 4, 6], "non-decreasing"),
        ([0, 2, 5], "end at the number of tokens"),
        ([1, 2, 6], "start at 0"),
        ([0], "B \\+ 1 >= 2"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    z, y = torch.randn(6, 11), torch.randint(0, 11, (6,))
    with pytest.raises(ValueError, match=match):
        pf.sequence_logprobs(z, y, cu_seqlens=torch.tensor(cu))


def test_bad_cu_seqlens_type_and_layout():
    z, y = torch.randn(6, 11), torch.randint(0, 11, (6,))
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor"):
        pf.sequence_logprobs(z, y, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        pf.sequence_logprobs(z, y, cu_seqlens=torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match="packed"):
        pf.sequence_logprobs(z.reshape(2, 3, 11), y.reshape(2, 3), cu_seqlens=torch.tensor([0, 6]))


def test_sequence_module_matches_function():
    z, y = _batch(2, 4, 13, torch.float32)
    mod = pf.SequenceLogProbs(average=True, temperature=0.5)
    assert torch.equal(mod(z, y), pf.sequence_logprobs(z, y, average=True, temperature=0.5))
    with pytest.raises(ValueError, match="temperature"):
        pf.SequenceLogProbs(temperature=0.0)


# --------------------------------------------------------------------------- logits DPO


def _dpo_inputs(B=2, T=6, V=41, dtype=torch.float32):
    z, y = _batch(2 * B, T, V, dtype, prompt=2)
    ref = (z.float() + 0.3 * torch.randn(z.shape)).to(dtype)
    return z, y, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "robust", ["sigmoid", "sft"]])
def test_logits_dpo_equals_head_on_reference_logps(backend, dtype, loss_type):
    B = 2
    z, y, ref = _dpo_inputs(B, dtype=dtype)
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1 if loss_type == "robust" else 0.0)
    zl = z.clone().requires_grad_()
    loss, metrics = pf.logits_dpo_loss(zl, y, ref_logits=ref, backend=backend, **kw)
    # restatement: fp64 sums, then the per-sequence head
    zr = z.double().requires_grad_()
    s = ref_seq(zr, y)
    rs = ref_seq(ref.double(), y)
    n = (y != -100).sum(-1)
    ref_loss, ref_metrics = pf.dpo_loss(
        s[:B], s[B:], rs[:B], rs[B:], chosen_lengths=n[:B], rejected_lengths=n[B:], **kw
    )
    torch.testing.assert_close(loss.double(), ref_loss, atol=2e-5, rtol=2e-5)
    for k, v in ref_metrics.items():
        torch.testing.assert_close(metrics[k].double(), v, atol=2e-4, rtol=2e-5, msg=k)
    loss.backward()
    ref_loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(zl.grad.double(), zr.grad, atol=tol, rtol=tol)


def test_logits_dpo_precomputed_reference_and_module(backend):
    B = 3
    z, y, ref = _dpo_inputs(B)
    rs = pf.sequence_logprobs(ref, y)
    a, ma = pf.logits_dpo_loss(z, y, ref_logits=ref, beta=0.1, backend=backend)
    b, mb = pf.logits_dpo_loss(z, y, ref_chosen_logps=rs[:B], ref_rejected_logps=rs[B:], beta=0.1, backend=backend)
    c, mc = pf.LogitsDPOLoss(beta=0.1, backend=backend)(z, y, ref_logits=ref)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert ma.keys() == mb.keys() == mc.keys()


def test_logits_dpo_packed_equals_padded():
    B, T, V = 2, 5, 23
    z, y, ref = _dpo_inputs(B, T, V)
    lengths = [5, 3, 4, 5]
    for b, n in enumerate(lengths):
        y[b, n:] = -100
    idx = torch.cat([torch.arange(b * T, b * T + n) for b, n in enumerate(lengths)])
    cu = torch.tensor([0] + lengths).cumsum(0)
    padded, _ = pf.logits_dpo_loss(z, y, ref_logits=ref, loss_type="ipo")
    packed, _ = pf.logits_dpo_loss(
        z.reshape(-1, V)[idx], y.reshape(-1)[idx], ref_logits=ref.reshape(-1, V)[idx], cu_seqlens=cu, loss_type="ipo"
    )
    torch.testing.assert_close(packed, padded)


def test_logits_dpo_reference_free_and_inplace():
    z, y, _ = _dpo_inputs()
    za = z.clone().requires_grad_()
    zb = z.clone().requires_grad_()
    la, _ = pf.logits_dpo_loss(za, y, beta=0.1)
    lb, _ = pf.logits_dpo_loss(zb, y, beta=0.1, inplace_backward=True)
    la.backward()
    lb.backward()
    torch.testing.assert_close(zb.grad, za.grad)
    assert torch.equal(zb.detach(), zb.grad)  # the gradient overwrote the logits buffer


def test_logits_dpo_bad_input():
    z, y, ref = _dpo_inputs()
    with pytest.raises(ValueError, match="stacked \\[chosen; rejected\\]"):
        pf.logits_dpo_loss(z[:3], y[:3])
    with pytest.raises(ValueError, match="either ref_logits or"):
        pf.logits_dpo_loss(z, y, ref_logits=ref, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="loss_type"):
        pf.logits_dpo_loss(z, y, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        pf.LogitsDPOLoss(beta=0.0)
