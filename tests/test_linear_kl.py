"""The exact KL in the fused-linear path: linear_token_logprobs(stats=("kl",), ref_hidden=, ref_weight=)
against token_logprobs(stats=("kl",), ref_logits=) on the materialized logits (itself checked
against the fp64 reference), forward and backward, with several vocabulary blocks and token tiles."""

import pytest
import torch

import prefopt_fast.ops.linear_logprobs as LL
from prefopt_fast import token_logprobs
from prefopt_fast.linear import linear_token_logprobs

IGN = -100


@pytest.fixture(autouse=True)
def narrow_vocab_blocks(request, monkeypatch):
    """Several vocabulary blocks and token tiles even at these tiny sizes (not under the
    Triton interpreter, which is slow)."""
    params = getattr(request.node, "callspec", None)
    if params is None or params.params.get("backend") != "triton":
        monkeypatch.setattr(LL, "MIN_VOCAB_BLOCK", 1)
        monkeypatch.setattr(LL, "TOKEN_TILE", 4)


def _logits(h, w, b, logit_scale, softcap):
    z = (h @ w.t() + (0 if b is None else b)) * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_linear_kl_matches_from_logits(backend, device, dtype, softcap):
    g = torch.Generator().manual_seed(3)
    B, T, H, Hr, V = 2, 5, 8, 6, 37
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    ref_hidden = torch.randn(B, T, Hr, generator=g).to(dtype)
    ref_weight = (torch.randn(V, Hr, generator=g) / 2).to(dtype)
    ref_bias = torch.randn(V, generator=g).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = IGN
    gl, ge, gk = (torch.randn(B, T, generator=g) for _ in range(3))
    kw = dict(temperature=0.8, logit_scale=1.3, softcap=softcap, stats=("entropy", "kl"), backend=backend)

    leaves = [x.clone().to(device).requires_grad_() for x in (hidden, weight, bias)]
    out = linear_token_logprobs(
        *leaves[:2],
        y.to(device),
        bias=leaves[2],
        ref_hidden=ref_hidden.to(device),
        ref_weight=ref_weight.to(device),
        ref_bias=ref_bias.to(device),
        chunk_size=2,
        **kw,
    )
    (out.logprobs * gl + out.entropy * ge + out.kl * gk).sum().backward()

    # the same through the materialized logits, in fp32 (the path's own compute precision)
    want_leaves = [x.clone().float().requires_grad_() for x in (hidden, weight, bias)]
    z = _logits(want_leaves[0], want_leaves[1], want_leaves[2], 1.3, softcap)
    zr = _logits(ref_hidden.float(), ref_weight.float(), ref_bias.float(), 1.3, softcap)
    want = token_logprobs(z, y, ref_logits=zr, temperature=0.8, stats=("entropy", "kl"), backend="torch")
    (want.logprobs * gl + want.entropy * ge + want.kl * gk).sum().backward()

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for f in ("logprobs", "entropy", "kl"):
        torch.testing.assert_close(getattr(out, f).cpu().float(), getattr(want, f), **tol, msg=lambda m: f"{f}: {m}")
    assert (out.kl.cpu()[0, :2] == 0).all()  # ignored rows
    for name, a, b in zip(("hidden", "weight", "bias"), leaves, want_leaves):
        torch.testing.assert_close(a.grad.cpu().float(), b.grad, **tol, msg=lambda m: f"grad {name}: {m}")


def test_kl_of_the_policy_against_itself_is_zero(backend, device):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=g).to(device)
    w = torch.randn(23, 8, generator=g).to(device)
    y = torch.randint(0, 23, (6,), generator=g).to(device)
    out = linear_token_logprobs(h, w, y, stats=("kl",), ref_hidden=h, ref_weight=w, chunk_size=2, backend=backend)
    torch.testing.assert_close(out.kl.cpu(), torch.zeros(6), atol=1e-6, rtol=0)


def test_reference_head_is_checked():
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="needs the reference head"):
        linear_token_logprobs(h, w, y, stats=("kl",))
    with pytest.raises(ValueError, match='only used by the "kl" statistic'):
        linear_token_logprobs(h, w, y, ref_hidden=h, ref_weight=w)
    with pytest.raises(ValueError, match="ref_weight must have shape"):
        linear_token_logprobs(h, w, y, stats=("kl",), ref_hidden=h, ref_weight=torch.randn(6, 4))
    with pytest.raises(ValueError, match="ref_hidden must have shape"):
        linear_token_logprobs(h, w, y, stats=("kl",), ref_hidden=torch.randn(2, 4), ref_weight=w)
    with pytest.raises(TypeError, match="ref_hidden must have the dtype of hidden"):
        linear_token_logprobs(h, w, y, stats=("kl",), ref_hidden=h.double(), ref_weight=w)
