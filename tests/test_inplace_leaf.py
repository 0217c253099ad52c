"""inplace_backward=True keeps its point when the logits are a leaf (issue 18, point 3).

The backward writes the gradient over the logits buffer. If the autograd Function handed
that buffer back as the saved tensor itself, a leaf's AccumulateGrad would see a tensor
referenced elsewhere and clone it: a full N x V copy, the allocation inplace_backward is
there to avoid. Checked with the benchmarks' own memory measurement
(benchmarks.measure.MemProbe: peak RSS above the start on CPU, the caching allocator's
peak on CUDA), for a leaf and for logits produced by a matmul, on every backend here; the
gradient is checked against the fp64 reference. A memory test, not a timing test.

Every backend shares the one autograd Function; Triton is tested on a GPU only (under the
interpreter on CPU the N x V this test needs takes minutes).
"""

import gc

import pytest
import torch

from benchmarks.measure import MemProbe
from prefopt_fast.reference import naive_token_logprobs

# big enough that one N x V copy (>= 32 MiB) stands far above the allocator's noise. The
# bound: a quarter of the logits (the torch backend's block scratch is 4 MiB whatever N; a
# copy would be the whole logits).
N, V, H = 1024, 16384, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture
def backend(backend):
    """conftest's backend fixture, but Triton on a GPU only (see the module docstring)."""
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("Triton: tested on a GPU only (the interpreter takes minutes at this size)")
    return backend


def _peak_extra(device, fn) -> int:
    probe = MemProbe(str(device))
    probe.start()
    try:
        fn()
        return probe.peak_extra()
    finally:
        gc.unfreeze()  # MemProbe.start freezes the survivors (a benchmark-process shortcut)


# the gradient is row-local: every 16th row against the fp64 reference keeps the check fast
ROWS = slice(None, None, 16)


def _check_grad(grad, z, y, g):
    zr = z[ROWS].double().requires_grad_()
    (ref,) = torch.autograd.grad(naive_token_logprobs(zr, y[ROWS]), zr, g[ROWS].double())
    # fp32 math (the row contract) then one rounding to the logits dtype
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}[z.dtype]
    torch.testing.assert_close(grad[ROWS].double(), ref, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_leaf_gradient_is_the_logits_buffer(backend, device, dtype):
    import prefopt_fast

    z = (torch.randn(N, V, device=device) * 2).to(dtype)
    y = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    x = z.clone().requires_grad_()
    out = prefopt_fast.token_logprobs(x, y, backend=backend, inplace_backward=True)
    peak = _peak_extra(device, lambda: out.backward(g))
    logits_bytes = x.numel() * x.element_size()
    assert x.grad.data_ptr() == x.data_ptr(), "the leaf's .grad is not the logits buffer (AccumulateGrad copied it)"
    assert peak < logits_bytes / 4, f"peak extra {peak / 2**20:.1f} MiB for {logits_bytes / 2**20:.1f} MiB of logits"
    _check_grad(x.grad, z, y, g)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_non_leaf_logits_take_no_copy(backend, device, dtype):
    """Logits from a matmul (as from an lm_head): the gradient flows on into the matmul's
    backward, which allocates only the small [N, H] and [V, H] gradients."""
    import prefopt_fast

    h = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, device=device, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (N,), device=device)
    g = torch.randn(N, device=device)
    logits = h @ w.T
    z = logits.detach().clone()
    out = prefopt_fast.token_logprobs(logits, y, backend=backend, inplace_backward=True)
    grads = {}
    peak = _peak_extra(device, lambda: grads.update(zip("hw", torch.autograd.grad(out, (h, w), g))))
    logits_bytes = logits.numel() * logits.element_size()
    assert peak < logits_bytes / 4, f"peak extra {peak / 2**20:.1f} MiB for {logits_bytes / 2**20:.1f} MiB of logits"
    # the logits now hold their gradient: check it, then the matmul's use of it
    _check_grad(logits.detach(), z, y, g)
    torch.testing.assert_close(grads["h"], logits.detach() @ w.detach())
