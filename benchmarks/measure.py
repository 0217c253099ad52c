"""Measuring one case: the clock, the peak-memory probe, :class:`CaseRunner` and
:func:`measure_case` (warm-up, the peak extra memory of one step, then the timing loops);
jobs of cases run in this process (:func:`run_job`) or in a fresh worker process
(:func:`run_job_subprocess`, ``python -m benchmarks._worker``); the machine's description.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Sequence

import torch

from benchmarks.spec import PHASES, Case, OpSpec, Provider, load_op

RESULT_MARK = "@@BENCH-RESULT@@ "
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    return {
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "n": len(xs),
        "samples": xs,
    }


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


def malloc_trim():
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
        malloc_trim()
        if self.method.startswith("rss VmHWM"):
            self.base = _proc_status_kb("VmRSS") * 1024
            _reset_hwm()
        else:
            self.base = (
                _proc_status_kb("VmRSS") * 1024
                if _proc_status_kb("VmRSS")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )

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

        torch.autograd.grad, not .backward(): every provider's gradients are handed back the
        same way (a leaf's AccumulateGrad may clone a gradient that aliases its input; for
        prefopt_fast's in-place backward it does not: tests/test_inplace_leaf.py)."""
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


def _one_run(
    runner: CaseRunner,
    clock: Clock,
    times: dict | None,
    backward: bool,
    probe: MemProbe | None = None,
    mem: dict | None = None,
) -> None:
    """One timed call: a step (forward, then backward) or a no-grad forward, on freshly
    prepared inputs; its times go to ``times`` (None: not recorded). With ``probe`` the peak
    extra memory is read after the forward (and the backward) into ``mem`` instead of
    synchronizing the device before the first mark."""
    runner.prepare()
    if probe is not None:
        probe.start()
    else:
        clock.sync()
    t0 = clock.mark()
    out = runner.forward() if backward else runner.forward_nograd()
    t1 = clock.mark()
    if probe is not None:
        mem["fwd" if backward else "fwd_nograd"] = probe.peak_extra()
    if backward:
        runner.backward(out)
        t2 = clock.mark()
        if probe is not None:
            mem["step"] = probe.peak_extra()
    clock.sync()
    del out
    if times is None:
        return
    if backward:
        times["fwd"].append(clock.seconds(t0, t1))
        times["bwd"].append(clock.seconds(t1, t2))
        times["step"].append(clock.seconds(t0, t2))
    else:
        times["fwd_nograd"].append(clock.seconds(t0, t1))


def _timing_loop(settings: dict, *args) -> None:
    """:func:`_one_run` (with ``args``) up to ``repeats`` times, stopping early once
    ``min_repeats`` are in and the loop has used its time budget (``max_loop_s``)."""
    start = time.perf_counter()
    for i in range(settings["repeats"]):
        _one_run(*args)
        if i + 1 >= settings["min_repeats"] and time.perf_counter() - start > settings["max_loop_s"]:
            break


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

        # memory: no-grad forward, then a full step (fwd peak read before the backward); in a
        # dry run these single runs are the timing samples too
        mem = {}
        _one_run(runner, clock, times if dry else None, False, probe, mem)
        if provider.backward:
            _one_run(runner, clock, times if dry else None, True, probe, mem)
        res["mem_bytes"] = mem

        if not dry:
            if provider.backward:
                _timing_loop(settings, runner, clock, times, True)
            _timing_loop(settings, runner, clock, times, False)
        res["time_s"] = {p: summarize(times[p]) for p in PHASES}
        res["status"] = "ok"
    finally:
        runner.close()
        del runner
        _collect()
        malloc_trim()
    return res


# --------------------------------------------------------------------------- jobs and the worker process


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
            res = {"status": "error", "note": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:400]}
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
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks._worker"],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return fail(f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    if proc.returncode < 0:
        sig = -proc.returncode
        hint = " (out of memory?)" if sig == 9 else ""
        return fail(f"worker killed by signal {sig}{hint}")
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return fail(f"worker failed (exit {proc.returncode}): {tail[-400:]}")


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
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": _meminfo("MemTotal"),
        "transparent_hugepage": thp,
        "env": {
            k: os.environ[k]
            for k in ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "PREFOPT_BACKEND", "TRITON_INTERPRET")
            if k in os.environ
        },
        "device": device,
    }
    if device.startswith("cuda"):
        try:
            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        except Exception:
            pass
    try:
        import prefopt_fast

        info["prefopt_fast"] = {
            "version": getattr(prefopt_fast, "__version__", None),
            "path": os.path.dirname(prefopt_fast.__file__),
            "backends": list(prefopt_fast.available_backends()),
        }
    except Exception as exc:
        info["prefopt_fast"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
