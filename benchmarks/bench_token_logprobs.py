"""Benchmark of token_logprobs (issue 2): per-token log-probs of the labels, from logits.

Shapes are [B, T, V] logits with B = 4 sequences, [B, T] labels (no ignored labels).
Run: ``python -m benchmarks --op token_logprobs [--quick|--full]`` or this file directly.
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks import harness as H

B = 4  # sequences per batch; tokens N = B * T


def make_shape(tokens: int, vocab: int) -> dict:
    if tokens % B:
        raise ValueError(f"token count must be a multiple of {B}, got {tokens}")
    return {"B": B, "T": tokens // B, "V": vocab}


def make_inputs(shape, dtype, device, seed=0):
    """logits [B, T, V] ~ N(0, 2^2) in ``dtype``; labels int64 [B, T] uniform in [0, V)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, t, v = shape["B"], shape["T"], shape["V"]
    logits = torch.empty(b, t, v, dtype=dtype, device=device)
    if device == "cpu":
        logits.normal_(0.0, 2.0, generator=g)
    else:
        logits.normal_(0.0, 2.0)
    labels = torch.randint(0, v, (b, t), generator=g).to(device)
    return {"logits": logits, "labels": labels}


def _n(shape):
    return shape["B"] * shape["T"]


def main_bytes(shape, dtype):
    return _n(shape) * shape["V"] * torch.empty((), dtype=dtype).element_size()


def bytes_moved(shape, dtype):
    """The least traffic: fwd reads the logits once (+ labels, writes fp32 log-probs);
    bwd reads the logits once and writes the gradient once (+ labels, fp32 grad_output)."""
    n, s = _n(shape), main_bytes(shape, dtype)
    small = n * 8 + n * 4  # int64 labels + one fp32 per token
    return {"fwd": s + small, "bwd": 2 * s + small}


# ----------------------------------------------------------------------------- providers


def naive(inputs):
    """What users write: log_softmax over the whole row in the input dtype, then gather."""
    logits, labels = inputs["logits"], inputs["labels"]
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def naive_fp32(inputs):
    """The common 'upcast for stability' variant (logits.float() first)."""
    logits, labels = inputs["logits"], inputs["labels"]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def torch_cross_entropy(inputs):
    """-F.cross_entropy(reduction='none'): torch's fused log_softmax + nll."""
    logits, labels = inputs["logits"], inputs["labels"]
    v = logits.shape[-1]
    return -F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none").view(labels.shape)


def _make_compiled():
    return torch.compile(naive)


def _make_trl():
    from trl.trainer.utils import selective_log_softmax
    return lambda inputs: selective_log_softmax(inputs["logits"], inputs["labels"])


def _make_liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fn(inputs):
        logits, labels = inputs["logits"], inputs["labels"]
        v = logits.shape[-1]
        return -liger_cross_entropy(logits.view(-1, v), labels.view(-1), reduction="none").view(labels.shape)
    return fn


def _prefopt_fast_call(inputs, backend, inplace_backward):
    import prefopt_fast
    return prefopt_fast.token_logprobs(inputs["logits"], inputs["labels"], backend=backend,
                                       inplace_backward=inplace_backward)


def _not_fp32(case):
    return "same as naive for fp32" if case.dtype == "fp32" else None


_ours, _our_notes = H.prefopt_fast_providers(_prefopt_fast_call)

PROVIDERS = [
    H.Provider("naive", lambda: naive, description="torch.log_softmax(logits, -1).gather(...) in the input dtype",
               mem_factor=4.0),
    H.Provider("naive-fp32", lambda: naive_fp32, check=_not_fp32,
               description="torch.log_softmax(logits.float(), -1).gather(...)", mem_factor=9.0),
    H.Provider("naive-compile", _make_compiled, slow_setup=True, mem_factor=3.0,
               description="torch.compile(naive) (compile time excluded by the warm-up)"),
    H.Provider("torch-cross-entropy", lambda: torch_cross_entropy, mem_factor=4.0,
               description="-F.cross_entropy(logits, labels, reduction='none')"),
    H.Provider("trl", _make_trl, kind="peer", requires=("trl",), install="pip install trl", mem_factor=4.0,
               description="trl.trainer.utils.selective_log_softmax (per-row loop on CPU, Triton kernel on CUDA)"),
    H.Provider("liger", _make_liger, kind="peer", requires=("liger_kernel",), install="pip install liger-kernel",
               check=H.needs_cuda, mutates=("logits",), mem_factor=0.5,
               description="-liger_cross_entropy(reduction='none') (Triton; gradient written into the logits)"),
] + _ours

_FULL = [make_shape(n, v) for v in (32000, 128256, 256000) for n in (512, 2048, 8192)]

OP = H.OpSpec(
    name="token_logprobs",
    module="benchmarks.bench_token_logprobs",
    description="per-token log-probs of the labels from logits [B, T, V] (fwd, and bwd into the logits)",
    make_inputs=make_inputs,
    grad_inputs=("logits",),
    main_bytes=main_bytes,
    bytes_moved=bytes_moved,
    alloc_bytes=main_bytes,  # the gradient, unless written in place
    make_shape=make_shape,
    tokens=_n,
    vocab=lambda s: s["V"],
    presets={
        "dry-run": [make_shape(32, 1000)],
        "quick": [make_shape(2048, 32000)],
        "default": [make_shape(2048, 128256)],
        "full": _FULL,
    },
    preset_dtypes={"dry-run": ["fp32", "bf16"], "quick": ["fp32", "bf16"], "default": ["fp32", "bf16"],
                   "full": ["fp32", "bf16"]},
    providers=PROVIDERS,
    reference=("naive",),
    notes=_our_notes + [
        "cut-cross-entropy takes hidden states and the classifier, not logits: it is benchmarked with"
        " the fused-linear ops, not here",
    ],
)

if __name__ == "__main__":
    from benchmarks import bench_token_logprobs as _self  # the importable module, for the workers
    sys.exit(H.main(op=_self.OP))
