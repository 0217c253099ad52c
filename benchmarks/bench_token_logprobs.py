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

from benchmarks import bench_support as S
from benchmarks.spec import Provider, needs_cuda, prefopt_fast_providers

LAYOUT = S.LogitsLayout(batch=4)
make_shape, make_inputs, main_bytes, bytes_moved = (
    LAYOUT.make_shape,
    LAYOUT.make_inputs,
    LAYOUT.main_bytes,
    LAYOUT.bytes_moved,
)


def naive(inputs):
    return S.naive_token_logps(inputs["logits"], inputs["labels"])


def naive_fp32(inputs):
    """The common 'upcast for stability' variant (logits.float() first)."""
    return S.naive_token_logps(inputs["logits"].float(), inputs["labels"])


def torch_cross_entropy(inputs):
    """-F.cross_entropy(reduction='none'): torch's fused log_softmax + nll."""
    logits, labels = inputs["logits"], inputs["labels"]
    v = logits.shape[-1]
    return -F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="none").view(labels.shape)


# Rows per block of the chunked baseline: about 1 Mi elements (4 MiB of fp32), so a block's
# temporaries stay in cache; at least one row.
CHUNK_ELEMS = 1 << 20


class ChunkedTokenLogps(torch.autograd.Function):
    """The plain chunked PyTorch a user would write (issue 18): per block of rows, fp32
    log_softmax and gather forward (saving only lse [N]); backward recomputes the block's
    softmax and writes the gradient into the logits buffer, returned as a fresh view (so a
    leaf's AccumulateGrad can take it without a copy)."""

    @staticmethod
    def forward(ctx, logits, labels):
        V = logits.shape[-1]
        x, y = logits.detach().reshape(-1, V), labels.reshape(-1, 1)
        logp = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        lse = torch.empty_like(logp)
        rows = max(1, CHUNK_ELEMS // V)
        for r0 in range(0, x.shape[0], rows):
            xb = x[r0 : r0 + rows].float()
            yb = y[r0 : r0 + rows]
            lp = torch.log_softmax(xb, -1).gather(1, yb).squeeze(1)
            logp[r0 : r0 + rows] = lp
            lse[r0 : r0 + rows] = xb.gather(1, yb).squeeze(1) - lp
        ctx.save_for_backward(logits, labels, lse)
        return logp.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        logits, labels, lse = ctx.saved_tensors
        V = logits.shape[-1]
        x, y = logits.detach().view(-1, V), labels.reshape(-1, 1)  # view: writes reach the buffer
        g = grad_logp.reshape(-1, 1).float()
        rows = max(1, CHUNK_ELEMS // V)
        for r0 in range(0, x.shape[0], rows):
            xb = x[r0 : r0 + rows]
            gb = g[r0 : r0 + rows]
            p = (xb.float() - lse[r0 : r0 + rows, None]).exp_()  # softmax from the saved lse
            p.mul_(-gb).scatter_add_(1, y[r0 : r0 + rows], gb)
            xb.copy_(p)
        return x.view(logits.shape), None


def chunked_torch(inputs):
    return ChunkedTokenLogps.apply(inputs["logits"], inputs["labels"])


def _make_trl():
    tl = S.trl_selective_log_softmax()
    return lambda inputs: tl(inputs["logits"], inputs["labels"])


def _make_liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    def fn(inputs):
        logits, labels = inputs["logits"], inputs["labels"]
        v = logits.shape[-1]
        return -liger_cross_entropy(logits.view(-1, v), labels.view(-1), reduction="none").view(labels.shape)

    return fn


def _prefopt_fast_call(inputs, backend, inplace_backward):
    import prefopt_fast

    return prefopt_fast.token_logprobs(
        inputs["logits"], inputs["labels"], backend=backend, inplace_backward=inplace_backward
    )


def _not_fp32(case):
    return "same as naive for fp32" if case.dtype == "fp32" else None


_ours, _our_notes = prefopt_fast_providers(_prefopt_fast_call)

PROVIDERS = [
    Provider(
        "naive",
        lambda: naive,
        description="torch.log_softmax(logits, -1).gather(...) in the input dtype",
        mem_factor=4.0,
    ),
    Provider(
        "naive-fp32",
        lambda: naive_fp32,
        check=_not_fp32,
        description="torch.log_softmax(logits.float(), -1).gather(...)",
        mem_factor=9.0,
    ),
    S.compiled_provider(naive),
    Provider(
        "chunked-torch",
        lambda: chunked_torch,
        mutates=("logits",),
        mem_factor=0.1,
        description="a plain chunked PyTorch autograd.Function (fp32 log_softmax per block of rows; backward"
        " writes the gradient into the logits): what the torch backend must match (issue 18)",
    ),
    Provider(
        "torch-cross-entropy",
        lambda: torch_cross_entropy,
        mem_factor=4.0,
        description="-F.cross_entropy(logits, labels, reduction='none')",
    ),
    S.trl_provider(_make_trl, "trl.trainer.utils.selective_log_softmax (per-row loop on CPU, Triton kernel on CUDA)"),
    Provider(
        "liger",
        _make_liger,
        kind="peer",
        requires=("liger_kernel",),
        install=S.LIGER_INSTALL,
        check=needs_cuda,
        mutates=("logits",),
        mem_factor=0.5,
        grad_in_forward=True,
        description="-liger_cross_entropy(reduction='none') (Triton; gradient written into the logits)",
    ),
] + _ours

OP = S.logits_op(
    "token_logprobs",
    "benchmarks.bench_token_logprobs",
    LAYOUT,
    PROVIDERS,
    description="per-token log-probs of the labels from logits [B, T, V] (fwd, and bwd into the logits)",
    quick_dtypes=("fp32", "bf16"),
    full_dtypes=("fp32", "bf16"),
    full_center=512,
    full_tokens=(128, 4096),
    full_providers=("naive", "naive-fp32", "chunked-torch", "torch-cross-entropy", "trl", "liger", "prefopt_fast.*"),
    notes=_our_notes
    + [
        "cut-cross-entropy and torch's F.linear_cross_entropy take hidden states and the classifier, not"
        " logits: they are benchmarked with the fused-linear ops (linear_token_logprobs), not here",
    ],
)

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_token_logprobs"))
