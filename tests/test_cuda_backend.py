"""Every op on backend="cuda" and backend="triton" against backend="torch", on a GPU.

One command verifies a GPU installation (docs/cuda.md):

    TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_cuda_backend.py

(TRITON_INTERPRET=0: tests/conftest.py otherwise runs Triton interpreted, for machines
without a GPU.) Skipped where no CUDA device is visible. On a GPU machine the cuda
backend must be available (an extension built with CUDA kernels that load on this GPU);
``PREFOPT_ALLOW_NO_CUDA_EXT=1`` turns that requirement into skips (e.g. a CPU-only wheel).
"""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

import prefopt_fast
from prefopt_fast import _rows
from prefopt_fast._rows import OUT_ENTROPY, OUT_KL, OUT_LSE, OUT_LSE_LO, OUT_REF_LSE, STAT_ALL, STAT_ENTROPY, STAT_KL
from prefopt_fast.backends import torch_backend

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
from reference import DTYPES, IGN, assert_forward, assert_grad, ref_backward, ref_forward, special_labels, special_rows  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_BACKENDS = ("cuda", "triton")
DEV = "cuda"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def backend_module(name):
    from prefopt_fast import _dispatch

    mod = _dispatch.load_backend(name)
    if mod is None or not mod.is_available():
        why = _dispatch.why_unavailable(name)
        if name == "cuda" and os.environ.get("PREFOPT_ALLOW_NO_CUDA_EXT") != "1":
            pytest.fail(f"backend 'cuda' is not available on this GPU machine: {why}")
        pytest.skip(f"backend {name!r}: {why}")
    if name == "triton" and _interpreting():
        pytest.skip("TRITON_INTERPRET=1: run with TRITON_INTERPRET=0 to test Triton on the GPU")
    return mod


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    backend_module(request.param)
    return request.param


def test_cuda_backend_available_and_selected_by_default():
    from prefopt_fast._build_info import build_info

    mod = backend_module("cuda")
    info = build_info()
    assert info["cuda"] is not None and info["cuda_driver"] is not None, info
    assert mod.supports(torch.empty(2, 3, device=DEV, dtype=torch.bfloat16)) is None
    from prefopt_fast._dispatch import resolve_backend

    if os.environ.get("PREFOPT_BACKEND", "auto") in ("", "auto"):
        assert resolve_backend("auto", torch.empty(2, 3, device=DEV)).NAME == "cuda"


def _tol(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-4, atol=2e-4)


def _grad_close(a, b, dtype):
    t = {torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}[dtype]
    scale = max(b.abs().max().item(), 1e-30)
    torch.testing.assert_close(a.float(), b.float(), rtol=t, atol=t * scale, equal_nan=True)


# ----------------------------------------------------------------------------- token_logprobs

SHAPES = {
    "contiguous [4, 33, 1000]": lambda dt: torch.randn(4, 33, 1000, device=DEV).mul(3).to(dt),
    "causal view, odd V": lambda dt: torch.randn(3, 17, 1001, device=DEV).mul(3).to(dt)[:, :-1],
    "V=1": lambda dt: torch.randn(5, 1, device=DEV).to(dt),
    "transposed rows": lambda dt: torch.randn(6, 3, 4099, device=DEV).mul(3).to(dt).transpose(0, 1),
    "llama3 vocabulary": lambda dt: torch.randn(2, 8, 128256, device=DEV).mul(3).to(dt),
}
STATS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")


def _labels(shape, V, n_ignored=2):
    y = torch.randint(0, V, shape, device=DEV)
    flat = y.view(-1)
    flat[torch.randperm(flat.numel(), device=DEV)[:n_ignored]] = IGN
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_token_logprobs_vs_torch(backend, shape, dtype, inplace):
    z = SHAPES[shape](dtype)
    y = _labels(z.shape[:-1], z.shape[-1])
    temp = torch.rand(z.shape[:-1], device=DEV) + 0.5
    results = {}
    for b in ("torch", backend):
        leaf = z.detach().clone().requires_grad_(True)
        x = leaf * 1 if inplace else leaf  # in place needs a non-leaf
        out = prefopt_fast.token_logprobs(x, y, temperature=temp, stats=STATS, inplace_backward=inplace, backend=b)
        (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
        results[b] = (out, leaf.grad)
    (o0, g0), (o1, g1) = results["torch"], results[backend]
    for name in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit"):
        torch.testing.assert_close(
            getattr(o1, name), getattr(o0, name), **_tol(dtype), equal_nan=True, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert torch.equal(o1.is_argmax, o0.is_argmax)
    _grad_close(g1, g0, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_exact_kl_vs_torch(backend, dtype):
    mod = backend_module(backend)
    if not getattr(mod, "SUPPORTS_KL", False):
        pytest.skip(f"{backend} has no exact-KL kernels")
    z = torch.randn(3, 9, 3001, device=DEV).mul(2).to(dtype)[:, :-1]
    zr = torch.randn(3, 9, 3001, device=DEV).mul(2).to(dtype)[:, 1:]
    y = _labels(z.shape[:-1], z.shape[-1])
    res = {}
    for b in ("torch", backend):
        leaf = z.detach().clone().requires_grad_(True)
        out = prefopt_fast.token_logprobs(leaf, y, stats=("kl", "entropy"), ref_logits=zr, temperature=0.7, backend=b)
        (out.logprobs.sum() + out.kl.sum() - 0.1 * out.entropy.sum()).backward()
        res[b] = (out, leaf.grad)
    torch.testing.assert_close(res[backend][0].kl, res["torch"][0].kl, **_tol(dtype))
    _grad_close(res[backend][1], res["torch"][1], dtype)


# ----------------------------------------------------------------------------- row kernels, edge rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [40, 50257])
def test_row_kernels_special_rows_vs_fp64(backend, dtype, V):
    mod = backend_module(backend)
    z = special_rows(dtype, V).to(DEV)
    zr = special_rows(dtype, V, big=1e30 if dtype != torch.float16 else 6e4).flip(0).to(DEV)
    y = special_labels(V).to(DEV)
    it = torch.ones(y.numel(), device=DEV)
    kl = getattr(mod, "SUPPORTS_KL", False)
    out = mod.row_forward(z, y, it, IGN, STAT_ALL if kl else STAT_ALL & ~STAT_KL, zr if kl else None)
    ref = ref_forward(z, y, it, zr=zr if kl else None)
    tol = 1e-4 if dtype == torch.float32 else 3e-4
    stats = (STAT_ALL if kl else STAT_ALL & ~STAT_KL) & ~_rows.STAT_MEAN  # the +-3e38 row's mean cancels
    assert_forward(out, ref, stats, rtol=tol, atol=tol)
    ref32 = ref.float().to(DEV)
    c, e = torch.randn(y.numel(), device=DEV), torch.randn(y.numel(), device=DEV)
    k = torch.randn(y.numel(), device=DEV) if kl else None
    kw = dict(grad_kl=k, ref_logits=zr, ref_lse=ref32[OUT_REF_LSE], kl=ref32[OUT_KL]) if kl else {}
    g_ref = ref_backward(
        z,
        y,
        it,
        ref32[OUT_LSE],
        ref32[OUT_ENTROPY],
        c,
        e,
        zr=zr if kl else None,
        k=k,
        rlse=kw.get("ref_lse"),
        kl=kw.get("kl"),
        lse_lo=ref32[OUT_LSE_LO],
    )
    for inplace in (False, True):
        g = mod.row_backward(
            z.clone() if inplace else z,
            y,
            it,
            ref32[OUT_LSE],
            ref32[OUT_LSE_LO],
            ref32[OUT_ENTROPY],
            c,
            e,
            IGN,
            inplace,
            **kw,
        )
        assert_grad(g, g_ref, dtype, what=f"{backend} inplace={inplace}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_row_kernels_many_rows_and_short_rows(backend, dtype):
    mod = backend_module(backend)
    z = torch.randn(70000, 37, device=DEV).mul(3).to(dtype)
    y = torch.randint(0, 37, (70000,), device=DEV)
    it = torch.rand(70000, device=DEV) + 0.5
    out = mod.row_forward(z, y, it, IGN, STAT_ENTROPY)
    ref = torch_backend.row_forward(z, y, it, IGN, STAT_ENTROPY)
    assert_forward(out, ref.double().cpu(), STAT_ENTROPY, **_tol(dtype))


# ----------------------------------------------------------------------------- the ops built on them


def _pair_batch(dtype, B=2, T=24, V=2053):
    z = torch.randn(2 * B, T + 1, V, device=DEV).mul(2).to(dtype)[:, :-1]
    y = torch.randint(0, V, (2 * B, T), device=DEV)
    y[:, :5] = IGN  # prompt tokens
    return z, y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_sequence_logprobs_and_dpo_vs_torch(backend, dtype):
    z, y = _pair_batch(dtype)
    zr = torch.randn_like(z, dtype=torch.float32).to(dtype)
    res = {}
    for b in ("torch", backend):
        leaf = z.detach().clone().requires_grad_(True)
        s = prefopt_fast.sequence_logprobs(leaf, y, average=True, backend=b)
        loss, metrics = prefopt_fast.logits_dpo_loss(leaf, y, ref_logits=zr, beta=0.1, backend=b)
        (loss + s.sum()).backward()
        res[b] = (s, loss, metrics, leaf.grad)
    (s0, l0, m0, g0), (s1, l1, m1, g1) = res["torch"], res[backend]
    torch.testing.assert_close(s1, s0, **_tol(dtype))
    torch.testing.assert_close(l1, l0, **_tol(dtype))
    for key in m0:
        torch.testing.assert_close(m1[key].float(), m0[key].float(), **_tol(dtype), msg=lambda m, k=key: f"{k}: {m}")
    _grad_close(g1, g0, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("with_ref_logits", [False, True], ids=["ref_logps", "ref_logits"])
def test_ppo_loss_vs_torch(backend, dtype, with_ref_logits):
    mod = backend_module(backend)
    if with_ref_logits and not getattr(mod, "SUPPORTS_KL", False):
        pytest.skip(f"{backend} has no exact-KL kernels")
    B, T, V = 3, 20, 3001
    z = torch.randn(B, T, V, device=DEV).mul(2).to(dtype)
    y = torch.randint(0, V, (B, T), device=DEV)
    mask = torch.rand(B, T, device=DEV) > 0.2
    old = -torch.rand(B, T, device=DEV) * 5
    adv = torch.randn(B, device=DEV)
    kw = dict(loss_mask=mask, kl_coef=0.05, entropy_coef=0.01, clip_eps_high=0.28)
    if with_ref_logits:
        kw["ref_logits"] = torch.randn(B, T, V, device=DEV).mul(2).to(dtype)
    else:
        kw["ref_logps"] = -torch.rand(B, T, device=DEV) * 5
    res = {}
    for b in ("torch", backend):
        leaf = z.detach().clone().requires_grad_(True)
        loss, metrics = prefopt_fast.ppo_loss(leaf, y, old, adv, backend=b, **kw)
        loss.backward()
        res[b] = (loss, metrics, leaf.grad)
    torch.testing.assert_close(res[backend][0], res["torch"][0], **_tol(dtype))
    _grad_close(res[backend][2], res["torch"][2], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_ops_vs_torch(backend, dtype):
    from prefopt_fast.linear import linear_dpo_loss, linear_ppo_loss, linear_token_logprobs

    N, H, V = 96, 64, 5003
    h = torch.randn(N, H, device=DEV).to(dtype)
    w = (torch.randn(V, H, device=DEV) / 8).to(dtype)
    y = torch.randint(0, V, (N,), device=DEV)
    y[:7] = IGN
    res = {}
    for b in ("torch", backend):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = linear_token_logprobs(hh, ww, y, stats=("entropy",), chunk_size=32, backend=b)
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        res[b] = (out.logprobs, out.entropy, hh.grad, ww.grad)
    for a, r in zip(res[backend], res["torch"]):
        _grad_close(a, r, dtype)
    # the loss heads on the same path
    hp = torch.randn(4, 12, H, device=DEV).to(dtype)
    yp = torch.randint(0, V, (4, 12), device=DEV)
    losses = {}
    for b in ("torch", backend):
        hh = hp.clone().requires_grad_(True)
        l1, _ = linear_dpo_loss(
            hh,
            w,
            yp,
            ref_chosen_logps=torch.zeros(2, device=DEV),
            ref_rejected_logps=torch.zeros(2, device=DEV),
            beta=0.1,
            backend=b,
        )
        l2, _ = linear_ppo_loss(
            hh, w, yp, -torch.rand(4, 12, device=DEV), torch.randn(4, device=DEV).sort().values, backend=b
        )
        (l1 + l2).backward()
        losses[b] = (l1, l2, hh.grad)
    for a, r in zip(losses[backend], losses["torch"]):
        _grad_close(a, r, dtype)


# ----------------------------------------------------------------------------- compile, streams, devices


def test_opcheck_cuda_ops():
    backend_module("cuda")
    z = torch.randn(2, 5, 37, device=DEV, dtype=torch.bfloat16)[:, :-1]
    zr = torch.randn(2, 5, 37, device=DEV, dtype=torch.bfloat16)[:, 1:]
    y = torch.randint(0, 37, (8,), device=DEV)
    it = torch.rand(8, device=DEV) + 0.5
    ops = torch.ops.prefopt_fast
    torch.library.opcheck(ops.row_forward.default, (z, y, it, IGN, STAT_ALL, zr))
    out = ops.row_forward(z, y, it, IGN, STAT_ALL, zr)
    c, e, k = (torch.randn(8, device=DEV) for _ in range(3))
    args = (z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], c, e, IGN, k, zr, out[OUT_REF_LSE], out[OUT_KL])
    torch.library.opcheck(ops.row_backward.default, args)
    torch.library.opcheck(ops.row_backward_.default, (z.clone(),) + args[1:])


def test_torch_compile_fullgraph(backend):
    z = torch.randn(4, 16, 3000, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 3000, (4, 16), device=DEV)

    def f(z, y, t):
        out = prefopt_fast.token_logprobs(z, y, temperature=t, stats=("entropy",), backend=backend)
        return out.logprobs.sum() + out.entropy.mean()

    compiled = torch.compile(f, fullgraph=True)
    for t in (1.0, 0.7):
        (g_c,) = torch.autograd.grad(compiled(z, y, t), z)
        (g_e,) = torch.autograd.grad(f(z, y, t), z)
        torch.testing.assert_close(g_c, g_e)


def test_current_stream_and_device_guard():
    mod = backend_module("cuda")
    z = torch.randn(64, 5000, device=DEV)
    y = torch.randint(0, 5000, (64,), device=DEV)
    it = torch.ones(64, device=DEV)
    ref = mod.row_forward(z, y, it, IGN, 0)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy: a launch elsewhere would finish first
        out = mod.row_forward(z, y, it, IGN, 0)
    s.synchronize()
    torch.testing.assert_close(out, ref)
    if torch.cuda.device_count() > 1:
        z1, y1, it1 = z.to("cuda:1"), y.to("cuda:1"), it.to("cuda:1")
        with torch.cuda.device(0):
            out1 = mod.row_forward(z1, y1, it1, IGN, 0)
        torch.testing.assert_close(out1.cpu(), ref.cpu())


@pytest.mark.slow
def test_more_than_2_pow_31_elements(backend):
    mod = backend_module(backend)
    N, V = 16400, 131072  # 2.15e9 bf16 elements, 4.3 GB (+ the same again for the gradient)
    free, _ = torch.cuda.mem_get_info()
    if free < 10 * 2**30:
        pytest.skip("needs ~10 GiB of free GPU memory")
    z = torch.empty(N, V, device=DEV, dtype=torch.bfloat16).normal_()
    y = torch.randint(0, V, (N,), device=DEV)
    it = torch.ones(N, device=DEV)
    rows = torch.tensor([0, N // 2, N - 1], device=DEV)
    out = mod.row_forward(z, y, it, IGN, 0)
    ref = torch.logsumexp(z[rows].float(), -1)
    torch.testing.assert_close(out[OUT_LSE][rows], ref, rtol=1e-4, atol=1e-4)
    g = mod.row_backward(
        z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_LSE], torch.ones(N, device=DEV), None, IGN, True
    )
    assert g is z
    # every row of c (onehot - p) sums to 0; the last rows are past element 2^31
    sums = g[rows].float().sum(-1)
    assert torch.isfinite(sums).all() and sums.abs().max().item() < 1e-2, sums
    assert math.isclose(float(g[-1, y[-1]].float()), 1.0, abs_tol=0.02)
