"""The CUDA row kernels' own code (csrc/cuda/*_kernel.cuh), compiled for the host with a
thread emulation of CUDA blocks (tests/cuda_emulation/), against an fp64 reference.

No GPU needed: this is how the kernels' logic (vector/scalar load paths, alignment
heads and tails, per-thread online logsumexp, block merges, the argmax, KL, non-finite
rows, in-place writes, the grid-stride loop) is checked on machines without one. The
device-only parts (the fast exp, the real hardware) are covered by tests/test_cuda_backend.py
on a GPU. Shapes stay small: every emulated thread is a host thread.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
import emulated  # noqa: E402
from reference import (  # noqa: E402
    DTYPES,
    IGN,
    assert_forward,
    assert_grad,
    make,
    ref_backward,
    ref_forward,
    special_labels,
    special_rows,
)

from prefopt_fast._rows import (  # noqa: E402
    OUT_ENTROPY,
    OUT_KL,
    OUT_LSE,
    OUT_LSE_LO,
    OUT_MEAN,
    OUT_REF_LSE,
    STAT_ALL,
    STAT_ENTROPY,
    STAT_KL,
    STAT_MEAN,
)

pytestmark = pytest.mark.skipif(emulated.compiler() is None, reason="no host C++ compiler")

NOKL = STAT_ALL & ~STAT_KL


@pytest.fixture(scope="module", autouse=True)
def _built():
    emulated.library()  # compile once (cached under build/cuda_emulation/)


# name -> (logits factory(dtype), launch overrides)
SHAPES = {
    # odd V: every row starts at another offset mod 16 bytes (all head lengths), two lead dims
    "causal view, V=1001": (lambda dt: make((3, 5, 1001), dt)[:, :-1], {}),
    "V=1": (lambda dt: make((5, 1), dt), {}),
    "V=7 (less than a vector)": (lambda dt: make((4, 7), dt), {}),
    "V=2051, 128 threads, fewer blocks than rows": (lambda dt: make((7, 2051), dt), {"blocks": 3}),
    "V=8200, 256 threads, transposed rows": (lambda dt: make((2, 2, 8200), dt).transpose(0, 1), {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_shapes(shape, dtype):
    make_z, launch = SHAPES[shape]
    z = make_z(dtype)
    N, V = z.numel() // z.shape[-1], z.shape[-1]
    y = torch.randint(0, V, (N,))
    y[N // 2] = IGN
    it = torch.rand(N) + 0.5
    ref = ref_forward(z, y, it)
    for stats in (0, STAT_ENTROPY, NOKL):  # the three non-KL kernel variants
        out = emulated.row_forward(z, y, it, IGN, stats, **launch)
        assert_forward(out, ref, stats, what=f"stats={stats}")
        assert not out.isnan().any(), "every output row is written (0 where not requested)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_kl_misaligned_reference(dtype):
    # the reference rows start at another offset mod 16 bytes than the policy rows for
    # most rows (scalar path) and at the same one for others (vector path)
    zb = make((3, 6, 333), dtype)
    z, zr = zb[:, :-1], make((3, 6, 333), dtype)[:, 1:]
    N, V = 15, 333
    y = torch.randint(0, V, (N,))
    y[4] = IGN
    y[7] = V + 3
    it = torch.rand(N) + 0.5
    ref = ref_forward(z, y, it, zr=zr)
    for stats in (STAT_KL, STAT_KL | STAT_ENTROPY, STAT_ALL):
        assert_forward(emulated.row_forward(z, y, it, IGN, stats, zr), ref, stats, what=f"stats={stats}")
    # aligned reference (vector path for both)
    zr2 = make((3, 6, 333), dtype)[:, :-1]
    assert_forward(emulated.row_forward(z, y, it, IGN, STAT_ALL, zr2), ref_forward(z, y, it, zr=zr2), STAT_ALL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [40, 3001])
def test_forward_special_rows(V, dtype):
    z = special_rows(dtype, V)
    y = special_labels(V)
    it = torch.ones(len(y))
    it[5] = 0.7
    zr = special_rows(dtype, V, big=1e30 if dtype != torch.float16 else 6e4).flip(0)
    ref = ref_forward(z, y, it, zr=zr)
    out = emulated.row_forward(z, y, it, IGN, STAT_ALL, zr)
    tol = 1e-4 if dtype == torch.float32 else 3e-4  # rows 4 and 10 are far from unit scale
    assert_forward(out, ref, STAT_ALL & ~STAT_MEAN, rtol=tol, atol=tol)
    # the mean of a row holding +-3e38 cancels: fp32 sums are exact to ~1e-7 of the largest term
    scale = z.float().abs().nan_to_num(0, 0, 0).amax(-1).double() * 1e-6 + 1e-6
    diff = (out[OUT_MEAN].double() - ref[OUT_MEAN]).abs()
    same = (out[OUT_MEAN].double() == ref[OUT_MEAN]) | (out[OUT_MEAN].isnan() & ref[OUT_MEAN].isnan())
    assert (same | (diff <= scale)).all(), (out[OUT_MEAN], ref[OUT_MEAN])


def test_forward_ignored_rows_are_not_read_and_zero():
    z = make((6, 50), torch.float32)
    z[[1, 4]] = float("nan")  # ignored: must not leak into anything
    y = torch.tensor([3, IGN, 7, 0, IGN, 49])
    out = emulated.row_forward(z, y, torch.ones(6), IGN, STAT_ALL, z.flip(0))
    assert (out[:, [1, 4]] == 0).all()
    assert torch.isfinite(out[:2][:, [0, 2, 3, 5]]).all()


def _backward_case(dtype, z, y, it, mode, zr=None):
    N = y.numel()
    out = ref_forward(z, y, it, zr=zr).float()
    lse, lo, H = out[OUT_LSE], out[OUT_LSE_LO], out[OUT_ENTROPY]
    c = torch.randn(N)
    e = torch.randn(N) if mode != "plain" else None
    k = torch.randn(N) if mode == "kl" else None
    kw = {}
    if mode == "kl":
        kw = dict(grad_kl=k, ref_logits=zr, ref_lse=out[OUT_REF_LSE], kl=out[OUT_KL])
    ref = ref_backward(z, y, it, lse, H, c, e, zr=zr, k=k, rlse=kw.get("ref_lse"), kl=kw.get("kl"), lse_lo=lo)
    return (lse, lo, H if e is not None else lse, c, e), kw, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "entropy", "kl"])
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_backward(mode, inplace, dtype):
    z = make((3, 5, 1001), dtype)[:, :-1]  # unaligned rows; fresh gradient rows at n * V
    zr = make((3, 5, 1001), dtype)[:, 1:]
    N, V = 12, 1001
    y = torch.randint(0, V, (N,))
    y[2] = IGN
    y[9] = -5  # out of range: no one-hot term
    it = torch.rand(N) + 0.5
    (lse, lo, H, c, e), kw, ref = _backward_case(dtype, z, y, it, mode, zr if mode == "kl" else None)
    zin = z.clone() if inplace else z
    z_before = z.clone()
    g = emulated.row_backward(zin, y, it, lse, lo, H, c, e, IGN, inplace, **kw, blocks=5)
    assert_grad(g, ref, dtype, what=f"{mode} inplace={inplace}")
    if inplace:
        assert g is zin
    else:
        assert g.is_contiguous() and torch.equal(
            z.view(torch.int16 if dtype != torch.float32 else torch.int32),
            z_before.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [8, 9000])
def test_backward_aligned_shapes(V, dtype):
    z = make((4, V), dtype)
    N = 4
    y = torch.randint(0, V, (N,))
    it = torch.rand(N) + 0.5
    (lse, lo, H, c, e), kw, ref = _backward_case(dtype, z, y, it, "entropy")
    for inplace in (False, True):
        g = emulated.row_backward(z.clone() if inplace else z, y, it, lse, lo, H, c, e, IGN, inplace)
        assert_grad(g, ref, dtype, what=f"inplace={inplace}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_special_rows(dtype):
    V = 40
    z = special_rows(dtype, V)
    y = special_labels(V)
    N = y.numel()
    it = torch.ones(N)
    zr = special_rows(dtype, V, big=1e30 if dtype != torch.float16 else 6e4).flip(0)
    (lse, lo, H, c, e), kw, ref = _backward_case(dtype, z, y, it, "kl", zr)
    c[6] = float("nan")  # NaN upstream gradient: a NaN row
    e[7] = float("inf")
    ref = ref_backward(z, y, it, lse, H, c, e, zr=zr, k=kw["grad_kl"], rlse=kw["ref_lse"], kl=kw["kl"], lse_lo=lo)
    for inplace in (False, True):
        g = emulated.row_backward(z.clone() if inplace else z, y, it, lse, lo, H, c, e, IGN, inplace, **kw)
        assert_grad(g, ref, dtype, what=f"inplace={inplace}")


def test_backward_ignored_rows_zero_without_reading():
    z = make((5, 37), torch.bfloat16)
    z[1] = float("nan")
    y = torch.tensor([1, IGN, 3, IGN, 0])
    lse = torch.logsumexp(z.float(), -1)
    g = emulated.row_backward(z, y, torch.ones(5), lse, torch.zeros(5), lse, torch.ones(5), None, IGN, False)
    assert (g[[1, 3]] == 0).all() and not g[[1, 3]].signbit().any()


@pytest.mark.parametrize("magnitude", [1e8, 1e30])
def test_backward_tied_maxima_at_huge_magnitudes(magnitude):
    """LSE + LSE_LO carry log V below ulp(max): p = 1/V for every tie, not 1 (fast path at
    1e8, the exact path beyond 2^64)."""
    V = 33
    z = torch.full((2, V), magnitude)
    y = torch.tensor([4, 0])
    out = emulated.row_forward(z, y, torch.ones(2), IGN, 0)
    g = emulated.row_backward(
        z, y, torch.ones(2), out[OUT_LSE], out[OUT_LSE_LO], out[OUT_LSE], torch.ones(2), None, IGN, False
    )
    expected = torch.full((2, V), -1.0 / V)
    expected[0, 4] += 1.0
    expected[1, 0] += 1.0
    torch.testing.assert_close(g, expected, atol=1e-6, rtol=1e-5)
