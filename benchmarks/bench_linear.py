"""Benchmark of the fused-linear DPO loss (issue 6): DPO forward + backward from hidden states.

Inputs: the stacked [chosen; rejected] batch of 2B = 4 sequences, hidden ``[4, T, H]``,
the lm_head ``weight [V, H]`` (both in the dtype, both requiring grad), labels ``[4, T]``
whose first ``PROMPT`` positions are the prompt (ignore_index) and the rest uniform in
``[0, V)``, and precomputed fp32 reference log-probs ``[B]``. The loss is sigmoid DPO
(beta 0.1); the gradient flows to ``hidden`` and ``weight``.

Providers doing the same work (per-token log-probs of the completion tokens through the
lm_head, summed per sequence, the DPO head, and the gradients of hidden and weight):

- ``prefopt_fast.<backend>``: ``prefopt_fast.linear.linear_dpo_loss`` (default chunking);
- ``naive``: materialized logits ``hidden @ W.T`` in the dtype, fp32 log_softmax, gather;
- ``trl``: TRL 1.16's fused head ``trl.kernels.ChunkedLogProbFunction`` on the completion
  rows (as TRL's trainer calls it on GPUs; default vocabulary tile 32768), then the same head;
- ``torch-linear-ce``: ``-F.linear_cross_entropy(..., reduction="none",
  options=LinearCrossEntropyOptions())`` (torch's chunked path) on the completion rows;
- ``matmul-floor``: the three GEMMs alone on the completion rows, ``h W^T`` (forward) then
  ``G W`` and ``G^T h`` (its backward, G a random upstream gradient): the floor the issue
  measures against (its memory column is not meaningful: it materializes the logits).

The FLOPs given to the harness are those of the floor (2 M H V forward, 4 M H V backward,
M = completion tokens), so ``x bound`` reads as "times the machine's GEMM rate".

Run: ``python benchmarks/bench_linear.py [--quick] [--providers ...] [--repeats 1 --warmup 0]``
(register ``"linear_dpo": "benchmarks.bench_linear"`` in ``benchmarks/__init__.py`` to reach it
with ``--op``). The default preset is the issue's shape (T = 512, H = 2048, V = 128256): on a
2-core CPU one fp32 step takes minutes, so run it with ``--repeats 1 --warmup 0``.
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks import harness as H

B2 = 4        # sequences: 2B = 4 (B = 2 pairs)
PROMPT = 64   # ignored positions at the start of each sequence
BETA = 0.1
IGN = -100


def make_shape(tokens: int, vocab: int, hidden: int = 2048) -> dict:
    if tokens % B2:
        raise ValueError(f"token count must be a multiple of {B2}, got {tokens}")
    return {"B2": B2, "T": tokens // B2, "H": hidden, "V": vocab}


def _prompt(shape):
    return min(PROMPT, shape["T"] // 4)


def make_inputs(shape, dtype, device, seed=0):
    """hidden ~ N(0, 1), weight ~ N(0, 2 / H) (logits ~ N(0, 2)), labels with a prompt."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, t, h, v = shape["B2"], shape["T"], shape["H"], shape["V"]
    hidden = torch.empty(b, t, h, dtype=dtype, device=device)
    weight = torch.empty(v, h, dtype=dtype, device=device)
    kw = {"generator": g} if device == "cpu" else {}
    hidden.normal_(0.0, 1.0, **kw)
    weight.normal_(0.0, (2.0 / h) ** 0.5, **kw)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :_prompt(shape)] = IGN
    ref = -(t - _prompt(shape)) * torch.log(torch.tensor(float(v))) + torch.randn(b, generator=g)
    return {"hidden": hidden, "weight": weight, "labels": labels.to(device),
            "ref_chosen": ref[: b // 2].to(device), "ref_rejected": ref[b // 2:].to(device)}


def _tokens(shape):
    return shape["B2"] * shape["T"]


def _m(shape):
    return shape["B2"] * (shape["T"] - _prompt(shape))


def _item(dtype):
    return torch.empty((), dtype=dtype).element_size()


def main_bytes(shape, dtype):
    """The logits the fused path never materializes: [2B * T, V] in the dtype."""
    return _tokens(shape) * shape["V"] * _item(dtype)


def bytes_moved(shape, dtype):
    """At the least: read W and the hidden rows (fwd); read them again and write both
    gradients (bwd). Negligible next to the GEMMs: the bound is the FLOP term."""
    w = shape["V"] * shape["H"] * _item(dtype)
    h = _m(shape) * shape["H"] * _item(dtype)
    return {"fwd": w + h, "bwd": 2 * (w + h)}


def flops(shape, dtype):
    f = 2.0 * _m(shape) * shape["H"] * shape["V"]
    return {"fwd": f, "bwd": 2 * f}


# ----------------------------------------------------------------------------- providers


def _dpo_head(seq_logps, inputs):
    n = seq_logps.shape[0] // 2
    h = BETA * ((seq_logps[:n] - inputs["ref_chosen"]) - (seq_logps[n:] - inputs["ref_rejected"]))
    return -F.logsigmoid(h).mean()


def _completion(inputs):
    """(hidden rows of the completion tokens [M, H], their labels [M], sequence index [M])."""
    labels = inputs["labels"]
    keep = labels != IGN
    hid = inputs["hidden"]
    seq = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[keep]
    return hid[keep], labels[keep], seq


def _sums(token_logps, seq, n):
    return torch.zeros(n, dtype=torch.float32, device=seq.device).index_add(0, seq, token_logps.float())


def naive(inputs):
    """Materialized logits in the dtype, fp32 log_softmax over the vocabulary, gather, sums."""
    hid, w, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    keep = labels != IGN
    logits = hid @ w.t()
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return _dpo_head((logp * keep).sum(-1), inputs)


def _make_trl():
    from trl.kernels import ChunkedLogProbFunction

    def fn(inputs):
        h, y, seq = _completion(inputs)
        logp = ChunkedLogProbFunction.apply(h, inputs["weight"], None, y, 1.0, 32768, None, 1.0, ())[0]
        return _dpo_head(_sums(logp, seq, inputs["labels"].shape[0]), inputs)
    return fn


def _make_torch_lce():
    opts = torch.nn.LinearCrossEntropyOptions()

    def fn(inputs):
        h, y, seq = _completion(inputs)
        logp = -F.linear_cross_entropy(h, inputs["weight"], y, reduction="none", options=opts)
        return _dpo_head(_sums(logp, seq, inputs["labels"].shape[0]), inputs)
    return fn


def _has_torch_lce(case):
    return None if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions") else \
        "this torch has no F.linear_cross_entropy with chunking options (torch >= 2.13)"


def matmul_floor(inputs):
    """h W^T on the completion rows; its backward is the two gradient GEMMs."""
    h, _, _ = _completion(inputs)
    return h @ inputs["weight"].t()


def _linear_dpo_call(inputs, backend, inplace_backward):
    from prefopt_fast.linear import linear_dpo_loss

    loss, _ = linear_dpo_loss(inputs["hidden"], inputs["weight"], inputs["labels"],
                              ref_chosen_logps=inputs["ref_chosen"], ref_rejected_logps=inputs["ref_rejected"],
                              beta=BETA, backend=backend)
    return loss


_ours, _our_notes = H.prefopt_fast_providers(_linear_dpo_call, inplace=False, mem_factor=0.2)

PROVIDERS = [
    H.Provider("matmul-floor", lambda: matmul_floor, mem_factor=3.0,
               description="the three GEMMs alone (h W^T, G W, G^T h) on the completion rows; materializes"),
    H.Provider("naive", lambda: naive, mem_factor=4.0,
               description="hidden @ W.T in the dtype, fp32 log_softmax, gather, sums, DPO"),
    H.Provider("trl", _make_trl, kind="peer", requires=("trl",), install="pip install trl==1.16", mem_factor=1.0,
               description="trl.kernels.ChunkedLogProbFunction (TRL 1.16 fused head) on the completion rows"),
    H.Provider("torch-linear-ce", _make_torch_lce, kind="peer", check=_has_torch_lce, mem_factor=1.0,
               description="-F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions())"),
] + _ours

OP = H.OpSpec(
    name="linear_dpo",
    module="benchmarks.bench_linear",
    description="sigmoid DPO fwd + bwd from hidden states [2B, T, H] and the lm_head [V, H] (grads to both)",
    make_inputs=make_inputs,
    grad_inputs=("hidden", "weight"),
    main_bytes=main_bytes,
    bytes_moved=bytes_moved,
    flops=flops,
    make_shape=make_shape,
    tokens=_tokens,
    vocab=lambda s: s["V"],
    presets={
        "dry-run": [make_shape(64, 1000, 32)],
        "quick": [make_shape(1024, 32000, 1024)],
        "default": [make_shape(2048, 128256)],  # the 2B = 4, T = 512, H = 2048, V = 128256
        "full": [make_shape(2048, 128256)],
    },
    preset_dtypes={"dry-run": ["fp32", "bf16"], "quick": ["fp32", "bf16"], "default": ["fp32", "bf16"],
                   "full": ["fp32", "bf16"]},
    providers=PROVIDERS,
    reference=("naive",),
    notes=_our_notes + [
        "liger-kernel (LigerFusedLinearDPOLoss) and cut-cross-entropy are not installed here: not benchmarked",
        "matmul-floor materializes the logits: its memory column is not a contender's",
    ],
)

if __name__ == "__main__":
    from benchmarks import bench_linear as _self  # the importable module, for the workers
    sys.exit(H.main(op=_self.OP))
