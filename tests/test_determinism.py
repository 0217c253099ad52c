"""Determinism: the same inputs give bitwise the same outputs and gradients, run to run,
on every backend; and what the result may depend on (see docs/numerics.md, Determinism).

- run to run, same process, same settings: bitwise equal, every op, every backend;
- the cpu backend and the thread count (torch.set_num_threads): bitwise equal for any
  thread count, with plentiful rows and with few very long ones (V >= 65536 and fewer than
  64 rows: split into segments whose number follows N and V only);
- the torch backend and the fused-linear path (GEMMs) across thread counts;
- torch.use_deterministic_algorithms(True): every op runs under it (nothing in the package
  is refused as nondeterministic) and gives the same bits as without it.
"""

import contextlib

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch

import prefopt_fast as pf
from prefopt_fast import linear as pfl


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _bits(t):
    t = t.detach().cpu().reshape(-1).contiguous()
    return t if t.dtype == torch.bool else t.view(torch.uint8)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _diff(a, b, names):
    return [n for n, x, y in zip(names, a, b) if not torch.equal(_bits(x), _bits(y))]


# ------------------------------------------------------------------------- the ops
# Each op: (inputs factory(device, small) -> dict, run(inputs, backend) -> (names, tensors)).


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _token_inputs(device, small, V=None, N=None, dtype=torch.bfloat16):
    V = V or (97 if small else 3001)
    N = N or (6 if small else 64)
    z = (torch.randn(N, V + 3, generator=_g()) * 3).to(dtype)[:, 1 : V + 1]  # strided rows
    y = torch.randint(0, V, (N,), generator=_g(1))
    y[::5] = -100
    t = torch.rand(N, generator=_g(2)) + 0.5
    ref = (torch.randn(N, V, generator=_g(3)) * 3).to(dtype)
    return dict(z=z.to(device), y=y.to(device), t=t.to(device), ref=ref.to(device))


def _run_token(ins, backend, inplace=False):
    base = ins["z"].detach().clone().requires_grad_()
    z = base * 1.0 if inplace else base
    o = pf.token_logprobs(
        z,
        ins["y"],
        temperature=ins["t"],
        backend=backend,
        inplace_backward=inplace,
        stats=("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax", "kl"),
        ref_logits=ins["ref"],
    )
    w = torch.linspace(-1, 1, o.logprobs.numel(), device=o.logprobs.device)
    (o.logprobs * w + o.entropy * w.flip(0) + 0.3 * o.kl).sum().backward()
    names = ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit", "is_argmax", "kl", "grad")
    return names, [o.logprobs, o.entropy, o.log_sum_sq_probs, o.mean_logit, o.is_argmax, o.kl, base.grad]


def _run_packed_dpo(ins, backend):
    z = ins["z"].detach().clone().requires_grad_()
    n = z.shape[0]
    cu = torch.tensor([0, 1, n // 2, n // 2 + 2, n], device=z.device)
    loss, m = pf.logits_dpo_loss(
        z, ins["y"], cu_seqlens=cu, ref_logits=ins["ref"], beta=0.1, loss_type=["sigmoid", "ipo"], backend=backend
    )
    loss.backward()
    return ("loss", "rewards/margins", "grad"), [loss, m["rewards/margins"], z.grad]


def _run_ppo(ins, backend):
    z = ins["z"].detach().clone().reshape(2, -1, ins["z"].shape[-1]).requires_grad_()
    y = ins["y"].reshape(2, -1)
    ref = ins["ref"].reshape(2, -1, ins["ref"].shape[-1])
    adv = torch.tensor([0.5, -1.0], device=z.device)
    loss, m = pf.ppo_loss(
        z,
        y,
        None,
        adv,
        kl_coef=0.05,
        kl_estimator="full",
        ref_logits=ref,
        entropy_coef=0.01,
        loss_agg_mode="seq-mean-token-mean",
        backend=backend,
    )
    loss.backward()
    return ("loss", "kl", "grad"), [loss, m["kl"], z.grad]


def _linear_inputs(device, small, dtype=torch.bfloat16):
    N, H, V = (8, 16, 300) if small else (96, 64, 3000)
    h = torch.randn(N, H, generator=_g(4)).to(dtype)
    w = (torch.randn(V, H, generator=_g(5)) / 4).to(dtype)
    y = torch.randint(0, V, (N,), generator=_g(6))
    y[::7] = -100
    return dict(h=h.to(device), w=w.to(device), y=y.to(device))


def _run_linear(ins, backend):
    h = ins["h"].detach().clone().requires_grad_()
    w = ins["w"].detach().clone().requires_grad_()
    o = pfl.linear_token_logprobs(h, w, ins["y"], stats=("entropy",), chunk_size=3, backend=backend)
    (o.logprobs.sum() + 0.1 * o.entropy.sum()).backward()
    return ("logprobs", "entropy", "grad_hidden", "grad_weight"), [o.logprobs, o.entropy, h.grad, w.grad]


OPS = {
    "token_logprobs": (_token_inputs, _run_token),
    "token_logprobs(inplace)": (_token_inputs, lambda ins, be: _run_token(ins, be, inplace=True)),
    "logits_dpo_loss(packed)": (_token_inputs, _run_packed_dpo),
    "ppo_loss(full kl)": (_token_inputs, _run_ppo),
    "linear_token_logprobs": (_linear_inputs, _run_linear),
}


def _small(backend):
    return backend == "triton"


@pytest.mark.parametrize("op", list(OPS))
def test_run_to_run_bitwise(backend, device, op):
    make, run = OPS[op]
    ins = make(device, _small(backend))
    names, first = run(ins, backend)
    for _ in range(2):
        _, again = run(ins, backend)
        assert _same(first, again), f"{op} on {backend}: run-to-run difference in {_diff(first, again, names)}"


# ---------------------------------------------------------------- thread counts

CPU_SHAPES = {
    "many rows": dict(N=64, V=3001),
    "few long rows": dict(N=3, V=131083),  # segmented rows (4 segments, whatever the thread count)
}


@pytest.mark.parametrize(
    "shape",
    [
        "many rows",
        "few long rows",
    ],
)
def test_cpu_backend_thread_count(backends, shape):
    if "cpu" not in backends:
        expected.require("cpu-extension")
    ins = _token_inputs("cpu", False, dtype=torch.float32, **CPU_SHAPES[shape])
    results = {}
    for n in (1, 2, 3):
        with num_threads(n):
            names, results[n] = _run_token(ins, "cpu")
    for n in (2, 3):
        assert _same(results[1], results[n]), (
            f"{shape}: 1 vs {n} threads differ in {_diff(results[1], results[n], names)}"
        )


def test_cpu_backend_logp_and_its_gradient_do_not_depend_on_threads_even_when_segmented(backends):
    """Log-probs and the gradient of a loss of the log-probs alone (DPO, SFT, PPO without
    entropy / full KL) through segmented rows, with the backward too."""
    if "cpu" not in backends:
        expected.require("cpu-extension")
    ins = _token_inputs("cpu", False, dtype=torch.float32, **CPU_SHAPES["few long rows"])
    out = {}
    for n in (1, 2, 3):
        with num_threads(n):
            z = ins["z"].detach().clone().requires_grad_()
            o = pf.token_logprobs(z, ins["y"], temperature=ins["t"], backend="cpu")
            (o * torch.linspace(-1, 1, o.numel())).sum().backward()
            out[n] = [o, z.grad]
    assert _same(out[1], out[2]) and _same(out[1], out[3])


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs"])
def test_torch_backend_thread_count(op):
    make, run = OPS[op]
    ins = make("cpu", False)
    results = {}
    for n in (1, 2, 3):
        with num_threads(n):
            names, results[n] = run(ins, "torch")
    for n in (2, 3):
        assert _same(results[1], results[n]), f"{op}: 1 vs {n} threads differ in {_diff(results[1], results[n], names)}"


def test_cpu_backend_linear_thread_count(backends):
    """The fused-linear path on the cpu backend: GEMMs and row kernels across thread counts."""
    if "cpu" not in backends:
        expected.require("cpu-extension")
    ins = _linear_inputs("cpu", False)
    results = {}
    for n in (1, 2, 3):
        with num_threads(n):
            names, results[n] = _run_linear(ins, "cpu")
    for n in (2, 3):
        assert _same(results[1], results[n]), f"1 vs {n} threads differ in {_diff(results[1], results[n], names)}"


# ---------------------------------------------------- use_deterministic_algorithms


@pytest.mark.parametrize("op", list(OPS))
def test_under_use_deterministic_algorithms(backend, device, op):
    """Nothing the package runs is refused by torch.use_deterministic_algorithms(True),
    and the results are the same bits as without it."""
    make, run = OPS[op]
    ins = make(device, _small(backend))
    names, plain = run(ins, backend)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, det = run(ins, backend)
    finally:
        torch.use_deterministic_algorithms(was)
    assert _same(plain, det), f"{op}: deterministic mode changed {_diff(plain, det, names)}"


def test_no_atomics_in_the_triton_and_cuda_kernels():
    """Bitwise run-to-run determinism on a GPU rests on every row being reduced by one
    program / block in a fixed order: no atomic adds in the kernels (checked in the source,
    since there is no GPU here). The only atomics-based op the package calls on a GPU is
    index_add (packed per-sequence sums), which use_deterministic_algorithms makes
    deterministic (docs/numerics.md)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = list((root / "kernels").glob("*.py")) + list((root / "csrc" / "cuda").glob("*.cu*"))
    assert files
    for f in files:
        text = f.read_text()
        for needle in ("atomic_add", "atomic_cas", "atomic_xchg", "atomicAdd", "atomicCAS", "atomicMax"):
            assert needle not in text, f"{f.relative_to(root)} uses {needle}: revisit the determinism notes"
