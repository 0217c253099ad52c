"""The machine's bound for a measured result, from the calibration (benchmarks/calibration.py):
the op's least traffic / exps / FLOPs per phase, the calibrations this process ran (cached
per size, measured again after the jobs and pooled), :func:`derive` (GB/s, x bound and the
calibration errors) and x naive (:func:`add_speedups`).
"""

from __future__ import annotations

import json
from typing import Sequence

import torch

from benchmarks.calibration import (
    exp_rate,
    first_touch_min_bytes,
    gemm_throughput,
    last_level_cache_bytes,
    memory_rates,
    merge_best,
    phase_bound,
    pool_dram_rates,
    traffic_parts,
)
from benchmarks.spec import DTYPES, PHASES, OpSpec, shape_label

# Calibration buffers are the size of the op's main tensor (the logits) up to this cap and a
# quarter of the available memory (three of them are alive at once).
CALIBRATION_CAP_BYTES = 4 << 30


# --------------------------------------------------------------------------- the op's least work and the bound


def bytes_by_phase(op: OpSpec, shape: dict, dtype: torch.dtype) -> dict:
    """Total bytes moved per phase (the sum of :func:`traffic_by_phase`'s parts)."""
    return {p: sum(t.values()) for p, t in traffic_by_phase(op, shape, dtype).items()}


def traffic_by_phase(op: OpSpec, shape: dict, dtype: torch.dtype) -> dict:
    """The op's least traffic per phase, split by access pattern (calibration.traffic_parts):
    ``{phase: {"read", "rw", "write"}}``; step = fwd + bwd, fwd_nograd = fwd."""
    b = op.bytes_moved(shape, dtype)
    out = {"fwd": traffic_parts(b["fwd"]), "bwd": traffic_parts(b["bwd"])}
    out["step"] = {k: out["fwd"][k] + out["bwd"][k] for k in out["fwd"]}
    out["fwd_nograd"] = dict(out["fwd"])
    return out


def _by_phase(f: dict, cast=float) -> dict:
    out = {"fwd": cast(f["fwd"]), "bwd": cast(f["bwd"])}
    out["step"] = out["fwd"] + out["bwd"]
    out["fwd_nograd"] = out["fwd"]
    return out


def flops_by_phase(op: OpSpec, shape: dict, dtype: torch.dtype) -> dict | None:
    return None if op.flops is None else _by_phase(op.flops(shape, dtype))


def exps_by_phase(op: OpSpec, shape: dict, dtype: torch.dtype) -> dict | None:
    return None if op.exps is None else _by_phase(op.exps(shape, dtype), int)


def derive(
    result: dict,
    op: OpSpec,
    shape: dict,
    dtype: torch.dtype,
    calib: dict,
    gemm: dict | None = None,
    *,
    inplace: bool = False,
    exp: dict | None = None,
    grad_in_forward: bool = False,
) -> None:
    """Add bytes_moved, traffic, the bound and the ratios to one measured result.

    calib: the memory calibration of the op's size (calibration.memory_rates, plus
    ``first_touch_min_bytes``); gemm / exp: the compute ceilings (None: not applicable or not
    measured). inplace: the provider writes its gradient over its input (rmw pattern, no
    fresh allocation); otherwise the gradient goes into freshly allocated memory (copy
    pattern plus the first touch of ``op.alloc_bytes`` in the backward).

    bound_s per phase: fwd and bwd from calibration.phase_bound; step = fwd + bwd (the
    backward starts when the forward has returned); fwd_nograd = fwd. bound_warm_s: the
    same without the first touch. grad_in_forward (Provider.grad_in_forward): the backward's
    work happens in the forward, so bwd gets no bound (None) while step keeps fwd + bwd. A phase whose fastest run is below its bound is recorded
    in ``calibration_error`` (phase -> fastest / bound): a lower bound cannot be beaten, so
    the calibration is wrong there, not the provider fast.
    """
    traffic = traffic_by_phase(op, shape, dtype)
    flops = flops_by_phase(op, shape, dtype)
    exps = exps_by_phase(op, shape, dtype)
    alloc = op.alloc_bytes(shape, dtype) if (op.alloc_bytes and not inplace) else 0
    fps = gemm["flops_per_s"] if gemm else None
    eps = exp.get("exp_per_s") if exp else None
    terms = {
        p: phase_bound(
            traffic[p],
            calib,
            inplace=inplace,
            alloc=alloc if p == "bwd" else 0,
            exps=exps[p] if exps else 0,
            exp_per_s=eps,
            flops=flops[p] if flops else 0,
            flops_per_s=fps,
        )
        for p in ("fwd", "bwd")
    }
    bound = {p: terms[p]["bound_s"] for p in terms}
    warm = {p: terms[p]["warm_s"] for p in terms}
    for d in (bound, warm):
        d["step"] = d["fwd"] + d["bwd"]
        d["fwd_nograd"] = d["fwd"]
        if grad_in_forward:
            d["bwd"] = None
    result["bytes_moved"] = {p: sum(t.values()) for p, t in traffic.items()}
    result["traffic"] = traffic
    if flops:
        result["flops"] = flops
    if exps:
        result["exps"] = exps
    result["bound_pattern"] = "in place (rmw)" if inplace else "fresh gradient (copy + first touch)"
    result["bound_s"], result["bound_warm_s"] = bound, warm
    result["bound_terms"] = terms
    ts = result.get("time_s") or {}
    result["gbps"], result["x_bound"], result["x_bound_warm"] = {}, {}, {}
    errors = {}
    for p in PHASES:
        t = ts.get(p)
        if not t or bound[p] is None:
            continue
        med = t["median"]
        result["gbps"][p] = result["bytes_moved"][p] / med / 1e9 if med > 0 else None
        result["x_bound"][p] = med / bound[p]
        result["x_bound_warm"][p] = med / warm[p]
        if t["min"] < bound[p]:
            errors[p] = t["min"] / bound[p]
    result["calibration_error"] = errors


def bound_limit(result: dict, phase: str) -> str:
    """Which term sets a phase's bound: "memory", "exp" or "gemm" (step: "fwd X + bwd Y")."""
    terms = result.get("bound_terms") or {}
    if phase == "step":
        return f"fwd {terms['fwd']['limit']} + bwd {terms['bwd']['limit']}"
    return terms["bwd" if phase == "bwd" else "fwd"]["limit"]


def calibration_error_notes(results: list) -> list:
    """One line per result with a phase measured below its bound (see derive)."""
    out = []
    for r in results:
        for p, x in (r.get("calibration_error") or {}).items():
            out.append(
                f"CALIBRATION ERROR: {r['provider']} {shape_label(r['shape'])} {r['dtype']} {p}: its fastest"
                f" run took {x:.2f}x its bound ({bound_limit(r, p)}): a time below a lower bound means"
                f" the calibration underestimates a rate here, not that the provider is that fast"
            )
    return out


def add_speedups(results: list, reference: Sequence[str]) -> None:
    """x naive: reference median / provider median, per phase, same shape and dtype."""
    by_case = {}
    for r in results:
        if r.get("status") == "ok":
            by_case.setdefault((json.dumps(r["shape"], sort_keys=True), r["dtype"]), {})[r["provider"]] = r
    for (_, _), rs in by_case.items():
        ref = next((rs[n] for n in reference if n in rs), None)
        for r in rs.values():
            r["reference"] = ref["provider"] if ref else None
            r["x_naive"] = {}
            if ref is None:
                continue
            for p in PHASES:
                a, b = (ref.get("time_s") or {}).get(p), (r.get("time_s") or {}).get(p)
                if a and b and b["median"] > 0:
                    r["x_naive"][p] = a["median"] / b["median"]


# --------------------------------------------------------------------------- this process's calibrations

_CALIBRATION_CACHE: dict = {}

CALIBRATION_NOTE = (
    "bound per phase = max(memory, exp, gemm): memory = read / read_Bps + rw / (rmw_Bps in place,"
    " copy_Bps otherwise) + write / write_Bps, plus for a fresh gradient its first touch at"
    " fresh_copy_Bps; exp = exps / exp_per_s; gemm = flops / flops_per_s. step = fwd + bwd,"
    " fwd_nograd = fwd. Rates are the best of the repeats (and of the rounds before and after"
    " the jobs). A phase whose fastest run is below its bound is listed in calibration_errors."
)


def calibration_bytes(main: int, avail: int | None) -> int:
    """Size of the calibration buffers: the op's main tensor, unless three of them (copy
    source, destination, a fresh one) would not fit; far beyond the caches a smaller buffer
    measures the same rates or higher ones, so the bound stays a lower bound."""
    cap = CALIBRATION_CAP_BYTES if avail is None else min(CALIBRATION_CAP_BYTES, avail // 4)
    return max(1, min(main, cap))


def _memory_settings(dry_run: bool, quick: bool) -> dict:
    """Calibration effort: at least 5 repeats of each candidate, more while under min_time."""
    return dict(repeats=5 if not dry_run else 3, min_time=0.05 if dry_run else (0.1 if quick else 0.6))


def pooled(calib: dict, device: str) -> dict:
    """``calib`` (keyed by main-tensor size) with the rates of this process's other
    calibrations far beyond the caches pooled in (calibration.pool_dram_rates)."""
    others = [
        c
        for k, c in _CALIBRATION_CACHE.items()
        if isinstance(k[0], int) and k[1] == device and c["nbytes"] not in {x["nbytes"] for x in calib.values()}
    ]
    mine = list(calib.values())
    merged = pool_dram_rates(mine + others, last_level_cache_bytes())[: len(mine)]
    return dict(zip(calib, merged))


def calibrate_memory(main: int, device: str, *, dry_run: bool, quick: bool, avail: int | None = None) -> dict:
    """The memory calibration for a main-tensor size ``main`` (cached per process, so the ops
    of one ``--op all`` run share it; each op's document gets its own copy)."""
    size = max(64, calibration_bytes(main, avail) // 4 * 4)  # whole fp32 buffers, as measured
    key = (size, device, dry_run, quick)
    if key not in _CALIBRATION_CACHE:
        c = memory_rates(size, device, **_memory_settings(dry_run, quick))
        c["capped"] = size < main
        c["first_touch_min_bytes"], c["first_touch_note"] = first_touch_min_bytes(device)
        _CALIBRATION_CACHE[key] = c
    return dict(_CALIBRATION_CACHE[key], for_main_bytes=main)


def recalibrate_memory(c: dict, *, dry_run: bool, quick: bool) -> dict:
    """The calibration ``c`` measured once more and merged (best of both rounds): a shared
    machine can make one window unlucky. Once per buffer size and process."""
    key = (c["nbytes"], c["device"], dry_run, quick)
    cached = _CALIBRATION_CACHE.get(key, c)
    if len(cached.get("rounds", {}).get("read_Bps", [])) < 2:
        again = memory_rates(c["nbytes"], c["device"], **_memory_settings(dry_run, quick))
        cached = merge_best(cached, again)
        _CALIBRATION_CACHE[key] = cached
    return dict(cached, for_main_bytes=c["for_main_bytes"])


def calibrate_exp(device: str, *, dry_run: bool, quick: bool, again: bool = False) -> dict:
    """The exp ceiling (calibration.exp_rate), cached per process; ``again``: measure once
    more and keep the better rate."""
    key = ("exp", device, dry_run, quick)
    kw = dict(repeats=3 if dry_run else 5, min_time=0.02 if dry_run else (0.1 if quick else 0.3))
    if key not in _CALIBRATION_CACHE:
        _CALIBRATION_CACHE[key] = exp_rate(device, **kw)
    elif again and len(_CALIBRATION_CACHE[key].get("rounds", [])) < 2:
        e, e2 = _CALIBRATION_CACHE[key], exp_rate(device, **kw)
        if "exp_per_s" in e and "exp_per_s" in e2:
            rounds = [e["exp_per_s"], e2["exp_per_s"]]
            _CALIBRATION_CACHE[key] = dict(
                e2 if e2["exp_per_s"] > e["exp_per_s"] else e, exp_per_s=max(rounds), rounds=rounds
            )
    return dict(_CALIBRATION_CACHE[key])


def calibrate_gemm(dtype: str, device: str, *, dry_run: bool, quick: bool) -> dict:
    key = ("gemm", dtype, device, dry_run, quick)
    if key not in _CALIBRATION_CACHE:
        g = gemm_throughput(DTYPES[dtype], device, size=256 if dry_run else (1024 if quick else 2048))
        g["dtype"] = dtype
        _CALIBRATION_CACHE[key] = g
    return dict(_CALIBRATION_CACHE[key])
