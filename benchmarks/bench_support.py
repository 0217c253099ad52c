"""What the thin op scripts share: input makers, byte/FLOP counts, presets, common providers,
and the pytest-benchmark glue (benchmarks/test_bench_*.py).

Two families of ops:

* logits ops (:func:`logits_op`): logits ``[B, T, V]`` (or packed ``[B * T, V]`` with
  ``cu_seqlens``) ~ N(0, 2^2) in the dtype, labels ``[B, T]`` uniform in ``[0, V)`` with the
  first ``prompt`` fraction of each sequence ignored (-100), optionally reference logits;
  the least traffic is one read of each logits tensor forward, and one read of each plus
  one write of the gradient backward (ignored rows: only the zero gradient written), and
  the least arithmetic one exp per logit of each tensor forward and one per logit backward;
* fused-linear ops (:func:`linear_op`): hidden ``[B, T, H]`` and the lm_head ``[V, H]``
  (both requiring grad), the same labels; the bound is the GEMM term (2 M H V forward,
  4 M H V backward, M = completion tokens).

Presets shared by every op of a family (an op may override): ``dry-run`` (tiny, one call
per phase), ``quick`` (tiny, so that every op fits in ``--quick``'s minute), ``default``
(the issues' target shapes) and ``full`` (a cross of a vocabulary sweep at a fixed token
count and a token sweep at V = 32000, so both plots have one line per provider).
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from benchmarks.cli import main, memory_guard
from benchmarks.measure import CaseRunner, available_memory, default_device
from benchmarks.spec import Case, OpSpec, Provider, availability, load_op, needs_cuda

IGN = -100
FULL_VOCABS = (32000, 128256, 256000)
# the backends with compiled kernels: --full sweeps of the secondary ops skip the pure-PyTorch
# fallback ("torch"), which takes seconds per step at V = 256000 on a small CPU
COMPILED = ("prefopt_fast.cpu", "prefopt_fast.triton", "prefopt_fast.cuda")


def itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _normal(t, std, g, device):
    return t.normal_(0.0, std, **({"generator": g} if device == "cpu" else {}))


def cross_shapes(make_shape, center: int, tokens=(), vocabs=FULL_VOCABS, base_vocab: int = 32000) -> list:
    """The --full grid: every V in ``vocabs`` at ``center`` tokens, plus every count in
    ``tokens`` at ``base_vocab`` (no full product: the sweep must fit in ~15 minutes)."""
    out = [make_shape(center, v) for v in vocabs]
    out += [make_shape(n, base_vocab) for n in tokens if make_shape(n, base_vocab) not in out]
    return out


# --------------------------------------------------------------------------- logits ops


@dataclasses.dataclass(frozen=True)
class LogitsLayout:
    """How a logits op's inputs look. ``prompt``: ignored fraction at the start of each
    sequence; ``ref_logits``: a second (reference) logits tensor, read but not differentiated;
    ``packed``: logits ``[B * T, V]`` with ``cu_seqlens`` (sequence lengths vary around T);
    ``extra(shape, generator) -> dict`` of small CPU tensors (old log-probs, advantages...)."""

    batch: int
    prompt: float = 0.0
    ref_logits: bool = False
    packed: bool = False
    extra: object = None
    small_per_token: int = 12  # int64 label + one fp32 per token in / out

    def make_shape(self, tokens: int, vocab: int) -> dict:
        if tokens % self.batch:
            raise ValueError(f"token count must be a multiple of {self.batch}, got {tokens}")
        return {"B": self.batch, "T": tokens // self.batch, "V": vocab}

    @staticmethod
    def tokens(shape) -> int:
        return shape["B"] * shape["T"]

    @staticmethod
    def vocab(shape) -> int:
        return shape["V"]

    def main_bytes(self, shape, dtype) -> int:
        """One logits tensor (the gradient has the same size)."""
        return self.tokens(shape) * shape["V"] * itemsize(dtype)

    def ignored_rows(self, shape) -> int:
        """Rows whose label is ignored (the first ``prompt`` fraction of each sequence)."""
        return shape["B"] * int(shape["T"] * self.prompt)

    def bytes_moved(self, shape, dtype) -> dict:
        """The least traffic, by access pattern (see calibration.traffic_parts). fwd reads every
        logits tensor once, rows with an ignored label excepted (their outputs are zeros: a
        kernel may skip them); bwd reads them again and writes the gradient (``rw``: each
        gradient element against one read of its logit; ``read``: a reference tensor) and
        writes zeros over the ignored rows (``write``). The per-token vectors count as read."""
        k = 2 if self.ref_logits else 1
        row = shape["V"] * itemsize(dtype)
        ign = self.ignored_rows(shape) * row
        act = self.main_bytes(shape, dtype) - ign
        small = self.tokens(shape) * self.small_per_token
        return {"fwd": {"read": k * act + small}, "bwd": {"read": (k - 1) * act + small, "rw": 2 * act, "write": ign}}

    def exps(self, shape, dtype) -> dict:
        """The exps the math needs at the least, on the rows with a label: forward, one per
        logit of each logits tensor (its log-sum-exp); backward, one per logit (the softmax
        probability p_v in the gradient; the reference's log q needs none)."""
        act = (self.tokens(shape) - self.ignored_rows(shape)) * shape["V"]
        return {"fwd": (2 if self.ref_logits else 1) * act, "bwd": act}

    def make_inputs(self, shape, dtype, device, seed=0) -> dict:
        g = torch.Generator(device="cpu").manual_seed(seed)
        b, t, v = shape["B"], shape["T"], shape["V"]
        lead = (b * t,) if self.packed else (b, t)
        logits = _normal(torch.empty(*lead, v, dtype=dtype, device=device), 2.0, g, device)
        labels = torch.randint(0, v, (b, t), generator=g)
        labels[:, : int(t * self.prompt)] = IGN
        out = {"logits": logits}
        if self.packed:  # lengths in [T/2, 3T/2), summing to B * T
            lens = torch.full((b,), t)
            if b > 1 and t > 1:
                d = torch.randint(0, max(1, t // 2), (b // 2,), generator=g)
                lens[: b // 2] -= d
                lens[b // 2 : 2 * (b // 2)] += d
            out["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)
            labels = labels.reshape(-1)
        out["labels"] = labels.to(device)
        if self.ref_logits:
            out["ref_logits"] = _normal(torch.empty_like(logits), 2.0, g, device)
        if self.extra is not None:
            out.update({k: x.to(device) for k, x in self.extra(shape, g).items()})
        return out


def logits_op(
    name: str,
    module: str,
    layout: LogitsLayout,
    providers: list,
    *,
    description: str,
    notes=(),
    quick=(256, 8192),
    default=(2048, 128256),
    full_center: int = 256,
    full_tokens=(128, 2048),
    dtypes=("fp32", "bf16"),
    quick_dtypes=("fp32",),
    full_dtypes=("bf16",),
    full_providers=None,
    quick_providers=None,
    reference=("naive",),
) -> OpSpec:
    """An OpSpec for an op on logits, with the family's presets; ``providers`` should list
    the baselines and peers, followed by ``prefopt_fast_providers`` output.
    ``*_providers``: globs restricting the providers of --full / --quick (time budgets)."""
    ms = layout.make_shape
    return OpSpec(
        name=name,
        module=module,
        description=description,
        make_inputs=layout.make_inputs,
        grad_inputs=("logits",),
        main_bytes=layout.main_bytes,
        bytes_moved=layout.bytes_moved,
        exps=layout.exps,
        alloc_bytes=layout.main_bytes,  # the gradient, unless written in place
        make_shape=ms,
        tokens=layout.tokens,
        vocab=layout.vocab,
        presets={
            "dry-run": [ms(layout.batch * 8, 1000)],
            "quick": [ms(*quick)],
            "default": [ms(*default)],
            "full": cross_shapes(ms, full_center, full_tokens),
        },
        preset_dtypes={
            "dry-run": list(dtypes),
            "quick": list(quick_dtypes),
            "default": list(dtypes),
            "full": list(full_dtypes),
        },
        preset_providers=_preset_providers(full_providers, quick_providers),
        providers=providers,
        reference=tuple(reference),
        notes=list(notes),
    )


def _preset_providers(full, quick) -> dict:
    return {k: list(v) for k, v in (("full", full), ("quick", quick)) if v}


# --------------------------------------------------------------------------- fused-linear ops


@dataclasses.dataclass(frozen=True)
class LinearLayout:
    """Inputs of a fused-linear op: hidden ``[B, T, H]`` ~ N(0, 1), weight ``[V, H]`` ~
    N(0, 2 / H) (so the logits are ~ N(0, 2)), labels with the first ``prompt`` positions
    of each sequence ignored, and ``extra(shape, generator)`` small tensors."""

    batch: int
    hidden: int
    prompt: int = 64
    extra: object = None

    def make_shape(self, tokens: int, vocab: int, hidden: int | None = None) -> dict:
        if tokens % self.batch:
            raise ValueError(f"token count must be a multiple of {self.batch}, got {tokens}")
        return {"B": self.batch, "T": tokens // self.batch, "H": hidden or self.hidden, "V": vocab}

    tokens = staticmethod(LogitsLayout.tokens)
    vocab = staticmethod(LogitsLayout.vocab)

    def n_prompt(self, shape) -> int:
        return min(self.prompt, shape["T"] // 4)

    def completion_tokens(self, shape) -> int:
        return shape["B"] * (shape["T"] - self.n_prompt(shape))

    def main_bytes(self, shape, dtype) -> int:
        """The logits the fused path never materializes: [B * T, V] in the dtype."""
        return self.tokens(shape) * shape["V"] * itemsize(dtype)

    def bytes_moved(self, shape, dtype) -> dict:
        """Read W and the hidden rows (fwd); read them again and write both gradients (bwd, the
        ``rw`` pattern). Negligible next to the GEMMs: the bound is the FLOP term."""
        w = shape["V"] * shape["H"] * itemsize(dtype)
        h = self.completion_tokens(shape) * shape["H"] * itemsize(dtype)
        return {"fwd": {"read": w + h}, "bwd": {"rw": 2 * (w + h)}}

    def flops(self, shape, dtype) -> dict:
        f = 2.0 * self.completion_tokens(shape) * shape["H"] * shape["V"]
        return {"fwd": f, "bwd": 2 * f}

    def make_inputs(self, shape, dtype, device, seed=0) -> dict:
        g = torch.Generator(device="cpu").manual_seed(seed)
        b, t, h, v = shape["B"], shape["T"], shape["H"], shape["V"]
        hidden = _normal(torch.empty(b, t, h, dtype=dtype, device=device), 1.0, g, device)
        weight = _normal(torch.empty(v, h, dtype=dtype, device=device), (2.0 / h) ** 0.5, g, device)
        labels = torch.randint(0, v, (b, t), generator=g)
        labels[:, : self.n_prompt(shape)] = IGN
        out = {"hidden": hidden, "weight": weight, "labels": labels.to(device)}
        if self.extra is not None:
            out.update({k: x.to(device) for k, x in self.extra(shape, g).items()})
        return out


def linear_op(
    name: str,
    module: str,
    layout: LinearLayout,
    providers: list,
    *,
    description: str,
    notes=(),
    quick=(256, 8192, 256),
    default=(2048, 128256, 2048),
    full_center: int = 256,
    full_tokens=(128, 1024),
    full_hidden: int = 256,
    dtypes=("fp32", "bf16"),
    quick_dtypes=("bf16",),
    full_dtypes=("bf16",),
    full_providers=None,
    quick_providers=None,
    reference=("naive",),
) -> OpSpec:
    """An OpSpec for a fused-linear op (grads to hidden and weight), with the family's presets."""
    ms = layout.make_shape
    return OpSpec(
        name=name,
        module=module,
        description=description,
        make_inputs=layout.make_inputs,
        grad_inputs=("hidden", "weight"),
        main_bytes=layout.main_bytes,
        bytes_moved=layout.bytes_moved,
        flops=layout.flops,
        make_shape=ms,
        tokens=layout.tokens,
        vocab=layout.vocab,
        presets={
            "dry-run": [ms(layout.batch * 16, 1000, 32)],
            "quick": [ms(*quick)],
            "default": [ms(*default)],
            "full": cross_shapes(lambda n, v: ms(n, v, full_hidden), full_center, full_tokens),
        },
        preset_dtypes={
            "dry-run": list(dtypes),
            "quick": list(quick_dtypes),
            "default": list(dtypes),
            "full": list(full_dtypes),
        },
        preset_providers=_preset_providers(full_providers, quick_providers),
        providers=providers,
        reference=tuple(reference),
        notes=list(notes),
    )


def completion_rows(inputs):
    """(hidden rows of the completion tokens [M, H], their labels [M], sequence index [M])."""
    labels = inputs["labels"]
    keep = labels != IGN
    seq = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[keep]
    return inputs["hidden"][keep], labels[keep], seq


def seq_sums(token_logps, seq, n: int):
    """Per-sequence fp32 sums of per-row values, rows mapped to sequences by ``seq``."""
    return torch.zeros(n, dtype=torch.float32, device=seq.device).index_add(0, seq, token_logps.float())


def on_completion_rows(row_logps, finish=None):
    """An op from a per-row log-prob function ``(h [M, H], W, y [M]) -> [M]`` applied to the
    completion rows; ``finish(row_values, seq, inputs)`` turns them into the op's output
    (default: per-sequence sums [B])."""

    def fn(inputs):
        h, y, seq = completion_rows(inputs)
        v = row_logps(h, inputs["weight"], y)
        return finish(v, seq, inputs) if finish else seq_sums(v, seq, inputs["labels"].shape[0])

    return fn


def from_ce(ce, finish=None):
    """:func:`on_completion_rows` from a per-row cross-entropy (log-prob = -CE)."""
    return on_completion_rows(lambda h, w, y: -ce(h, w, y), finish)


def matmul_floor(inputs):
    """h W^T on the completion rows; its backward is the two gradient GEMMs (G W, G^T h)."""
    h, _, _ = completion_rows(inputs)
    return h @ inputs["weight"].t()


def matmul_floor_provider() -> Provider:
    return Provider(
        "matmul-floor",
        lambda: matmul_floor,
        mem_factor=3.0,
        description="the three GEMMs alone (h W^T, G W, G^T h) on the completion rows; materializes",
    )


def linear_baselines(naive, make_trl, what: str) -> list:
    """The fused-linear ops' first rows: matmul-floor, naive (materialized logits) and TRL's
    fused head; ``what`` ends the descriptions (", sums, DPO", ...)."""
    return [
        matmul_floor_provider(),
        Provider(
            "naive",
            lambda: naive,
            mem_factor=4.0,
            description=f"hidden @ W.T in the dtype, fp32 log_softmax, gather{what}",
        ),
        trl_provider(
            make_trl,
            f"trl.kernels.ChunkedLogProbFunction (TRL 1.16 fused head) on the completion rows{what}",
            mem_factor=1.0,
        ),
    ]


def liger_providers(make_liger, what: str) -> list:
    """Liger-Kernel's chunked loss ``what``: eager (``make_liger(False)``) and with its chunk
    step under torch.compile (``make_liger(True)``, slow_setup). Plain PyTorch: runs on CPU.
    Its forward computes the gradients too (the backward only scales them): grad_in_forward."""
    return [
        Provider(
            "liger",
            make_liger(False),
            kind="peer",
            requires=("liger_kernel",),
            install=LIGER_INSTALL,
            mem_factor=1.0,
            grad_in_forward=True,
            description=f"liger_kernel.chunked_loss.{what}, compiled=False",
        ),
        Provider(
            "liger-compile",
            make_liger(True),
            kind="peer",
            requires=("liger_kernel",),
            install=LIGER_INSTALL,
            slow_setup=True,
            mem_factor=1.0,
            grad_in_forward=True,
            description=f"liger_kernel.chunked_loss.{what}, compiled=True",
        ),
    ]


# --------------------------------------------------------------------------- shared reference math


def naive_token_logps(logits, labels):
    """What users write: log_softmax over the whole row in the input dtype, then gather
    (ignored labels gather index 0 and are masked by the caller)."""
    return torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def masked_seq_sums(token_logps, labels, cu_seqlens=None):
    """fp32 per-sequence sums of token log-probs over real labels: [B, T] -> [B], or packed
    [total] with cu_seqlens [B + 1] -> [B]."""
    vals = torch.where(labels != IGN, token_logps.float(), 0.0)
    if cu_seqlens is None:
        return vals.sum(-1)
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    return seq_sums(vals, seq, lens.numel())


def dpo_sigmoid(seq_logps, ref_chosen, ref_rejected, beta: float):
    """Sigmoid DPO on the stacked [chosen; rejected] sums: mean(-log sigmoid(beta * (delta_w - delta_l)))."""
    n = seq_logps.shape[0] // 2
    h = beta * ((seq_logps[:n] - ref_chosen) - (seq_logps[n:] - ref_rejected))
    return -F.logsigmoid(h).mean()


def ref_seq_logps(shape, g, prompt_tokens: int):
    """Plausible reference sums [B / 2] x 2 for the stacked batch: about (completion
    tokens) x log(1 / V), plus noise."""
    b, t, v = shape["B"], shape["T"], shape["V"]
    ref = -(t - prompt_tokens) * math.log(v) + torch.randn(b, generator=g)
    return {"ref_chosen": ref[: b // 2], "ref_rejected": ref[b // 2 :]}


# --------------------------------------------------------------------------- shared providers


def compiled_provider(fn, *, mem_factor: float = 3.0, what: str = "naive") -> Provider:
    """``torch.compile(fn)``: compile time excluded by a warm-up step (slow_setup)."""
    return Provider(
        f"{what}-compile",
        lambda: torch.compile(fn),
        slow_setup=True,
        mem_factor=mem_factor,
        description=f"torch.compile({what}) (compile time excluded by the warm-up)",
    )


def trl_selective_log_softmax():
    """TRL's per-token log-probs: ``selective_log_softmax(logits, labels)`` (ignored labels
    are clamped to 0 first, as TRL's callers do with their masks)."""
    from trl.trainer.utils import selective_log_softmax

    return lambda logits, labels: selective_log_softmax(logits, labels.clamp(min=0))


def trl_provider(make, description: str, mem_factor: float = 4.0) -> Provider:
    return Provider(
        "trl",
        make,
        kind="peer",
        requires=("trl",),
        install="pip install trl",
        mem_factor=mem_factor,
        description=description,
    )


LIGER_INSTALL = "pip install --no-deps liger-kernel (or pip install -e '.[bench]')"
CCE_INSTALL = "pip install --no-deps cut-cross-entropy (or pip install -e '.[bench]')"


def cce_linear_ce(impl: str):
    """cut-cross-entropy's per-token CE (``reduction="none"``) on the completion rows."""
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, y: linear_cross_entropy(h, w, y, reduction="none", impl=impl)


def cce_providers(make_fn, what: str) -> list:
    """cut-cross-entropy: its Triton kernel (``impl="cce"``, CUDA only) and its
    ``impl="torch_compile"`` path (materialized logits under torch.compile; runs on CPU).
    ``make_fn(ce) -> fn(inputs)`` turns the per-token CE into the op."""
    return [
        Provider(
            "cce",
            lambda: make_fn(cce_linear_ce("cce")),
            kind="peer",
            requires=("cut_cross_entropy",),
            install=CCE_INSTALL,
            check=needs_cuda,
            mem_factor=1.0,
            description=f"cut_cross_entropy.linear_cross_entropy(impl='cce', reduction='none') {what}",
        ),
        Provider(
            "cce-compile",
            lambda: make_fn(cce_linear_ce("torch_compile")),
            kind="peer",
            requires=("cut_cross_entropy",),
            install=CCE_INSTALL,
            slow_setup=True,
            mem_factor=3.0,
            description=f"cut_cross_entropy.linear_cross_entropy(impl='torch_compile') {what}",
        ),
    ]


def torch_lce_check(case):
    return (
        None
        if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
        else "this torch has no F.linear_cross_entropy with chunking options (torch >= 2.13)"
    )


def torch_lce():
    """-F.linear_cross_entropy(reduction="none") with torch's chunked path (options=...)."""
    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, reduction="none", options=opts)


def torch_lce_provider(make_fn, what: str) -> Provider:
    return Provider(
        "torch-linear-ce",
        lambda: make_fn(torch_lce()),
        kind="peer",
        check=torch_lce_check,
        mem_factor=1.0,
        description=f"-F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()) {what}",
    )


def trl_chunked_logps():
    """TRL 1.16's fused head ``trl.kernels.ChunkedLogProbFunction`` (vocabulary tile 32768):
    per-row log-probs from hidden rows [M, H] and the lm_head."""
    from trl.kernels import ChunkedLogProbFunction

    return lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ())[0]


def renamed(providers: list, prefix: str, kind: str, what: str) -> list:
    """prefopt_fast providers renamed (e.g. the token_logprobs floor of a loss)."""
    return [
        dataclasses.replace(
            p,
            name=p.name.replace("prefopt_fast", prefix, 1),
            kind=kind,
            description=p.description.replace("prefopt_fast", what, 1),
        )
        for p in providers
    ]


def script_main(module_name: str, variants=None):
    """``python benchmarks/bench_x.py [options]``: the CLI on this script's op (or variants)."""
    import importlib

    mod = importlib.import_module(module_name)  # the importable module, for the workers
    if variants:
        return main(ops={mod.variant_op(v).name: f"{module_name}:{v}" for v in variants})
    return main(op=mod.OP)


# --------------------------------------------------------------------------- pytest-benchmark glue


def shapes(op: OpSpec) -> dict:
    """The pytest shapes: ``small`` is the --quick shape, ``default`` the default preset's."""
    return {"small": op.presets["quick"][0], "default": op.presets["default"][0]}


@functools.lru_cache(maxsize=None)
def _fn(op_module: str, provider: str):
    """The provider's callable, made once per process (torch.compile compiles once)."""
    return load_op(op_module).provider(provider).make()


def runner_for(op: OpSpec, provider: str, shape_name: str, dtype: str, grad: bool = True) -> CaseRunner:
    """A CaseRunner for the case, or pytest.skip with the harness's note."""
    import pytest

    prov = op.provider(provider)
    why = availability(prov)
    if why:
        pytest.skip(why)
    shape = shapes(op)[shape_name]
    case = Case.make(shape, dtype, default_device())
    why = prov.check(case) if prov.check else None
    why = why or memory_guard(op, prov, case, available_memory(case.device))
    if why:
        pytest.skip(why)
    if not grad:
        prov = dataclasses.replace(prov, backward=False)
    return CaseRunner(op, prov, case, fn=_fn(op.module, provider))
