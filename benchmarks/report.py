"""Reporting a results document: the JSON schema check (:func:`validate_doc`), the terminal /
markdown tables, the PNG plots, and the files of a run (:func:`write_outputs`).
"""

from __future__ import annotations

import json
import os

from benchmarks.calibration import MEMORY_PATTERNS, TRAFFIC_PARTS
from benchmarks.spec import DTYPES, PHASES, OpSpec, shape_label

SCHEMA = "prefopt_fast.benchmarks/2"


# --------------------------------------------------------------------------- JSON schema

_TIME_KEYS = ("median", "min", "max", "q1", "q3", "n", "samples")


def validate_doc(doc: dict) -> list:
    """Problems with a results document against the schema of benchmarks/README.md ([] if none)."""
    errs = []

    def need(obj, key, types, where):
        if not isinstance(obj, dict) or key not in obj:
            errs.append(f"{where}: missing {key!r}")
            return None
        if not isinstance(obj[key], types):
            errs.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
            return None
        return obj[key]

    num = (int, float)
    if doc.get("schema") != SCHEMA:
        errs.append(f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
    for k, t in (
        ("op", str),
        ("preset", str),
        ("created", str),
        ("machine", dict),
        ("settings", dict),
        ("calibration", dict),
        ("calibration_errors", list),
        ("providers", list),
        ("notes", list),
        ("results", list),
    ):
        need(doc, k, t, "doc")
    m = doc.get("machine") or {}
    for k, t in (("device", str), ("torch", str), ("cpu_count", int), ("torch_threads", int)):
        need(m, k, t, "machine")
    cal = doc.get("calibration") or {}
    for i, c in enumerate(need(cal, "memory", list, "calibration") or []):
        for k in ("nbytes", "for_main_bytes") + tuple(f"{p}_Bps" for p in MEMORY_PATTERNS):
            need(c, k, num, f"calibration.memory[{i}]")
    if "exp" not in cal:
        errs.append("calibration: missing 'exp'")
    elif cal["exp"] is not None and not isinstance(
        cal["exp"].get("exp_per_s", cal["exp"].get("error")), (int, float, str)
    ):
        errs.append("calibration.exp: expected exp_per_s or error")
    for i, g in enumerate(need(cal, "gemm", list, "calibration") or []):
        for k in ("flops_per_s", "size"):
            need(g, k, num, f"calibration.gemm[{i}]")
        need(g, "dtype", str, f"calibration.gemm[{i}]")
    for i, p in enumerate(doc.get("providers") or []):
        for k in ("name", "kind", "status"):
            need(p, k, str, f"providers[{i}]")
        if p.get("status") not in ("ok", "skipped"):
            errs.append(f"providers[{i}].status: {p.get('status')!r}")
    for i, r in enumerate(doc.get("results") or []):
        w = f"results[{i}]"
        for k, t in (
            ("provider", str),
            ("kind", str),
            ("shape", dict),
            ("tokens", int),
            ("vocab", int),
            ("dtype", str),
            ("device", str),
            ("status", str),
        ):
            need(r, k, t, w)
        st = r.get("status")
        if st not in ("ok", "skipped", "error"):
            errs.append(f"{w}.status: {st!r}")
        if st != "ok":
            need(r, "note", str, w)
            continue
        ts = need(r, "time_s", dict, w) or {}
        for ph in PHASES:
            if ph not in ts:
                errs.append(f"{w}.time_s: missing {ph!r}")
            elif ts[ph] is not None:
                for k in _TIME_KEYS:
                    need(ts[ph], k, list if k == "samples" else num, f"{w}.time_s.{ph}")
        for k in (
            "mem_bytes",
            "bytes_moved",
            "bound_s",
            "bound_warm_s",
            "gbps",
            "x_bound",
            "x_bound_warm",
            "x_naive",
            "calibration_error",
        ):
            d = need(r, k, dict, w) or {}
            for ph, v in d.items():
                if ph not in PHASES:
                    errs.append(f"{w}.{k}: unknown phase {ph!r}")
                elif v is not None and not isinstance(v, num):
                    errs.append(f"{w}.{k}.{ph}: not a number")
        need(r, "mem_method", str, w)
        for ph, t in (need(r, "traffic", dict, w) or {}).items():
            if not isinstance(t, dict) or set(t) != set(TRAFFIC_PARTS):
                errs.append(f"{w}.traffic.{ph}: expected the parts {TRAFFIC_PARTS}")
        for ph in ("fwd", "bwd"):
            term = (need(r, "bound_terms", dict, w) or {}).get(ph)
            if not isinstance(term, dict) or term.get("limit") not in ("memory", "exp", "gemm"):
                errs.append(f"{w}.bound_terms.{ph}: expected the terms of calibration.phase_bound")
    return errs


# --------------------------------------------------------------------------- output


def _t(seconds: float) -> str:
    """Milliseconds with three significant digits or so (0.123, 12.3, 123)."""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def _median(t: dict | None) -> str:
    return "-" if not t else _t(t["median"])


def _spread(t: dict | None) -> str:
    """median [min-max] of a phase's repeats, in ms (the median alone for a single run)."""
    if not t:
        return "-"
    if t.get("n", 2) < 2:
        return _t(t["median"])
    return f"{_t(t['median'])} [{_t(t['min'])}-{_t(t['max'])}]"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.4g} MB"


def _num(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def _gbs(bps: float | None) -> str:
    return "-" if not bps else f"{bps / 1e9:.1f}"


TABLE_COLUMNS = (
    "provider",
    "fwd ms",
    "bwd ms",
    "step ms [min-max]",
    "no-grad fwd ms [min-max]",
    "peak extra MB",
    "GB/s",
    "bound ms",
    "x bound",
    "x naive",
)
# in the x bound column: a phase of this row ran faster than its bound (a calibration error)
BELOW_BOUND_MARK = " !"


def table_rows(results: list) -> list:
    rows = []
    for r in results:
        if r.get("status") != "ok":
            rows.append([r["provider"], f"{r.get('status')}: {r.get('note', '')}"])
            continue
        t, mem = r.get("time_s") or {}, r.get("mem_bytes") or {}
        peak = mem.get("step", mem.get("fwd_nograd"))
        phase = "step" if t.get("step") else "fwd_nograd"
        bound = (r.get("bound_s") or {}).get(phase)
        xb = _num(r.get("x_bound", {}).get(phase), ".2f")
        if r.get("calibration_error"):
            xb += BELOW_BOUND_MARK
        rows.append(
            [
                r["provider"],
                _median(t.get("fwd")),
                _median(t.get("bwd")),
                _spread(t.get("step")),
                _spread(t.get("fwd_nograd")),
                _num(None if peak is None else peak / 1e6, ".0f"),
                _num(r.get("gbps", {}).get(phase), ".1f"),
                "-" if bound is None else _t(bound),
                xb,
                _num(r.get("x_naive", {}).get(phase), ".2f"),
            ]
        )
    return rows


def format_table(rows: list, columns=TABLE_COLUMNS, markdown=False) -> str:
    full = [r for r in rows if len(r) == len(columns)]
    widths = [max([len(c)] + [len(r[i]) for r in full]) for i, c in enumerate(columns)]
    lines = []
    if markdown:
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
        for r in rows:
            cells = r if len(r) == len(columns) else [r[0], r[1]] + [""] * (len(columns) - 2)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt(columns))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(fmt(r) if len(r) == len(columns) else f"{r[0].ljust(widths[0])}  {r[1]}")
    return "\n".join(lines)


def group_header(op: OpSpec, shape: dict, dtype: str, res: list) -> str:
    """The (shape, dtype) line above a table, with the bound's phases and what sets them."""
    main = op.main_bytes(shape, DTYPES[dtype])
    head = (
        f"{op.name}  {shape_label(shape)}  {dtype}  (tokens={op.tokens(shape)}, "
        f"vocab={op.vocab(shape)}, logits {_mb(main)}"
    )
    parts = []
    for inplace, what in ((True, "in place"), (False, "fresh gradient")):
        r = next(
            (
                r
                for r in res
                if r.get("bound_s")
                and r["bound_s"]["bwd"] is not None
                and r["bound_pattern"].startswith("in place") == inplace
            ),
            None,
        )
        if r is not None:
            b, lim = r["bound_s"], {p: r["bound_terms"][p]["limit"] for p in ("fwd", "bwd")}
            parts.append(
                f"{what} {_t(b['step'])} = fwd {_t(b['fwd'])} ({lim['fwd']}) + bwd {_t(b['bwd'])} ({lim['bwd']})"
            )
    if parts:
        head += "; step bound ms: " + ", ".join(parts)
    return head + ")"


def calibration_lines(cal: dict) -> list:
    """What the bound was calibrated with, one line per buffer size and compute ceiling."""
    out = []
    for c in cal.get("memory", []):
        m = c.get("methods", {})
        out.append(
            f"Bound calibration on {_mb(c['nbytes'])} buffers{' (capped)' if c.get('capped') else ''}, best of"
            f" the repeats: read-only {_gbs(c['read_Bps'])} GB/s ({m.get('read')}), in-place read-modify-write"
            f" {_gbs(c['rmw_Bps'])} ({m.get('rmw')}), copy into mapped memory {_gbs(c['copy_Bps'])}"
            f" ({m.get('copy')}), write-only {_gbs(c['write_Bps'])} ({m.get('write')}), copy into fresh"
            f" memory {_gbs(c['fresh_copy_Bps'])} ({m.get('fresh_copy')}) (read + write counted in rmw and the"
            f" copies);"
            f" {c.get('first_touch_note', 'no first-touch term')}."
        )
    e = cal.get("exp")
    if e is not None:
        out.append(
            f"Exp ceiling: {e['exp_per_s'] / 1e9:.2f} Gexp/s ({e['method']}, {e['threads']} threads)"
            if "exp_per_s" in e
            else f"Exp ceiling: none, {e.get('error')}"
        )
    for g in cal.get("gemm", []):
        out.append(f"GEMM: {g['dtype']} {g['flops_per_s'] / 1e12:.2f} TFLOP/s ({g['size']}^3)")
    return out


def report_text(doc: dict, op: OpSpec, markdown: bool = False) -> str:
    """The terminal (or markdown) table, one block per (shape, dtype), then the notes."""
    groups: dict = {}
    for r in doc["results"]:
        groups.setdefault((json.dumps(r["shape"]), r["dtype"]), []).append(r)
    out = []
    for (shape_s, dtype), res in groups.items():
        head = group_header(op, json.loads(shape_s), dtype, res)
        out.append(("**" + head + "**") if markdown else head)
        out.append(format_table(table_rows(res), markdown=markdown))
        out.append("")
    out.append(
        "Columns: medians ([min-max]: the fastest and slowest repeat); step = fwd + bwd timed together; GB/s, bound, x bound"
        " and x naive are for the step (for forward-only providers: the no-grad forward). bound = the"
        " least time this machine allows for what the provider does (in place: read-modify-write; a"
        " fresh gradient: copy into other memory plus its first touch), per phase the larger of the"
        " memory time and the exp ceiling. x bound = median / bound (1.0 = at the bound; lower is"
        f" better; '{BELOW_BOUND_MARK.strip()}' = a phase ran below its bound: a calibration error, see"
        " below). x naive = reference median / median (higher is better; reference:"
        f" {', '.join(op.reference)}). peak extra = peak memory of a step above the inputs."
    )
    out += calibration_lines(doc["calibration"])
    out += doc.get("calibration_errors", [])
    for n in doc["notes"]:
        out.append(f"Note: {n}")
    return "\n".join(out)


def write_plots(doc: dict, op: OpSpec, outdir: str, stem: str) -> tuple[list, str | None]:
    """PNG plots of step time and peak memory vs vocabulary size and vs token count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    if not ok:
        return [], "plots skipped: no successful results"
    dtypes = sorted({r["dtype"] for r in ok}, key=list(DTYPES).index)
    files = []
    # one color per provider in every panel and plot of the op
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("tab20").colors[1::2]  # distinct hues first
    colors = {prov: palette[k % len(palette)] for k, prov in enumerate(providers)}

    def metric(r, what):
        t = r.get("time_s") or {}
        if what == "time":
            ph = t.get("step") or t.get("fwd_nograd")
            return ph["median"] * 1e3 if ph else None
        m = r.get("mem_bytes") or {}
        v = m.get("step", m.get("fwd_nograd"))
        return None if v is None else v / 1e6

    for axis, other, label in (("vocab", "tokens", "vocabulary size V"), ("tokens", "vocab", "tokens N")):
        xs = {r[axis] for r in ok}
        if len(xs) < 2:
            continue
        # one line per provider at the most common value of the other axis
        counts: dict = {}
        for r in ok:
            counts[r[other]] = counts.get(r[other], 0) + 1
        fixed = max(sorted(counts), key=lambda k: counts[k])
        fig, axes = plt.subplots(2, len(dtypes), figsize=(6 * len(dtypes), 8), squeeze=False)
        for j, dt in enumerate(dtypes):
            for i, (what, ylab) in enumerate((("time", "step time (ms)"), ("mem", "peak extra memory (MB)"))):
                ax = axes[i][j]
                for prov in providers:
                    pts = sorted(
                        (r[axis], metric(r, what))
                        for r in ok
                        if r["provider"] == prov
                        and r["dtype"] == dt
                        and r[other] == fixed
                        and metric(r, what) is not None
                    )
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov, color=colors[prov])
                ax.set_xlabel(label)
                ax.set_ylabel(ylab)
                ax.set_xscale("log")
                # ticks at the measured sizes only (log minor ticks overlap at these few points)
                ax.set_xticks(sorted(xs), [f"{x:g}" for x in sorted(xs)])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                if what == "time":
                    ax.set_yscale("log")
                else:  # linear: an in-place provider's ~0 MB must show as 0
                    ax.set_ylim(bottom=0)
                ax.set_title(f"{op.name} {dt}, {other}={fixed}")
                ax.grid(True, which="both", alpha=0.3)
        for ax in axes[0]:  # each dtype may have its own providers (e.g. naive-fp32 for bf16 only)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, f"{stem}_vs_{axis}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    if not files:  # a single shape: bars per provider instead of lines
        fig, axes = plt.subplots(2, len(dtypes), figsize=(6 * len(dtypes), 8), squeeze=False)
        for j, dt in enumerate(dtypes):
            rs = [r for r in ok if r["dtype"] == dt]
            for i, (what, ylab) in enumerate((("time", "step time (ms)"), ("mem", "peak extra memory (MB)"))):
                ax = axes[i][j]
                vals = [(r["provider"], metric(r, what)) for r in rs if metric(r, what) is not None]
                ax.barh([v[0] for v in vals], [v[1] for v in vals])
                ax.set_xlabel(ylab)
                ax.set_title(f"{op.name} {dt} {shape_label(rs[0]['shape'])}")
                ax.invert_yaxis()
        fig.tight_layout()
        path = os.path.join(outdir, f"{stem}_bars.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files, None


def write_outputs(doc: dict, op: OpSpec, outdir: str, device: str, *, plots: bool = True, quiet: bool = False) -> None:
    """Write the JSON document, the markdown table and the plots of a run into ``outdir``
    (named ``<op>_<preset>_<device>``); print the table unless ``quiet``. A note on skipped
    plots joins ``doc["notes"]``."""
    stem = f"{op.name}_{doc['preset']}_{device.split(':')[0]}"
    os.makedirs(outdir, exist_ok=True)
    text = report_text(doc, op)
    if plots:
        files, why = write_plots(doc, op, outdir, stem)
        doc["plots"] = [os.path.basename(f) for f in files]
        if why:
            doc["notes"].append(why)
            text += f"\nNote: {why}"
    json_path = os.path.join(outdir, stem + ".json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    md_path = os.path.join(outdir, stem + ".md")
    with open(md_path, "w") as f:
        m = doc["machine"]
        f.write(
            f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads),"
            f" device {device}; {doc['created']}\n\n"
        )
        f.write(report_text(doc, op, markdown=True) + "\n")
    if not quiet:
        print(text)
        plots = [os.path.join(outdir, p) for p in doc.get("plots", [])]  # the JSON keeps bare names
        print(f"\nwrote {json_path}, {md_path}" + "".join(f", {p}" for p in plots))
