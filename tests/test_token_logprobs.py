"""token_logprobs against the naive fp64 reference, on every backend available here.

Tolerances. Every backend computes in fp32 whatever the logits dtype (the row-kernel
contract), so the reference is computed in fp64 on the SAME rounded inputs (the bf16/fp16
logits upcast exactly) and the fp32-level error bound applies to all three dtypes:

    atol = BASE_ATOL + K * eps32 * scale,   scale = max(1, max finite |logits / T|)

The scale term covers x = z * inv_temp and x_y - lse being rounded at the magnitude of
the logits (a 1e4 logit carries an absolute fp32 error of ~1e-3). The gradient comes
back in the logits dtype, so on top of that it carries one rounding of that dtype:
rtol = the unit roundoff (2^-8 bf16, 2^-11 fp16). A wrong formula, a wrong row or a lost
term gives errors orders of magnitude above these bounds.
"""

import os

import expected  # noqa: E402  (tests/expected.py)
import pytest
import torch

from prefopt_fast.reference import STAT_NAMES, naive_token_logprobs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS32 = 2.0**-23
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
NEG_INF = float("-inf")


def tl(*args, **kwargs):
    import prefopt_fast

    return prefopt_fast.token_logprobs(*args, **kwargs)


# ----------------------------------------------------------------------------- cases
# A case builds (full, view, labels, kwargs): ``full`` is the tensor that owns the memory
# (the leaf for gradients), ``view(full)`` the logits passed to the op.


def _ident(t):
    return t


def _labels(z, *, ignore_index=-100, ignore_frac=0.2, argmax_frac=0.3):
    """Random labels for logits z [..., V]: some at the row argmax (first index), some ignored."""
    V = z.shape[-1]
    shape = z.shape[:-1]
    y = torch.randint(0, V, shape)
    u = torch.rand(shape)
    y = torch.where(u < argmax_frac, z.float().argmax(-1), y)
    y = torch.where(u > 1 - ignore_frac, torch.full_like(y, ignore_index), y)
    return y


def _rows_neg_inf(z):
    """-inf in ~30% of the entries, rows -inf everywhere but the label, labels at -inf."""
    B, T, V = z.shape
    z = z.clone()
    z[torch.rand(z.shape) < 0.3] = NEG_INF
    y = _labels(z, ignore_frac=0.1)
    # the label itself at -inf (the row keeps finite entries)
    y[0, 0] = 5
    z[0, 0, 5] = NEG_INF
    z[0, 0, 6] = 1.0
    y[1, 2] = 0
    z[1, 2, 0] = NEG_INF
    z[1, 2, 1:] = torch.randn(V - 1)
    # only the label is finite
    for b, t, lab in ((0, 1, 7), (2, 3, V - 1), (3, 7, 0)):
        z[b, t] = NEG_INF
        z[b, t, lab] = 2.5
        y[b, t] = lab
    # a row with a single -inf and the label at the argmax
    z[2, 0] = torch.randn(V)
    z[2, 0, 3] = NEG_INF
    y[2, 0] = int(z[2, 0].argmax())
    # no row of only -inf here (that is the non-finite test's business)
    allneg = torch.isinf(z).all(-1)
    z[..., 0] = torch.where(allneg, torch.zeros(()), z[..., 0])
    return z, y


def _ties(V=300, dtype=torch.float32):
    z = torch.randn(8, V).to(dtype).float()
    y = torch.zeros(8, dtype=torch.long)
    for r in range(8):
        i, j = sorted(torch.randperm(V)[:2].tolist())
        z[r, i] = z[r, j] = 4.0  # two maxima
        y[r] = i if r % 2 == 0 else j  # first occurrence -> True, second -> False
    z[7] = 1.0  # constant row: every index is a maximum, only index 0 is "the" argmax
    y[6], y[7] = 0, 0
    return z, y


def build(case, dtype):
    """-> full (dtype, CPU), view fn, labels (int64 unless said), kwargs."""
    g = torch.randn
    kw = {}
    view = _ident
    if case == "V1000":
        z = g(4, 6, 1000) * 2
        y = _labels(z)
    elif case == "V4097":
        z = g(16, 4097) * 2
        y = _labels(z)
    elif case == "V1":
        z = g(5, 3, 1)
        y = _labels(z)
    elif case == "V2":
        z = g(9, 2) * 3
        y = _labels(z)
    elif case == "1d":
        z = g(300) * 2
        y = torch.tensor(17)
    elif case == "1d_ignored":
        z = g(50)
        y = torch.tensor(-100)
    elif case == "causal_shift":  # logits[:, :-1] of a [B, T, V] tensor
        z = g(3, 9, 777) * 2
        y = _labels(z[:, :-1])
        view = lambda t: t[:, :-1]  # noqa: E731
    elif case == "row_stride":  # logits[::2]
        z = g(16, 513) * 2
        y = _labels(z[::2])
        view = lambda t: t[::2]  # noqa: E731
    elif case == "transposed_lead":  # [T, B, V] seen as [B, T, V]
        z = g(5, 3, 600) * 2
        y = _labels(z.transpose(0, 1))
        view = lambda t: t.transpose(0, 1)  # noqa: E731
    elif case == "all_ignored":
        z = g(4, 5, 300)
        y = torch.full((4, 5), -100)
    elif case == "ignore_index_neg1":
        z = g(6, 7, 257)
        y = _labels(z, ignore_index=-1, ignore_frac=0.4)
        kw["ignore_index"] = -1
    elif case == "ignore_index_in_vocab":  # an ignore_index inside [0, V)
        z = g(6, 7, 257)
        y = _labels(z)
        y[y == -100] = 3
        y[0, :3] = 3
        kw["ignore_index"] = 3
    elif case == "neg_inf":
        z, y = _rows_neg_inf(g(4, 8, 400) * 2)
    elif case == "magnitude_1e4":
        z = (torch.rand(4, 6, 500) * 2 - 1) * 1e4
        y = _labels(z, argmax_frac=0.5)
        z[0, 0, :] = 1e4  # a constant row of huge logits
        z[0, 1, :100] = -1e4
    elif case == "temperature_0.7":
        z = g(4, 6, 700) * 2
        y = _labels(z)
        kw["temperature"] = 0.7
    elif case == "temperature_2.5":
        z = g(4, 6, 700) * 2
        y = _labels(z)
        kw["temperature"] = 2.5
    elif case == "temperature_per_token":
        z = g(4, 6, 700) * 2
        y = _labels(z)
        kw["temperature"] = torch.rand(4, 6) * 2.7 + 0.3
    elif case == "temperature_per_sequence":
        z = g(4, 6, 700) * 2
        y = _labels(z)
        kw["temperature"] = torch.rand(4, 1) * 2.7 + 0.3
    elif case == "temperature_per_token_shift":
        z = g(3, 9, 777) * 2
        y = _labels(z[:, :-1])
        view = lambda t: t[:, :-1]  # noqa: E731
        kw["temperature"] = torch.rand(3, 8) * 2.7 + 0.3
    elif case == "argmax_ties":
        z, y = _ties(dtype=dtype)
    elif case == "int32_labels":
        z = g(7, 333) * 2
        y = _labels(z).to(torch.int32)
    else:
        raise KeyError(case)
    return z.to(dtype), view, y, kw


CASES = [
    "V1000",
    "V4097",
    "V1",
    "V2",
    "1d",
    "1d_ignored",
    "causal_shift",
    "row_stride",
    "transposed_lead",
    "all_ignored",
    "ignore_index_neg1",
    "ignore_index_in_vocab",
    "neg_inf",
    "magnitude_1e4",
    "temperature_0.7",
    "temperature_2.5",
    "temperature_per_token",
    "temperature_per_sequence",
    "temperature_per_token_shift",
    "argmax_ties",
    "int32_labels",
]


# Under the Triton interpreter (~1 ms per program per loop step) the bf16/fp16 rows of the
# matrix are cut to the cases where the storage dtype matters; fp32 runs every case.
INTERPRETED_DTYPE_CASES = {
    "V1000",
    "V4097",
    "V1",
    "causal_shift",
    "transposed_lead",
    "neg_inf",
    "magnitude_1e4",
    "temperature_per_token_shift",
    "argmax_ties",
    "all_ignored",
}


def reduce_for_interpreter(backend, dtype, case):
    if _interpreted_triton(backend) and dtype != torch.float32 and case not in INTERPRETED_DTYPE_CASES:
        pytest.skip("interpreted Triton: reduced bf16/fp16 matrix (fp32 runs every case)")


def _on(device, x):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return x


def make(case, dtype, device):
    full, view, y, kw = build(case, dtype)
    kw = {k: _on(device, v) for k, v in kw.items()}
    return full.to(device), view, y.to(device), kw


# ------------------------------------------------------------------------- tolerances


def _scale(logits, temperature):
    x = logits.detach().double()
    if isinstance(temperature, torch.Tensor):
        x = x / temperature.double().expand(logits.shape[:-1]).unsqueeze(-1)
    else:
        x = x / temperature
    fin = x[torch.isfinite(x)]
    return max(1.0, float(fin.abs().max())) if fin.numel() else 1.0


def fwd_tol(scale):
    return dict(atol=2e-5 + 16 * EPS32 * scale, rtol=4 * EPS32)


def _interpreted_triton(backend):
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def grad_tol(scale, dtype, wmax, backend=None):
    u = UNIT_ROUNDOFF[dtype]
    if dtype == torch.bfloat16 and _interpreted_triton(backend):
        # The Triton interpreter converts fp32 -> bf16 by truncation (its cast passes no
        # rounding mode), not round-to-nearest as the GPU does: up to one full bf16 ulp.
        u = 2.0**-7
    atol = (2e-5 + 32 * EPS32 * scale) * wmax
    return dict(atol=atol * (1 + u), rtol=u + 4 * EPS32)


def check_close(actual, expected, what, atol, rtol, equal_nan=False):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    try:
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, equal_nan=equal_nan)
    except AssertionError as err:
        both = torch.isfinite(a) & torch.isfinite(e)
        err_max = float((a - e).abs()[both].max()) if both.any() else float("nan")
        raise AssertionError(f"{what}: max finite abs err {err_max:.3g} (atol {atol:.3g}, rtol {rtol:.3g})\n{err}")


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_forward(backend, device, dtype, case):
    reduce_for_interpreter(backend, dtype, case)
    full, view, y, kw = make(case, dtype, device)
    logits = view(full)
    T = kw.get("temperature", 1.0)
    ref = naive_token_logprobs(logits, y, stats=STAT_NAMES, **kw)
    tol = fwd_tol(_scale(logits, T))

    logp = tl(logits, y, backend=backend, **kw)
    assert isinstance(logp, torch.Tensor)
    assert logp.dtype == torch.float32 and logp.shape == y.shape and logp.device == logits.device
    check_close(logp, ref[0], "logprobs (stats=())", **tol)

    out = tl(logits, y, backend=backend, stats=STAT_NAMES, **kw)
    assert isinstance(out, tuple) and out._fields[:5] == ("logprobs",) + STAT_NAMES
    for extra in out._fields[5:]:  # fields added later (e.g. KL) are None unless asked for
        assert getattr(out, extra) is None, extra
    for name, r in zip(out._fields, ref):
        got = getattr(out, name)
        assert got is not None, name
        assert got.shape == y.shape and got.device == logits.device, name
        if name == "is_argmax":
            assert got.dtype == torch.bool
            mism = (got.cpu() != r.cpu()).nonzero().tolist()
            assert not mism, f"is_argmax differs at {mism}"
        else:
            assert got.dtype == torch.float32, name
            check_close(got, r, name, **tol)
    # asking for stats does not change the log-probs
    check_close(out.logprobs, logp, "logprobs (stats) vs (no stats)", atol=1e-6, rtol=1e-6)
    # ignored rows: exactly 0 / False everywhere
    ign = (y == kw.get("ignore_index", -100)).cpu()
    for name in out._fields[:5]:
        v = getattr(out, name).cpu()[ign]
        assert (v == 0).all(), f"{name} not 0 on ignored rows: {v}"


@pytest.mark.parametrize("stat", STAT_NAMES)
def test_single_stat_fields(backend, device, stat):
    """Only the requested fields are filled; the others are None."""
    z = (torch.randn(3, 5, 129) * 2).to(device)
    y = _labels(z.cpu()).to(device)
    out = tl(z, y, stats=(stat,), backend=backend)
    ref = naive_token_logprobs(z, y, stats=(stat,))
    for name in out._fields[5:]:
        assert getattr(out, name) is None, name
    for name, r in zip(out._fields, ref):
        got = getattr(out, name)
        if r is None:
            assert got is None, f"{name} returned though only {stat!r} was asked"
        elif name == "is_argmax":
            assert torch.equal(got.cpu(), r.cpu())
        else:
            check_close(got, r, name, **fwd_tol(_scale(z, 1.0)))


def test_stats_only_argmax_does_not_need_grad(backend, device):
    """Non-differentiable stats carry no gradient; logp still does."""
    z = torch.randn(4, 65, device=device, requires_grad=True)
    y = torch.randint(0, 65, (4,), device=device)
    out = tl(z, y, stats=("log_sum_sq_probs", "mean_logit", "is_argmax"), backend=backend)
    assert not out.log_sum_sq_probs.requires_grad
    assert not out.mean_logit.requires_grad
    assert not out.is_argmax.requires_grad
    assert out.logprobs.requires_grad


def test_float_and_scalar_tensor_temperature_agree(backend, device):
    z = torch.randn(4, 7, 300, device=device)
    y = torch.randint(0, 300, (4, 7), device=device)
    a = tl(z, y, temperature=0.7, backend=backend, stats=("entropy",))
    b = tl(z, y, temperature=torch.tensor(0.7, device=device), backend=backend, stats=("entropy",))
    check_close(a.logprobs, b.logprobs, "logprobs", atol=1e-6, rtol=1e-6)
    check_close(a.entropy, b.entropy, "entropy", atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- gradients


GRAD_CASES = [c for c in CASES if c not in ("1d_ignored",)] + ["1d_ignored"]


def _grads(backend, logits, y, kw, which, w1, w2, inplace=False):
    if which == "logp":
        out = tl(logits, y, backend=backend, inplace_backward=inplace, **kw)
        return torch.autograd.grad(out, logits, w1)[0]
    out = tl(logits, y, backend=backend, stats=("entropy",), inplace_backward=inplace, **kw)
    if which == "entropy":
        return torch.autograd.grad(out.entropy, logits, w2)[0]
    return torch.autograd.grad((out.logprobs, out.entropy), logits, (w1, w2))[0]


def _ref_grads(logits, y, kw, which, w1, w2):
    x = logits.detach().double().requires_grad_()
    logp, h = naive_token_logprobs(x, y, stats=("entropy",), **kw)[:2]
    if which == "logp":
        outs, ws = (logp,), (w1,)
    elif which == "entropy":
        outs, ws = (h,), (w2,)
    else:
        outs, ws = (logp, h), (w1, w2)
    return torch.autograd.grad(outs, x, tuple(w.double() for w in ws))[0]


@pytest.mark.parametrize("which", ["both", "logp", "entropy"])
@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_grad(backend, device, dtype, case, which):
    if which == "entropy" and dtype != torch.float32:
        pytest.skip("entropy-only gradient: fp32 is enough")
    if which == "logp" and dtype != torch.float32 and _interpreted_triton(backend):
        pytest.skip("interpreted Triton: logp-only gradient in fp32 only")
    reduce_for_interpreter(backend, dtype, case)
    full, view, y, kw = make(case, dtype, device)
    full.requires_grad_()
    logits = view(full)
    w1 = torch.randn(y.shape, device=device)
    w2 = torch.randn(y.shape, device=device)
    g = _grads(backend, logits, y, kw, which, w1, w2)
    ref = _ref_grads(logits, y, kw, which, w1, w2)
    assert g.dtype == dtype and g.shape == logits.shape and g.device == logits.device
    wmax = max(1.0, float(w1.abs().max()) if y.numel() else 1.0, float(w2.abs().max()) if y.numel() else 1.0)
    check_close(g, ref, f"grad ({which})", **grad_tol(_scale(logits, kw.get("temperature", 1.0)), dtype, wmax, backend))
    ign = y == kw.get("ignore_index", -100)
    assert (g[ign] == 0).all(), "ignored rows must get an all-zero gradient"
    finite = torch.isfinite(logits.detach())
    assert torch.isfinite(g).all() or not finite.all(), "non-finite gradient from finite logits"
    # -inf logits have p = 0: exactly zero gradient there unless it is the label
    neginf = logits.detach() == NEG_INF
    if neginf.any():
        lab = torch.zeros_like(neginf)
        keep = ~ign
        lab[keep] = torch.nn.functional.one_hot(y[keep].long(), logits.shape[-1]).bool()
        mask = neginf & ~lab
        assert (g[mask] == 0).all(), "gradient at -inf logits (p = 0) must be 0"


# ----------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_nonfinite_rows_stay_local(backend, device, dtype):
    """NaN / +inf in a row -> NaN for that row only; a row of only -inf -> NaN log-prob;
    an ignored row with NaN -> 0 and a zero gradient; the other rows are unaffected."""
    V = 200
    z = torch.randn(10, V) * 2
    y = torch.randint(0, V, (10,))
    z[1, (int(y[1]) + 7) % V] = float("nan")  # NaN away from the label
    z[2, int(y[2])] = float("nan")  # NaN at the label
    z[3, (int(y[3]) + 3) % V] = float("inf")  # +inf away from the label
    z[4, int(y[4])] = float("inf")  # +inf at the label
    z[5] = NEG_INF  # all -inf
    z[6, 11] = float("nan")
    y[6] = -100  # ignored NaN row
    bad_rows = [1, 2, 3, 4]
    good = torch.tensor([0, 7, 8, 9])
    z = z.to(dtype).to(device).requires_grad_()
    y = y.to(device)

    out = tl(z, y, stats=STAT_NAMES, backend=backend)
    ref = naive_token_logprobs(z, y, stats=STAT_NAMES)
    lp = out.logprobs.cpu()
    for r in bad_rows + [5]:
        assert torch.isnan(lp[r]), f"row {r}: expected NaN log-prob, got {lp[r]}"
    for r in bad_rows:
        assert torch.isnan(out.entropy.cpu()[r]), f"row {r}: NaN in should give NaN entropy"
    assert lp[6] == 0 and out.entropy.cpu()[6] == 0, "ignored row with NaN must give 0"
    tol = fwd_tol(_scale(z[good.to(device)], 1.0))
    for name, r in zip(out._fields, ref):
        got = getattr(out, name).cpu()[good]
        if name == "is_argmax":
            assert torch.equal(got, r.cpu()[good])
        else:
            check_close(got, r[good], f"{name} of finite rows", **tol)

    w1 = torch.randn(10, device=device)
    w2 = torch.randn(10, device=device)
    g = torch.autograd.grad((out.logprobs, out.entropy), z, (w1, w2))[0].cpu()
    assert (g[6] == 0).all(), "ignored NaN row must get a zero gradient"
    zg = z.detach()[good.to(device)]
    ref_g = _ref_grads(zg, y[good.to(device)], {}, "both", w1[good.to(device)], w2[good.to(device)])
    check_close(g[good], ref_g, "grad of finite rows", **grad_tol(_scale(zg, 1.0), dtype, 4.0, backend))


# ------------------------------------------------------------------- in-place backward


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("which", ["both", "logp"])
def test_inplace_backward(backend, device, dtype, which):
    """inplace_backward=True: same gradient, written over the logits' own memory (a view
    logits[:, :-1] of a non-leaf [B, T, V] buffer), the last position untouched."""
    if _interpreted_triton(backend) and (dtype == torch.float16 or (which == "logp" and dtype != torch.float32)):
        pytest.skip("interpreted Triton: reduced matrix")
    B, T, V = 3, 9, 777
    base = (torch.randn(B, T, V) * 2).to(dtype).to(device)
    y = _labels(base[:, :-1].cpu()).to(device)
    kw = {"temperature": (torch.rand(B, T - 1) * 2 + 0.5).to(device)}
    w1 = torch.randn(B, T - 1, device=device)
    w2 = torch.randn(B, T - 1, device=device)

    leaf = base.clone().requires_grad_()
    logits = leaf[:, :-1]
    g_fresh = _grads(backend, logits, y, kw, which, w1, w2, inplace=False)
    assert g_fresh.untyped_storage().data_ptr() != leaf.untyped_storage().data_ptr()

    leaf2 = base.clone().requires_grad_()
    buf = leaf2 * 1  # non-leaf buffer that owns the logits memory (as an lm_head output would)
    logits2 = buf[:, :-1]
    ptr = logits2.data_ptr()
    g_in = _grads(backend, logits2, y, kw, which, w1, w2, inplace=True)

    assert g_in.data_ptr() == ptr, "in-place gradient must live in the logits buffer"
    assert g_in.stride() == logits2.stride()
    assert torch.equal(buf.detach()[:, :-1], g_in), "the logits buffer must hold the gradient"
    assert torch.equal(buf.detach()[:, -1], base[:, -1]), "in-place backward wrote outside the view"
    ref = _ref_grads(base[:, :-1], y, kw, which, w1, w2)
    wmax = max(1.0, float(w1.abs().max()), float(w2.abs().max()))
    tol = grad_tol(_scale(base[:, :-1], kw["temperature"]), dtype, wmax, backend)
    check_close(g_in, ref, "in-place grad vs reference", **tol)
    check_close(g_in, g_fresh, "in-place grad vs fresh grad", atol=tol["atol"], rtol=2 * tol["rtol"])


# -------------------------------------------------------- no hidden copies of the logits


def _allocations(fn):
    """Run fn under the profiler; return (result, [bytes of each CPU allocation], peak
    bytes live) for allocations made during fn.

    Every allocation through c10's CPU allocator is reported to the profiler with its
    size, whoever asked for it (Python, ATen, a C++ kernel through the stable ABI, the
    Triton interpreter's torch tensors), which is what makes this a proof rather than a
    look at the Python code. The running total starts at 0 when profiling starts.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover
        pytest.skip("torch profiler event tree API not available")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        res = fn()

    def walk(evs):
        for e in evs:
            yield e
            yield from walk(e.children)

    allocs = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree()) if e.tag == _EventType.Allocation]
    allocs.sort(key=lambda e: e.start_time_ns)
    sizes = [e.extra_fields.alloc_size for e in allocs if e.extra_fields.alloc_size > 0]
    peak = max([e.extra_fields.total_allocated for e in allocs] + [0])
    return res, sizes, peak


def _copy_shape(backend):
    # The chunked torch backend allocates fp32 blocks of up to 2^22 elements (16 MiB); the
    # tensor must be large enough that half of it is still bigger than such a block, so
    # that a copy (>= the whole view) and a block are told apart. The native backends are
    # tested at the same size; the interpreted Triton backend at a small one.
    if backend == "triton":
        return 2, 33, 1000
    return 4, 1025, 5000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_logits_are_not_copied(backend, device, dtype):
    """logits[:, :-1]: no allocation of the size of the logits in forward; in backward the
    only one is the gradient itself, and with inplace_backward=True there is none."""
    if device.type != "cpu":
        pytest.skip("allocation tracking through the CPU allocator")
    if backend in ("torch", "triton") and dtype == torch.float32:
        pytest.skip("the bf16 case covers .contiguous()/.float(); fp32 is slow here (large / interpreted)")
    B, T, V = _copy_shape(backend)
    full = torch.randn(B, T, V, dtype=dtype)
    y = torch.randint(0, V, (B, T - 1))
    view_bytes = B * (T - 1) * V * full.element_size()
    big = view_bytes // 2  # a copy of the view, in any dtype >= 2 bytes, is at least this

    leaf = full.clone().requires_grad_()
    logits = leaf[:, :-1]
    out, sizes, peak = _allocations(lambda: tl(logits, y, stats=("entropy",), backend=backend))
    assert max(sizes + [0]) < big, f"forward allocated {max(sizes)} bytes (view: {view_bytes})"
    w = torch.randn(B, T - 1)
    g, sizes, peak = _allocations(lambda: torch.autograd.grad((out.logprobs, out.entropy), logits, (w, w))[0])
    large = [s for s in sizes if s >= big]
    assert len(large) == 1 and large[0] <= view_bytes * 1.01, (
        f"backward: allocations >= half the logits: {large} (view {view_bytes} bytes)"
    )

    buf = full.clone().requires_grad_() * 1
    logits = buf[:, :-1]
    out = tl(logits, y, stats=("entropy",), backend=backend, inplace_backward=True)
    g2, sizes, peak = _allocations(lambda: torch.autograd.grad((out.logprobs, out.entropy), logits, (w, w))[0])
    assert max(sizes + [0]) < big, f"in-place backward allocated {max(sizes)} bytes (view {view_bytes})"
    assert g2.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(g2, g)


# ------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("case", ["plain", "causal_shift", "temperature_per_token", "neg_inf", "V1", "V2"])
def test_gradcheck_fp64_torch_backend(case):
    import prefopt_fast

    if "torch" not in prefopt_fast.available_backends():
        pytest.skip("no torch backend")
    kw = {}
    if case == "causal_shift":
        full = torch.randn(2, 5, 11, dtype=torch.float64)
        view = lambda t: t[:, :-1]  # noqa: E731
    elif case == "V1":
        full = torch.randn(3, 4, 1, dtype=torch.float64)
        view = _ident
    elif case == "V2":
        full = torch.randn(3, 4, 2, dtype=torch.float64)
        view = _ident
    else:
        full = torch.randn(2, 4, 13, dtype=torch.float64)
        view = _ident
    if case == "neg_inf":
        full[0, 0, 3:] = NEG_INF  # gradcheck perturbs -inf entries to -inf: harmless
    y = _labels(view(full), argmax_frac=0.2, ignore_frac=0.25)
    if case == "temperature_per_token":
        kw["temperature"] = torch.rand(y.shape, dtype=torch.float64) + 0.5
    if case == "neg_inf":
        y[0, 0] = 1

    def f(full):
        out = tl(view(full), y, stats=("entropy",), backend="torch", **kw)
        return out.logprobs, out.entropy

    full.requires_grad_()
    lp, h = f(full)
    assert lp.dtype == torch.float64 and h.dtype == torch.float64, "fp64 logits must give fp64 outputs"
    assert torch.autograd.gradcheck(f, (full,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------- > 2^31 elements


def _mem_available_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
def test_more_than_2_31_elements_cpu_backend():
    """2^31 + rows of bf16 logits (4.3 GB), in-place backward: rows past element 2^31
    match the reference (a 32-bit offset would wrap onto the first rows, which differ)."""
    import prefopt_fast

    if "cpu" not in prefopt_fast.available_backends():
        expected.require("cpu-extension")
    if _mem_available_gb() < 8:
        pytest.skip("needs ~8 GB of free memory")
    V = 128256
    N = (2**31) // V + 3
    tile = torch.randn(64, V, dtype=torch.bfloat16)
    full = torch.empty(N + 1, V, dtype=torch.bfloat16)
    for r0 in range(0, N + 1, 64):
        r1 = min(r0 + 64, N + 1)
        full[r0:r1] = tile[: r1 - r0]
    special = torch.tensor(list(range(N - 8, N)) + [0, 1, 2])
    full[special] = (torch.randn(len(special), V) * 3).to(torch.bfloat16)
    y = torch.randint(0, V, (N,))
    y[N - 1] = int(full[N - 1].float().argmax())
    y[N - 2] = -100
    inp = full[special].clone()
    sentinel = full[N].clone()
    w1, w2 = torch.randn(N), torch.randn(N)

    full.requires_grad_()
    logits = full[:N]  # rows of stride V, the last row of ``full`` is outside the view
    assert logits.numel() > 2**31
    out = prefopt_fast.token_logprobs(logits, y, stats=STAT_NAMES, backend="cpu", inplace_backward=True)
    ys = y[special]
    ref = naive_token_logprobs(inp, ys, stats=STAT_NAMES)
    tol = fwd_tol(_scale(inp, 1.0))
    for name, r in zip(out._fields, ref):
        got = getattr(out, name)[special]
        if name == "is_argmax":
            assert torch.equal(got, r)
        else:
            check_close(got, r, name + " (rows past 2^31 and first rows)", **tol)
    g = torch.autograd.grad((out.logprobs, out.entropy), logits, (w1, w2))[0]
    assert g.data_ptr() == logits.data_ptr()
    ref_g = _ref_grads(inp, ys, {}, "both", w1[special], w2[special])
    check_close(g[special], ref_g, "grad rows", **grad_tol(_scale(inp, 1.0), torch.bfloat16, 5.0))
    assert torch.equal(full.detach()[N], sentinel), "in-place backward wrote past the end of the view"


# ----------------------------------------------------------------------------- no rows


@pytest.mark.parametrize("shape", [(0, 100), (2, 0, 100)])
def test_zero_rows(backend, device, shape):
    z = torch.randn(shape, device=device, requires_grad=True)
    y = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    out = tl(z, y, stats=STAT_NAMES, backend=backend)
    assert out.logprobs.shape == y.shape and out.entropy.shape == y.shape
    (g,) = torch.autograd.grad((out.logprobs.sum() + out.entropy.sum()), z)
    assert g.shape == z.shape
