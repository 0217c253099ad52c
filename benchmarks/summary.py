"""One line per op from a results folder: the largest vocabulary of a sweep, ours against
naive PyTorch and the best peer that ran.

    python -m benchmarks.summary results/full            # markdown on stdout

For each op JSON (``<op>_<preset>_<device>.json``) and dtype, the case with the largest V
(and, among those, the most tokens) is summarized: naive's step time, the fastest peer,
the fastest prefopt_fast provider, its speed-up over naive, its ratio to the bound and the
peak extra memory of both.
"""

import argparse
import glob
import json
import os

_NOT_PEERS = ("naive", "matmul-floor", "token_logprobs+entropy")


def _step(r: dict):
    ph = _phase(r.get("time_s"))
    return ph["median"] if ph else None


def _phase(by_phase):
    """The step's value of a per-phase dict, or the no-grad forward's for forward-only providers."""
    by_phase = by_phase or {}
    return by_phase.get("step", by_phase.get("fwd_nograd"))


def _mem(r: dict):
    return _phase(r.get("mem_bytes"))


def _role(provider: str) -> str:
    if provider.startswith("prefopt_fast."):
        return "ours"
    if provider == "naive":
        return "naive"
    return "other" if provider.startswith(_NOT_PEERS) else "peer"


def summarize_doc(doc: dict) -> list:
    """[dict(op, dtype, tokens, vocab, naive, peer, ours, ...)] for the largest case per dtype."""
    ok = [r for r in doc["results"] if r.get("status") == "ok" and _step(r) is not None]
    rows = []
    for dt in dict.fromkeys(r["dtype"] for r in ok):
        rs = [r for r in ok if r["dtype"] == dt]
        vocab, tokens = max((r["vocab"], r["tokens"]) for r in rs)
        case = [r for r in rs if r["vocab"] == vocab and r["tokens"] == tokens]
        best = {}
        for r in case:
            role = _role(r["provider"])
            if role not in best or _step(r) < _step(best[role]):
                best[role] = r
        if "ours" not in best or "naive" not in best:
            continue
        ours, naive, peer = best["ours"], best["naive"], best.get("peer")
        rows.append(
            dict(
                op=doc["op"],
                dtype=dt,
                tokens=tokens,
                vocab=vocab,
                naive_ms=_step(naive) * 1e3,
                naive_mb=(_mem(naive) or 0) / 1e6,
                peer=peer["provider"] if peer else None,
                peer_ms=_step(peer) * 1e3 if peer else None,
                ours=ours["provider"].removeprefix("prefopt_fast."),
                ours_ms=_step(ours) * 1e3,
                ours_mb=(_mem(ours) or 0) / 1e6,
                x_naive=_step(naive) / _step(ours),
                x_bound=_phase(ours.get("x_bound")),
                below_bound=bool(ours.get("calibration_error")),
            )
        )
    return rows


def markdown(rows: list) -> str:
    out = [
        "| op | dtype | tokens x V | naive | best peer | prefopt_fast | x naive | x bound | peak extra (ours / naive) |",
        "|---|---|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        peer = f"{r['peer']} {r['peer_ms']:.0f} ms" if r["peer"] else "none ran"
        xb = f"{r['x_bound']:.1f}" if isinstance(r["x_bound"], (int, float)) else "-"
        if r.get("below_bound"):  # a phase ran below its bound: the calibration is wrong there
            xb += " !"
        out.append(
            f"| {r['op']} | {r['dtype']} | {r['tokens']} x {r['vocab']} | {r['naive_ms']:.0f} ms | {peer} "
            f"| {r['ours']} {r['ours_ms']:.0f} ms | {r['x_naive']:.1f} | {xb} "
            f"| {r['ours_mb']:.0f} / {r['naive_mb']:.0f} MB |"
        )
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a results folder written by python -m benchmarks")
    args = ap.parse_args(argv)
    rows = []
    for path in sorted(glob.glob(os.path.join(args.folder, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        if "results" in doc and "op" in doc:
            rows += summarize_doc(doc)
    print(markdown(rows))


if __name__ == "__main__":
    main()
