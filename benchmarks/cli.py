"""The command line (``python -m benchmarks``) and the run of one op: which ops and providers,
the plan of jobs (memory guard, skips), :func:`run` (calibrate, run the jobs, derive the
bound, write the outputs), :func:`main`, and the strict-mode check of a finished run
(:func:`broken_providers`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import gc
import json
import sys
import time
from typing import Iterable, Sequence

from benchmarks import strict
from benchmarks.bound import (
    CALIBRATION_NOTE,
    add_speedups,
    calibrate_exp,
    calibrate_gemm,
    calibrate_memory,
    calibration_error_notes,
    derive,
    pooled,
    recalibrate_memory,
)
from benchmarks.measure import (
    PRESET_SETTINGS,
    available_memory,
    default_device,
    machine_info,
    malloc_trim,
    run_job,
    run_job_subprocess,
)
from benchmarks.report import SCHEMA, write_outputs
from benchmarks.spec import DTYPES, Case, OpSpec, Provider, availability, canonical_dtype, load_op, shape_label

# How the (provider, shape) cases are run by default: "shape" = one fresh worker process per
# (provider, shape); "provider" = one worker per provider running all its shapes in turn;
# "op" = one worker per op running every provider and shape in turn (the peak-RSS counter is
# reset per region, so the memory figures stay per case; this saves the ~3-7 s start-up of a
# worker, which would take a quarter of --full); "inline" = in this process (--quick and
# --dry-run: seconds matter more than isolation there).
PRESET_JOBS = {"dry-run": "inline", "quick": "inline", "default": "shape", "full": "op"}

# Peak memory a case may be expected to need before it is skipped (bytes; --max-mem-gb).
DEFAULT_MEM_CAP = 16 << 30


# --------------------------------------------------------------------------- the run


class Progress:
    """tqdm on stderr if installed, else one plain line per finished job."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="job", dynamic_ncols=True)
            except Exception:
                self.bar = None

    def start(self, label: str):
        if self.bar is not None:
            self.bar.set_description(label[:60])
        elif self.enabled:
            print(f"[{self.done + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def finish(self, label: str, seconds: float):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label} done in {seconds:.1f} s", file=sys.stderr, flush=True)

    def note(self, msg: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def select_providers(op: OpSpec, patterns: Sequence[str] | None, preset: str) -> tuple[list, list]:
    """Providers to run (in table order) and notes on those left out by the preset.

    Without ``patterns`` (--providers), the op's ``preset_providers[preset]`` globs (if any)
    restrict the table (e.g. a sweep that would take too long with every provider), and
    compiling providers are left out of --quick.
    """
    notes = []
    if patterns:
        chosen = [p for p in op.providers if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
        unknown = [pat for pat in patterns if not any(fnmatch.fnmatchcase(p.name, pat) for p in op.providers)]
        for pat in unknown:
            notes.append(
                f"--providers {pat!r} matches no provider of {op.name} "
                f"(known: {', '.join(p.name for p in op.providers)})"
            )
        return chosen, notes
    chosen = []
    keep = op.preset_providers.get(preset)
    for p in op.providers:
        if keep is not None and not any(fnmatch.fnmatchcase(p.name, pat) for pat in keep):
            notes.append(f"{p.name}: not in the {preset} preset of {op.name} (name it in --providers to include it)")
            continue
        if preset in ("quick",) and p.slow_setup:
            notes.append(
                f"{p.name}: left out of --quick (its first call compiles, ~10-30 s here);"
                f" name it in --providers to include it"
            )
            continue
        chosen.append(p)
    return chosen, notes


def memory_guard(
    op: OpSpec, provider: Provider, case: Case, avail: int | None, cap: int | None = DEFAULT_MEM_CAP
) -> str | None:
    """A skip note if the case's estimated peak (inputs + the provider's extra, from
    ``mem_factor``) exceeds 85% of the available memory or ``cap``; None if it fits."""
    limits = [x for x in (None if avail is None else 0.85 * avail, cap) if x is not None]
    if not limits:
        return None
    main = op.main_bytes(case.shape_dict, case.torch_dtype)
    need = main * (1.0 + (1.0 if provider.mutates else 0.0) + provider.mem_factor) + 300e6
    if need > min(limits):
        have = f"{avail / 1e9:.1f} GB available" if avail is not None else "no memory figure"
        cap_s = f", cap {cap / 2**30:.0f} GiB (--max-mem-gb)" if cap is not None else ""
        return f"skipped: needs about {need / 1e9:.1f} GB ({have}{cap_s})"
    return None


def plan(
    op: OpSpec,
    providers: list,
    shapes: list,
    dtypes: list,
    device: str,
    avail: int | None,
    cap: int | None = DEFAULT_MEM_CAP,
    per: str = "shape",
) -> tuple[list, list]:
    """Jobs and per-case skip results. ``per="shape"``: one job per (provider, shape) with the
    dtypes that apply; ``per="provider"``: one job per provider holding all its shapes;
    ``per="op"``: one job holding all of them (``subjobs``)."""
    jobs, skipped = [], []
    for shape in shapes:
        for prov in providers:
            run_dtypes = []
            for dt in dtypes:
                case = Case.make(shape, dt, device)
                reason = prov.check(case) if prov.check else None
                if reason is None:
                    reason = memory_guard(op, prov, case, avail, cap)
                if reason is not None:
                    skipped.append(new_result(op, prov, case, status="skipped", note=reason))
                else:
                    run_dtypes.append(case.dtype)
            if run_dtypes:
                jobs.append(
                    {
                        "module": op.module,
                        "provider": prov.name,
                        "shape": dict(shape),
                        "dtypes": run_dtypes,
                        "device": device,
                    }
                )
    if per == "op" and jobs:
        jobs = [{"module": op.module, "provider": f"{len(providers)} providers", "device": device, "subjobs": jobs}]
    if per == "provider":
        merged: dict = {}
        for j in jobs:
            m = merged.setdefault(
                j["provider"], {"module": op.module, "provider": j["provider"], "device": device, "cases": []}
            )
            m["cases"].append({"shape": j["shape"], "dtypes": j["dtypes"]})
        jobs = list(merged.values())
    return jobs, skipped


def job_label(job: dict) -> str:
    if "subjobs" in job:
        return f"{job['provider']} x {len({json.dumps(j['shape']) for j in job['subjobs']})} shapes"
    if "cases" in job:
        return f"{job['provider']} ({len(job['cases'])} shapes)"
    return f"{job['provider']} {shape_label(job['shape'])} {','.join(job['dtypes'])}"


def new_result(op: OpSpec, prov: Provider, case: Case, **kw) -> dict:
    shape = case.shape_dict
    r = {
        "provider": prov.name,
        "kind": prov.kind,
        "shape": shape,
        "tokens": op.tokens(shape),
        "vocab": op.vocab(shape),
        "dtype": case.dtype,
        "device": case.device,
    }
    r.update(kw)
    return r


def run(
    op: OpSpec,
    *,
    preset: str = "default",
    providers: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    device: str | None = None,
    outdir: str = "results",
    dry_run: bool = False,
    shapes: list | None = None,
    subprocesses: bool | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    plots: bool = True,
    progress: bool = True,
    timeout: float = 1800.0,
    quiet: bool = False,
    jobs_per: str | None = None,
    mem_cap: int | None = DEFAULT_MEM_CAP,
) -> dict:
    """Run the benchmark of one op and write its outputs; returns the JSON document.

    jobs_per: "inline", "shape" or "provider" (see PRESET_JOBS; default per preset);
    ``subprocesses=False`` is "inline", ``True`` the preset's subprocess mode (or "shape").
    mem_cap: skip cases estimated to need more peak memory than this (bytes; None: no cap).
    """
    device = device or default_device()
    name = "dry-run" if dry_run else preset
    settings = dict(PRESET_SETTINGS[name])
    if repeats is not None:
        settings["repeats"] = max(1, repeats)
        settings["min_repeats"] = min(settings["min_repeats"], settings["repeats"])
    if warmup is not None:
        settings["warmup"] = max(0, warmup)
    settings["dry_run"] = dry_run
    if jobs_per is None:
        jobs_per = PRESET_JOBS[name]
        if subprocesses is False:
            jobs_per = "inline"
        elif subprocesses and jobs_per == "inline":
            jobs_per = "shape"
    quick = preset == "quick" and not dry_run
    shapes = shapes or op.presets[name]
    dtypes = [canonical_dtype(d) for d in (dtypes or op.preset_dtypes.get(preset) or op.preset_dtypes["default"])]
    chosen, notes = select_providers(op, providers, preset)
    notes = list(op.notes) + notes
    prov_table = []
    runnable = []
    for p in chosen:
        why = availability(p)
        prov_table.append(
            {
                "name": p.name,
                "kind": p.kind,
                "description": p.description,
                "requires": list(p.requires),
                "status": "skipped" if why else "ok",
                "note": why,
            }
        )
        if why:
            notes.append(f"{p.name}: {why}")
        else:
            runnable.append(p)

    avail = available_memory(device)
    jobs, results = plan(
        op,
        runnable,
        shapes,
        dtypes,
        device,
        avail,
        mem_cap,
        per=jobs_per if jobs_per in ("provider", "op") else "shape",
    )

    # calibration, before any job, once per distinct logits size
    calib = {}
    gemm_list, gemm = [], {}
    for shape in shapes:
        for dt in dtypes:
            main = op.main_bytes(shape, DTYPES[dt])
            if main not in calib:
                calib[main] = calibrate_memory(main, device, dry_run=dry_run, quick=quick, avail=avail)
            if op.flops is not None and dt not in gemm:
                gemm[dt] = calibrate_gemm(dt, device, dry_run=dry_run, quick=quick)
                gemm_list.append(gemm[dt])
    exp = calibrate_exp(device, dry_run=dry_run, quick=quick) if op.exps is not None else None
    gc.collect()
    malloc_trim()

    bar = Progress(len(jobs), enabled=progress)
    for n in notes:
        bar.note(f"note: {n}")
    t_all = time.perf_counter()
    for job in jobs:
        job["settings"] = settings
        label = job_label(job)
        bar.start(label)
        t0 = time.perf_counter()
        if jobs_per == "inline":
            outs = run_job(job, op=op)
        else:
            outs = run_job_subprocess(job, timeout)
        for o in outs:
            prov = op.provider(o.pop("provider", job["provider"]))
            case = Case.make(o.pop("shape"), o.pop("dtype"), device)
            r = new_result(op, prov, case, **o)
            if r.get("status") != "ok":
                bar.note(f"{prov.name} {shape_label(case.shape_dict)} {case.dtype}: {r.get('status')}: {r.get('note')}")
            results.append(r)
        bar.finish(label, time.perf_counter() - t0)
    bar.close()

    # the calibration again after the jobs: on a shared machine one window can be unlucky,
    # and the bound takes the best rate seen (once per size and process: with --op all the
    # later ops reuse the merged figures); not in a dry run, which times nothing
    if not dry_run and jobs:
        calib = {m: recalibrate_memory(c, dry_run=dry_run, quick=quick) for m, c in calib.items()}
        if exp is not None:
            exp = calibrate_exp(device, dry_run=dry_run, quick=quick, again=True)
        gc.collect()
        malloc_trim()
    calib = pooled(calib, device)
    exp_ok = exp if exp and "exp_per_s" in exp else None
    for r in results:
        if r.get("status") == "ok":
            prov, d = op.provider(r["provider"]), DTYPES[r["dtype"]]
            derive(
                r,
                op,
                r["shape"],
                d,
                calib[op.main_bytes(r["shape"], d)],
                gemm.get(r["dtype"]),
                inplace=bool(prov.mutates),
                exp=exp_ok,
                grad_in_forward=prov.grad_in_forward,
            )
    cal_errors = calibration_error_notes(results)

    # table order: shapes as given, dtypes as given, providers in table order
    order_p = {p.name: i for i, p in enumerate(op.providers)}
    order_s = {json.dumps(dict(s)): i for i, s in enumerate(shapes)}
    results.sort(
        key=lambda r: (order_s.get(json.dumps(r["shape"]), 0), dtypes.index(r["dtype"]), order_p.get(r["provider"], 0))
    )
    add_speedups(results, op.reference)

    doc = {
        "schema": SCHEMA,
        "op": op.name,
        "description": op.description,
        "preset": "dry-run" if dry_run else preset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t_all,
        "machine": machine_info(device),
        "settings": {
            **settings,
            "subprocess_per_job": jobs_per != "inline",
            "jobs_per": jobs_per,
            "mem_cap_bytes": mem_cap,
            "dtypes": dtypes,
            "shapes": [dict(s) for s in shapes],
        },
        "calibration": {"memory": list(calib.values()), "exp": exp, "gemm": gemm_list, "note": CALIBRATION_NOTE},
        "calibration_errors": cal_errors,
        "providers": prov_table,
        "notes": notes,
        "results": results,
    }
    write_outputs(doc, op, outdir, device, plots=plots, quiet=quiet)
    return doc


# --------------------------------------------------------------------------- CLI


def _csv(s: str | None) -> list | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def build_parser(op_names: Iterable[str] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="prefopt_fast benchmarks: time, peak extra memory, GB/s and the machine's bound, "
        "against naive PyTorch and the peers installed here.",
    )
    names = list(op_names)
    p.add_argument(
        "--op",
        default=None,
        help=f"ops to benchmark, comma-separated names or globs ({', '.join(names)}; 'all' for"
        f" every op). Default: every op with --quick / --full / --dry-run,"
        f" {names[0] if names else '-'} otherwise",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick",
        action="store_const",
        dest="preset",
        const="quick",
        help="one small shape, few repeats (under a minute on a 2-core machine)",
    )
    g.add_argument(
        "--full",
        action="store_const",
        dest="preset",
        const="full",
        help="sweep V in {32000, 128256, 256000} x token counts",
    )
    p.set_defaults(preset="default")
    p.add_argument("--providers", help="comma-separated provider names or globs (e.g. 'naive*,prefopt_fast.*')")
    p.add_argument("--dtypes", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--tokens", help="comma-separated token counts (overrides the preset's shapes)")
    p.add_argument("--vocab", help="comma-separated vocabulary sizes (overrides the preset's shapes)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument(
        "--dry-run", action="store_true", help="run every provider once on tiny shapes, no timing loops (smoke test)"
    )
    p.add_argument("--repeats", type=int, help="timing repeats per phase (default: per preset)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: per preset)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of a fresh subprocess per (provider, shape)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker job")
    p.add_argument(
        "--max-mem-gb",
        type=float,
        default=DEFAULT_MEM_CAP / 2**30,
        help="skip cases estimated to need more peak memory than this (GiB; default 16)",
    )
    p.add_argument(
        "--jobs-per",
        choices=("shape", "provider", "op", "inline"),
        help="one worker process per (provider, shape), per provider, per op, or none"
        " (default: inline for --quick / --dry-run, op for --full, shape otherwise)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list the providers and whether they run here")
    return p


def shapes_from_args(op: OpSpec, preset: str, tokens, vocab, dry_run: bool) -> list | None:
    """The grid of --tokens x --vocab; other shape keys (e.g. the hidden size H of the
    fused-linear ops) keep the preset's value when all its shapes agree on it."""
    if not tokens and not vocab:
        return None
    base = op.presets["dry-run" if dry_run else preset]
    ts = [int(t) for t in tokens] if tokens else sorted({op.tokens(s) for s in base})
    vs = [int(v) for v in vocab] if vocab else sorted({op.vocab(s) for s in base})
    out = []
    for v in vs:
        for t in ts:
            s = op.make_shape(t, v)
            for k, val in base[0].items():
                if k not in ("B", "T", "V") and k in s and all(b.get(k) == val for b in base):
                    s[k] = val
            out.append(s)
    return out


def list_providers(op: OpSpec, device: str) -> str:
    lines = [f"{op.name} providers (device {device}):"]
    for p in op.providers:
        why = availability(p)
        extra = " [slow setup: not in --quick]" if p.slow_setup else ""
        lines.append(f"  {p.name:28s} {p.kind:8s} {'skip: ' + why if why else 'ok'}{extra}  {p.description}")
    for n in op.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def select_ops(spec: str | None, names: Sequence[str], preset: str, dry_run: bool) -> list:
    """Op names from ``--op`` (comma-separated names or globs, 'all'); raises KeyError."""
    if not spec:
        spec = "all" if (preset in ("quick", "full") or dry_run) else names[0]
    out = []
    for pat in _csv(spec) or []:
        hit = list(names) if pat == "all" else [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise KeyError(pat)
        out += [n for n in hit if n not in out]
    return out


def main(argv: Sequence[str] | None = None, op: OpSpec | None = None, ops: dict | None = None) -> int:
    """The command line. ``op``: run this one op (a script run directly); ``ops``: name ->
    module spec to choose from (default: benchmarks.OPS)."""
    if op is not None:
        ops = {op.name: op.module}
    elif ops is None:
        from . import OPS  # op name -> module

        ops = dict(OPS)
    args = build_parser(ops).parse_args(argv)
    try:
        names = select_ops(args.op, list(ops), args.preset, args.dry_run)
    except KeyError as exc:
        print(f"unknown --op {exc.args[0]!r}; known: {', '.join(ops)}", file=sys.stderr)
        return 2
    device = args.device or default_device()
    t0 = time.perf_counter()
    broken = []
    for name in names:
        spec = op if op is not None and op.name == name else load_op(ops[name])
        if args.list:
            print(list_providers(spec, device))
            continue
        shapes = shapes_from_args(spec, args.preset, _csv(args.tokens), _csv(args.vocab), args.dry_run)
        doc = run(
            spec,
            preset=args.preset,
            providers=_csv(args.providers),
            dtypes=_csv(args.dtypes),
            device=device,
            outdir=args.out,
            dry_run=args.dry_run,
            shapes=shapes,
            subprocesses=False if args.in_process else None,
            repeats=args.repeats,
            warmup=args.warmup,
            plots=not args.no_plots,
            progress=not args.no_progress,
            timeout=args.timeout,
            jobs_per=args.jobs_per,
            mem_cap=int(args.max_mem_gb * 2**30) if args.max_mem_gb > 0 else None,
        )
        print()
        broken += [f"{doc['op']}: {b}" for b in broken_providers(doc)]
    if len(names) > 1 and not args.list:
        print(f"{len(names)} ops in {time.perf_counter() - t0:.0f} s: {', '.join(names)}")
    if broken and strict_mode():
        print(
            "error: PREFOPT_STRICT=1 and providers that should run here did not (missing or broken install; "
            "PREFOPT_ALLOW_MISSING=name[,...] names the ones to leave out):\n  " + "\n  ".join(broken),
            file=sys.stderr,
        )
        return 1
    return 0


def strict_mode() -> bool:
    """PREFOPT_STRICT=1 (scripts/bench.sh) or CI: an installed-but-broken or missing peer fails the run
    (benchmarks/strict.py, the rule the tests use too)."""
    return strict.strict_mode()


def broken_providers(doc: dict) -> list:
    """The providers of ``doc`` that could not run for a reason of the install (not installed,
    failing to import, a prefopt_fast backend that should be built here), minus those named
    in PREFOPT_ALLOW_MISSING (by distribution name, e.g. ``trl,liger-kernel``). A provider
    that cannot serve this device (CUDA-only kernels on a CPU) is not broken."""
    if "all" in strict.allowed_missing():
        return []
    out = []
    for p in doc.get("providers", []):
        note = p.get("note") or ""
        if p.get("status") == "skipped" and note.startswith("not installed"):
            out.append(f"{p['name']}: {note}")
    for r in doc.get("results", []):
        note = r.get("note") or ""
        if r.get("status") == "skipped" and note.startswith("import failed") and f"{r['provider']}: {note}" not in out:
            out.append(f"{r['provider']}: {note}")
    for n in doc.get("notes", []):
        # prefopt_fast backends that are not there: the native cpu backend is expected on a CPU
        if n.startswith("prefopt_fast.cpu: skipped") and doc["machine"].get("device", "cpu").startswith("cpu"):
            out.append(n)
    modules = {p["name"]: p.get("requires", []) for p in doc.get("providers", [])}
    return [
        b
        for b in out
        if not any(strict.may_be_missing(m) for m in modules.get(b.split(":")[0], []))
        and not (strict.may_be_missing("cpu-extension") and b.startswith("prefopt_fast.cpu"))
    ]
