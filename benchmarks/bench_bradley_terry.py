"""Benchmark of bradley_terry_loss (the reward-model loss), end to end from the last hidden state.

Why it is tiny: the loss itself is O(B) work on 2B scalar rewards (no vocabulary, nothing
to fuse), so alone it measures only Python and kernel-launch overhead. What a reward model
step does around it is: pick the last real token's hidden state of each of the 2B
sequences, apply the scalar reward head ``[H] -> 1``, and the loss; that is what runs here,
with hidden ``[2B, T, H]`` (gradient to it and to the head). It reads 2B x H values: the
bound is microseconds and ``x bound`` is large for every provider; the table is there to
show that prefopt_fast's head adds no overhead over the two-line formula (TRL 1.16 computes
the same formula inline in ``RewardTrainer.compute_loss``; there is no function to call).
Shape keys: B (pairs x 2), T, H; ``tokens`` = 2B x T, ``vocab`` = 1 (the scalar head).
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks import bench_support as S
from benchmarks.spec import OpSpec, Provider

B2 = 16  # 8 pairs


def make_shape(tokens: int, vocab: int = 1, hidden: int = 2048) -> dict:
    return {"B": B2, "T": max(1, tokens // B2), "H": hidden}


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, t, h = shape["B"], shape["T"], shape["H"]
    hidden = torch.randn(b, t, h, generator=g).to(device=device, dtype=dtype)
    head = (torch.randn(1, h, generator=g) / h**0.5).to(device=device, dtype=dtype)
    last = torch.randint(t // 2, t, (b,), generator=g).to(device)  # index of the last real token
    return {"hidden": hidden, "head": head, "last": last, "margin": torch.rand(b // 2, generator=g).to(device)}


def _rewards(inputs):
    hid = inputs["hidden"]
    rows = hid[torch.arange(hid.shape[0], device=hid.device), inputs["last"]]  # [2B, H]
    r = (rows @ inputs["head"].t()).squeeze(-1).float()
    n = r.shape[0] // 2
    return r[:n], r[n:]


def naive(inputs):
    rw, rl = _rewards(inputs)
    return -F.logsigmoid(rw - rl - inputs["margin"]).mean()


def _ours():
    import prefopt_fast

    def fn(inputs):
        rw, rl = _rewards(inputs)
        return prefopt_fast.bradley_terry_loss(rw, rl, margin=inputs["margin"])[0]

    return fn


def _item(dtype):
    return S.itemsize(dtype)


def main_bytes(shape, dtype):
    return shape["B"] * shape["H"] * _item(dtype)


def bytes_moved(shape, dtype):
    """Read the 2B last hidden rows and the head (fwd); read them again and write their gradients (bwd)."""
    s = (shape["B"] + 1) * shape["H"] * _item(dtype)
    return {"fwd": {"read": s}, "bwd": {"rw": 2 * s}}


_SHAPE = make_shape(16 * 128)
OP = OpSpec(
    name="bradley_terry",
    module="benchmarks.bench_bradley_terry",
    description="Bradley-Terry reward loss from the last hidden state [2B, T, H] through a scalar head",
    make_inputs=make_inputs,
    grad_inputs=("hidden", "head"),
    main_bytes=main_bytes,
    bytes_moved=bytes_moved,
    make_shape=make_shape,
    tokens=lambda s: s["B"] * s["T"],
    vocab=lambda s: 1,
    presets={"dry-run": [make_shape(64, hidden=32)], "quick": [_SHAPE], "default": [_SHAPE], "full": [_SHAPE]},
    preset_dtypes={"dry-run": ["fp32"], "quick": ["fp32"], "default": ["fp32", "bf16"], "full": ["fp32", "bf16"]},
    providers=[
        Provider(
            "naive",
            lambda: naive,
            mem_factor=1.0,
            description="gather the last hidden rows, scalar head, -logsigmoid(r_w - r_l - margin).mean()",
        ),
        Provider(
            "prefopt_fast",
            _ours,
            kind="ours",
            mem_factor=1.0,
            description="the same rewards, prefopt_fast.bradley_terry_loss (one implementation: no backends)",
        ),
    ],
    notes=["O(B) on scalars: the bound is microseconds; see the script's docstring"],
)

if __name__ == "__main__":
    sys.exit(S.script_main("benchmarks.bench_bradley_terry"))
