"""Benchmark of the fused-linear DPO loss (issue 6): DPO forward + backward from hidden states.

Inputs: the stacked [chosen; rejected] batch of 2B = 4 sequences, hidden ``[4, T, H]``,
the lm_head ``weight [V, H]`` (both in the dtype, both requiring grad), labels ``[4, T]``
whose first 64 positions (at most T / 4) are the prompt (ignored) and the rest uniform in
``[0, V)``, and precomputed fp32 reference sums ``[B]``. The loss is sigmoid DPO (beta 0.1);
the gradient flows to ``hidden`` and ``weight``.

Providers doing the same work (completion log-probs through the lm_head, summed per
sequence, the DPO head, the gradients of hidden and weight): ``prefopt_fast.<backend>``
(``linear_dpo_loss``, default plan: the forward-gradient plan, 3 GEMMs; ``+recompute``: the
recompute plan, 4 GEMMs); ``naive`` (materialized logits, fp32 log_softmax, gather); ``trl``
(TRL 1.16's fused head ``ChunkedLogProbFunction`` on the completion rows, as its trainer
calls it on GPUs); ``torch-linear-ce`` (torch's chunked ``F.linear_cross_entropy``);
``cce`` / ``cce-compile`` (cut-cross-entropy, Triton on CUDA / its torch.compile path);
``liger`` / ``liger-compile`` (Liger-Kernel's ``LigerFusedLinearDPOLoss``, plain PyTorch
chunked per pair, eager / under torch.compile; reference-free (``use_ref_model=False``,
reference sums 0): the same lm_head work, its reference path would add a second forward);
``matmul-floor`` (the three GEMMs alone: the floor the issue measures against; its memory
column is not a contender's). FLOPs given to the harness are the floor's (2 M H V
forward, 4 M H V backward, M = completion tokens): ``x bound`` reads as "times the GEMM rate".
The default preset is the issue's shape (T = 512, H = 2048, V = 128256): minutes per fp32
step on a 2-core CPU; run it with ``--repeats 1 --warmup 0``.
"""

import dataclasses
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_support as S
from benchmarks.spec import prefopt_fast_providers

BETA = 0.1
LAYOUT = S.LinearLayout(
    batch=4, hidden=2048, prompt=64, extra=lambda shape, g: S.ref_seq_logps(shape, g, min(64, shape["T"] // 4))
)
make_shape, make_inputs, main_bytes, bytes_moved, flops = (
    LAYOUT.make_shape,
    LAYOUT.make_inputs,
    LAYOUT.main_bytes,
    LAYOUT.bytes_moved,
    LAYOUT.flops,
)


def _head(seq, inputs):
    return S.dpo_sigmoid(seq, inputs["ref_chosen"], inputs["ref_rejected"], BETA)


def naive(inputs):
    """Materialized logits in the dtype, fp32 log_softmax over the vocabulary, gather, sums."""
    logits = inputs["hidden"] @ inputs["weight"].t()
    return _head(S.masked_seq_sums(S.naive_token_logps(logits.float(), inputs["labels"]), inputs["labels"]), inputs)


def _finish(row_logps, seq, inputs):
    return _head(S.seq_sums(row_logps, seq, inputs["labels"].shape[0]), inputs)


def _from_ce(ce):
    return S.from_ce(ce, _finish)


def _make_liger(compiled):
    def make():
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=compiled)
        return lambda inputs: loss(inputs["weight"], inputs["hidden"], inputs["labels"])[0]

    return make


def _linear_dpo_call(plan):
    def call(inputs, backend, inplace_backward):
        from prefopt_fast.linear import linear_dpo_loss

        loss, _ = linear_dpo_loss(
            inputs["hidden"],
            inputs["weight"],
            inputs["labels"],
            ref_chosen_logps=inputs["ref_chosen"],
            ref_rejected_logps=inputs["ref_rejected"],
            beta=BETA,
            backend=backend,
            plan=plan,
        )
        return loss

    return call


# the default plan ("auto": the forward-gradient plan here, its gradients made in the forward)
# and the recompute plan as "+recompute"
_fwd, _our_notes = prefopt_fast_providers(_linear_dpo_call("auto"), inplace=False, mem_factor=0.6)
_rec, _ = prefopt_fast_providers(_linear_dpo_call("recompute"), inplace=False, mem_factor=0.2)
_ours = [
    dataclasses.replace(p, grad_in_forward=True, description=p.description + ", plan='auto' (forward-gradient)")
    for p in _fwd
] + [dataclasses.replace(p, name=p.name + "+recompute", description=p.description + ", plan='recompute'") for p in _rec]

PROVIDERS = (
    S.linear_baselines(naive, lambda: S.on_completion_rows(S.trl_chunked_logps(), _finish), ", sums, DPO")
    + [
        S.torch_lce_provider(_from_ce, "on the completion rows, sums, DPO"),
        *S.cce_providers(_from_ce, "on the completion rows, sums, DPO"),
        *S.liger_providers(_make_liger, "LigerFusedLinearDPOLoss (reference-free)"),
    ]
    + _ours
)

OP = S.linear_op(
    "linear_dpo",
    "benchmarks.bench_linear_dpo",
    LAYOUT,
    PROVIDERS,
    description="sigmoid DPO fwd + bwd from hidden states [2B, T, H] and the lm_head [V, H] (grads to both)",
    notes=_our_notes
    + [
        "matmul-floor materializes the logits: its memory column is not a contender's",
        "liger runs reference-free (reference sums 0): the same lm_head work as the others",
    ],
    full_providers=("matmul-floor", "naive", "trl", "cce", "liger", "prefopt_fast.*"),
)


def side_by_side(tokens=1024, hidden=1024, vocabs=(32000,), dtypes=("fp32", "bf16"), repeats=3, providers=None):
    """Every provider of one shape in one process, interleaved (repeat outer, provider inner),
    best of ``repeats`` after one warm-up step (compilation), then one step each under the
    harness's memory probe: ``{(dtype, V): {provider: (seconds, peak extra bytes)}}`` and a
    table on stdout with the ratios to matmul-floor. The loss's upstream gradient is 1 (a
    training step's ``loss.backward()``); matmul-floor gets a fixed random one. For the
    issue's H = 1024 (the CLI keeps the preset's hidden size)."""
    import time

    import torch

    from benchmarks.measure import MemProbe

    names = providers or (
        "matmul-floor",
        "naive",
        "cce-compile",
        "liger-compile",
        "prefopt_fast.cpu",
        "prefopt_fast.cpu+recompute",
    )
    by_name = {p.name: p for p in PROVIDERS}
    results = {}
    for dt in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        for V in vocabs:
            shape = LAYOUT.make_shape(tokens, V, hidden)
            inputs = LAYOUT.make_inputs(shape, dtype, "cpu")
            for k in ("hidden", "weight"):
                inputs[k].requires_grad_(True)
            leaves = [inputs["hidden"], inputs["weight"]]
            fns, ups = {}, {}
            for n in names:
                try:
                    fns[n] = by_name[n].make()
                except Exception as exc:  # a peer that is not installed
                    print(f"{n}: skipped ({type(exc).__name__}: {exc})")

            def step(n):
                out = fns[n](inputs)
                if out.dim() == 0:
                    g = None
                else:
                    if n not in ups:
                        ups[n] = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
                    g = ups[n]
                grads = torch.autograd.grad(out, leaves, g)
                del out, grads

            best = {n: float("inf") for n in fns}
            for rep in range(repeats + 1):
                for n in list(fns):
                    t = time.perf_counter()
                    step(n)
                    dt_s = time.perf_counter() - t
                    if rep:  # rep 0: warm-up (compilation)
                        best[n] = min(best[n], dt_s)
            mem = {}
            for n in fns:
                probe = MemProbe("cpu")
                probe.start()
                out = fns[n](inputs)
                grads = torch.autograd.grad(out, leaves, None if out.dim() == 0 else ups[n])
                mem[n] = probe.peak_extra()
                del out, grads
            floor = best.get("matmul-floor")
            logits = LAYOUT.main_bytes(shape, dtype)
            returned = sum(x.numel() * x.element_size() for x in leaves)
            print(
                f"\n{dt} tokens={tokens} (completion {LAYOUT.completion_tokens(shape)}) H={hidden} V={V}: "
                f"logits {logits / 2**20:.0f} MiB, returned gradients {returned / 2**20:.0f} MiB"
            )
            print(f"{'provider':30s} {'best s':>8s} {'x floor':>8s} {'peak extra MiB':>15s} {'beyond grads':>13s}")
            for n in fns:
                r = best[n] / floor if floor else float("nan")
                extra = mem[n] - returned
                print(
                    f"{n:30s} {best[n]:8.3f} {r:8.3f} {mem[n] / 2**20:15.0f} "
                    f"{extra / 2**20:8.0f} ({100 * extra / logits:.0f}%)"
                )
            results[(dt, V)] = {n: (best[n], mem[n]) for n in fns}
    return results


if __name__ == "__main__":
    if "--side-by-side" in sys.argv:  # python3 benchmarks/bench_linear_dpo.py --side-by-side [V ...]
        vs = tuple(int(a) for a in sys.argv[1:] if a.isdigit()) or (32000,)
        side_by_side(vocabs=vs)
        sys.exit(0)
    sys.exit(S.script_main("benchmarks.bench_linear_dpo"))
