"""Bad input to token_logprobs: a clear ValueError/TypeError naming the argument, raised
before any kernel runs; backend selection by argument and PREFOPT_BACKEND."""

import pytest
import torch

BAD = (ValueError, TypeError)
V = 50


def tl(*args, **kwargs):
    import prefopt_fast

    return prefopt_fast.token_logprobs(*args, **kwargs)


def _inputs(dtype=torch.float32):
    return torch.randn(3, 4, V, dtype=dtype), torch.randint(0, V, (3, 4))


# ------------------------------------------------------------------------- labels


@pytest.mark.parametrize("bad", [V, V + 7, -1, -101, 2**40])
def test_label_out_of_range(backend, bad):
    z, y = _inputs()
    y[1, 2] = bad
    with pytest.raises(ValueError, match="labels") as e:
        tl(z, y, backend=backend)
    assert str(V) in str(e.value), "the message should give the vocabulary size"


def test_label_equal_default_ignore_index_is_not_out_of_range_with_custom_ignore_index(backend):
    z, y = _inputs()
    y[0, 0] = -100  # not the ignore_index any more
    with pytest.raises(ValueError, match="labels"):
        tl(z, y, ignore_index=-1, backend=backend)
    y[0, 0] = -1
    tl(z, y, ignore_index=-1, backend=backend)  # fine


@pytest.mark.parametrize("shape", [(3,), (3, 5), (4, 3), (3, 4, 1), ()])
def test_labels_shape_mismatch(shape):
    z, _ = _inputs()
    y = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        tl(z, y)


def test_labels_broadcastable_is_still_an_error():
    """labels must be exactly logits.shape[:-1], not merely broadcastable to it."""
    z, _ = _inputs()
    with pytest.raises(ValueError, match="labels"):
        tl(z, torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bool, torch.complex64])
def test_labels_non_integer_dtype(dtype):
    z, y = _inputs()
    with pytest.raises(TypeError, match="labels"):
        tl(z, y.to(dtype))


def test_labels_not_a_tensor():
    z, y = _inputs()
    with pytest.raises(TypeError, match="labels"):
        tl(z, y.tolist())


def test_int32_labels_accepted():
    z, y = _inputs()
    a = tl(z, y.to(torch.int32))
    b = tl(z, y)
    torch.testing.assert_close(a, b)


def test_labels_on_another_device():
    z, y = _inputs()
    with pytest.raises(ValueError, match="labels") as e:
        tl(z, y.to("meta"))
    assert "device" in str(e.value)


# ------------------------------------------------------------------------- logits


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_logits_non_float_dtype(dtype):
    z, y = _inputs()
    with pytest.raises(TypeError, match="logits"):
        tl(z.to(dtype), y)


def test_logits_not_a_tensor():
    z, y = _inputs()
    with pytest.raises(TypeError, match="logits"):
        tl(z.tolist(), y)


def test_logits_0d():
    with pytest.raises(ValueError, match="logits"):
        tl(torch.tensor(1.0), torch.tensor(0))


def test_logits_empty_vocabulary():
    with pytest.raises(ValueError, match="logits"):
        tl(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("how", ["transpose", "step2", "permute"])
def test_non_unit_last_stride(how):
    if how == "transpose":
        z = torch.randn(3, V, 4).transpose(-1, -2)  # [3, 4, V], last stride 4
    elif how == "step2":
        z = torch.randn(3, 4, 2 * V)[..., ::2]
    else:
        z = torch.randn(V, 3, 4).permute(1, 2, 0)
    y = torch.randint(0, V, (3, 4))
    with pytest.raises(ValueError, match="logits") as e:
        tl(z, y)
    assert "stride" in str(e.value)


def test_fp64_logits_on_native_backends_rejected(backends):
    """The spec's dtypes are fp32/bf16/fp16; fp64 is an extension of the torch backend
    (for gradcheck). A native backend asked for fp64 explicitly must refuse clearly."""
    z, y = _inputs(torch.float64)
    for name in backends:
        if name == "torch":
            assert tl(z, y, backend="torch").dtype == torch.float64
            continue
        with pytest.raises((ValueError, RuntimeError), match=name):
            tl(z, y, backend=name)


# -------------------------------------------------------------------- temperature


@pytest.mark.parametrize("t", [0.0, -1.0, -0.0, float("nan"), float("inf"), float("-inf")])
def test_bad_float_temperature(t):
    z, y = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        tl(z, y, temperature=t)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_tensor_temperature(t):
    z, y = _inputs()
    temp = torch.rand(3, 4) + 0.5
    temp[2, 1] = t
    with pytest.raises(ValueError, match="temperature"):
        tl(z, y, temperature=temp)
    temp = torch.full((3, 1), 0.7)
    temp[0, 0] = t
    with pytest.raises(ValueError, match="temperature"):
        tl(z, y, temperature=temp)


def test_bad_temperature_in_an_ignored_row_is_still_an_error():
    """Validation does not depend on which rows are ignored."""
    z, y = _inputs()
    y[0, 0] = -100
    temp = torch.ones(3, 4)
    temp[0, 0] = -1.0
    with pytest.raises(ValueError, match="temperature"):
        tl(z, y, temperature=temp)


@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (3, 4, 2), (2, 1)])
def test_temperature_not_broadcastable(shape):
    z, y = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        tl(z, y, temperature=torch.ones(shape))


@pytest.mark.parametrize("t", ["1.0", None, [1.0], torch.ones(3, 4, dtype=torch.long)])
def test_temperature_wrong_type(t):
    z, y = _inputs()
    with pytest.raises(BAD, match="temperature"):
        tl(z, y, temperature=t)


def test_temperature_on_another_device():
    z, y = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        tl(z, y, temperature=torch.ones(3, 4, device="meta"))


# ------------------------------------------------------------------ other arguments


@pytest.mark.parametrize("stats", [("entropie",), ("entropy", "kl_div"), ("logprobs",), "bogus"])
def test_unknown_stat(stats):
    z, y = _inputs()
    with pytest.raises(ValueError, match="stats"):
        tl(z, y, stats=stats)


@pytest.mark.parametrize("ii", [-100.0, "x", None])
def test_ignore_index_not_an_int(ii):
    z, y = _inputs()
    with pytest.raises(TypeError, match="ignore_index"):
        tl(z, y, ignore_index=ii)


# ------------------------------------------------------------------------ backends


@pytest.mark.parametrize("name", ["nope", "CPU", "Torch", ""])
def test_unknown_backend_name(name):
    z, y = _inputs()
    with pytest.raises(ValueError, match="backend"):
        tl(z, y, backend=name)


def test_backend_not_a_string():
    z, y = _inputs()
    with pytest.raises(BAD, match="backend"):
        tl(z, y, backend=1)


def test_explicit_backend_that_cannot_serve(backends):
    """cuda on CPU tensors (or when not built), and a native backend on fp64 logits."""
    z, y = _inputs()
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        tl(z, y, backend="cuda")
    if "cpu" in backends:
        with pytest.raises((ValueError, RuntimeError), match="cpu"):
            tl(z.double(), y, backend="cpu")


def _spy(monkeypatch, name):
    """Record calls to backend ``name``'s row_forward (the documented backend interface)."""
    import importlib

    mod = importlib.import_module(f"prefopt_fast.backends.{'torch_backend' if name == 'torch' else name}")
    calls = []
    orig = mod.row_forward

    def row_forward(*a, **k):
        calls.append(name)
        return orig(*a, **k)

    monkeypatch.setattr(mod, "row_forward", row_forward)
    return calls


def test_prefopt_backend_env_selects_auto(backend, monkeypatch):
    calls = _spy(monkeypatch, backend)
    monkeypatch.setenv("PREFOPT_BACKEND", backend)
    z, y = _inputs()
    tl(z, y)  # backend="auto"
    assert calls == [backend], f"PREFOPT_BACKEND={backend} not respected"


def test_explicit_backend_beats_env(backends, monkeypatch):
    calls = _spy(monkeypatch, "torch")
    other = [b for b in backends if b != "torch"]
    monkeypatch.setenv("PREFOPT_BACKEND", other[0] if other else "torch")
    z, y = _inputs()
    tl(z, y, backend="torch")
    assert calls == ["torch"]


@pytest.mark.parametrize("value", ["nope", "TORCH", "cuda:0"])
def test_prefopt_backend_env_invalid(monkeypatch, value):
    monkeypatch.setenv("PREFOPT_BACKEND", value)
    z, y = _inputs()
    with pytest.raises(ValueError, match="PREFOPT_BACKEND"):
        tl(z, y)


def test_prefopt_backend_env_unavailable(monkeypatch, backends):
    if "cuda" in backends:
        pytest.skip("cuda is available here")
    monkeypatch.setenv("PREFOPT_BACKEND", "cuda")
    z, y = _inputs()
    with pytest.raises((ValueError, RuntimeError), match="PREFOPT_BACKEND"):
        tl(z, y)


def test_prefopt_backend_env_auto_and_empty(monkeypatch):
    z, y = _inputs()
    ref = tl(z, y)
    for v in ("auto", ""):
        monkeypatch.setenv("PREFOPT_BACKEND", v)
        torch.testing.assert_close(tl(z, y), ref)


def test_available_backends_lists_torch():
    import prefopt_fast

    names = prefopt_fast.available_backends()
    assert isinstance(names, list) and "torch" in names
    assert set(names) <= {"torch", "cpu", "triton", "cuda"}


# ------------------------------------------------------------- in-place backward


def test_rows_disjoint_matches_a_brute_force_check():
    from prefopt_fast._rows import rows_disjoint

    base = torch.arange(2 * 3 * 40, dtype=torch.float32)
    views = [
        base.view(6, 40),
        base.view(2, 3, 40)[:, :-1],
        base.view(2, 3, 40)[:, 1:, 5:30],
        base.view(2, 3, 40).transpose(0, 1),
        base.view(6, 40)[:, :20],
        base[:40].expand(3, 40),
        base.as_strided((5, 10), (8, 1)),
        base.as_strided((3, 2, 10), (10, 30, 1)),
        base.as_strided((4, 1, 10), (0, 7, 1)),
        base.as_strided((0, 10), (0, 1)),
        base.view(6, 40).flip(0),
    ]
    for v in views:
        idx = torch.as_strided(torch.arange(base.numel()), v.shape, v.stride(), v.storage_offset()).reshape(-1)
        assert rows_disjoint(v) == (idx.unique().numel() == idx.numel()), (tuple(v.shape), v.stride())
    # a sufficient test: interleaved disjoint rows are refused (conservatively)
    assert not rows_disjoint(base.as_strided((3, 2, 10), (20, 30, 1)))


def test_inplace_backward_on_overlapping_rows_is_refused_before_any_kernel(backend, monkeypatch):
    import importlib

    mod = importlib.import_module(f"prefopt_fast.backends.{'torch_backend' if backend == 'torch' else backend}")
    calls = []
    orig = mod.row_forward
    monkeypatch.setattr(mod, "row_forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    z = torch.randn(1, V).expand(4, V)
    with pytest.raises(ValueError, match="inplace_backward.*overlap"):
        tl(z, torch.randint(0, V, (4,)), inplace_backward=True, backend=backend)
    assert not calls
    tl(z, torch.randint(0, V, (4,)), backend=backend)  # reading such rows is fine
    assert calls
