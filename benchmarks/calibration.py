"""The machine's bound: what the least traffic and arithmetic of an op cost on this machine.

Each phase of an op is charged with the memory access patterns it really has, each one
measured on buffers the size of the op's logits (the best of the repeats, so that the
bound stays a lower bound on a shared machine):

=========  ==========================================  =====================================
pattern    what it is                                  measured with (best of)
=========  ==========================================  =====================================
``read``   a read-only stream (forward reads)          ``sum``, ``amax``, a compiled sum loop
``rmw``    read-modify-write in place (an in-place     ``neg_()``, ``add_(1.0)``
           backward writing over its logits)
``copy``   read one buffer, write another one that is  ``copy_``, ``memmove`` (threads)
           already mapped (a gradient reusing memory)
``write``  write only (the zero gradient of ignored    ``fill_``, ``zero_``, ``memset``
           rows)
``fresh``  ``copy`` into freshly allocated memory:     ``empty_like(src).copy_(src)``, also
           first-touch page faults included            with transparent huge pages
=========  ==========================================  =====================================

Rates are in bytes moved per second; ``rmw``, ``copy`` and ``fresh`` count the read and
the write. Compute ceilings: the exps the math needs at the rate of a cheap vectorized exp
compiled here (``exp_ceiling.c``; memory only when no C compiler is found), and GEMM FLOPs
at ``torch.mm``'s rate. :func:`phase_bound` combines them (pure arithmetic: the tests feed it
synthetic calibrations).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
MEMORY_PATTERNS = ("read", "rmw", "copy", "write", "fresh_copy")
# bytes moved per byte of buffer: rmw / copy read and write each byte
_MOVED = {"read": 1, "rmw": 2, "copy": 2, "write": 1, "fresh_copy": 2}


class _Clock:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        """Seconds one call of fn takes (CUDA: synchronized before and after)."""
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _samples(fn, clock, repeats: int, min_time: float, max_runs: int = 50) -> list:
    """One untimed call, then at least ``repeats`` timed ones, more while under ``min_time``."""
    clock(fn)
    out, start = [], time.perf_counter()
    while len(out) < repeats or (time.perf_counter() - start < min_time and len(out) < max_runs):
        out.append(clock(fn))
    return out


def _threaded(fn, parts: int):
    """fn(i, parts) for i < parts, in that many threads (ctypes calls release the GIL)."""
    if parts <= 1:
        fn(0, 1)
        return
    ts = [threading.Thread(target=fn, args=(i, parts)) for i in range(parts)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def _chunk(nbytes: int, i: int, parts: int, align: int = 64) -> tuple:
    """(offset, length) of part i of nbytes split into ``parts`` aligned pieces."""
    step = (nbytes // parts) // align * align
    lo = i * step
    return lo, (nbytes - lo) if i == parts - 1 else step


# --------------------------------------------------------------------------- the compiled loops

_NATIVE: dict = {}


def native_loops():
    """The loops of exp_ceiling.c, compiled once per process with the system C compiler:
    ``(libs, None)`` with one library per vector width tried, or ``(None, why)``."""
    if "libs" in _NATIVE:
        return _NATIVE["libs"], _NATIVE.get("why")
    src = os.path.join(_HERE, "exp_ceiling.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    libs, why = [], None
    if cc is None:
        why = "no C compiler found (set CC)"
    else:
        tag = hashlib.sha1(open(src, "rb").read()).hexdigest()[:12]
        out_dir = tempfile.mkdtemp(prefix="prefopt_bench_")
        base = ["-O3", "-ffp-contract=fast", "-fopenmp-simd", "-shared", "-fPIC"]
        native = [
            ("512-bit vectors", ["-march=native", "-mprefer-vector-width=512"]),
            ("256-bit vectors", ["-march=native", "-mprefer-vector-width=256"]),
        ]
        # both widths (whichever runs faster counts), else plain -march=native; never a
        # portable build: a ceiling from an exp slower than the ISA allows is no bound
        for group in (native, [("-march=native", ["-march=native"])]):
            for label, flags in group:
                so = os.path.join(out_dir, f"exp_ceiling_{tag}_{len(libs)}.so")
                proc = subprocess.run([cc, *base, *flags, src, "-o", so], capture_output=True, text=True)
                if proc.returncode != 0:
                    why = f"{cc} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
                    continue
                lib = ctypes.CDLL(so)
                lib.exp_loop.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
                lib.exp_loop.restype = None
                lib.read_sum.argtypes = [ctypes.c_void_p, ctypes.c_int64]
                lib.read_sum.restype = ctypes.c_float
                libs.append((f"{os.path.basename(cc)} {label}", lib))
            if libs:
                why = None
                break
        shutil.rmtree(out_dir, ignore_errors=True)  # loaded: the files are no longer needed
    _NATIVE["libs"], _NATIVE["why"] = (libs or None), why
    return _NATIVE["libs"], why


# --------------------------------------------------------------------------- memory patterns


def _best(cands: dict, clock, nbytes: int, moved: int, repeats: int, min_time: float) -> dict:
    """Best and median rates (bytes moved / s) over candidate implementations of one pattern."""
    best, runs = None, {}
    for name, fn in cands.items():
        ts = _samples(fn, clock, repeats, min_time)
        runs[name] = moved * nbytes / min(ts)
        if best is None or min(ts) < best[1]:
            best = (name, min(ts), statistics.median(ts))
    return {
        "Bps": moved * nbytes / best[1],
        "Bps_median": moved * nbytes / best[2],
        "method": best[0],
        "candidates": runs,
    }


def memory_rates(
    nbytes: int, device: str = "cpu", repeats: int = 5, min_time: float = 0.5, patterns=MEMORY_PATTERNS
) -> dict:
    """Rates of each access pattern on buffers of ``nbytes`` (see the module docstring).

    Returns ``{"nbytes", "<pattern>_Bps", "<pattern>_Bps_median", "methods": {pattern:
    fastest implementation}, "candidates": {pattern: {implementation: best rate}}}``.
    ``fresh_copy`` repeats allocate, copy and free with nothing in between, as a training
    step does: where the allocator hands back memory still mapped (small buffers) its best
    repeat shows no first-touch cost, as the op's steps then do not either.
    """
    n = max(16, nbytes // 4)
    nbytes = n * 4
    clock = _Clock(device)
    cpu = device == "cpu"
    threads = torch.get_num_threads()
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(0.5)  # touched: pages mapped
    dst = torch.empty_like(src).fill_(0.0)
    sp, dp = src.data_ptr(), dst.data_ptr()
    libs, _ = native_loops() if cpu else (None, None)
    out: dict = {"nbytes": nbytes, "device": device, "threads": threads, "methods": {}, "candidates": {}}

    def memmove(i, parts):
        lo, ln = _chunk(nbytes, i, parts)
        ctypes.memmove(dp + lo, sp + lo, ln)

    def memset(i, parts):
        lo, ln = _chunk(nbytes, i, parts)
        ctypes.memset(dp + lo, 0, ln)

    def reader(lib):
        def run(i, parts):
            lo, ln = _chunk(nbytes, i, parts)
            lib.read_sum(sp + lo, ln // 4)

        return lambda: _threaded(run, threads)

    cands = {
        "read": {
            "sum": lambda: src.sum(),
            "amax": lambda: src.amax(),
            **{f"C sum loop ({name})": reader(lib) for name, lib in (libs or [])[:1]},
        },
        "rmw": {"neg_": lambda: dst.neg_(), "add_": lambda: dst.add_(1.0)},
        "copy": {"copy_": lambda: dst.copy_(src), **({"memmove": lambda: _threaded(memmove, threads)} if cpu else {})},
        "write": {
            "fill_": lambda: dst.fill_(1.0),
            "zero_": lambda: dst.zero_(),
            **({"memset": lambda: _threaded(memset, threads)} if cpu else {}),
        },
    }
    for pat in patterns:
        if pat == "fresh_copy":
            continue
        r = _best(cands[pat], clock, nbytes, _MOVED[pat], repeats, min_time)
        out[f"{pat}_Bps"], out[f"{pat}_Bps_median"] = r["Bps"], r["Bps_median"]
        out["methods"][pat], out["candidates"][pat] = r["method"], r["candidates"]
    dst = None  # freed before the fresh copies allocate theirs
    if "fresh_copy" in patterns:

        def huge():  # as prefopt_fast's cpu backend does for its gradient
            d = torch.empty_like(src)
            advise_huge_pages(d.data_ptr(), nbytes)
            return d.copy_(src)

        fresh = {"empty_like + copy_": lambda: torch.empty_like(src).copy_(src)}
        if cpu and _libc() is not None:
            fresh["empty_like + MADV_HUGEPAGE + copy_"] = huge
        r = _best(fresh, clock, nbytes, 2, max(3, repeats), 0.0)
        out["fresh_copy_Bps"], out["fresh_copy_Bps_median"] = r["Bps"], r["Bps_median"]
        out["methods"]["fresh_copy"], out["candidates"]["fresh_copy"] = r["method"], r["candidates"]
    return out


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            lib = ctypes.CDLL("libc.so.6", use_errno=True)
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC.append(lib)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


def advise_huge_pages(ptr: int, nbytes: int) -> None:
    """madvise(MADV_HUGEPAGE) on the 2 MiB pages inside [ptr, ptr + nbytes): their first
    touch then costs a few times less (transparent huge pages in "madvise" mode)."""
    huge = 2 << 20
    lo, hi = (ptr + huge - 1) // huge * huge, (ptr + nbytes) // huge * huge
    if hi > lo and _libc() is not None:
        _libc().madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE


# glibc's malloc serves requests of at least this size with a fresh mmap every time: its
# dynamic mmap threshold stops growing at DEFAULT_MMAP_THRESHOLD_MAX (4 MiB x sizeof(long)).
# Below it a freed gradient can come back still mapped (no page faults), so only
# allocations this large are charged their first touch.
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def first_touch_min_bytes(device: str) -> tuple:
    """(smallest allocation whose first touch the bound charges, or None; why), for a
    gradient allocated fresh every step by torch's default CPU allocator (malloc)."""
    import platform

    if device != "cpu":
        return None, f"no first-touch term on {device}: its caching allocator reuses memory"
    if platform.libc_ver()[0] != "glibc":
        return None, "no first-touch term: not glibc, whose malloc behaviour the term relies on"
    tuned = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_") if k in os.environ]
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        tuned.append("GLIBC_TUNABLES / LD_PRELOAD")
    if tuned:
        return None, f"no first-touch term: malloc is tuned or replaced here ({', '.join(tuned)})"
    return GLIBC_MMAP_THRESHOLD_MAX, (
        f"first touch charged for fresh allocations of at least"
        f" {GLIBC_MMAP_THRESHOLD_MAX >> 20} MiB (always a fresh mmap in glibc)"
    )


def merge_best(a: dict, b: dict) -> dict:
    """Two calibrations of the same buffers (e.g. before and after the jobs): per pattern the
    better rate and the method that reached it; each round's rate is kept in ``rounds``."""
    out = dict(a, methods=dict(a.get("methods", {})))
    rounds = {k: list(v) for k, v in a.get("rounds", {}).items()}
    for pat in MEMORY_PATTERNS:
        k = f"{pat}_Bps"
        if k not in b:
            continue
        rounds.setdefault(k, [a[k]] if k in a else []).append(b[k])
        if k not in a or b[k] > a[k]:
            out[k] = b[k]
            out["methods"][pat] = b.get("methods", {}).get(pat)
    out["rounds"] = rounds
    return out


def last_level_cache_bytes(default: int = 64 << 20) -> int:
    """The largest CPU cache (sysfs), or ``default`` where it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            if d.startswith("index"):
                with open(os.path.join(base, d, "size")) as f:
                    txt = f.read().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
                best = max(best, int(txt.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or default


def pool_dram_rates(calibs: list, llc_bytes: int) -> list:
    """Calibrations of buffers far beyond the caches (at least 8x the last-level cache) all
    measure the same memory: each then uses, per pattern, the best rate any of them reached
    (``pooled_with`` lists the other sizes). More samples of one rate, taken at different
    moments of a shared machine; the others are returned unchanged."""
    big = [c for c in calibs if c["nbytes"] >= 8 * llc_bytes]
    out = []
    for c in calibs:
        if c["nbytes"] < 8 * llc_bytes or len(big) < 2:
            out.append(c)
            continue
        c = dict(
            c,
            methods=dict(c.get("methods", {})),
            pooled_with=sorted({o["nbytes"] for o in big if o["nbytes"] != c["nbytes"]}),
        )
        for pat in MEMORY_PATTERNS:
            k = f"{pat}_Bps"
            best = max(big, key=lambda o: o.get(k, 0.0))
            if best.get(k, 0.0) > c.get(k, 0.0):
                c[k] = best[k]
                c["methods"][pat] = f"{best.get('methods', {}).get(pat)} on {best['nbytes'] / 1e6:.4g} MB"
        out.append(c)
    return out


# --------------------------------------------------------------------------- compute ceilings


def exp_rate(device: str = "cpu", repeats: int = 5, min_time: float = 0.2, n: int = 2048) -> dict:
    """Exps per second of exp_ceiling.c's loop, one cache-resident buffer pair of ``n`` floats
    per thread, in torch.get_num_threads() threads: ``{"exp_per_s", "exp_per_s_median",
    "method", "threads"}``, or ``{"error": why}`` (no compiler, not a CPU, wrong results)."""
    if device != "cpu":
        return {"error": f"no exp ceiling on {device}: the bound is memory only"}
    libs, why = native_loops()
    if libs is None:
        return {"error": f"no exp ceiling ({why}): the bound is memory only"}
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    bufs = [(torch.empty(n).uniform_(-80.0, 0.0, generator=g), torch.empty(n)) for _ in range(threads)]
    x, y = bufs[0]
    best = None
    for name, lib in libs:
        lib.exp_loop(x.data_ptr(), y.data_ptr(), n, 1)
        # a loop that does not compute exp must not set a ceiling
        if not torch.allclose(y.double(), x.double().exp(), rtol=1e-5, atol=0.0):
            return {"error": f"the compiled exp loop ({name}) gives wrong results: the bound is memory only"}
        reps = 1
        while True:  # calls of ~20 ms, so thread start-up does not count
            t0 = time.perf_counter()
            lib.exp_loop(x.data_ptr(), y.data_ptr(), n, reps)
            if time.perf_counter() - t0 > 0.02 or reps > 1 << 30:
                break
            reps *= 4

        def run(i, parts, lib=lib, reps=reps):
            lib.exp_loop(bufs[i][0].data_ptr(), bufs[i][1].data_ptr(), n, reps)

        ts = _samples(lambda: _threaded(run, threads), _Clock("cpu"), repeats, min_time)
        elems = float(n) * reps * threads
        if best is None or elems / min(ts) > best["exp_per_s"]:
            best = {
                "exp_per_s": elems / min(ts),
                "exp_per_s_median": elems / statistics.median(ts),
                "method": f"exp_ceiling.c ({name})",
            }
    best["threads"] = threads
    return best


def gemm_throughput(dtype: torch.dtype, device: str = "cpu", size: int = 2048, repeats: int = 3) -> dict:
    """Matmul throughput (FLOP/s) on square ``size`` matrices: the GEMM ceiling."""
    clock = _Clock(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    c = a @ b
    ts = _samples(lambda: torch.mm(a, b, out=c), clock, repeats, 0.0)
    flops = 2.0 * size**3
    return {"size": size, "flops_per_s": flops / min(ts), "flops_per_s_median": flops / statistics.median(ts)}


# --------------------------------------------------------------------------- the bound (pure arithmetic)

TRAFFIC_PARTS = ("read", "rw", "write")


def traffic_parts(t) -> dict:
    """A phase's traffic as ``{"read", "rw", "write"}`` bytes moved: ``read`` only read, ``rw``
    a gradient written element for element against one read of the same size (read + write
    counted: in place that is the rmw pattern, into another buffer the copy pattern),
    ``write`` only written. A plain number (an op spec that does not split) is all ``read``:
    the fastest pattern, so the bound stays a lower bound."""
    if isinstance(t, dict):
        unknown = set(t) - set(TRAFFIC_PARTS)
        if unknown:
            raise ValueError(f"unknown traffic parts {sorted(unknown)}; expected {TRAFFIC_PARTS}")
        return {k: int(t.get(k, 0)) for k in TRAFFIC_PARTS}
    return {"read": int(t), "rw": 0, "write": 0}


def phase_bound(
    traffic: dict,
    rates: dict,
    *,
    inplace: bool,
    alloc: float = 0.0,
    exps: float = 0.0,
    exp_per_s: float | None = None,
    flops: float = 0.0,
    flops_per_s: float | None = None,
) -> dict:
    """Lower bound on one phase (fwd or bwd) of one provider, and its terms (seconds).

    memory_s: read / read rate + rw / (rmw rate in place, else copy rate) + write / write rate;
    first_touch_s: for a gradient allocated fresh (``alloc`` bytes, not in place) of at least
    ``rates["first_touch_min_bytes"]`` (None or absent: never), the page faults of its first
    touch: alloc x (2 / fresh copy rate - 2 / copy rate);
    exp_s, gemm_s: the compute ceilings. bound_s = max(memory_s + first_touch_s, exp_s, gemm_s)
    and warm_s the same without first_touch_s; limit names the largest term.
    """
    t = traffic_parts(traffic)
    rw_rate = rates["rmw_Bps"] if inplace else rates["copy_Bps"]
    memory = t["read"] / rates["read_Bps"] + t["rw"] / rw_rate + t["write"] / rates["write_Bps"]
    touch = 0.0
    floor = rates.get("first_touch_min_bytes")
    if alloc and not inplace and floor is not None and alloc >= floor:
        touch = alloc * max(0.0, 2.0 / rates["fresh_copy_Bps"] - 2.0 / rates["copy_Bps"])
    exp_s = exps / exp_per_s if exps and exp_per_s else 0.0
    gemm_s = flops / flops_per_s if flops and flops_per_s else 0.0
    terms = {"memory": memory + touch, "exp": exp_s, "gemm": gemm_s}
    limit = max(terms, key=terms.get)
    return {
        "bound_s": terms[limit],
        "warm_s": max(memory, exp_s, gemm_s),
        "memory_s": memory,
        "first_touch_s": touch,
        "exp_s": exp_s,
        "gemm_s": gemm_s,
        "limit": limit,
    }
