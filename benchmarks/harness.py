"""The shared benchmark harness: providers, measurements, the machine's bound, output.

An op script (``bench_<op>.py``) is a thin file building one :class:`OpSpec`: how to make
inputs for a shape, the bytes (by access pattern), exps and FLOPs the op needs at the least,
the preset shapes, and a table of :class:`Provider` (named callables). Everything else lives
here:

* each (provider, shape) runs in a fresh subprocess (``python -m benchmarks._worker``):
  warm-up, then the peak extra memory of one step, then the timing loops;
* the parent calibrates the machine's bound itself (benchmarks/calibration.py: each memory
  access pattern on buffers the size of the logits, an exp ceiling, GEMM throughput when the
  op has FLOPs), derives GB/s, x bound (flagging any phase measured below its bound as a
  calibration error) and x naive, and writes JSON, a markdown table and PNG plots, and
  prints a table.

Vocabulary used throughout: ``phase`` is one of ``fwd`` (forward with autograd recording,
as in a training step), ``bwd`` (backward of that forward), ``step`` (fwd + bwd, timed
as one) and ``fwd_nograd`` (forward under ``torch.no_grad``, e.g. a reference model).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as _dt
import fnmatch
import gc
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch

from benchmarks.calibration import (MEMORY_PATTERNS, TRAFFIC_PARTS, exp_rate, first_touch_min_bytes, gemm_throughput,
                                    last_level_cache_bytes, memory_rates, merge_best, phase_bound, pool_dram_rates,
                                    traffic_parts)

SCHEMA = "prefopt_fast.benchmarks/2"
PHASES = ("fwd", "bwd", "step", "fwd_nograd")
RESULT_MARK = "@@BENCH-RESULT@@ "
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Timing settings per preset: repeats of each timing loop, warm-up steps before anything
# is measured, and a time budget per loop after which it stops (once min_repeats are in).
# Every preset that times takes at least 5 repeats: the table shows their spread, and the
# bound check compares the fastest of them with the bound.
PRESET_SETTINGS = {
    "dry-run": dict(repeats=1, warmup=0, min_repeats=1, max_loop_s=0.0),
    # --quick: no separate warm-up (the memory step before the timing loops serves as one)
    "quick": dict(repeats=5, warmup=0, min_repeats=5, max_loop_s=0.0),
    # default: fast providers get up to 10 repeats, slow ones stop at 5 once 5 s are used
    "default": dict(repeats=10, warmup=1, min_repeats=5, max_loop_s=5.0),
    # --full: the memory step before the timing loops serves as the warm-up (compiling
    # providers still get one)
    "full": dict(repeats=5, warmup=0, min_repeats=5, max_loop_s=3.0),
}
# How the (provider, shape) cases are run by default: "shape" = one fresh worker process per
# (provider, shape); "provider" = one worker per provider running all its shapes in turn;
# "op" = one worker per op running every provider and shape in turn (the peak-RSS counter is
# reset per region, so the memory figures stay per case; this saves the ~3-7 s start-up of a
# worker, which would take a quarter of --full); "inline" = in this process (--quick and
# --dry-run: seconds matter more than isolation there).
PRESET_JOBS = {"dry-run": "inline", "quick": "inline", "default": "shape", "full": "op"}

# Peak memory a case may be expected to need before it is skipped (bytes; --max-mem-gb).
DEFAULT_MEM_CAP = 16 << 30

# Calibration buffers are the size of the op's main tensor (the logits) up to this cap and a
# quarter of the available memory (three of them are alive at once).
CALIBRATION_CAP_BYTES = 4 << 30


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation of an op, as the benchmark calls it.

    make: called once per process (imports happen here) and returns ``fn(inputs) ->
        outputs``; ``inputs`` is the dict built by ``OpSpec.make_inputs``; outputs a tensor
        or a tuple of tensors (the differentiable ones get a backward).
    kind: "ours" (prefopt_fast), "baseline" (what users write by hand) or "peer" (other
        libraries).
    backward: False for a forward-only provider (bwd and step are then not measured).
    requires: importable module names; if one is missing the provider is skipped with a note.
    install: how to get the missing requirement (shown in the note).
    check: ``check(case) -> None | reason`` for per-case skips (device, dtype, ...).
    mutates: names of inputs the provider overwrites (e.g. an in-place backward); they are
        restored from a pristine copy (untimed) before every call.
    mem_factor: rough peak extra memory of a step in units of the op's main tensor (the
        logits); only used to skip cases that would not fit in memory.
    slow_setup: the first call takes long (compilation); left out of --quick unless named.
    grad_in_forward: the provider computes its gradient in the forward and its backward only
        hands it out (Liger's chunked losses and cross-entropy): its backward has no bound of
        its own, only its forward and step have one.
    """

    name: str
    make: Callable[[], Callable[[dict], Any]]
    kind: str = "baseline"
    description: str = ""
    backward: bool = True
    requires: tuple = ()
    install: str = ""
    check: Callable[["Case"], str | None] | None = None
    mutates: tuple = ()
    mem_factor: float = 4.0
    slow_setup: bool = False
    grad_in_forward: bool = False


@dataclasses.dataclass
class OpSpec:
    """What a thin op script declares.

    make_inputs(shape, dtype, device, seed) -> dict of tensors (touched: filled with data).
    main_bytes(shape, dtype) -> bytes of the dominant tensor (the logits): sizes the
        calibration buffer and the memory guard.
    bytes_moved(shape, dtype) -> {"fwd": t, "bwd": t}: the least traffic any implementation
        must do, each ``t`` a dict of bytes moved per access pattern, ``{"read", "rw",
        "write"}`` (see calibration.traffic_parts), or a plain number (all read); "step" is
        their sum.
    alloc_bytes(shape, dtype) -> bytes the op's contract makes it allocate fresh per step
        (the logits gradient, unless written in place): their first touch is in the bound
        of providers that do not write in place.
    flops(shape, dtype) -> {"fwd": float, "bwd": float} or None (no GEMM in the op).
    exps(shape, dtype) -> {"fwd": int, "bwd": int} or None: the exps the math needs at the
        least (the exp ceiling of the bound).
    make_shape(tokens, vocab) -> a shape dict; tokens(shape), vocab(shape) -> the two axes.
    presets: preset name -> list of shape dicts ("dry-run", "quick", "default", "full").
    preset_dtypes: preset name -> list of dtype names.
    preset_providers: preset name -> provider names or globs run in that preset when
        --providers is not given (a sweep that would take too long with every provider).
    reference: the provider "x naive" compares against (per dtype, the first of these
        names that has a result).
    notes: lines printed and stored with the results (peers that do not apply, etc.).
    """

    name: str
    module: str
    make_inputs: Callable
    grad_inputs: tuple
    main_bytes: Callable
    bytes_moved: Callable
    make_shape: Callable
    tokens: Callable
    vocab: Callable
    presets: dict
    preset_dtypes: dict
    providers: list
    alloc_bytes: Callable | None = None
    flops: Callable | None = None
    exps: Callable | None = None
    preset_providers: dict = dataclasses.field(default_factory=dict)
    reference: tuple = ("naive",)
    notes: list = dataclasses.field(default_factory=list)
    description: str = ""

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"op {self.name!r} has no provider {name!r}; "
                       f"known: {', '.join(p.name for p in self.providers)}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration: op shape, dtype name and device."""

    shape: tuple  # sorted (key, value) pairs, hashable
    dtype: str
    device: str

    @property
    def shape_dict(self) -> dict:
        return dict(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @staticmethod
    def make(shape: dict, dtype: str, device: str) -> "Case":
        return Case(tuple(shape.items()), canonical_dtype(dtype), device)


def canonical_dtype(name: str) -> str:
    try:
        return DTYPE_NAMES[DTYPES[name]]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of fp32, bf16, fp16") from None


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


# --------------------------------------------------------------------------- helpers for op scripts


def missing_modules(provider: Provider) -> list:
    """The modules of ``provider.requires`` that cannot be imported here (cheap: no import)."""
    out = []
    for mod in provider.requires:
        try:
            if importlib.util.find_spec(mod) is None:
                out.append(mod)
        except (ImportError, ValueError):
            out.append(mod)
    return out


def availability(provider: Provider) -> str | None:
    """None if the provider can run here at all, else the note saying why not."""
    missing = missing_modules(provider)
    if missing:
        how = f" ({provider.install})" if provider.install else ""
        return f"not installed: {', '.join(missing)}{how}"
    return None


def needs_cuda(case: Case) -> str | None:
    return None if case.device.startswith("cuda") else "needs a CUDA device"


def prefopt_fast_providers(call: Callable, *, inplace: bool = True,
                           known=("torch", "cpu", "triton", "cuda"),
                           mem_factor: float = 1.1) -> tuple[list, list]:
    """Providers for every prefopt_fast backend available here, and notes for the others.

    call(inputs, backend=name, inplace_backward=bool) runs the op. With ``inplace`` each
    backend also gets a ``+inplace`` provider (inplace_backward=True, mutates the logits).
    """
    notes = []
    try:
        import prefopt_fast
        available = list(prefopt_fast.available_backends())
    except Exception as exc:  # the package or the op may not be there yet
        return [], [f"prefopt_fast: not usable here ({type(exc).__name__}: {exc})"]
    try:  # the dispatcher knows every backend name and why one is unavailable
        from prefopt_fast import _dispatch
        known = tuple(_dispatch.BACKENDS)
    except Exception:
        _dispatch = None
    for name in known:
        if name in available:
            continue
        reason = "not available"
        try:
            reason = _dispatch._why_unavailable(name) or reason
        except Exception:
            pass
        notes.append(f"prefopt_fast.{name}: skipped ({reason})")

    def checker(backend):
        def check(case: Case) -> str | None:
            if backend == "triton" and not case.device.startswith("cuda"):
                return "Triton on CPU runs only in the interpreter: not benchmarked"
            if _dispatch is None:
                return None
            try:
                mod = _dispatch._load(backend)
                probe = torch.zeros(2, 4, dtype=case.torch_dtype, device=case.device)
                return mod.supports(probe)
            except Exception as exc:
                return f"cannot serve these inputs ({type(exc).__name__}: {exc})"
        return check

    providers = []
    for backend in available:
        for inp in ((False, True) if inplace else (False,)):
            def make(backend=backend, inp=inp):
                return lambda inputs: call(inputs, backend=backend, inplace_backward=inp)
            providers.append(Provider(
                name=f"prefopt_fast.{backend}" + ("+inplace" if inp else ""),
                make=make, kind="ours",
                description=f"prefopt_fast, backend={backend!r}"
                            + (", inplace_backward=True" if inp else ""),
                check=checker(backend), mutates=("logits",) if inp else (),
                mem_factor=0.1 if inp else mem_factor))
    return providers, notes


# --------------------------------------------------------------------------- measurement primitives


def summarize(samples: Sequence[float]) -> dict | None:
    """Median and spread of timing samples (seconds)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        return None
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "q1": q1, "q3": q3, "n": len(xs), "samples": xs}


class Clock:
    """Wall-clock on CPU; CUDA events on a GPU (the tensors' device decides)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1e3  # call after sync()
        return b - a


_LIBC = None


def _malloc_trim():
    """Hand freed heap memory back to the OS so the RSS baseline is not inflated."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except Exception:
        pass


def _collect():
    """gc.collect, then freeze the survivors: with transformers imported (TRL) a full
    collection takes ~0.5 s here, and later ones then only scan objects made since."""
    gc.collect()
    gc.freeze()


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemProbe:
    """Peak extra memory of a region of code, relative to the state at ``start()``.

    CPU: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS
    at start; where the reset is not possible, getrusage's ru_maxrss (never reset, so it
    is only right for the first region measured in a fresh process). CUDA: the caching
    allocator's max_memory_allocated minus memory_allocated at start.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = 0
        if self.cuda:
            self.method = "cuda max_memory_allocated"
        elif _proc_status_kb("VmHWM") is not None and _reset_hwm():
            self.method = "rss VmHWM (reset per region)"
        else:
            self.method = "rss ru_maxrss (not resettable)"

    def start(self):
        _collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        if self.method.startswith("rss VmHWM"):
            self.base = _proc_status_kb("VmRSS") * 1024
            _reset_hwm()
        else:
            self.base = _proc_status_kb("VmRSS") * 1024 if _proc_status_kb("VmRSS") else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_extra(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        if self.method.startswith("rss VmHWM"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return int(max(0, peak - self.base))


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _tensors(x)]
    if isinstance(out, dict):
        return [t for x in out.values() for t in _tensors(x)]
    return []


class CaseRunner:
    """Inputs of one case plus the provider's function, ready to be called repeatedly.

    ``prepare()`` (untimed) drops the previous gradients and restores mutated inputs;
    ``forward()``, ``backward(out)`` and ``forward_nograd()`` are what gets timed.
    """

    def __init__(self, op: OpSpec, provider: Provider, case: Case, fn=None, seed: int = 0):
        self.op, self.provider, self.case = op, provider, case
        self.fn = fn if fn is not None else provider.make()
        self.inputs = op.make_inputs(case.shape_dict, case.torch_dtype, case.device, seed)
        self.grad_names = tuple(op.grad_inputs) if provider.backward else ()
        for k in self.grad_names:
            self.inputs[k].requires_grad_(True)
        self.pristine = {k: self.inputs[k].detach().clone() for k in provider.mutates}
        self._grads: dict = {}
        self.last_grads = None
        self._gen = torch.Generator(device="cpu").manual_seed(seed + 1)

    def prepare(self):
        self.last_grads = None
        for k in self.grad_names:
            self.inputs[k].grad = None
        if self.pristine:
            with torch.no_grad():
                for k, v in self.pristine.items():
                    self.inputs[k].copy_(v)

    def forward(self):
        return self.fn(self.inputs)

    def forward_nograd(self):
        with torch.no_grad():
            return self.fn(self.inputs)

    def backward(self, out):
        """Gradients of the grad_inputs, kept in ``last_grads`` until the next prepare().

        torch.autograd.grad, not .backward(): accumulating into a leaf's .grad would clone a
        gradient that aliases the input (an in-place backward), which no training step
        does (there the logits come from the lm_head and their gradient flows on).
        """
        outs = [t for t in _tensors(out) if t.requires_grad]
        if not outs:
            raise RuntimeError(f"provider {self.provider.name!r}: no output requires grad")
        grads = []
        for t in outs:
            key = (tuple(t.shape), t.dtype, str(t.device))
            if key not in self._grads:
                g = torch.randn(t.shape, generator=self._gen, dtype=torch.float32)
                self._grads[key] = g.to(device=t.device, dtype=t.dtype)
            grads.append(self._grads[key])
        self.last_grads = torch.autograd.grad(outs, [self.inputs[k] for k in self.grad_names], grads)
        return self.last_grads

    def step(self):
        out = self.forward()
        self.backward(out)

    def close(self):
        self.prepare()
        self.inputs = self.pristine = self._grads = None
        self.fn = None


def measure_case(op: OpSpec, provider: Provider, case: Case, settings: dict, fn=None) -> dict:
    """Warm up, measure peak extra memory of one step, then time the phases.

    In dry-run mode (settings["warmup"] == 0 and repeats == 1) every phase runs exactly
    once, and those single runs are both the memory and the timing sample.
    """
    clock = Clock(case.device)
    runner = CaseRunner(op, provider, case, fn=fn)
    probe = MemProbe(case.device)
    dry = settings.get("dry_run", False)
    res: dict = {"mem_method": probe.method}
    times = {p: [] for p in PHASES}
    # a compiling provider's first call must not land in the memory or timing measurements
    warmup = settings["warmup"] if (dry or not provider.slow_setup) else max(1, settings["warmup"])
    try:
        for _ in range(warmup):
            runner.prepare()
            if provider.backward:
                runner.step()
            out = runner.forward_nograd()
            del out
        clock.sync()

        # memory: no-grad forward, then a full step (fwd peak read before the backward)
        mem = {}
        runner.prepare()
        probe.start()
        t0 = clock.mark()
        out = runner.forward_nograd()
        t1 = clock.mark()
        mem["fwd_nograd"] = probe.peak_extra()
        clock.sync()
        if dry:
            times["fwd_nograd"].append(clock.seconds(t0, t1))
        del out
        if provider.backward:
            runner.prepare()
            probe.start()
            t0 = clock.mark()
            out = runner.forward()
            t1 = clock.mark()
            mem["fwd"] = probe.peak_extra()
            runner.backward(out)
            t2 = clock.mark()
            mem["step"] = probe.peak_extra()
            clock.sync()
            del out
            if dry:
                times["fwd"].append(clock.seconds(t0, t1))
                times["bwd"].append(clock.seconds(t1, t2))
                times["step"].append(clock.seconds(t0, t2))
        res["mem_bytes"] = mem

        if not dry:
            budget = settings["max_loop_s"]
            if provider.backward:
                start = time.perf_counter()
                for i in range(settings["repeats"]):
                    runner.prepare()
                    clock.sync()
                    t0 = clock.mark()
                    out = runner.forward()
                    t1 = clock.mark()
                    runner.backward(out)
                    t2 = clock.mark()
                    clock.sync()
                    del out
                    times["fwd"].append(clock.seconds(t0, t1))
                    times["bwd"].append(clock.seconds(t1, t2))
                    times["step"].append(clock.seconds(t0, t2))
                    if i + 1 >= settings["min_repeats"] and time.perf_counter() - start > budget:
                        break
            start = time.perf_counter()
            for i in range(settings["repeats"]):
                runner.prepare()
                clock.sync()
                t0 = clock.mark()
                out = runner.forward_nograd()
                t1 = clock.mark()
                clock.sync()
                del out
                times["fwd_nograd"].append(clock.seconds(t0, t1))
                if i + 1 >= settings["min_repeats"] and time.perf_counter() - start > budget:
                    break
        res["time_s"] = {p: summarize(times[p]) for p in PHASES}
        res["status"] = "ok"
    finally:
        runner.close()
        del runner
        _collect()
        _malloc_trim()
    return res


# --------------------------------------------------------------------------- subprocess worker


def load_op(module: str) -> OpSpec:
    """The OpSpec of ``"pkg.module"`` (its ``OP``) or ``"pkg.module:variant"`` (its
    ``variant_op(variant)``: one script parametrized, e.g. the PPO KL estimator)."""
    name, _, variant = module.partition(":")
    mod = importlib.import_module(name)
    return mod.variant_op(variant) if variant else mod.OP


def job_cases(job: dict) -> list:
    """[(shape, dtype)] of a job: ``{"shape", "dtypes"}`` or ``{"cases": [{"shape", "dtypes"}]}``
    (for a job of ``subjobs``: [(provider, shape, dtype)])."""
    if "subjobs" in job:
        return [(j["provider"], sh, d) for j in job["subjobs"] for sh, d in job_cases(j)]
    groups = job["cases"] if "cases" in job else [{"shape": job["shape"], "dtypes": job["dtypes"]}]
    return [(g["shape"], d) for g in groups for d in g["dtypes"]]


def _fail(job: dict, status: str, note: str) -> list:
    if "subjobs" in job:
        return [{"provider": p, "shape": sh, "dtype": d, "status": status, "note": note} for p, sh, d in job_cases(job)]
    return [{"shape": sh, "dtype": d, "status": status, "note": note} for sh, d in job_cases(job)]


def run_job(job: dict, op: OpSpec | None = None) -> list:
    """Run one job (a provider over one or several shapes, each over its dtypes) in this
    process; one result per (shape, dtype), carrying both."""
    op = op if op is not None else load_op(job["module"])
    if "subjobs" in job:
        out = []
        for sj in job["subjobs"]:
            sj = dict(sj, settings=job["settings"])
            out += [dict(r, provider=sj["provider"]) for r in run_job(sj, op)]
        return out
    out = []
    try:
        provider = op.provider(job["provider"])
        fn = provider.make()
    except ImportError as exc:  # installed but not importable here (e.g. a GPU-only dependency)
        return _fail(job, "skipped", f"import failed: {type(exc).__name__}: {exc}")
    except Exception as exc:
        return _fail(job, "error", f"setup failed: {type(exc).__name__}: {exc}")
    for shape, dtype in job_cases(job):
        case = Case.make(shape, dtype, job["device"])
        t0 = time.perf_counter()
        try:
            res = measure_case(op, provider, case, job["settings"], fn=fn)
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            res = {"status": "error",
                   "note": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:400]}
        res["shape"] = dict(shape)
        res["dtype"] = case.dtype
        res["wall_s"] = time.perf_counter() - t0
        out.append(res)
    return out


def worker_main():
    """Entry point of ``python -m benchmarks._worker``: a job as JSON on stdin."""
    job = json.loads(sys.stdin.read())
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    results = run_job(job)
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(results) + "\n")
    sys.stdout.flush()


def run_job_subprocess(job: dict, timeout: float) -> list:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    fail = lambda note: _fail(job, "error", note)
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._worker"], input=json.dumps(job),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return fail(f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode < 0:
        sig = -proc.returncode
        hint = " (out of memory?)" if sig == 9 else ""
        return fail(f"worker killed by signal {sig}{hint}")
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return fail(f"worker failed (exit {proc.returncode}): {tail[-400:]}")


# --------------------------------------------------------------------------- calibration and bound


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


def derive(result: dict, op: OpSpec, shape: dict, dtype: torch.dtype, calib: dict,
           gemm: dict | None = None, *, inplace: bool = False, exp: dict | None = None,
           grad_in_forward: bool = False) -> None:
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
    terms = {p: phase_bound(traffic[p], calib, inplace=inplace, alloc=alloc if p == "bwd" else 0,
                            exps=exps[p] if exps else 0, exp_per_s=eps,
                            flops=flops[p] if flops else 0, flops_per_s=fps)
             for p in ("fwd", "bwd")}
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
            out.append(f"CALIBRATION ERROR: {r['provider']} {shape_label(r['shape'])} {r['dtype']} {p}: its fastest"
                       f" run took {x:.2f}x its bound ({bound_limit(r, p)}): a time below a lower bound means"
                       f" the calibration underestimates a rate here, not that the provider is that fast")
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


# --------------------------------------------------------------------------- machine description


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory(device: str) -> int | None:
    if device.startswith("cuda"):
        try:
            return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return None
    return _meminfo("MemAvailable")


def machine_info(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    thp = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        pass
    info = {
        "hostname": platform.node(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": _meminfo("MemTotal"), "transparent_hugepage": thp,
        "env": {k: os.environ[k] for k in ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS",
                                            "PREFOPT_BACKEND", "TRITON_INTERPRET")
                if k in os.environ},
        "device": device,
    }
    if device.startswith("cuda"):
        try:
            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        except Exception:
            pass
    try:
        import prefopt_fast
        info["prefopt_fast"] = {"version": getattr(prefopt_fast, "__version__", None),
                                "path": os.path.dirname(prefopt_fast.__file__),
                                "backends": list(prefopt_fast.available_backends())}
    except Exception as exc:
        info["prefopt_fast"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


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
    for k, t in (("op", str), ("preset", str), ("created", str), ("machine", dict), ("settings", dict),
                 ("calibration", dict), ("calibration_errors", list), ("providers", list), ("notes", list),
                 ("results", list)):
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
    elif cal["exp"] is not None and not isinstance(cal["exp"].get("exp_per_s", cal["exp"].get("error")),
                                                    (int, float, str)):
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
        for k, t in (("provider", str), ("kind", str), ("shape", dict), ("tokens", int), ("vocab", int),
                     ("dtype", str), ("device", str), ("status", str)):
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
        for k in ("mem_bytes", "bytes_moved", "bound_s", "bound_warm_s", "gbps", "x_bound",
                  "x_bound_warm", "x_naive", "calibration_error"):
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


TABLE_COLUMNS = ("provider", "fwd ms", "bwd ms", "step ms [min-max]", "no-grad fwd ms [min-max]", "peak extra MB", "GB/s",
                 "bound ms", "x bound", "x naive")
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
        rows.append([
            r["provider"], _median(t.get("fwd")), _median(t.get("bwd")), _spread(t.get("step")),
            _spread(t.get("fwd_nograd")), _num(None if peak is None else peak / 1e6, ".0f"),
            _num(r.get("gbps", {}).get(phase), ".1f"), "-" if bound is None else _t(bound), xb,
            _num(r.get("x_naive", {}).get(phase), ".2f"),
        ])
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
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt(columns))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(fmt(r) if len(r) == len(columns) else f"{r[0].ljust(widths[0])}  {r[1]}")
    return "\n".join(lines)


def group_header(op: OpSpec, shape: dict, dtype: str, res: list) -> str:
    """The (shape, dtype) line above a table, with the bound's phases and what sets them."""
    main = op.main_bytes(shape, DTYPES[dtype])
    head = (f"{op.name}  {shape_label(shape)}  {dtype}  (tokens={op.tokens(shape)}, "
            f"vocab={op.vocab(shape)}, logits {_mb(main)}")
    parts = []
    for inplace, what in ((True, "in place"), (False, "fresh gradient")):
        r = next((r for r in res if r.get("bound_s") and r["bound_s"]["bwd"] is not None
                  and r["bound_pattern"].startswith("in place") == inplace), None)
        if r is not None:
            b, lim = r["bound_s"], {p: r["bound_terms"][p]["limit"] for p in ("fwd", "bwd")}
            parts.append(f"{what} {_t(b['step'])} = fwd {_t(b['fwd'])} ({lim['fwd']}) + bwd {_t(b['bwd'])}"
                         f" ({lim['bwd']})")
    if parts:
        head += "; step bound ms: " + ", ".join(parts)
    return head + ")"


def calibration_lines(cal: dict) -> list:
    """What the bound was calibrated with, one line per buffer size and compute ceiling."""
    out = []
    for c in cal.get("memory", []):
        m = c.get("methods", {})
        out.append(f"Bound calibration on {_mb(c['nbytes'])} buffers{' (capped)' if c.get('capped') else ''}, best of"
                   f" the repeats: read-only {_gbs(c['read_Bps'])} GB/s ({m.get('read')}), in-place read-modify-write"
                   f" {_gbs(c['rmw_Bps'])} ({m.get('rmw')}), copy into mapped memory {_gbs(c['copy_Bps'])}"
                   f" ({m.get('copy')}), write-only {_gbs(c['write_Bps'])} ({m.get('write')}), copy into fresh"
                   f" memory {_gbs(c['fresh_copy_Bps'])} ({m.get('fresh_copy')}) (read + write counted in rmw and the"
                   f" copies);"
                   f" {c.get('first_touch_note', 'no first-touch term')}.")
    e = cal.get("exp")
    if e is not None:
        out.append(f"Exp ceiling: {e['exp_per_s'] / 1e9:.2f} Gexp/s ({e['method']}, {e['threads']} threads)"
                   if "exp_per_s" in e else f"Exp ceiling: none, {e.get('error')}")
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
    out.append("Columns: medians ([min-max]: the fastest and slowest repeat); step = fwd + bwd timed together; GB/s, bound, x bound"
               " and x naive are for the step (for forward-only providers: the no-grad forward). bound = the"
               " least time this machine allows for what the provider does (in place: read-modify-write; a"
               " fresh gradient: copy into other memory plus its first touch), per phase the larger of the"
               " memory time and the exp ceiling. x bound = median / bound (1.0 = at the bound; lower is"
               f" better; '{BELOW_BOUND_MARK.strip()}' = a phase ran below its bound: a calibration error, see"
               " below). x naive = reference median / median (higher is better; reference:"
               f" {', '.join(op.reference)}). peak extra = peak memory of a step above the inputs.")
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
                    pts = sorted((r[axis], metric(r, what)) for r in ok
                                 if r["provider"] == prov and r["dtype"] == dt and r[other] == fixed
                                 and metric(r, what) is not None)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov,
                                color=colors[prov])
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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
            notes.append(f"--providers {pat!r} matches no provider of {op.name} "
                         f"(known: {', '.join(p.name for p in op.providers)})")
        return chosen, notes
    chosen = []
    keep = op.preset_providers.get(preset)
    for p in op.providers:
        if keep is not None and not any(fnmatch.fnmatchcase(p.name, pat) for pat in keep):
            notes.append(f"{p.name}: not in the {preset} preset of {op.name} (name it in --providers to include it)")
            continue
        if preset in ("quick",) and p.slow_setup:
            notes.append(f"{p.name}: left out of --quick (its first call compiles, ~10-30 s here);"
                         f" name it in --providers to include it")
            continue
        chosen.append(p)
    return chosen, notes


def memory_guard(op: OpSpec, provider: Provider, case: Case, avail: int | None,
                 cap: int | None = DEFAULT_MEM_CAP) -> str | None:
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


def plan(op: OpSpec, providers: list, shapes: list, dtypes: list, device: str,
         avail: int | None, cap: int | None = DEFAULT_MEM_CAP, per: str = "shape") -> tuple[list, list]:
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
                jobs.append({"module": op.module, "provider": prov.name, "shape": dict(shape),
                             "dtypes": run_dtypes, "device": device})
    if per == "op" and jobs:
        jobs = [{"module": op.module, "provider": f"{len(providers)} providers", "device": device, "subjobs": jobs}]
    if per == "provider":
        merged: dict = {}
        for j in jobs:
            m = merged.setdefault(j["provider"], {"module": op.module, "provider": j["provider"],
                                                  "device": device, "cases": []})
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
    r = {"provider": prov.name, "kind": prov.kind, "shape": shape,
         "tokens": op.tokens(shape), "vocab": op.vocab(shape), "dtype": case.dtype,
         "device": case.device}
    r.update(kw)
    return r


_CALIBRATION_CACHE: dict = {}

CALIBRATION_NOTE = (
    "bound per phase = max(memory, exp, gemm): memory = read / read_Bps + rw / (rmw_Bps in place,"
    " copy_Bps otherwise) + write / write_Bps, plus for a fresh gradient its first touch at"
    " fresh_copy_Bps; exp = exps / exp_per_s; gemm = flops / flops_per_s. step = fwd + bwd,"
    " fwd_nograd = fwd. Rates are the best of the repeats (and of the rounds before and after"
    " the jobs). A phase whose fastest run is below its bound is listed in calibration_errors.")


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
    others = [c for k, c in _CALIBRATION_CACHE.items() if isinstance(k[0], int) and k[1] == device
              and c["nbytes"] not in {x["nbytes"] for x in calib.values()}]
    mine = list(calib.values())
    merged = pool_dram_rates(mine + others, last_level_cache_bytes())[:len(mine)]
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
            _CALIBRATION_CACHE[key] = dict(e2 if e2["exp_per_s"] > e["exp_per_s"] else e,
                                           exp_per_s=max(rounds), rounds=rounds)
    return dict(_CALIBRATION_CACHE[key])


def calibrate_gemm(dtype: str, device: str, *, dry_run: bool, quick: bool) -> dict:
    key = ("gemm", dtype, device, dry_run, quick)
    if key not in _CALIBRATION_CACHE:
        g = gemm_throughput(DTYPES[dtype], device, size=256 if dry_run else (1024 if quick else 2048))
        g["dtype"] = dtype
        _CALIBRATION_CACHE[key] = g
    return dict(_CALIBRATION_CACHE[key])


def run(op: OpSpec, *, preset: str = "default", providers: Sequence[str] | None = None,
        dtypes: Sequence[str] | None = None, device: str | None = None, outdir: str = "results",
        dry_run: bool = False, shapes: list | None = None, subprocesses: bool | None = None,
        repeats: int | None = None, warmup: int | None = None, plots: bool = True,
        progress: bool = True, timeout: float = 1800.0, quiet: bool = False, jobs_per: str | None = None,
        mem_cap: int | None = DEFAULT_MEM_CAP) -> dict:
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
        prov_table.append({"name": p.name, "kind": p.kind, "description": p.description,
                           "requires": list(p.requires), "status": "skipped" if why else "ok", "note": why})
        if why:
            notes.append(f"{p.name}: {why}")
        else:
            runnable.append(p)

    avail = available_memory(device)
    jobs, results = plan(op, runnable, shapes, dtypes, device, avail, mem_cap,
                         per=jobs_per if jobs_per in ("provider", "op") else "shape")

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
    _malloc_trim()

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
        _malloc_trim()
    calib = pooled(calib, device)
    exp_ok = exp if exp and "exp_per_s" in exp else None
    for r in results:
        if r.get("status") == "ok":
            prov, d = op.provider(r["provider"]), DTYPES[r["dtype"]]
            derive(r, op, r["shape"], d, calib[op.main_bytes(r["shape"], d)], gemm.get(r["dtype"]),
                   inplace=bool(prov.mutates), exp=exp_ok, grad_in_forward=prov.grad_in_forward)
    cal_errors = calibration_error_notes(results)

    # table order: shapes as given, dtypes as given, providers in table order
    order_p = {p.name: i for i, p in enumerate(op.providers)}
    order_s = {json.dumps(dict(s)): i for i, s in enumerate(shapes)}
    results.sort(key=lambda r: (order_s.get(json.dumps(r["shape"]), 0), dtypes.index(r["dtype"]),
                                order_p.get(r["provider"], 0)))
    add_speedups(results, op.reference)

    doc = {
        "schema": SCHEMA, "op": op.name, "description": op.description,
        "preset": "dry-run" if dry_run else preset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t_all,
        "machine": machine_info(device),
        "settings": {**settings, "subprocess_per_job": jobs_per != "inline", "jobs_per": jobs_per,
                     "mem_cap_bytes": mem_cap, "dtypes": dtypes,
                     "shapes": [dict(s) for s in shapes]},
        "calibration": {"memory": list(calib.values()), "exp": exp, "gemm": gemm_list,
                        "note": CALIBRATION_NOTE},
        "calibration_errors": cal_errors,
        "providers": prov_table,
        "notes": notes,
        "results": results,
    }
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
        f.write(f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads),"
                f" device {device}; {doc['created']}\n\n")
        f.write(report_text(doc, op, markdown=True) + "\n")
    if not quiet:
        print(text)
        print(f"\nwrote {json_path}, {md_path}" + "".join(f", {p}" for p in doc.get("plots", [])))
    return doc


# --------------------------------------------------------------------------- CLI


def _csv(s: str | None) -> list | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def build_parser(op_names: Iterable[str] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="prefopt_fast benchmarks: time, peak extra memory, GB/s and the machine's bound, "
                    "against naive PyTorch and the peers installed here.")
    names = list(op_names)
    p.add_argument("--op", default=None,
                   help=f"ops to benchmark, comma-separated names or globs ({', '.join(names)}; 'all' for"
                        f" every op). Default: every op with --quick / --full / --dry-run,"
                        f" {names[0] if names else '-'} otherwise")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", dest="preset", const="quick",
                   help="one small shape, few repeats (under a minute on a 2-core machine)")
    g.add_argument("--full", action="store_const", dest="preset", const="full",
                   help="sweep V in {32000, 128256, 256000} x token counts")
    p.set_defaults(preset="default")
    p.add_argument("--providers", help="comma-separated provider names or globs (e.g. 'naive*,prefopt_fast.*')")
    p.add_argument("--dtypes", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--tokens", help="comma-separated token counts (overrides the preset's shapes)")
    p.add_argument("--vocab", help="comma-separated vocabulary sizes (overrides the preset's shapes)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every provider once on tiny shapes, no timing loops (smoke test)")
    p.add_argument("--repeats", type=int, help="timing repeats per phase (default: per preset)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: per preset)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh subprocess per (provider, shape)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker job")
    p.add_argument("--max-mem-gb", type=float, default=DEFAULT_MEM_CAP / 2**30,
                   help="skip cases estimated to need more peak memory than this (GiB; default 16)")
    p.add_argument("--jobs-per", choices=("shape", "provider", "op", "inline"),
                   help="one worker process per (provider, shape), per provider, per op, or none"
                        " (default: inline for --quick / --dry-run, op for --full, shape otherwise)")
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
        doc = run(spec, preset=args.preset, providers=_csv(args.providers), dtypes=_csv(args.dtypes),
            device=device, outdir=args.out, dry_run=args.dry_run, shapes=shapes,
            subprocesses=False if args.in_process else None, repeats=args.repeats, warmup=args.warmup,
            plots=not args.no_plots, progress=not args.no_progress, timeout=args.timeout,
            jobs_per=args.jobs_per, mem_cap=int(args.max_mem_gb * 2**30) if args.max_mem_gb > 0 else None)
        print()
        broken += [f"{doc['op']}: {b}" for b in broken_providers(doc)]
    if len(names) > 1 and not args.list:
        print(f"{len(names)} ops in {time.perf_counter() - t0:.0f} s: {', '.join(names)}")
    if broken and strict_mode():
        print("error: PREFOPT_STRICT=1 and providers that should run here did not (missing or broken install; "
              "PREFOPT_ALLOW_MISSING=name[,...] names the ones to leave out):\n  " + "\n  ".join(broken),
              file=sys.stderr)
        return 1
    return 0


def strict_mode() -> bool:
    """PREFOPT_STRICT=1 (scripts/bench.sh) or CI: an installed-but-broken or missing peer fails the run."""
    return os.environ.get("PREFOPT_STRICT", "0") not in ("", "0") or os.environ.get("CI", "") not in ("", "0", "false")


def broken_providers(doc: dict) -> list:
    """The providers of ``doc`` that could not run for a reason of the install (not installed,
    failing to import, a prefopt_fast backend that should be built here), minus those named
    in PREFOPT_ALLOW_MISSING (by distribution name, e.g. ``trl,liger-kernel``). A provider
    that cannot serve this device (CUDA-only kernels on a CPU) is not broken."""
    allowed = {a.strip().replace("_", "-") for a in os.environ.get("PREFOPT_ALLOW_MISSING", "").split(",") if a.strip()}
    if "all" in allowed:
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
    return [b for b in out if not any(m.replace("_", "-") in allowed for m in modules.get(b.split(":")[0], []))
            and not ("cpu-extension" in allowed and b.startswith("prefopt_fast.cpu"))]
