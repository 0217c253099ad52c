"""Generate docs/accuracy.md: the error of every op, per backend and dtype, against float64,
next to plain PyTorch's error on the same inputs.

    python tools/accuracy_table.py                  # the committed table (a few minutes on 2 cores)
    python tools/accuracy_table.py --tiny --out /tmp/acc.md   # a smoke run (seconds)
    TRITON_INTERPRET=1 python tools/accuracy_table.py          # adds the Triton interpreter (small shapes)

For every op the inputs are built once per dtype (fixed seed); then each output and gradient
is computed by

- fp64: the op's formula in float64 on the same inputs (the reference);
- plain fp32: the same formula on the inputs upcast to fp32 (``x.float()``), as careful
  plain PyTorch does; the baseline of the accuracy rule (2x its error plus a few ulps);
- plain in dtype: the same formula without the upcast (e.g. ``log_softmax`` in bf16, what
  TRL's ``selective_log_softmax`` does for 16-bit logits);
- each prefopt_fast backend available here.

The formulas are prefopt_fast.reference (the package's fp64 spec); baselines and error
definitions are those of tools/accuracy_rule.py (the property
tests' rule). Errors: absolute |x - ref| over the finite reference entries, max and mean;
relative |x - ref| / |ref| over the entries with |ref| >= 1e-6, max and mean.
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import accuracy_rule as bl  # noqa: E402  (tools/accuracy_rule.py: the rule, over prefopt_fast.reference)
import torch  # noqa: E402

SEED = 1234

# op -> (builder(dtype, size) -> Problem, outputs to report, label of the shape)
# size: "full" (the committed table), "small" (the Triton interpreter), "tiny" (smoke test)
SHAPES = {
    "full": dict(B=4, T=32, V=128256, N=64, H=512, heads_B=64),
    "small": dict(B=2, T=8, V=4096, N=16, H=64, heads_B=64),
    "tiny": dict(B=2, T=3, V=300, N=6, H=16, heads_B=8),
}


def _ops(s):
    B, T, V, N, H, HB = s["B"], s["T"], s["V"], s["N"], s["H"], s["heads_B"]
    return {
        "token_logprobs": (
            lambda dt: bl.make_token_problem(
                SEED,
                shape=(B, T, V),
                dtype=dt,
                scale=4.0,
                ignore_frac=0.1,
                stats=("entropy", "log_sum_sq_probs", "mean_logit"),
                temperature="float",
            ),
            ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit", "grad:logits"),
            f"logits [{B}, {T}, {V}], N(0, 4^2), 10% ignored, T ~ U(0.25, 4); gradient of w1 . logp + w2 . H",
        ),
        "sequence_logprobs": (
            lambda dt: bl.make_sequence_problem(SEED, B=B, T=T, V=V, dtype=dt, scale=4.0),
            ("seq", "grad:logits"),
            f"padded logits [{B}, {T}, {V}], 30% ignored, one sequence fully masked; sums",
        ),
        "logits_dpo_loss": (
            lambda dt: bl.make_logits_dpo_problem(
                SEED, B=B // 2, T=T, V=V, dtype=dt, loss_type="sigmoid", beta=0.1, scale=4.0
            ),
            ("loss", "rewards/margins", "grad:logits"),
            f"[{B}, {T}, {V}] = [chosen; rejected] with ref_logits, sigmoid, beta 0.1",
        ),
        "ppo_loss": (
            lambda dt: bl.make_ppo_problem(
                SEED,
                B=B,
                T=T,
                V=V,
                dtype=dt,
                kl_estimator="full",
                kl_coef=0.05,
                agg="token-mean",
                entropy_coef=0.01,
                scale=4.0,
            ),
            ("loss", "entropy", "grad:logits"),
            f"[{B}, {T}, {V}], exact KL to ref_logits (kl_coef 0.05), entropy bonus 0.01, token-mean",
        ),
        "linear_token_logprobs": (
            lambda dt: bl.make_linear_problem(SEED, N=N, H=H, V=V, dtype=dt, bias=True, chunk_size=max(1, N // 8)),
            ("logprobs", "entropy", "grad:hidden", "grad:weight"),
            f"hidden [{N}, {H}], weight [{V}, {H}] + bias, chunk_size {max(1, N // 8)}",
        ),
        "dpo_loss": (
            lambda dt: bl.make_dpo_problem(SEED, B=HB, dtype=dt, loss_type="sigmoid", beta=0.1, magnitude=200.0),
            ("loss", "grad:chosen_logps"),
            f"[{HB}] sequence log-probs in (-200, 0), sigmoid, beta 0.1",
        ),
        "bradley_terry_loss": (
            lambda dt: bl.make_bt_problem(SEED, B=HB, dtype=dt, margin="tensor", coef=0.01, magnitude=3.0),
            ("loss", "grad:chosen_rewards"),
            f"[{HB}] rewards N(0, 3^2), margin, centering 0.01",
        ),
    }


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        tv = "not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs ({torch.get_num_threads()} torch threads), load {load}; "
        f"Linux {platform.release()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {tv}"
    )


def commit() -> str:
    import subprocess

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "prefopt_fast", "csrc", "kernels"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev or "?") + (" + uncommitted changes to the package" if dirty else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return "?"


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.1e}"


def measure(ops, backends, dtypes, log=print):
    """[(op, dtype name, output, {column: stats})] for every combination."""
    rows = []
    for op, (build, outputs, _) in ops.items():
        for dname in dtypes:
            dt = bl.DTYPES[dname]
            t0 = time.time()
            pb = build(dt)
            ref = bl.evaluate(pb, "ref")
            cols = {"plain fp32": bl.evaluate(pb, "plain"), "plain in dtype": bl.evaluate(pb, "plain_dtype")}
            for be in backends if op in bl.BACKEND_OPS else ["(loss head)"]:
                cols[be] = bl.evaluate(pb, "lib", None if be == "(loss head)" else be)
            S = bl.logit_scale(pb)
            for out in outputs:
                stats = {c: bl.error_stats(v[out], ref[out]) for c, v in cols.items()}
                floor = bl.floor_for(ref[out]) * (max(1.0, S) if out.startswith("grad:") else 1.0)
                bound = 2 * bl.max_abs_err(cols["plain fp32"][out], ref[out]) + floor
                for c, st in stats.items():
                    st["of_bound"] = st["max_abs"] / bound if bound > 0 else 0.0
                rows.append((op, dname, out, stats))
            log(f"  {op} {dname}: {time.time() - t0:.1f} s")
    return rows


def table(rows, what: str):
    """One markdown table per op: each implementation's max / mean abs and rel error."""
    lines = []
    for op in dict.fromkeys(r[0] for r in rows):
        sel = [r for r in rows if r[0] == op]
        impls = [c for c in sel[0][3] if not c.startswith("plain")] + ["plain fp32", "plain in dtype"]
        lines.append(f"### {op}{what}\n")
        head = "| dtype | output | " + " | ".join(f"{c} max abs | mean abs | max rel" for c in impls) + " |"
        lines.append(head)
        lines.append("|" + "---|" * (2 + 3 * len(impls)))
        for _, dname, out, stats in sel:
            cells = []
            for c in impls:
                s = stats[c]
                cells += [fmt(s["max_abs"]), fmt(s["mean_abs"]), fmt(s["max_rel"])]
            lines.append(f"| {dname} | {out} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def ratios(rows, only=None, label=None):
    """Per op and implementation: the worst max-abs error relative to plain fp32 PyTorch's,
    and relative to the rule's bound (2x plain fp32 + floor; <= 1 meets the rule)."""
    worst = {}
    for op, dname, out, stats in rows:
        base = stats["plain fp32"]["max_abs"]
        for c, s in stats.items():
            if c == "plain fp32" or (only is not None and c != only):
                continue
            r = s["max_abs"] / base if base > 0 else (0.0 if s["max_abs"] == 0 else math.inf)
            key = (op, c)
            w = worst.setdefault(key, [-1.0, "", -1.0, ""])
            if r > w[0]:
                w[0], w[1] = r, f"{dname} {out}"
            if s["of_bound"] > w[2]:
                w[2], w[3] = s["of_bound"], f"{dname} {out}"
    lines = [
        "| op | implementation | worst error / plain fp32's | at | worst error / rule bound | at |",  # noqa
        "|---|---|---|---|---|---|",
    ]
    for (op, c), (r, where, b, bwhere) in worst.items():
        lines.append(f"| {op} | {label or c} | {r:.2g} | {where} | {b:.2g} | {bwhere} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "accuracy.md"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the script)")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--ops", default="", help="comma-separated subset of the ops")
    args = ap.parse_args(argv)

    import prefopt_fast as pf

    backends = [b for b in pf.available_backends()]
    dtypes = [d for d in args.dtypes.split(",") if d]
    size = "tiny" if args.tiny else "full"
    ops = _ops(SHAPES[size])
    if args.ops:
        ops = {k: v for k, v in ops.items() if k in args.ops.split(",")}
    native = [b for b in backends if b != "triton"]
    t0 = time.time()
    print(f"measuring {list(ops)} on {native} ({size} shapes)", file=sys.stderr)
    rows = measure(ops, native, dtypes, log=lambda m: print(m, file=sys.stderr))
    tri_rows, tri_ops = [], {}
    if "triton" in backends:
        tri_ops = {
            k: v for k, v in _ops(SHAPES["tiny" if args.tiny else "small"]).items() if k in ops and k in bl.BACKEND_OPS
        }
        print("measuring the Triton interpreter on small shapes", file=sys.stderr)
        tri_rows = measure(tri_ops, ["triton", *native], dtypes, log=lambda m: print(m, file=sys.stderr))
    elapsed = time.time() - t0

    doc = [
        "# Accuracy against float64",
        "",
        "Generated by `python tools/accuracy_table.py` (do not edit by hand). Every op, per backend and",
        "input dtype, against the op's formula in float64 on the same inputs, next to plain PyTorch on",
        "the same inputs: **plain fp32** upcasts the inputs with `.float()` first (the baseline of the",
        "accuracy rule in [`tools/accuracy_rule.py`](../tools/accuracy_rule.py): a backend's max error must stay",
        "within 2x of it plus a few fp32 ulps; the property tests check it on random inputs), **plain in",
        "dtype** computes in the input dtype (e.g. `log_softmax` in bf16, as TRL's `selective_log_softmax`",
        "does for 16-bit logits). Gradients are returned in the input dtype by every implementation, so",
        "their errors include one rounding to it.",
        "",
        "Errors: absolute `|x - ref|` over the finite reference entries (max, mean); relative",
        "`|x - ref| / |ref|` over the entries with `|ref| >= 1e-6` (max). `grad:<input>` is the",
        "gradient of the op's outputs weighted by fixed random cotangents (for losses: of the loss).",
        "",
        f"- machine: {machine()}",
        f"- generated: {datetime.date.today().isoformat()} from commit {commit()}, seed {SEED}, {elapsed:.0f} s",
        f"- backends: {', '.join(backends)}"
        + ("" if "triton" in backends else " (run with TRITON_INTERPRET=1 to add the Triton interpreter)"),
        "",
        "## Shapes",
        "",
    ]
    for op, (_, _, label) in ops.items():
        doc.append(f"- `{op}`: {label}")
    if tri_ops:
        doc.append("")
        doc.append("Triton interpreter section (small shapes, the interpreter runs ~1 ms per program per tile):")
        doc.append("")
        for op, (_, _, label) in tri_ops.items():
            doc.append(f"- `{op}`: {label}")
    doc += [
        "",
        "## Summary",
        "",
        "The worst case over dtypes and outputs of each implementation's max abs error, divided by plain",
        "fp32 PyTorch's and by the accuracy rule's bound (`2 x plain fp32 + floor`; at most 1 meets the",
        "rule; the floor is a few fp32 ulps at the output's scale, times max|logits / T| for gradients,",
        'see tools/accuracy_rule.py). "plain in dtype" is listed for comparison.',
        "",
        ratios(rows),
    ]
    if tri_rows:
        doc += [
            "",
            "The Triton interpreter on the small shapes (its fp32 -> bf16 cast truncates where a GPU rounds,",
            "so its bf16 gradients may reach twice the bound computed from rounded plain PyTorch):",
            "",
            ratios(tri_rows, only="triton", label="triton (interpreted)"),
        ]
    doc += ["", "## Errors", "", table(rows, "")]
    if tri_rows:
        doc += [
            "## Triton interpreter (small shapes)",
            "",
            "The interpreter casts fp32 -> bf16 by truncation, a GPU rounds: bf16 gradients here carry up to",
            "one bf16 ulp where the GPU carries half.",
            "",
            table(tri_rows, " (small shapes)"),
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(doc).rstrip() + "\n")
    print(f"wrote {args.out} in {elapsed:.0f} s", file=sys.stderr)
    return rows + tri_rows


if __name__ == "__main__":
    main()
