"""The Triton backend's row kernels against the fp64 reference (prefopt_fast.reference).

Runs under TRITON_INTERPRET=1 on CPU tensors (set here before triton is imported, and
globally by tests/conftest.py), or on a CUDA device when TRITON_INTERPRET=0. Tiles are
shrunk to 64 elements so that rows of a few hundred cover several full tiles and a
partial one; grids stay at tens of rows (the interpreter costs ~1 ms per program per tile).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import warnings  # noqa: E402

import expected  # noqa: E402  (tests/expected.py)
import pytest  # noqa: E402
import torch  # noqa: E402

from prefopt_fast import _rows  # noqa: E402
from prefopt_fast import reference as R  # noqa: E402
from prefopt_fast.backends import triton as tb  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
IGN = -100
BLOCK = 64
STATS4 = _rows.STAT_ENTROPY | _rows.STAT_LSSP | _rows.STAT_MEAN | _rows.STAT_ARGMAX
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# storage rounding of the gradient (the forward statistics are fp32 whatever the input)
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def _triton_here():
    # under the interpreter Triton is expected (a failure in strict mode); on a GPU run
    # (TRITON_INTERPRET=0) a machine without a GPU skips
    if INTERPRET:
        expected.require("triton")
    elif not tb.is_available():
        pytest.skip(f"triton backend: {tb.unavailable_reason()}")


pytestmark = [
    # the interpreter evaluates -inf/NaN rows in numpy, which warns
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    config, _, _ = tb.kernel_modules()
    monkeypatch.setattr(config, "BLOCK_V_OVERRIDE", BLOCK)


# ---------------------------------------------------------------- reference (fp64)

# prefopt_fast.reference's statistic -> output row of the contract
REF_ROWS = {
    "logprobs": _rows.OUT_LOGP,
    "lse": _rows.OUT_LSE,
    "entropy": _rows.OUT_ENTROPY,
    "log_sum_sq_probs": _rows.OUT_LSSP,
    "mean_logit": _rows.OUT_MEAN,
    "is_argmax": _rows.OUT_ARGMAX,
    "kl": _rows.OUT_KL,
    "ref_lse": _rows.OUT_REF_LSE,
}


def ref_forward(logits, labels, inv_temp, ignore_index=IGN, ref_logits=None):
    """fp64 [N_OUT, N] per _rows.py, differentiable in ``logits`` (fp64 leaf): the token
    statistics of prefopt_fast.reference at x = logits * inv_temp, as output rows."""
    V = logits.shape[-1]
    it = inv_temp.double()[:, None]
    xr = None if ref_logits is None else ref_logits.reshape(-1, V).double() * it
    st = R.token_stats(logits.reshape(-1, V) * it, labels, ignore_index=ignore_index, ref_logits=xr)
    zero = torch.zeros_like(st["logprobs"])
    rows = [zero] * _rows.N_OUT
    for name, r in REF_ROWS.items():
        if name in st:
            rows[r] = st[name].to(zero.dtype)
    lse = st["lse"].detach()
    rows[_rows.OUT_LSE_LO] = torch.where(torch.isfinite(lse), lse - lse.float().double(), 0.0)
    return torch.stack(rows)


def check_forward(out, ref, stats=STATS4, atol=1e-5, rtol=1e-5):
    rows = [_rows.OUT_LOGP, _rows.OUT_LSE] + [o for b, o in _rows.STATS.values() if stats & b]
    if stats & _rows.STAT_KL:
        rows.append(_rows.OUT_REF_LSE)
    for r in rows:
        torch.testing.assert_close(
            out[r].double().cpu(),
            ref[r].detach().cpu(),
            atol=atol,
            rtol=rtol,
            equal_nan=True,
            msg=lambda m: f"output row {r}: {m}",
        )
    # LSE + LSE_LO: the lse to the accuracy of the fp32 log of the exp-sum, at any magnitude
    lse = out[_rows.OUT_LSE].double().cpu() + out[_rows.OUT_LSE_LO].double().cpu()
    torch.testing.assert_close(
        lse,
        ref[_rows.OUT_LSE].detach().cpu(),
        atol=max(atol, 2e-6),
        rtol=0,
        equal_nan=True,
        msg=lambda m: f"LSE + LSE_LO: {m}",
    )


def make_case(shape, V, dtype, scale=3.0, n_ignored=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * scale).to(dtype)
    N = math.prod(shape)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = IGN
    # a few labels at the row argmax so that is_argmax is exercised both ways
    am = logits.reshape(N, V).float().argmax(-1)
    labels[:3] = torch.where(labels[:3] == IGN, labels[:3], am[:3])
    inv_temp = 0.5 + 1.5 * torch.rand(N, generator=g)
    return logits.to(DEVICE), labels.to(DEVICE), inv_temp.to(DEVICE)


def run_backward(logits, labels, inv_temp, out, c, e, inplace, k=None, ref_logits=None):
    lse, lo = out[_rows.OUT_LSE].contiguous(), out[_rows.OUT_LSE_LO].contiguous()
    ent = out[_rows.OUT_ENTROPY].contiguous() if e is not None else lse
    kl_args = {}
    if k is not None:
        kl_args = dict(
            grad_kl=k,
            ref_logits=ref_logits,
            ref_lse=out[_rows.OUT_REF_LSE].contiguous(),
            kl=out[_rows.OUT_KL].contiguous(),
        )
    return tb.row_backward(logits, labels, inv_temp, lse, lo, ent, c, e, IGN, inplace, **kl_args)


def ref_grad(logits, labels, inv_temp, c, e, k=None, ref_logits=None):
    x = logits.detach().double().requires_grad_()
    ref = ref_forward(x, labels, inv_temp, ref_logits=None if ref_logits is None else ref_logits.double())
    loss = (c.double() * ref[_rows.OUT_LOGP]).sum()
    if e is not None:
        loss = loss + (e.double() * ref[_rows.OUT_ENTROPY]).sum()
    if k is not None:
        loss = loss + (k.double() * ref[_rows.OUT_KL]).sum()
    loss.backward()
    return x.grad


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 40, 64, 203])
def test_forward_all_stats(dtype, V):
    """V = 1, V < BLOCK (tail only), V = BLOCK (no tail), V = 3 tiles + a partial one."""
    logits, labels, inv_temp = make_case((3, 4), V, dtype)
    out = tb.row_forward(logits, labels, inv_temp, IGN, STATS4)
    assert out.shape == (_rows.N_OUT, 12) and out.dtype == torch.float32
    check_forward(out, ref_forward(logits.double(), labels, inv_temp))


@pytest.mark.parametrize("stats", [0, _rows.STAT_ENTROPY, _rows.STAT_ARGMAX, _rows.STAT_LSSP | _rows.STAT_MEAN])
def test_forward_stat_subsets(stats):
    logits, labels, inv_temp = make_case((10,), 150, torch.float32)
    out = tb.row_forward(logits, labels, inv_temp, IGN, stats)
    check_forward(out, ref_forward(logits.double(), labels, inv_temp), stats)


def test_forward_flag_combinations_direct():
    """Every flag combination of the kernel itself, not only the compiled flag sets."""
    config, fwd, _ = tb.kernel_modules()
    logits, labels, inv_temp = make_case((4,), 100, torch.float32, n_ignored=1)
    ref = ref_forward(logits.double(), labels, inv_temp)
    ref_logits = torch.randn_like(logits) * 2
    ref = ref_forward(logits.double(), labels, inv_temp, ref_logits=ref_logits)
    for stats in range(32):
        out = torch.full((_rows.N_OUT, 4), math.inf, device=DEVICE)
        fwd.launch(
            logits,
            _rows.row_offsets(logits),
            labels,
            inv_temp,
            out,
            IGN,
            stats,
            block_v=BLOCK,
            num_warps=4,
            ref_logits=ref_logits,
            ref_row_off=_rows.row_offsets(ref_logits),
        )
        check_forward(out, ref, stats)


def test_forward_ignored_rows_are_zero_and_custom_ignore_index():
    logits, labels, inv_temp = make_case((6,), 90, torch.float32, n_ignored=0)
    labels[[1, 4]] = 7  # ignore_index = 7: rows whose label is 7 are ignored
    labels[[0, 2, 3, 5]] = torch.tensor([0, 8, 89, 6])
    out = tb.row_forward(logits, labels, inv_temp, 7, STATS4)
    check_forward(out, ref_forward(logits.double(), labels, inv_temp, ignore_index=7))
    assert (out[:6, [1, 4]] == 0).all()


def test_forward_strided_views_no_copy():
    base = torch.randn(3, 6, 210, device=DEVICE) * 2
    _, labels, inv_temp = make_case((3, 5), 203, torch.float32)
    # causal shift and a narrowed vocabulary: row strides (1260, 210), not contiguous
    view = base[:, :-1, :203]
    out = tb.row_forward(view, labels, inv_temp, IGN, STATS4)
    check_forward(out, ref_forward(view.double(), labels, inv_temp))
    # leading dimensions permuted
    tview = base[:, :5, :203].transpose(0, 1)
    out = tb.row_forward(tview, labels, inv_temp, IGN, STATS4)
    check_forward(out, ref_forward(tview.double(), labels, inv_temp))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_neg_inf_entries(dtype):
    logits, labels, inv_temp = make_case((8,), 150, dtype, n_ignored=0)
    labels[2], labels[7] = 5, IGN
    logits[0, :100] = -math.inf  # whole first tiles -inf, finite later
    logits[1, 100:] = -math.inf  # finite first, -inf later (incl. the tail)
    logits[2, 5] = -math.inf  # at the label: logp = -inf
    logits[3] = -math.inf  # only -inf: NaN
    logits[4, ::3] = -math.inf
    logits[7] = -math.inf  # ignored: zeros
    out = tb.row_forward(logits, labels, inv_temp, IGN, STATS4)
    ref = ref_forward(logits.double(), labels, inv_temp)
    rest = [0, 1, 2, 4, 5, 6, 7]
    check_forward(out[:, rest], ref[:, rest])
    assert out[_rows.OUT_LOGP, 2] == -math.inf
    assert out[_rows.OUT_LOGP, 3].isnan() and out[_rows.OUT_LSE, 3] == -math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_large_magnitudes(dtype):
    logits, labels, inv_temp = make_case((6,), 180, dtype, scale=1e4)
    out = tb.row_forward(logits, labels, inv_temp, IGN, STATS4)
    ref = ref_forward(logits.double(), labels, inv_temp)
    # x is rounded to fp32 once: absolute errors scale with |x| (~4e4 here)
    check_forward(out, ref, atol=1e-6 * 4e4 * 8, rtol=1e-5)


def test_forward_nan_and_inf_rows():
    logits, labels, inv_temp = make_case((6,), 150, torch.float32, n_ignored=0)
    labels[:] = torch.tensor([5, 5, 5, 70, 7, 9])
    logits[0, 70] = math.nan
    logits[1, 130] = math.inf
    logits[2, 20] = math.inf
    logits[2, 5] = math.inf  # first +inf is the label -> is_argmax
    logits[3, 140] = math.nan
    logits[3, 70] = math.inf  # NaN counts as +inf: the first of them wins
    out = tb.row_forward(logits, labels, inv_temp, IGN, STATS4)
    bad = [0, 1, 2, 3]
    for r in (_rows.OUT_LOGP, _rows.OUT_LSE, _rows.OUT_ENTROPY, _rows.OUT_LSSP):
        assert out[r, bad].isnan().all(), (r, out[r, bad])
    assert out[_rows.OUT_ARGMAX, bad].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert out[_rows.OUT_MEAN, 1] == math.inf and math.isnan(out[_rows.OUT_MEAN, 0])
    check_forward(out[:, 4:], ref_forward(logits.double(), labels, inv_temp)[:, 4:])


def test_forward_out_of_range_labels_give_nan():
    logits, labels, inv_temp = make_case((6,), 100, torch.float32, n_ignored=1)
    labels[[0, 1, 2]] = torch.tensor([100, -1, 2**40], device=DEVICE)
    out = tb.row_forward(logits, labels, inv_temp, IGN, STATS4)
    assert out[_rows.OUT_LOGP, :3].isnan().all()
    assert (out[_rows.OUT_ARGMAX, :3] == 0).all()
    check_forward(out[:, 3:], ref_forward(logits.double(), labels, inv_temp)[:, 3:])


def test_forward_row_offsets_beyond_int32():
    """A row 2**31 + 64 elements from data_ptr(): untouched virtual memory, no RSS."""
    V, far = 200, 2**31 + 64
    storage = torch.empty(far + V, dtype=torch.bfloat16, device=DEVICE)
    view = storage.as_strided((2, V), (far, 1))
    src = (torch.randn(2, V) * 3).to(torch.bfloat16)
    view.copy_(src)
    labels = torch.tensor([3, 150], device=DEVICE)
    inv_temp = torch.tensor([1.0, 0.5], device=DEVICE)
    out = tb.row_forward(view, labels, inv_temp, IGN, STATS4)
    check_forward(out, ref_forward(src.double().to(DEVICE), labels, inv_temp))
    grad = run_backward(view, labels, inv_temp, out, torch.ones(2, device=DEVICE), None, True)
    expect = ref_grad(src.to(DEVICE), labels, inv_temp, torch.ones(2, device=DEVICE), None)
    torch.testing.assert_close(grad.double(), expect, rtol=8e-3, atol=1e-4)


def test_empty_rows():
    logits = torch.randn(0, 50, device=DEVICE)
    labels = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    inv_temp = torch.ones(0, device=DEVICE)
    out = tb.row_forward(logits, labels, inv_temp, IGN, STATS4)
    assert out.shape == (_rows.N_OUT, 0)
    grad = run_backward(logits, labels, inv_temp, out, inv_temp, None, False)
    assert grad.shape == (0, 50)


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_backward_matches_autograd(dtype, inplace, with_entropy):
    logits, labels, inv_temp = make_case((2, 5), 203, dtype)
    c = torch.randn(10, device=DEVICE)
    e = torch.randn(10, device=DEVICE) if with_entropy else None
    expect = ref_grad(logits, labels, inv_temp, c, e)
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
    grad = run_backward(logits, labels, inv_temp, out, c, e, inplace)
    assert grad.dtype == dtype and grad.shape == logits.shape
    if inplace:
        assert grad is logits
    else:
        assert grad.is_contiguous()
    torch.testing.assert_close(grad.double(), expect, rtol=GRAD_RTOL[dtype], atol=1e-6)
    ignored = labels.reshape(2, 5) == IGN
    assert (grad[ignored] == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_backward_strided_view(inplace):
    base = torch.randn(2, 6, 140, device=DEVICE)
    view = base[:, :-1, :130]
    keep = base.clone()
    _, labels, inv_temp = make_case((2, 5), 130, torch.float32)
    c, e = torch.randn(10, device=DEVICE), torch.randn(10, device=DEVICE)
    expect = ref_grad(view, labels, inv_temp, c, e)
    out = tb.row_forward(view, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
    grad = run_backward(view, labels, inv_temp, out, c, e, inplace)
    torch.testing.assert_close(grad.double(), expect, rtol=1e-5, atol=1e-6)
    if inplace:
        assert grad is view
        # only the view's elements were written
        assert torch.equal(base[:, -1], keep[:, -1]) and torch.equal(base[..., 130:], keep[..., 130:])
    else:
        assert grad.is_contiguous() and torch.equal(base, keep)


def test_backward_neg_inf_entries_and_v1():
    logits, labels, inv_temp = make_case((6,), 150, torch.float32, n_ignored=1)
    logits[0, ::2] = -math.inf
    logits[1, :130] = -math.inf
    labels[0] = 1 if labels[0] != IGN else IGN
    c, e = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    expect = ref_grad(logits, labels, inv_temp, c, e)
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
    grad = run_backward(logits, labels, inv_temp, out, c, e, False)
    assert grad.isfinite().all()
    assert (grad[logits == -math.inf] == 0).all()
    torch.testing.assert_close(grad.double(), expect, rtol=1e-5, atol=1e-6)
    # V = 1: p = 1, the gradient vanishes
    one = torch.randn(4, 1, device=DEVICE)
    lab = torch.tensor([0, IGN, 0, 0], device=DEVICE)
    it = torch.ones(4, device=DEVICE)
    out = tb.row_forward(one, lab, it, IGN, _rows.STAT_ENTROPY)
    grad = run_backward(one, lab, it, out, torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE), False)
    assert (grad == 0).all()


def test_backward_nan_and_inf_rows_stay_nan():
    logits, labels, inv_temp = make_case((5,), 150, torch.float32, n_ignored=0)
    logits[0, 40] = math.nan
    logits[1, 100] = math.inf
    logits[2] = -math.inf
    labels[4] = IGN
    logits[4, 3] = math.nan  # ignored row: zero gradient whatever its content
    c, e = torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
    grad = run_backward(logits, labels, inv_temp, out, c, e, False)
    assert grad[:3].isnan().all()  # even with c == 0
    assert grad[3].isfinite().all() and (grad[4] == 0).all()


# ---------------------------------------------------------------- exact-KL extension


def make_ref(logits, seed=1):
    """Reference logits near the policy's, in a differently strided buffer."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(logits.shape, generator=g).to(DEVICE)
    buf = torch.empty(*logits.shape[:-1], logits.shape[-1] + 3, dtype=logits.dtype, device=DEVICE)
    ref = buf[..., 2:-1]
    ref.copy_((logits.float() + noise).to(logits.dtype))
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kl(dtype):
    logits, labels, inv_temp = make_case((3, 4), 203, dtype)
    ref_logits = make_ref(logits)
    ref_logits[0, 1, 7] = -math.inf  # q == 0 where p > 0: KL = +inf
    logits[0, 2, :50] = -math.inf  # p == 0: those terms count 0, even where q == 0
    ref_logits[0, 2, :30] = -math.inf
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_KL | _rows.STAT_ENTROPY, ref_logits)
    ref = ref_forward(logits.double(), labels, inv_temp, ref_logits=ref_logits)
    check_forward(out, ref, _rows.STAT_KL | _rows.STAT_ENTROPY)
    if labels[1] != IGN:
        assert out[_rows.OUT_KL, 1] == math.inf
    # the same statistics without KL are unchanged
    plain = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
    torch.testing.assert_close(plain[:3], out[:3])


def test_forward_kl_large_magnitudes_and_identical_rows():
    logits, labels, inv_temp = make_case((8,), 150, torch.float32, scale=1e4)
    ref_logits = logits.clone()
    ref_logits[4:] += torch.randn(4, 150, device=DEVICE)
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_KL, ref_logits)
    # relative to the row shifts: no cancellation against LSE ~ 4e4
    assert (out[_rows.OUT_KL, :4] == 0).all()
    ref = ref_forward(logits.double(), labels, inv_temp, ref_logits=ref_logits)
    torch.testing.assert_close(out[_rows.OUT_KL].double(), ref[_rows.OUT_KL], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_backward_kl(dtype, inplace):
    logits, labels, inv_temp = make_case((2, 5), 203, dtype)
    ref_logits = make_ref(logits)
    c, e, k = (torch.randn(10, device=DEVICE) for _ in range(3))
    expect = ref_grad(logits, labels, inv_temp, c, e, k, ref_logits)
    keep_ref = ref_logits.clone()
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY | _rows.STAT_KL, ref_logits)
    grad = run_backward(logits, labels, inv_temp, out, c, e, inplace, k, ref_logits)
    torch.testing.assert_close(grad.double(), expect, rtol=GRAD_RTOL[dtype], atol=1e-6)
    assert torch.equal(ref_logits, keep_ref)


def test_backward_grad_kl_without_ref_logits_is_ignored():
    """What an autograd Function may pass when no KL was asked for: no KL term."""
    logits, labels, inv_temp = make_case((6,), 100, torch.float32)
    c, e, k = (torch.randn(6, device=DEVICE) for _ in range(3))
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
    lse, ent = out[_rows.OUT_LSE].contiguous(), out[_rows.OUT_ENTROPY].contiguous()
    lo = out[_rows.OUT_LSE_LO].contiguous()
    plain = tb.row_backward(logits, labels, inv_temp, lse, lo, ent, c, e, IGN, False)
    with_k = tb.row_backward(
        logits, labels, inv_temp, lse, lo, ent, c, e, IGN, False, grad_kl=k, ref_logits=None, ref_lse=lse, kl=ent
    )
    assert torch.equal(plain, with_k)


# ---------------------------------------------------------------- the wrapper


def test_row_alignment_hint():
    config, _, _ = tb.kernel_modules()
    ra = config.row_alignment
    assert ra(torch.empty(4, 64, dtype=torch.bfloat16)) == 8
    assert ra(torch.empty(4, 64)) == 4
    assert ra(torch.empty(4, 203, dtype=torch.bfloat16)) == 1
    assert ra(torch.empty(2, 6, 64, dtype=torch.float16)[:, :-1]) == 8
    assert ra(torch.empty(2, 6, 64, dtype=torch.float16)[:, :-1, :60]) == 8
    assert ra(torch.empty(2, 6, 64, dtype=torch.float16)[:, :-1, :60], with_contiguous_copy=True) == 1
    assert ra(torch.empty(1, 203)) == 4  # a single row: its offset is 0
    assert ra(torch.empty(5, 1)) == 1


def test_availability_and_supports():
    assert tb.NAME == "triton"
    assert tb.is_available() and tb.unavailable_reason() == ""
    assert tb.supports(torch.empty(2, 3, device=DEVICE)) is None
    assert "dtype" in tb.supports(torch.empty(2, 3, dtype=torch.float64, device=DEVICE))
    assert tb.supports(torch.empty(2, 3, device="meta")) is not None


def test_wrapper_rejects_inconsistent_rows():
    logits, labels, inv_temp = make_case((4,), 50, torch.float32)
    with pytest.raises(ValueError, match="labels"):
        tb.row_forward(logits, labels[:3], inv_temp, IGN, 0)
    with pytest.raises(ValueError, match="inv_temp"):
        tb.row_forward(logits, labels, inv_temp.double(), IGN, 0)
    with pytest.raises(ValueError, match="last stride"):
        tb.row_forward(logits.t(), labels[:4].repeat(13)[:50], torch.ones(50), IGN, 0)
    with pytest.raises(ValueError, match="ref_logits"):
        tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_KL)
    with pytest.raises(ValueError, match="ref_logits"):
        tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_KL, ref_logits=logits[:, :-1])
    with pytest.raises(ValueError, match="unknown bits"):
        tb.row_forward(logits, labels, inv_temp, IGN, 64)


def test_custom_ops_opcheck():
    logits, labels, inv_temp = make_case((2, 3), 70, torch.float32)
    out = tb.row_forward(logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
    lse, ent = out[_rows.OUT_LSE].contiguous(), out[_rows.OUT_ENTROPY].contiguous()
    lo = out[_rows.OUT_LSE_LO].contiguous()
    c, e = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    ref_logits = make_ref(logits)
    ops = torch.ops.prefopt_fast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.opcheck(ops.triton_row_forward, (logits, labels, inv_temp, IGN, _rows.STAT_ENTROPY, None))
        torch.library.opcheck(ops.triton_row_forward, (logits, labels, inv_temp, IGN, _rows.STAT_KL, ref_logits))
        torch.library.opcheck(
            ops.triton_row_backward, (logits, labels, inv_temp, lse, lo, ent, c, e, IGN, None, None, None, None)
        )
        torch.library.opcheck(
            ops.triton_row_backward, (logits, labels, inv_temp, lse, lo, ent, c, e, IGN, c, ref_logits, lse, ent)
        )
        torch.library.opcheck(
            ops.triton_row_backward_inplace,
            (logits.clone(), labels, inv_temp, lse, lo, ent, c, None, IGN, None, None, None, None),
        )


def test_torch_compile_fullgraph():
    logits, labels, inv_temp = make_case((2, 4), 90, torch.bfloat16)
    c, e = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)

    def step(z):
        out = tb.row_forward(z, labels, inv_temp, IGN, _rows.STAT_ENTROPY)
        g = tb.row_backward(
            z,
            labels,
            inv_temp,
            out[_rows.OUT_LSE].contiguous(),
            out[_rows.OUT_LSE_LO].contiguous(),
            out[_rows.OUT_ENTROPY].contiguous(),
            c,
            e,
            IGN,
            True,
        )
        return out[_rows.OUT_LOGP] * 2, g

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    lp, g = compiled(logits.clone())
    lp_ref, g_ref = step(logits.clone())
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(g, g_ref)
