"""The native ``cpu`` backend (prefopt_fast._C) against the fp64 row-contract reference
(tests/cuda_emulation/reference.py, shared with the CUDA kernel tests).

Focused on the extension itself: the torch.library ops (opcheck, torch.compile), dtypes,
strided views without copies, awkward vocabulary sizes, rows split across threads,
ignored rows, -inf / NaN / inf / huge values, out-of-range labels, in-place backward and
more than 2^31 elements (slow). The public-API matrix lives in test_token_logprobs.py.
"""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from prefopt_fast._rows import (
    N_OUT,
    OUT_ARGMAX,
    OUT_ENTROPY,
    OUT_KL,
    OUT_LOGP,
    OUT_LSE,
    OUT_LSE_LO,
    OUT_LSSP,
    OUT_MEAN,
    OUT_REF_LSE,
    STAT_ALL,
    STAT_ARGMAX,
    STAT_ENTROPY,
    STAT_KL,
    STAT_LSSP,
    STAT_MEAN,
)
from prefopt_fast.backends import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
import expected  # noqa: E402  (tests/expected.py)
from reference import ref_backward, ref_forward  # noqa: E402  (the fp64 row-contract reference)


@pytest.fixture(autouse=True)
def _native_extension():
    expected.require("cpu-extension")  # a broken build fails in strict mode (scripts/test.sh, CI)


IGN = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHUNK = 2048  # the kernels' chunk length (csrc/cpu/row_kernels.cpp kChunk)
NOKL = STAT_ALL & ~STAT_KL  # every statistic that needs no ref_logits


# ----------------------------------------------------------------------------- reference


def _rows(z):
    return z.reshape(-1, z.shape[-1])  # may copy: the reference only


def assert_fwd(out, ref, stats, kl=False, rtol=2e-5, atol=2e-5):
    rows = [OUT_LOGP, OUT_LSE]
    for bit, r in (
        (STAT_ENTROPY, OUT_ENTROPY),
        (STAT_LSSP, OUT_LSSP),
        (STAT_MEAN, OUT_MEAN),
        (STAT_ARGMAX, OUT_ARGMAX),
    ):
        if stats & bit:
            rows.append(r)
    if kl:
        rows += [OUT_KL, OUT_REF_LSE]
    for r in rows:
        torch.testing.assert_close(
            out[r].double(), ref[r], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, r=r: f"output row {r}: {m}"
        )
    # LSE + LSE_LO: the lse to the accuracy of the exp-sums (~1e-7), at any magnitude
    torch.testing.assert_close(
        out[OUT_LSE].double() + out[OUT_LSE_LO].double(),
        ref[OUT_LSE] + ref[OUT_LSE_LO],
        rtol=0,
        atol=1e-6,
        equal_nan=True,
        msg=lambda m: f"LSE + LSE_LO: {m}",
    )


def grad_tol(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]


def assert_grad(g, ref, dtype):
    scale = max(ref.abs().max().item(), 1e-30) if ref.numel() else 1.0
    torch.testing.assert_close(g.double(), ref, rtol=grad_tol(dtype), atol=1e-6 * scale, equal_nan=True)


def make(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype)


def rand_labels(N, V, n_ignored=1):
    y = torch.randint(0, V, (N,))
    y[torch.randperm(N)[:n_ignored]] = IGN
    return y


# ----------------------------------------------------------------------------- contract constants

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CONTRACT_DEF = re.compile(r"\bconstexpr\s+int\s+(kStat\w+|kOut\w+|kNumOut)\s*=\s*([^;]+);")


def _contract_constants():
    """{name: value} of every kStat* / kOut* / kNumOut in csrc/row_args.h (values are ints
    or |-combinations of earlier constants)."""
    values = {}
    for name, expr in _CONTRACT_DEF.findall((CSRC / "row_args.h").read_text()):
        assert re.fullmatch(r"[\w\s|]+", expr), f"row_args.h: {name} = {expr!r}: unexpected expression"
        assert name not in values, f"row_args.h defines {name} twice"
        values[name] = eval(expr, {"__builtins__": {}}, dict(values))  # ints, earlier names and |
    return values


def _python_name(cpp_name):
    # kStatArgmax -> STAT_ARGMAX, kOutRefLse -> OUT_REF_LSE, kNumOut -> N_OUT
    if cpp_name == "kNumOut":
        return "N_OUT"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name[1:]).upper()


class TestContractConstants:
    """csrc/row_args.h (the one C++ definition of the row contract's constants, used by the
    CPU and CUDA kernels and both bindings) against prefopt_fast/_rows.py, both ways. Pure
    parsing: runs without the native extension."""

    @pytest.fixture(autouse=True)
    def _native_extension(self):  # overrides the module's: nothing native needed here
        pass

    def test_every_cpp_constant_equals_rows_py(self):
        import prefopt_fast._rows as rows

        cpp = _contract_constants()
        assert {"kStatKl", "kOutLogp", "kOutLseLo", "kNumOut"} <= set(cpp), sorted(cpp)
        for name, value in cpp.items():
            py = _python_name(name)
            assert hasattr(rows, py), f"csrc/row_args.h {name} has no prefopt_fast._rows.{py}"
            assert value == getattr(rows, py), f"csrc/row_args.h {name} = {value} != _rows.{py} = {getattr(rows, py)}"

    def test_every_rows_py_constant_is_in_row_args_h(self):
        import prefopt_fast._rows as rows

        cpp = {_python_name(n) for n in _contract_constants()}
        py = {n for n in vars(rows) if re.fullmatch(r"(STAT|OUT)_[A-Z_]+|N_OUT", n)}
        assert py - cpp == set(), f"prefopt_fast._rows constants missing from csrc/row_args.h: {sorted(py - cpp)}"

    def test_defined_only_in_row_args_h(self):
        dup = re.compile(r"\b(k(?:Stat|Out)[A-Z]\w*|kNumOut)\s*=(?!=)")
        found = []
        for f in sorted(CSRC.rglob("*")):
            if f.suffix in (".h", ".cuh", ".cpp", ".cu") and f.name != "row_args.h":
                found += [f"{f.relative_to(CSRC)}: {m.group(0)}" for m in dup.finditer(f.read_text())]
        assert not found, f"contract constants are defined in csrc/row_args.h only: {found}"


# ----------------------------------------------------------------------------- ops


def _op_args(dtype=torch.float32, V=37):
    z = make((2, 5, V), dtype)[:, :-1]  # strided view
    N = 8
    y = rand_labels(N, V)
    it = torch.rand(N) + 0.5
    zr = make((2, 5, V), dtype)[:, 1:]
    return z, y, it, zr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16 binds the same way
def test_opcheck(dtype):
    z, y, it, zr = _op_args(dtype)
    ops = torch.ops.prefopt_fast
    torch.library.opcheck(ops.row_forward.default, (z, y, it, IGN, STAT_ALL, zr))
    torch.library.opcheck(ops.row_forward.default, (z, y, it, IGN, 0, None))
    out = ops.row_forward(z, y, it, IGN, STAT_ALL, zr)
    lse, lo, H, rlse, kl = out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], out[OUT_REF_LSE], out[OUT_KL]
    c, e, k = torch.randn(8), torch.randn(8), torch.randn(8)
    for args in [
        (z, y, it, lse, lo, lse, c, None, IGN, None, None, None, None),
        (z, y, it, lse, lo, H, c, e, IGN, None, None, None, None),
        (z, y, it, lse, lo, H, c, e, IGN, k, zr, rlse, kl),
    ]:
        torch.library.opcheck(ops.row_backward.default, args)
        torch.library.opcheck(ops.row_backward_.default, (z.clone(),) + args[1:])


def test_torch_compile_fullgraph():
    z, y, it, _ = _op_args(V=300)
    c = torch.randn(8)

    def f(z, y, it, c):
        out = cpu.row_forward(z, y, it, IGN, STAT_ENTROPY)
        g = cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], c, None, IGN, False)
        return out, g

    out, g = torch.compile(f, fullgraph=True, backend="aot_eager")(z, y, it, c)
    out0, g0 = f(z, y, it, c)
    torch.testing.assert_close(out, out0)
    torch.testing.assert_close(g, g0)


def test_input_errors_name_the_argument():
    z, y, it, _ = _op_args()
    with pytest.raises(RuntimeError, match="labels"):
        cpu.row_forward(z, y.int(), it, IGN, 0)
    with pytest.raises(RuntimeError, match="inv_temp"):
        cpu.row_forward(z, y, it.double(), IGN, 0)
    with pytest.raises(RuntimeError, match="logits"):
        cpu.row_forward(z.double(), y, it, IGN, 0)
    with pytest.raises(RuntimeError, match="stride 1"):
        cpu.row_forward(torch.randn(40, 8).t(), y, it, IGN, 0)
    with pytest.raises(RuntimeError, match="inv_temp"):
        cpu.row_forward(z, y, it[:-1], IGN, 0)
    with pytest.raises(RuntimeError, match="ref_logits"):
        cpu.row_forward(z, y, it, IGN, STAT_KL, None)


def test_supports_and_availability():
    assert cpu.NAME == "cpu" and cpu.is_available() and cpu.unavailable_reason() == ""
    assert cpu.supports(torch.empty(2, 3)) is None
    assert cpu.supports(torch.empty(2, 3, dtype=torch.bfloat16)) is None
    assert "float64" in cpu.supports(torch.empty(2, 3, dtype=torch.float64))
    assert "meta" in cpu.supports(torch.empty(2, 3, device="meta"))


def test_import_keeps_ieee_denormals():
    # the extension is built without -ffast-math: loading it must not set FTZ/DAZ
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() != 0.0 and (tiny / 2).item() != 0.0


# ----------------------------------------------------------------------------- forward / backward

SHAPES = {
    "causal-shift view": lambda dt: make((3, 7, 1000), dt)[:, :-1],
    "V=1": lambda dt: make((6, 1), dt),
    "V=chunk+1": lambda dt: make((5, CHUNK + 1), dt),
    "V=3 chunks+5, transposed rows": lambda dt: make((4, 3, 3 * CHUNK + 5), dt).transpose(0, 1),
    "one long row (split across threads)": lambda dt: make((1, 70000), dt),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_backward_against_fp64(dtype, shape):
    z = SHAPES[shape](dtype)
    V = z.shape[-1]
    N = z.numel() // V
    y = rand_labels(N, V, n_ignored=1 if N > 2 else 0)
    it = torch.rand(N) + 0.5
    zr = (z.float() + 0.5 * torch.randn(z.shape)).to(dtype)
    out = cpu.row_forward(z, y, it, IGN, STAT_ALL, zr)
    assert out.shape == (N_OUT, N) and out.dtype == torch.float32
    assert_fwd(out, ref_forward(z, y, it, zr=zr), STAT_ALL, kl=True)
    out0 = cpu.row_forward(z, y, it, IGN, 0)
    torch.testing.assert_close(out0[:2], out[:2], rtol=1e-6, atol=1e-6)

    lse, lo, H, rlse, kl = out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], out[OUT_REF_LSE], out[OUT_KL]
    c, e, k = torch.randn(N), torch.randn(N), torch.randn(N)
    for kw in (dict(), dict(e=e), dict(e=e, k=k)):
        ref = ref_backward(z, y, it, lse, H, c, ignore=IGN, zr=zr, rlse=rlse, kl=kl, lse_lo=lo, **kw)
        args = (y, it, lse, lo, H, c, kw.get("e"), IGN)
        kl_kw = dict(grad_kl=k, ref_logits=zr, ref_lse=rlse, kl=kl) if "k" in kw else {}
        g = cpu.row_backward(z, *args, False, **kl_kw)
        assert g.shape == z.shape and g.dtype == dtype and g.is_contiguous()
        assert_grad(_rows(g), ref, dtype)
        w = torch.empty_strided(z.shape, z.stride(), dtype=dtype).copy_(z)  # same layout as z
        assert cpu.row_backward(w, *args, True, **kl_kw) is w
        assert torch.equal(w, g), "in place must equal the fresh gradient"


def test_inplace_on_strided_view_writes_only_the_view():
    base = make((2, 9, 700), torch.float32)
    orig = base.clone()
    z = base[:, :-1]
    N = 16
    y = rand_labels(N, 700)
    it = torch.ones(N)
    out = cpu.row_forward(z, y, it, IGN, 0)
    g = cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_LSE], torch.ones(N), None, IGN, False)
    r = cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_LSE], torch.ones(N), None, IGN, True)
    assert r is z and r.data_ptr() == base.data_ptr()
    assert torch.equal(base[:, :-1], g)
    assert torch.equal(base[:, -1], orig[:, -1]), "rows outside the view are untouched"


def test_inplace_refuses_overlapping_rows():
    z = torch.randn(1, 50).expand(4, 50)
    y = torch.zeros(4, dtype=torch.long)
    out = cpu.row_forward(z, y, torch.ones(4), IGN, 0)  # reading is fine
    with pytest.raises(RuntimeError, match="overlap"):
        cpu.row_backward(z, y, torch.ones(4), out[OUT_LSE], out[OUT_LSE_LO], out[1], torch.ones(4), None, IGN, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ignored_rows_are_zero_everywhere(dtype):
    z = make((6, 3000), dtype)
    y = torch.tensor([IGN, 5, IGN, 0, 2999, IGN])
    it = torch.ones(6)
    out = cpu.row_forward(z, y, it, IGN, STAT_ALL, z.flip(-1))
    assert (out[:, y == IGN] == 0).all()
    w = z.clone()
    cpu.row_backward(w, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[2], torch.ones(6), torch.ones(6), IGN, True)
    assert (w[y == IGN] == 0).all() and (w[y != IGN] != 0).any()
    # another ignore index
    out7 = cpu.row_forward(z, torch.full((6,), 7), it, 7, NOKL)
    assert (out7 == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_entries(dtype):
    V = 3 * CHUNK + 11
    z = make((5, V), dtype)
    z[0, ::3] = -math.inf  # masked entries
    z[1, : 2 * CHUNK] = -math.inf  # whole leading chunks
    z[2, 1:] = -math.inf  # a single finite entry
    z[3, :] = -math.inf  # nothing finite: NaN log-probs
    y = torch.tensor([0, 5, 0, 1, 7])  # rows 0, 1: the label itself is -inf
    it = torch.ones(5)
    zr = make((5, V), dtype)
    zr[4, 100] = -math.inf  # q = 0 where p > 0: KL = inf
    out = cpu.row_forward(z, y, it, IGN, STAT_ALL, zr)
    ref = ref_forward(z, y, it, zr=zr)
    assert_fwd(out, ref, STAT_ALL, kl=True)
    assert out[OUT_LOGP, 0] == -math.inf and out[OUT_LOGP, 1] == -math.inf
    assert out[OUT_LOGP, 2] == 0 and out[OUT_ENTROPY, 2] == 0
    assert math.isnan(out[OUT_LOGP, 3]) and out[OUT_LSE, 3] == -math.inf
    assert out[OUT_MEAN, 0] == -math.inf and out[OUT_KL, 4] == math.inf
    assert torch.isfinite(out[OUT_ENTROPY, :3]).all()

    c, e = torch.randn(5), torch.randn(5)
    fin = [0, 1, 2, 4]
    g = cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], c, e, IGN, False)
    ref_g = ref_backward(z, y, it, out[OUT_LSE], out[OUT_ENTROPY], c, e, lse_lo=out[OUT_LSE_LO])
    assert_grad(g[fin], ref_g[fin], dtype)
    assert torch.isnan(g[3]).all()  # NaN row in, NaN gradient row out
    masked = torch.isneginf(z) & (torch.arange(V) != y[:, None])
    assert (g[fin][masked[fin]] == 0).all(), "p = 0 entries get exactly 0, no NaN from 0 * inf"
    assert g[0, 0].float() == c[0].to(dtype).float()  # a -inf label: c * (1 - 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_rows_stay_local(dtype):
    z = make((5, 5000), dtype)
    z[1, 4321] = math.nan
    z[2, 17] = math.inf
    z[3, 0] = math.inf
    z[3, 1] = -math.inf
    y = torch.tensor([1, 2, 3, 4, 5])
    it = torch.ones(5)
    out = cpu.row_forward(z, y, it, IGN, STAT_ALL, z.roll(1, 0))
    ref = ref_forward(z, y, it, zr=z.roll(1, 0))
    for r in (1, 2, 3):
        assert math.isnan(out[OUT_LOGP, r]) and math.isnan(out[OUT_LSE, r])
        assert math.isnan(out[OUT_ENTROPY, r])
    assert_fwd(out[:, [0, 4]], ref[:, [0, 4]], STAT_ALL & ~STAT_MEAN)
    g = cpu.row_backward(
        z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], torch.ones(5), torch.ones(5), IGN, False
    )
    assert torch.isnan(g[1:4]).all() and torch.isfinite(g[[0, 4]]).all()


def test_large_magnitudes():
    # 1e4 logits: fp32 ulp ~1e-3, log-probs must still be accurate (no x_y - lse cancellation)
    z = torch.randn(4, 9000) * 1e4
    y = torch.randint(0, 9000, (4,))
    y[0] = int(z[0].argmax())
    it = torch.ones(4)
    out = cpu.row_forward(z, y, it, IGN, NOKL)
    ref = ref_forward(z, y, it)
    assert_fwd(out, ref, STAT_ALL, rtol=1e-5, atol=1e-4)
    c = torch.randn(4)
    g = cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], c, c, IGN, False)
    assert_grad(g, ref_backward(z, y, it, out[OUT_LSE], out[OUT_ENTROPY], c, c, lse_lo=out[OUT_LSE_LO]), torch.float32)
    # beyond 2^64 the rows take the exact double path
    zh = torch.randn(3, 3000)
    zh[0, 5] = 1e30
    zh[1, 7] = -1e30
    zh[2] *= 1e25
    outh = cpu.row_forward(zh, torch.tensor([5, 7, 9]), torch.ones(3), IGN, NOKL)
    refh = ref_forward(zh, torch.tensor([5, 7, 9]), torch.ones(3))
    assert_fwd(outh, refh, STAT_ALL, rtol=1e-5, atol=1e-4)
    assert outh[OUT_LOGP, 0] == 0 and outh[OUT_LOGP, 1] == zh[1, 7]
    # finite values near -FLT_MAX overflow float partial sums: the mean is still finite
    zm = torch.randn(2, 5000)
    zm[0, 10:12] = -3e38
    zm[1, 3] = -math.inf
    outm = cpu.row_forward(zm, torch.tensor([0, 1]), torch.ones(2), IGN, STAT_MEAN)
    torch.testing.assert_close(outm[OUT_MEAN].double(), zm.double().mean(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_labels_are_safe(dtype):
    V = 1000
    z = make((4, V), dtype)
    y = torch.tensor([V, -5, 2**40, 3])
    it = torch.ones(4)
    out = cpu.row_forward(z, y, it, IGN, NOKL)
    ref = ref_forward(z, y, it)
    assert torch.isnan(out[OUT_LOGP, :3]).all() and (out[OUT_ARGMAX, :3] == 0).all()
    assert_fwd(out, ref, STAT_ALL)  # every other statistic as usual
    c = torch.randn(4)
    g = cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_LSE], c, None, IGN, False)
    ref = ref_backward(z, y, it, out[OUT_LSE], out[OUT_LSE], c, lse_lo=out[OUT_LSE_LO])
    assert_grad(g, ref, dtype)  # no one-hot term


@pytest.mark.parametrize("which", ["logp", "entropy", "kl"])
def test_confident_rows_keep_gradient_precision(which):
    # p_y ~ 1 - 1e-5: c (1 - p_y) and the entropy terms are small differences of O(1) terms
    N, V = 4, 5000
    z = torch.randn(N, V)
    y = torch.randint(0, V, (N,))
    z[torch.arange(N), y] = 16.0
    zr = z + 0.1 * torch.randn(N, V)
    it = torch.ones(N)
    out = cpu.row_forward(z, y, it, IGN, STAT_ENTROPY | STAT_KL, zr)
    c, e, k = torch.randn(N), (torch.randn(N) if which != "logp" else None), (torch.randn(N) if which == "kl" else None)
    kl_kw = dict(grad_kl=k, ref_logits=zr, ref_lse=out[OUT_REF_LSE], kl=out[OUT_KL]) if k is not None else {}
    g = cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], c, e, IGN, False, **kl_kw)
    ref = ref_backward(
        z,
        y,
        it,
        out[OUT_LSE],
        out[OUT_ENTROPY],
        c,
        e,
        zr=zr,
        k=k,
        rlse=out[OUT_REF_LSE],
        kl=out[OUT_KL],
        lse_lo=out[OUT_LSE_LO],
    )
    for r in range(N):  # each row against its own scale
        scale = ref[r].abs().max().item()
        torch.testing.assert_close(g[r].double(), ref[r], rtol=2e-5, atol=1e-6 * scale)


def test_argmax_is_the_first_index_of_the_max():
    V = 40 * CHUNK  # long enough for a single row to be split across threads
    pairs = [(3, 9), (10, CHUNK + 1), (CHUNK - 1, V // 2 + 5), (0, V - 1)]
    z = torch.randn(len(pairs), V)
    for r, (a, b) in enumerate(pairs):
        z[r, a] = z[r, b] = 50.0
    first = torch.tensor([a for a, _ in pairs])
    second = torch.tensor([b for _, b in pairs])
    one = torch.ones(1)
    for r in range(len(pairs)):
        for rows in (z, z[r : r + 1]):  # all rows, or one row alone (split into segments)
            sel = slice(None) if rows is z else slice(r, r + 1)
            n = rows.shape[0]
            assert (
                cpu.row_forward(rows, first[sel], one.expand(n).contiguous(), IGN, STAT_ARGMAX)[OUT_ARGMAX] == 1
            ).all()
            assert (
                cpu.row_forward(rows, second[sel], one.expand(n).contiguous(), IGN, STAT_ARGMAX)[OUT_ARGMAX] == 0
            ).all()


def test_max_jumps_late_in_the_row():
    # the running reference is raised when a later chunk's max is far above it
    z = torch.randn(3, 6 * CHUNK) * 0.1
    z[0, 5 * CHUNK + 3] = 80.0
    z[1, ::CHUNK] = torch.arange(6.0) * 35
    z[2, -1] = 200.0
    y = torch.tensor([0, 5 * CHUNK, 17])
    zr = z.flip(0).clone()
    out = cpu.row_forward(z, y, torch.ones(3), IGN, STAT_ALL, zr)
    assert_fwd(out, ref_forward(z, y, torch.ones(3), zr=zr), STAT_ALL, kl=True)


# ----------------------------------------------------------------------------- > 2^31 elements


@pytest.mark.slow
def test_more_than_2_31_elements_bf16():
    N, V = 17, 2**27  # 2.28e9 elements (4.6 GB of bf16): row 16 starts at element 2^31
    B = 1 << 20
    gen = torch.Generator().manual_seed(1)
    blocks = (torch.randn(4, B, generator=gen) * 2).to(torch.bfloat16)
    spike = [(r * 7919 + 12345) % V for r in range(N)]
    SPIKE = 16.0  # above the largest of 2^20 samples of N(0, 4)
    z = torch.empty(N, V, dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=gen)
    y[-1] = V - 1
    y[0] = spike[0]
    for r in range(N):  # cheap fill: a random block tiled V / B times, plus one spike per row
        z[r].view(V // B, B).copy_(blocks[r % 4])
        z[r, spike[r]] = SPIKE
    it = torch.ones(N)
    check = [0, N // 2, N - 1]
    cols = {
        r: torch.cat([torch.arange(0, 4096), torch.arange(V - 4096, V), y[r : r + 1], torch.tensor([spike[r]])])
        for r in check
    }
    saved = {r: z[r, cols[r]].clone() for r in check}

    out = cpu.row_forward(z, y, it, IGN, STAT_ENTROPY | STAT_ARGMAX)
    for r in check:
        # fp64 reference from the structure of the row: the block V / B times, one entry replaced
        b = blocks[r % 4].double()
        old = b[spike[r] % B]
        s = (V // B) * b.exp().sum() - old.exp() + math.exp(SPIKE)
        sx = (V // B) * (b.exp() * b).sum() - old.exp() * old + math.exp(SPIKE) * SPIKE
        lse = s.log()
        ent = lse - sx / s
        logp = z[r, y[r]].double() - lse
        torch.testing.assert_close(
            out[[OUT_LSE, OUT_LOGP, OUT_ENTROPY], r].double(), torch.stack([lse, logp, ent]), rtol=2e-5, atol=2e-5
        )
        assert out[OUT_ARGMAX, r] == float(y[r] == spike[r])
    assert out[OUT_ARGMAX, 0] == 1

    c = torch.full((N,), -1.0)
    cpu.row_backward(z, y, it, out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY], c, None, IGN, True)
    for r in check:  # a slice of each row, including the label and the spike
        # (the reference sees only these columns, so give it no label and add the one-hot term)
        ref_g = ref_backward(
            saved[r][None],
            torch.tensor([IGN + 1]),
            it[:1],
            out[OUT_LSE, r : r + 1],
            out[OUT_ENTROPY, r : r + 1],
            c[:1],
            lse_lo=out[OUT_LSE_LO, r : r + 1],
        )
        ref_g[0, cols[r] == y[r]] += c[r].double()
        assert_grad(z[r, cols[r]][None], ref_g, torch.bfloat16)
