"""Fused-linear log-probs and losses against the naive path, on every backend available here.

The reference (prefopt_fast.reference) materializes the logits in fp64 from the SAME
(possibly bf16) inputs upcast exactly, then log_softmax + gather + autograd. fp32 inputs: the fused path differs only by
fp32 rounding of the GEMM and the row kernels. bf16 inputs: the chunk logits are rounded
to bf16 after the GEMM (what the lm_head of a bf16 model produces), i.e. an absolute error
of about |z| * 2^-8 per logit, and the gradients come back in bf16; the tolerances below
scale with that. Gradients are compared by relative Frobenius error, per tensor.

Sizes stay tiny for the triton backend, which runs under the interpreter on CPU.
"""

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefopt_fast.ops.linear_logprobs as LL
import prefopt_fast.reference as R
from prefopt_fast import logits_dpo_loss, ppo_loss
from prefopt_fast.linear import (
    LinearDPOLoss,
    LinearPPOLoss,
    LinearSequenceLogProbs,
    linear_dpo_loss,
    linear_ppo_loss,
    linear_sequence_logprobs,
    linear_token_logprobs,
)

IGN = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (logp / stat atol, gradient relative error) per dtype
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (6e-2, 3e-2)}


@pytest.fixture(autouse=True)
def narrow_vocab_blocks(request, monkeypatch):
    """Let the tiny test vocabularies split into several backward blocks (the default floor of
    256 columns would keep them whole), except under the slow Triton interpreter."""
    params = getattr(request.node, "callspec", None)
    if params is None or params.params.get("backend") != "triton":
        monkeypatch.setattr(LL, "MIN_VOCAB_BLOCK", 1)


# ----------------------------------------------------------------------------- reference


def ref_logits(h, w, *, bias=None, lora=None, logit_scale=1.0, softcap=None):
    """The transformed logits (before temperature), fp64, differentiable w.r.t. every input."""
    return R.linear_logits(h, w, bias, lora=lora, logit_scale=logit_scale, softcap=softcap)


def ref_stats(z, y, temperature=1.0, ignore_index=IGN):
    """logp, entropy, log_sum_sq_probs, mean_logit, is_argmax of fp64 logits z [..., V]."""
    st = R.token_stats(z, y, ignore_index=ignore_index, temperature=temperature)
    return tuple(st[k] for k in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit", "is_argmax"))


def make(B=2, T=7, H=16, V=50, dtype=torch.float32, *, bias=False, lora_r=0, ignore=True, seed=0, wscale=0.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * wscale).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        y[0, :3] = IGN  # a prompt
        y[-1, -1] = IGN  # padding
    out = dict(h=h, w=w, y=y)
    if bias:
        out["b"] = torch.randn(V, generator=g).to(dtype)
    if lora_r:
        out["A"] = (torch.randn(lora_r, H, generator=g) * 0.3).to(dtype)
        out["Bm"] = (torch.randn(V, lora_r, generator=g) * 0.3).to(dtype)
    return out


def _leaves(d, names):
    return {k: d[k].clone().requires_grad_(True) for k in names if k in d}


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _assert_grads(got, want, tol, what=""):
    for k in want:
        assert got[k] is not None, f"{what} no gradient for {k}"
        err = _rel(got[k], want[k])
        assert err < tol, f"{what} grad {k}: relative error {err:.3g} >= {tol}"


CONFIGS = {
    "plain": dict(),
    "bias+scale": dict(bias=True, logit_scale=0.7),
    "softcap": dict(bias=True, logit_scale=1.3, softcap=2.5),
    "lora": dict(lora_r=3, logit_scale=1.2),
    "lora+softcap": dict(lora_r=3, softcap=3.0, bias=True),
}


def _run_case(backend, dtype, cfg, *, temperature=1.0, chunk_size=3, stats=("entropy",), V=50, seed=0):
    cfg = dict(cfg)
    logit_scale, softcap = cfg.pop("logit_scale", 1.0), cfg.pop("softcap", None)
    d = make(dtype=dtype, V=V, seed=seed, **cfg)
    names = ("h", "w", "b", "A", "Bm")
    ours, ref = _leaves(d, names), _leaves(d, names)
    lora = (ours["A"], ours["Bm"], 0.5) if "A" in ours else None
    out = linear_token_logprobs(
        ours["h"],
        ours["w"],
        d["y"],
        bias=ours.get("b"),
        lora=lora,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        stats=stats,
        chunk_size=chunk_size,
        backend=backend,
    )
    z = ref_logits(
        ref["h"],
        ref["w"],
        bias=ref.get("b"),
        lora=(ref["A"], ref["Bm"], 0.5) if "A" in ref else None,
        logit_scale=logit_scale,
        softcap=softcap,
    )
    r = ref_stats(z, d["y"], temperature)
    g = torch.Generator().manual_seed(1)
    c, e = torch.randn(d["y"].shape, generator=g), torch.randn(d["y"].shape, generator=g)
    loss = (out.logprobs * c).sum() + (out.entropy * e).sum() if stats else (out * c).sum()
    loss.backward()
    rloss = (r[0] * c).sum() + (r[1] * e).sum() if stats else (r[0] * c).sum()
    rloss.backward()
    return d, out, r, {k: v.grad for k, v in ours.items()}, {k: v.grad for k, v in ref.items()}, z


# ----------------------------------------------------------------------------- token log-probs vs naive


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_naive(backend, dtype, config):
    dt = DTYPES[dtype]
    temperature = 0.8 if config != "plain" else 1.0
    d, out, r, got, want, z = _run_case(backend, dt, CONFIGS[config], temperature=temperature)
    atol, gtol = TOL[dt]
    scale = max(1.0, z.abs().max().item()) if dt != torch.float32 else 1.0
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == d["y"].shape
    torch.testing.assert_close(out.logprobs.double(), r[0], atol=atol * scale, rtol=0)
    torch.testing.assert_close(out.entropy.double(), r[1], atol=atol * scale, rtol=0)
    assert (out.logprobs[d["y"] == IGN] == 0).all() and (out.entropy[d["y"] == IGN] == 0).all()
    _assert_grads(got, want, gtol, f"{backend}/{dtype}/{config}")


def test_per_token_and_per_sequence_temperature(backend):
    for temp in (torch.rand(2, 7) + 0.5, torch.tensor([[0.7], [1.6]])):
        d, out, r, got, want, _ = _run_case(backend, torch.float32, CONFIGS["bias+scale"], temperature=temp)
        torch.testing.assert_close(out.logprobs.double(), r[0], atol=2e-5, rtol=0)
        torch.testing.assert_close(out.entropy.double(), r[1], atol=2e-5, rtol=0)
        _assert_grads(got, want, 2e-5)


def test_all_stats_match_naive(backend):
    stats = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
    d = make(bias=True)
    # put some labels on the row argmax so is_argmax is exercised both ways
    z = ref_logits(d["h"], d["w"], bias=d["b"], logit_scale=1.1, softcap=4.0)
    d["y"][1, :4] = z[1, :4].argmax(-1)
    out = linear_token_logprobs(
        d["h"],
        d["w"],
        d["y"],
        bias=d["b"],
        logit_scale=1.1,
        softcap=4.0,
        temperature=0.9,
        stats=stats,
        chunk_size=4,
        backend=backend,
    )
    r = ref_stats(z, d["y"], 0.9)
    for got, want in zip(out[:4], r[:4]):
        torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=0)
    assert out.is_argmax.dtype == torch.bool and torch.equal(out.is_argmax, r[4])
    assert out.is_argmax.any() and out.kl is None


def test_stats_subset_and_plain_return(backend):
    d = make()
    lp = linear_token_logprobs(d["h"], d["w"], d["y"], backend=backend)
    assert isinstance(lp, torch.Tensor) and lp.shape == d["y"].shape
    out = linear_token_logprobs(d["h"], d["w"], d["y"], stats=("mean_logit",), backend=backend)
    assert out.entropy is None and out.mean_logit is not None and out.is_argmax is None
    torch.testing.assert_close(out.logprobs, lp)


# ----------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_chunk_boundaries_and_token_tiles(backend, dtype, monkeypatch):
    """Chunks that split sequences, one-token chunks, many vocabulary blocks and several token
    tiles (the weight-gradient accumulator path) all give the same answer."""
    dt = DTYPES[dtype]
    atol, gtol = TOL[dt]
    d = make(dtype=dt, bias=True, lora_r=2, V=70)
    y = d["y"]
    results = []
    configs = ((None, 4096), (1, 4096), (5, 4096), (3, 4), (100, 5))
    if backend == "triton":  # the tiling is backend-independent; the interpreter is slow per tile
        configs = ((None, 4096), (3, 4))
        monkeypatch.setattr(LL, "MIN_VOCAB_BLOCK", 16)
    for chunk, tile in configs:
        monkeypatch.setattr(LL, "TOKEN_TILE", tile)
        leaves = _leaves(d, ("h", "w", "b", "A", "Bm"))
        out = linear_token_logprobs(
            leaves["h"],
            leaves["w"],
            y,
            bias=leaves["b"],
            lora=(leaves["A"], leaves["Bm"], 2.0),
            stats=("entropy",),
            chunk_size=chunk,
            backend=backend,
        )
        (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
        results.append((out, {k: v.grad for k, v in leaves.items()}))
    base_out, base_g = results[0]
    for out, g in results[1:]:
        torch.testing.assert_close(out.logprobs, base_out.logprobs, atol=atol * 4, rtol=0)
        _assert_grads(g, base_g, gtol * 2 if dt == torch.float32 else gtol)


def test_backward_plan(monkeypatch):
    monkeypatch.setattr(LL, "MIN_VOCAB_BLOCK", 256)
    cfg = LL._Cfg(1.0, 1.0, None, 0, 1, "torch")
    assert LL._backward_plan(64, 1000, 4, cfg, False, True, True) == ("tiles", 64, 256)  # the floor
    monkeypatch.setattr(LL, "MIN_VOCAB_BLOCK", 1)
    cfg = LL._Cfg(1.0, 1.0, None, 0, 8, "torch")
    # one token tile, several vocabulary blocks of the byte budget (8 rows of logits)
    assert LL._backward_plan(64, 1000, 4, cfg, False, True, True) == ("tiles", 64, 125)
    # the softcap's second buffer halves the block
    soft = LL._Cfg(1.0, 1.0, 3.0, 0, 8, "torch")
    assert LL._backward_plan(64, 1000, 4, soft, False, True, True) == ("tiles", 64, 62)
    # half precision without an fp32-output GEMM: two passes, blocks of all tokens / rows of the whole vocabulary
    assert LL._backward_plan(64, 1000, 2, cfg, True, True, True) == ("two-pass", 8, 125)
    # ... unless nothing needs summing across tiles (the whole vocabulary fits one block)
    assert LL._backward_plan(8, 1000, 2, cfg, True, True, True) == ("tiles", 8, 1000)
    # a frozen head: only the hidden gradient, summed over blocks
    assert LL._backward_plan(64, 1000, 2, cfg, True, True, False)[0] == "two-pass"
    # only the weight gradient, one token tile: each block is one GEMM already
    assert LL._backward_plan(64, 1000, 2, cfg, True, False, True) == ("tiles", 64, 125)


def test_default_chunk_size_rule():
    # 1/16 of the logits, clamped to [16 MiB, 256 MiB]
    V = 128256
    assert LL.default_chunk_size(2048, V, torch.float32) == (2048 * V * 4 // 16) // (V * 4)
    assert LL.default_chunk_size(10**6, V, torch.bfloat16) == (256 << 20) // (V * 2)
    assert LL.default_chunk_size(100, 1000, torch.float32) == 100  # under 16 MiB: one chunk
    assert LL.default_chunk_size(100, V, torch.float32) == (16 << 20) // (V * 4)
    assert LL.default_chunk_size(0, V, torch.float32) == 1


# ----------------------------------------------------------------------------- ignored rows


def test_all_ignored_sequence_and_batch(backend):
    d = make(bias=True)
    y = d["y"].clone()
    y[1] = IGN  # a whole sequence
    for labels in (y, torch.full_like(y, IGN)):
        leaves = _leaves(d, ("h", "w", "b"))
        out = linear_token_logprobs(
            leaves["h"], leaves["w"], labels, bias=leaves["b"], stats=("entropy",), chunk_size=2, backend=backend
        )
        assert torch.isfinite(out.logprobs).all()
        assert (out.logprobs[labels == IGN] == 0).all() and (out.entropy[labels == IGN] == 0).all()
        (out.logprobs.sum() + out.entropy.sum()).backward()
        gh = leaves["h"].grad
        assert gh is not None and (gh[labels == IGN] == 0).all()
        if (labels == IGN).all():
            assert (leaves["w"].grad == 0).all() and (leaves["b"].grad == 0).all()
        else:
            ref = _leaves(d, ("h", "w", "b"))
            r = ref_stats(ref_logits(ref["h"], ref["w"], bias=ref["b"]), labels)
            (r[0].sum() + r[1].sum()).backward()
            _assert_grads({k: v.grad for k, v in leaves.items()}, {k: v.grad for k, v in ref.items()}, 2e-5)


# ----------------------------------------------------------------------------- no wasted GEMMs


class GemmLog(TorchDispatchMode):
    """Records (op, output shape, output dtype, operand shapes) of every matmul-family op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "matmul", "bmm", "baddbmm", "linear"):
            res = out if isinstance(out, torch.Tensor) else None
            if res is not None:
                shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
                self.calls.append((name, tuple(res.shape), res.dtype, shapes))
        return out


def test_frozen_weight_runs_no_weight_gemm(backend):
    d = make(H=24, V=50, bias=True)
    M = int((d["y"] != IGN).sum())
    h = d["h"].clone().requires_grad_(True)
    w, b = d["w"], d["b"]  # frozen head (requires_grad False)
    for chunk in (None, 3):  # one vocabulary block, several (of 15 columns: no shape collides with M = 10)
        h.grad = None
        with GemmLog() as log:
            out = linear_token_logprobs(h, w, d["y"], bias=b, chunk_size=chunk, backend=backend)
            out.sum().backward()
        assert h.grad is not None and w.grad is None and b.grad is None
        # every GEMM with H columns is a hidden-gradient one ([M, H]); none produces [V or block, H]
        h_cols = [c for c in log.calls if c[1][-1] == 24]
        assert h_cols and all(c[1][0] == M for c in h_cols), log.calls


def test_frozen_hidden_and_lora_on_frozen_head(backend):
    d = make(H=24, V=50, lora_r=3)
    M = int((d["y"] != IGN).sum())
    w = d["w"].clone().requires_grad_(True)
    with GemmLog() as log:
        linear_token_logprobs(d["h"], w, d["y"], chunk_size=3, backend=backend).sum().backward()
    assert w.grad is not None
    assert not [c for c in log.calls if c[1] == (M, 24)], "a hidden-gradient GEMM ran for a frozen hidden"

    # the usual LoRA setup: frozen weight, trainable A and B (and hidden)
    leaves = _leaves(d, ("h", "A", "Bm"))
    ref = _leaves(d, ("h", "A", "Bm"))
    with GemmLog() as log:
        out = linear_token_logprobs(
            leaves["h"],
            d["w"],
            d["y"],
            lora=(leaves["A"], leaves["Bm"], 0.7),
            stats=("entropy",),
            chunk_size=3,
            backend=backend,
        )
        (out.logprobs.sum() - out.entropy.sum()).backward()
    assert not [c for c in log.calls if c[1] == (50, 24) or (c[1][-1] == 24 and c[1][0] not in (M, 3))]
    r = ref_stats(ref_logits(ref["h"], d["w"], lora=(ref["A"], ref["Bm"], 0.7)), d["y"])
    (r[0].sum() - r[1].sum()).backward()
    _assert_grads({k: v.grad for k, v in leaves.items()}, {k: v.grad for k, v in ref.items()}, 2e-5)


@pytest.mark.parametrize("trainable", ["all", "head", "hidden"])
def test_bf16_gradients_never_sum_rounded_products(backend, monkeypatch, trainable):
    """Many vocabulary blocks and token tiles in bf16: every gradient GEMM either writes an fp32
    accumulator (fp32-output GEMM) or produces a complete result in one call; on the CPU
    (no fp32-output bf16 GEMM) the backward takes two passes and no product is summed."""
    if backend == "triton":
        pytest.skip("backend-independent tiling; hundreds of tiles are too slow for the Triton interpreter")
    monkeypatch.setattr(LL, "TOKEN_TILE", 4)
    d = make(dtype=torch.bfloat16, V=64, H=24, bias=True, lora_r=2)
    names = {"all": ("h", "w", "b", "A", "Bm"), "head": ("w", "b"), "hidden": ("h", "A", "Bm")}[trainable]
    leaves = _leaves(d, names)
    args = {k: leaves.get(k, d[k]) for k in ("h", "w", "b", "A", "Bm")}
    with GemmLog() as log:
        out = linear_token_logprobs(
            args["h"],
            args["w"],
            d["y"],
            bias=args["b"],
            lora=(args["A"], args["Bm"], 0.5),
            stats=("entropy",),
            chunk_size=1,
            backend=backend,
        )
        (out.logprobs.sum() + out.entropy.sum()).backward()
    # gradient GEMMs have H = 24 or r = 2 columns (the logits' LoRA term has a vocabulary block's)
    grad_acc = [c for c in log.calls if c[0].startswith("addmm") and c[1][-1] in (24, 2)]
    assert not [c for c in grad_acc if c[2] == torch.bfloat16], grad_acc
    if not LL._fp32_out_mm(torch.device("cpu")):
        # no fp32 GEMMs on upcast copies either, only the final [M, H] += grad_u @ A of LoRA
        assert [c for c in grad_acc if c[1] != (10, 24)] == [], grad_acc
    for k, v in leaves.items():
        assert v.grad.dtype == torch.bfloat16, k
    ref = _leaves(d, names)
    rargs = {k: ref.get(k, d[k]) for k in ("h", "w", "b", "A", "Bm")}
    r = ref_stats(ref_logits(rargs["h"], rargs["w"], bias=rargs["b"], lora=(rargs["A"], rargs["Bm"], 0.5)), d["y"])
    (r[0].sum() + r[1].sum()).backward()
    _assert_grads({k: v.grad for k, v in leaves.items()}, {k: v.grad for k, v in ref.items()}, 3e-2)


# ----------------------------------------------------------------------------- memory


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live storages created by ops inside the region.

    Every op output whose storage was not seen before is counted at its storage size and
    uncounted when the last tensor viewing it is freed (weakref finalizers; with PyObject
    preservation a tensor's Python object lives as long as its TensorImpl, including inside
    the autograd graph). Views, in-place and ``out=`` results share an input's storage and
    add nothing (views of tensors made before the region, such as weight slices, are not
    counted). Covers every aten / custom op, so any [N, V] tensor anywhere shows up.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.biggest = 0
        self.refs = {}

    def _drop(self, key, nbytes):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, (tuple, list)):
                inputs += [x for x in a if isinstance(x, torch.Tensor)]
        seen_in = {a.untyped_storage().data_ptr() for a in inputs}
        for t in outs:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or (key in seen_in and key not in self.refs):
                continue  # a view of / in-place result on memory allocated before the region
            if key not in self.refs:
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.biggest = max(self.biggest, nbytes)
            self.refs[key] += 1
            weakref.finalize(t, self._drop, key, nbytes)
        return out


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logits_are_never_materialized(backend, dtype):
    if backend == "triton":
        pytest.skip("sizes too large for the Triton interpreter; the memory rule is backend-independent")
    dt = DTYPES[dtype]
    B, T, H, V = 4, 128, 32, 4096
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, H, generator=g).to(dt).requires_grad_(True)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dt).requires_grad_(True)
    y = torch.randint(0, V, (B, T), generator=g)
    N, item = B * T, h.element_size()
    logits_bytes = N * V * 4
    chunk = 16
    with LiveBytes() as mem:
        out = linear_token_logprobs(h, w, y, stats=("entropy",), chunk_size=chunk, backend=backend)
        (out.logprobs.sum() + out.entropy.sum()).backward()
    # what the op may hold at once: one chunk (x3 for fp32 copies of a half tile on CPU),
    # the gradients and their fp32 accumulators, O(N) vectors and O(N * H) copies
    grads = (N * H + V * H) * (item + 4)
    bound = 3 * chunk * V * 4 + grads + 64 * N * 8 + 4 * N * H * 4 + (1 << 16)
    assert mem.peak < bound, (mem.peak, bound)
    assert mem.peak < logits_bytes / 4, (mem.peak, logits_bytes)
    assert mem.biggest < N * V * item / 8, mem.biggest
    # the naive path on the same inputs does allocate the logits (the probe sees them)
    with LiveBytes() as naive:
        torch.log_softmax((h @ w.t()).float(), -1).gather(-1, y.unsqueeze(-1)).sum().backward()
    assert naive.biggest >= N * V * item


# ----------------------------------------------------------------------------- TRL's fused head


def test_matches_trl_chunked_logprob_function(backend):
    trl_kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    fn = trl_kernels.ChunkedLogProbFunction
    d = make(bias=True, ignore=False, V=64)
    stats = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
    z = ref_logits(d["h"], d["w"], bias=d["b"], logit_scale=1.2, softcap=3.0)
    d["y"][0, :3] = z[0, :3].argmax(-1)
    a, b = _leaves(d, ("h", "w", "b")), _leaves(d, ("h", "w", "b"))
    H = d["h"].shape[-1]
    trl_out = fn.apply(
        a["h"].reshape(-1, H),
        a["w"],
        a["b"],
        d["y"].reshape(-1),
        0.9,
        16,
        3.0,
        1.2,
        ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
    )
    ours = linear_token_logprobs(
        b["h"],
        b["w"],
        d["y"],
        bias=b["b"],
        temperature=0.9,
        logit_scale=1.2,
        softcap=3.0,
        stats=stats,
        chunk_size=5,
        backend=backend,
    )
    for got, want in zip(ours[:4], trl_out[:4]):
        torch.testing.assert_close(got.reshape(-1), want, atol=3e-5, rtol=1e-5)
    assert torch.equal(ours.is_argmax.reshape(-1), trl_out[4]) and trl_out[4].any()
    c = torch.randn(d["y"].numel())
    (trl_out[0] * c + trl_out[1]).sum().backward()
    (ours.logprobs.reshape(-1) * c + ours.entropy.reshape(-1)).sum().backward()
    _assert_grads({k: v.grad for k, v in b.items()}, {k: v.grad for k, v in a.items()}, 3e-5)


# ----------------------------------------------------------------------------- sequences, DPO, PPO


def _materialized(d, *, bias=None, lora=None, logit_scale=1.0, softcap=None):
    z = d["h"] @ d["w"].t()
    if bias is not None:
        z = z + bias
    if lora is not None:
        z = z + lora[2] * (d["h"] @ lora[0].t()) @ lora[1].t()
    z = z * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def test_sequence_logprobs_padded_and_packed(backend):
    d = make(bias=True)
    h, w, y = d["h"], d["w"], d["y"]
    for average in (False, True):
        got = linear_sequence_logprobs(
            h, w, y, bias=d["b"], average=average, softcap=5.0, chunk_size=4, backend=backend
        )
        r = ref_stats(ref_logits(h, w, bias=d["b"], softcap=5.0), y)[0]
        n = (y != IGN).sum(-1).clamp(min=1)
        want = r.sum(-1) / (n if average else 1)
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=0)
    cu = torch.tensor([0, 7, 14])
    packed = linear_sequence_logprobs(
        h.reshape(14, -1), w, y.reshape(14), bias=d["b"], cu_seqlens=cu, softcap=5.0, chunk_size=4, backend=backend
    )
    torch.testing.assert_close(
        packed, linear_sequence_logprobs(h, w, y, bias=d["b"], softcap=5.0, backend=backend), atol=2e-5, rtol=0
    )
    mod = LinearSequenceLogProbs(average=True, softcap=5.0, chunk_size=4, backend=backend)
    torch.testing.assert_close(
        mod(h, w, y, bias=d["b"]),
        linear_sequence_logprobs(h, w, y, bias=d["b"], softcap=5.0, average=True, backend=backend),
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["sigmoid", "sft"]])
def test_dpo_equals_logits_dpo_on_materialized_logits(backend, loss_type):
    if backend == "triton" and loss_type != "sigmoid":
        pytest.skip("the loss head is backend-independent; one loss type is enough under the interpreter")
    d = make(B=4, T=6, bias=True, lora_r=2)
    ref_h = d["h"] + 0.1 * torch.randn_like(d["h"])
    kw = dict(logit_scale=0.9, softcap=4.0)
    a, b = _leaves(d, ("h", "w", "b", "A", "Bm")), _leaves(d, ("h", "w", "b", "A", "Bm"))
    loss, met = linear_dpo_loss(
        a["h"],
        a["w"],
        d["y"],
        bias=a["b"],
        lora=(a["A"], a["Bm"], 0.5),
        ref_hidden=ref_h,
        ref_weight=d["w"],
        ref_bias=d["b"],
        beta=0.2,
        loss_type=loss_type,
        temperature=1.1,
        chunk_size=5,
        backend=backend,
        **kw,
    )
    logits = _materialized(dict(h=b["h"], w=b["w"]), bias=b["b"], lora=(b["A"], b["Bm"], 0.5), **kw)
    ref_logits_ = _materialized(dict(h=ref_h, w=d["w"]), bias=d["b"], **kw)
    loss2, met2 = logits_dpo_loss(
        logits, d["y"], ref_logits=ref_logits_, beta=0.2, loss_type=loss_type, temperature=1.1, backend=backend
    )
    torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5)
    assert met.keys() == met2.keys()
    for k in met:
        torch.testing.assert_close(met[k], met2[k], atol=2e-5, rtol=1e-5)
    loss.backward()
    loss2.backward()
    _assert_grads({k: v.grad for k, v in a.items()}, {k: v.grad for k, v in b.items()}, 2e-5)

    # module, precomputed reference log-probs, packed layout
    mod = LinearDPOLoss(beta=0.2, loss_type=loss_type, temperature=1.1, chunk_size=5, backend=backend, **kw)
    ref_logps = linear_sequence_logprobs(ref_h, d["w"], d["y"], bias=d["b"], temperature=1.1, backend=backend, **kw)
    rc, rr = ref_logps[:2], ref_logps[2:]
    loss3, _ = mod(
        d["h"].reshape(-1, d["h"].shape[-1]),
        d["w"],
        d["y"].reshape(-1),
        rc,
        rr,
        bias=d["b"],
        lora=(d["A"], d["Bm"], 0.5),
        cu_seqlens=torch.arange(0, 25, 6),
    )
    torch.testing.assert_close(loss3, loss.detach(), atol=1e-4, rtol=1e-4)


PPO_VARIANTS = {
    "default": dict(),
    "k3+entropy": dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_eps_high=0.28),
    "seq-dual": dict(loss_agg_mode="seq-mean-token-mean", dual_clip=3.0, kl_coef=0.05, kl_estimator="k1"),
    "gspo-mask": dict(importance_sampling_level="sequence", loss_mask=True, loss_agg_mode="seq-mean-token-sum"),
}


@pytest.mark.parametrize("variant", list(PPO_VARIANTS))
def test_ppo_equals_ppo_loss_on_materialized_logits(backend, variant):
    kw = dict(PPO_VARIANTS[variant])
    d = make(B=3, T=6, bias=True)
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(3, 6, generator=g) * 3
    adv = torch.randn(3, generator=g)
    if kw.pop("loss_mask", False):
        kw["loss_mask"] = torch.rand(3, 6, generator=g) > 0.3
    if kw.get("kl_coef"):
        kw["ref_logps"] = -torch.rand(3, 6, generator=g) * 3
    tkw = dict(temperature=0.9)
    a, b = _leaves(d, ("h", "w", "b")), _leaves(d, ("h", "w", "b"))
    loss, met = linear_ppo_loss(
        a["h"], a["w"], d["y"], old, adv, bias=a["b"], softcap=6.0, chunk_size=4, backend=backend, **tkw, **kw
    )
    logits = _materialized(dict(h=b["h"], w=b["w"]), bias=b["b"], softcap=6.0)
    loss2, met2 = ppo_loss(logits, d["y"], old, adv, backend=backend, **tkw, **kw)
    torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5)
    assert met.keys() == met2.keys()
    for k in met:
        torch.testing.assert_close(met[k], met2[k], atol=1e-5, rtol=1e-5)
    loss.backward()
    loss2.backward()
    _assert_grads({k: v.grad for k, v in a.items()}, {k: v.grad for k, v in b.items()}, 3e-5)


def test_ppo_module_matches_function(backend):
    d = make(B=3, T=6)
    old, adv = -torch.rand(3, 6), torch.randn(3, 6)
    mod = LinearPPOLoss(clip_eps_low=0.1, entropy_coef=0.01, softcap=6.0, chunk_size=3, backend=backend)
    loss, _ = mod(d["h"], d["w"], d["y"], old, adv)
    loss2, _ = linear_ppo_loss(
        d["h"], d["w"], d["y"], old, adv, clip_eps_low=0.1, entropy_coef=0.01, softcap=6.0, backend=backend
    )
    torch.testing.assert_close(loss, loss2)
    assert "softcap=6.0" in repr(mod)


def test_ppo_exact_kl_from_the_reference_head(backend):
    """kl_estimator="full" reads the reference head (ref_hidden, ref_weight, ref_bias) and equals
    ppo_loss with the materialized reference logits, loss, metrics and gradients."""
    d = make(B=3, T=6, bias=True)
    g = torch.Generator().manual_seed(9)
    old, adv = -torch.rand(3, 6, generator=g) * 3, torch.randn(3, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    rh = torch.randn(3, 6, 12, generator=g)
    rw = torch.randn(d["w"].shape[0], 12, generator=g) / 2
    rb = torch.randn(d["w"].shape[0], generator=g)
    kw = dict(kl_coef=0.1, kl_estimator="full", entropy_coef=0.01, loss_mask=mask, temperature=0.9)
    a, b = _leaves(d, ("h", "w", "b")), _leaves(d, ("h", "w", "b"))
    mod = LinearPPOLoss(softcap=6.0, chunk_size=4, backend=backend, **{k: v for k, v in kw.items() if k != "loss_mask"})
    loss, met = mod(
        a["h"], a["w"], d["y"], old, adv, bias=a["b"], loss_mask=mask, ref_hidden=rh, ref_weight=rw, ref_bias=rb
    )
    logits = _materialized(dict(h=b["h"], w=b["w"]), bias=b["b"], softcap=6.0)
    ref_logits = _materialized(dict(h=rh, w=rw), bias=rb, softcap=6.0)
    loss2, met2 = ppo_loss(logits, d["y"], old, adv, ref_logits=ref_logits, backend=backend, **kw)
    torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5)
    for k in met:
        torch.testing.assert_close(met[k], met2[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    loss.backward()
    loss2.backward()
    _assert_grads({k: v.grad for k, v in a.items()}, {k: v.grad for k, v in b.items()}, 3e-5)
    with pytest.raises(ValueError, match="needs ref_hidden and ref_weight"):
        linear_ppo_loss(d["h"], d["w"], d["y"], old, adv, kl_coef=0.1, kl_estimator="full", backend=backend)
    with pytest.raises(ValueError, match="ref_hidden is only used by"):
        linear_ppo_loss(d["h"], d["w"], d["y"], old, adv, kl_coef=0.1, ref_logps=old, ref_hidden=rh, ref_weight=rw)


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    d = make(bias=True, lora_r=2)
    h, w, y = d["h"], d["w"], d["y"]
    cases = [
        (dict(hidden=h.long()), TypeError, "hidden must be float32"),
        (dict(weight=w[:, :5]), ValueError, r"weight must have shape \[V, H\]"),
        (dict(weight=w.double()), TypeError, "weight must have the dtype of hidden"),
        (dict(labels=y[:, :3]), ValueError, "labels must have shape hidden.shape"),
        (dict(labels=y.float()), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.full_like(y, 50)), ValueError, r"labels must lie in \[0, 50\)"),
        (dict(bias=d["b"][:3]), ValueError, "bias must have shape"),
        (dict(lora=(d["A"], d["Bm"])), TypeError, "lora must be a tuple"),
        (dict(lora=(d["A"], d["Bm"][:3], 1.0)), ValueError, "lora B must have shape"),
        (dict(lora=(d["A"], d["Bm"], torch.tensor(1.0))), TypeError, "scaling"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(logit_scale=float("nan")), ValueError, "logit_scale"),
        (dict(logit_scale=-1.0), ValueError, "logit_scale must be a finite float > 0"),
        (dict(stats=("kl",)), ValueError, "needs the reference head"),
        (dict(stats=("nope",)), ValueError, "stats entries"),
        (dict(temperature=0.0), ValueError, "temperature"),
    ]
    for over, exc, msg in cases:
        kw = dict(hidden=h, weight=w, labels=y)
        kw.update(over)
        args = (kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"))
        with pytest.raises(exc, match=msg):
            linear_token_logprobs(*args, **kw)
    with pytest.raises(ValueError, match="ref_weight"):
        linear_dpo_loss(make(B=2)["h"], w, make(B=2)["y"], ref_hidden=make(B=2)["h"])


def test_nan_hidden_row_stays_nan(backend):
    d = make()
    d["h"][1, 2, 0] = float("nan")
    out = linear_token_logprobs(d["h"], d["w"], d["y"], chunk_size=3, backend=backend)
    assert math.isnan(out[1, 2].item())
    assert torch.isfinite(out[0]).all()


def test_masked_vocabulary_with_neg_inf_bias(backend):
    """A bias of -inf over whole vocabulary blocks and scattered entries (a vocabulary mask):
    the merged per-block statistics match the fp64 reference, the gradient stays finite."""
    d = make(V=60, bias=True)
    b = d["b"].clone()
    b[20:45] = -math.inf  # covers whole backward / forward blocks at chunk_size=2
    b[3] = b[50] = -math.inf
    y = d["y"].clone()
    y = torch.where((y >= 20) & (y < 45) | (y == 3) | (y == 50), 7, y)
    stats = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
    leaves = _leaves(dict(h=d["h"], w=d["w"]), ("h", "w"))
    out = linear_token_logprobs(leaves["h"], leaves["w"], y, bias=b, stats=stats, chunk_size=2, backend=backend)
    ref = _leaves(dict(h=d["h"], w=d["w"]), ("h", "w"))
    want_lp, want_ent, want_lssp, _, want_argmax = ref_stats(ref_logits(ref["h"], ref["w"], bias=b), y)
    keep = y != IGN
    torch.testing.assert_close(out.logprobs.double(), want_lp, atol=3e-5, rtol=0)
    torch.testing.assert_close(out.entropy.double(), want_ent.detach(), atol=3e-5, rtol=0)
    torch.testing.assert_close(out.log_sum_sq_probs.double(), want_lssp.detach(), atol=3e-5, rtol=0)
    assert (out.mean_logit[keep] == -math.inf).all()
    assert torch.equal(out.is_argmax, want_argmax)
    (out.logprobs * 1.5).sum().backward()
    (want_lp * 1.5).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves.values())
    _assert_grads({k: v.grad for k, v in leaves.items()}, {k: v.grad for k, v in ref.items()}, 2e-5)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_fp32_precision_at_large_logits_matches_plain_pytorch(backend, offset):
    """Logits ~ offset + N(0, 4) over several vocabulary blocks: entropy, log-probs and gradients
    stay within 2x (+ a few ulps) of plain fp32 PyTorch's own error against fp64 (the rows are
    shifted before the kernels, so no fp32 lse of magnitude ~35 enters the merge or exp(x - lse))."""
    d = make(B=2, T=6, H=16, V=300 if backend == "triton" else 600, bias=True, ignore=False, wscale=0.5)
    b = d["b"] + offset
    leaves = _leaves(d, ("h", "w"))
    out = linear_token_logprobs(
        leaves["h"], leaves["w"], d["y"], bias=b, stats=("entropy",), chunk_size=1, backend=backend
    )
    g = torch.Generator().manual_seed(3)
    c, e = torch.randn(d["y"].shape, generator=g), torch.randn(d["y"].shape, generator=g)
    (out.logprobs * c + out.entropy * e).sum().backward()

    def stats_of(h, w, dt):  # the reference computed in dt (fp64: the reference, fp32: plain PyTorch)
        st = R.linear_token_stats(h, w, d["y"], bias=b, dtype=dt)
        return st["logprobs"], st["entropy"]

    ref, plain = _leaves(d, ("h", "w")), _leaves(d, ("h", "w"))
    r_lp, r_ent = stats_of(ref["h"], ref["w"], torch.float64)
    (r_lp * c + r_ent * e).sum().backward()
    p_lp, p_ent = stats_of(plain["h"], plain["w"], torch.float32)
    (p_lp * c + p_ent * e).sum().backward()
    floor = 8 * 2.0**-23 * (1 + offset)
    for got, pl, want in ((out.logprobs, p_lp, r_lp), (out.entropy, p_ent, r_ent)):
        err, perr = (got.double() - want).abs().max().item(), (pl.double() - want).abs().max().item()
        assert err <= 2 * perr + floor, (err, perr)
    for k in ("h", "w"):
        err, perr = _rel(leaves[k].grad, ref[k].grad), _rel(plain[k].grad, ref[k].grad)
        assert err <= 2 * perr + 1e-6, (k, err, perr)


# ------------------------------------------------ fused-linear twins of the reference-free heads

TWINS = [
    ("cpo", dict(loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.5)),
    ("cpo", dict(loss_type="simpo", beta=0.5, simpo_gamma=0.7, alpha=0.2)),
    ("cpo", dict(loss_type="ipo", cpo_alpha=0.0)),
    ("cpo", dict(loss_type="hinge", reduction="none")),
    ("simpo", dict()),
    ("simpo", dict(beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0, reduction="sum")),
    ("orpo", dict(beta=0.25)),
    ("orpo", dict(reduction="none")),
]
TWIN_MODULES = {"cpo": "LinearCPOLoss", "simpo": "LinearSimPOLoss", "orpo": "LinearORPOLoss"}


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
@pytest.mark.parametrize("head, cfg", TWINS, ids=[f"{h}-{i}" for i, (h, _) in enumerate(TWINS)])
def test_linear_twin_equals_head_on_materialized_logits(backend, head, cfg):
    """linear_<head>_loss == <head>_loss over sequence_logprobs of the materialized logits (fp32),
    forward, metrics and gradients of hidden, weight, bias and LoRA; the module gives the same."""
    import prefopt_fast as pf
    import prefopt_fast.linear as pfl

    d = make(B=4, T=6, bias=True, lora_r=2)
    lin = dict(logit_scale=0.9, softcap=4.0, temperature=1.1)
    a, b = _leaves(d, ("h", "w", "b", "A", "Bm")), _leaves(d, ("h", "w", "b", "A", "Bm"))
    loss, met = getattr(pfl, f"linear_{head}_loss")(
        a["h"], a["w"], d["y"], bias=a["b"], lora=(a["A"], a["Bm"], 0.5), chunk_size=5, backend=backend, **lin, **cfg
    )
    logits = _materialized(
        dict(h=b["h"], w=b["w"]), bias=b["b"], lora=(b["A"], b["Bm"], 0.5), logit_scale=0.9, softcap=4.0
    )
    sums = pf.sequence_logprobs(logits, d["y"], temperature=1.1, backend="torch")
    lengths = (d["y"] != IGN).sum(-1)
    loss2, met2 = getattr(pf, f"{head}_loss")(sums[:2], sums[2:], lengths[:2], lengths[2:], **cfg)
    assert loss.shape == loss2.shape == ((2,) if cfg.get("reduction") == "none" else ())
    torch.testing.assert_close(loss, loss2, atol=1e-5, rtol=1e-5)
    assert met.keys() == met2.keys()
    for k in met:
        torch.testing.assert_close(met[k], met2[k], atol=2e-5, rtol=1e-5)
    wts = torch.tensor([0.7, -1.3]) if loss.dim() else torch.tensor(1.0)
    (loss * wts).sum().backward()
    (loss2 * wts).sum().backward()
    _assert_grads({k: v.grad for k, v in a.items()}, {k: v.grad for k, v in b.items()}, 2e-5)

    mod = getattr(pfl, TWIN_MODULES[head])(chunk_size=5, backend=backend, **lin, **cfg)
    loss3, _ = mod(d["h"], d["w"], d["y"], bias=d["b"], lora=(d["A"], d["Bm"], 0.5))
    torch.testing.assert_close(loss3, loss.detach(), atol=1e-6, rtol=1e-6)


def test_linear_twins_packed_equal_padded():
    import prefopt_fast.linear as pfl

    d = make(B=4, T=6, ignore=False)
    H = d["h"].shape[-1]
    cu = torch.arange(0, 4 * 6 + 1, 6)
    for fn in (pfl.linear_cpo_loss, pfl.linear_simpo_loss, pfl.linear_orpo_loss):
        padded, _ = fn(d["h"], d["w"], d["y"], backend="torch")
        packed, _ = fn(d["h"].reshape(-1, H), d["w"], d["y"].reshape(-1), cu_seqlens=cu, backend="torch")
        torch.testing.assert_close(packed, padded, atol=1e-6, rtol=1e-6)


def test_linear_twin_modules_validate_once():
    import prefopt_fast.linear as pfl

    m = pfl.LinearSimPOLoss(beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0, softcap=30.0)
    assert (m.beta, m.simpo_gamma, m.cpo_alpha, m.loss_type) == (2.0, 1.0, 0.0, "simpo")
    assert "simpo_gamma=1.0" in repr(m) and "softcap=30.0" in repr(m)
    with pytest.raises(ValueError, match="beta"):
        pfl.LinearORPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        pfl.LinearCPOLoss(loss_type="dpo")
    with pytest.raises(ValueError, match="reduction"):
        pfl.LinearCPOLoss(reduction="avg")


# ------------------------------------------------------------- average=True, reduction="none"


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_pair_logprobs_average(backend):
    """average=True gives per-length means, as sequence_logprobs(average=True), the reference's too."""
    import prefopt_fast as pf
    import prefopt_fast.linear as pfl

    d = make(B=4, T=6, bias=True)
    ref_h = d["h"] + 0.1 * torch.randn_like(d["h"])
    got = pfl.linear_pair_logprobs(
        d["h"], d["w"], d["y"], bias=d["b"], ref_hidden=ref_h, ref_weight=d["w"], average=True, backend=backend
    )
    pol = pfl.linear_sequence_logprobs(d["h"], d["w"], d["y"], bias=d["b"], average=True, backend=backend)
    ref = pfl.linear_sequence_logprobs(ref_h, d["w"], d["y"], average=True, backend=backend)
    torch.testing.assert_close(torch.cat([got["chosen_logps"], got["rejected_logps"]]), pol)
    torch.testing.assert_close(torch.cat([got["ref_chosen_logps"], got["ref_rejected_logps"]]), ref)
    torch.testing.assert_close(torch.cat([got["chosen_lengths"], got["rejected_lengths"]]), (d["y"] != IGN).sum(-1))

    z, zr = _materialized(d, bias=d["b"]), _materialized(dict(h=ref_h, w=d["w"]))
    got = pf.pair_logprobs(z, d["y"], ref_logits=zr, average=True, backend=backend)
    torch.testing.assert_close(
        torch.cat([got["chosen_logps"], got["rejected_logps"]]),
        pf.sequence_logprobs(z, d["y"], average=True, backend=backend),
    )
    torch.testing.assert_close(
        torch.cat([got["ref_chosen_logps"], got["ref_rejected_logps"]]),
        pf.sequence_logprobs(zr, d["y"], average=True, backend=backend),
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"], indirect=True)
def test_dpo_losses_average_and_reduction(backend):
    """logits_dpo_loss / linear_dpo_loss (and modules) with average=True, reduction="none" ==
    dpo_loss over the averaged sequence log-probs; average=True is refused with the loss types
    that divide by the lengths themselves, naming the argument."""
    import prefopt_fast as pf
    import prefopt_fast.linear as pfl

    d = make(B=4, T=6)
    ref_h = d["h"] + 0.1 * torch.randn_like(d["h"])
    z, zr = _materialized(d), _materialized(dict(h=ref_h, w=d["w"]))
    avg = pf.sequence_logprobs(z, d["y"], average=True, backend=backend)
    ravg = pf.sequence_logprobs(zr, d["y"], average=True, backend=backend)
    want, _ = pf.dpo_loss(avg[:2], avg[2:], ravg[:2], ravg[2:], beta=0.3, reduction="none")
    kw = dict(beta=0.3, reduction="none", average=True, backend=backend)
    outs = [
        pf.logits_dpo_loss(z, d["y"], ref_logits=zr, **kw)[0],
        pf.LogitsDPOLoss(**kw)(z, d["y"], ref_logits=zr)[0],
        pfl.linear_dpo_loss(d["h"], d["w"], d["y"], ref_hidden=ref_h, ref_weight=d["w"], **kw)[0],
        pfl.LinearDPOLoss(**kw)(d["h"], d["w"], d["y"], ref_hidden=ref_h, ref_weight=d["w"])[0],
    ]
    for got in outs:
        assert got.shape == (2,)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for bad in ("ipo", ["sigmoid", "sigmoid_norm"], "sft"):
        with pytest.raises(ValueError, match="average"):
            pf.logits_dpo_loss(z, d["y"], average=True, loss_type=bad)
        with pytest.raises(ValueError, match="average"):
            pfl.linear_dpo_loss(d["h"], d["w"], d["y"], average=True, loss_type=bad)
        with pytest.raises(ValueError, match="average"):
            pfl.LinearDPOLoss(loss_type=bad, average=True)
        with pytest.raises(ValueError, match="average"):
            pf.LogitsDPOLoss(loss_type=bad, average=True)


def test_linear_dpo_module_keeps_the_callers_loss_type():
    assert LinearDPOLoss(loss_type="hinge").loss_type == "hinge"
    assert LinearDPOLoss(loss_type=["sigmoid", "sft"]).loss_type == ["sigmoid", "sft"]


def test_old_names_warn():
    """The renamed public names import for one release, with a DeprecationWarning naming the new one."""
    import prefopt_fast as pf
    import prefopt_fast.linear as pfl

    renamed = [
        (pf, "pair_logps", "pair_logprobs"),
        (pf, "linear_pair_logps", "linear_pair_logprobs"),
        (pf, "fused_dpo_loss", "logits_dpo_loss"),
        (pf, "FusedDPOLoss", "LogitsDPOLoss"),
        (pfl, "linear_pair_logps", "linear_pair_logprobs"),
    ]
    for mod, old, new in renamed:
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(mod, old) is getattr(mod, new)
        assert old not in mod.__all__ and new in mod.__all__
