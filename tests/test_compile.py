"""torch.compile(fullgraph=True) traces token_logprobs (forward and backward) on every
backend and matches eager; a new temperature value does not recompile."""
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
