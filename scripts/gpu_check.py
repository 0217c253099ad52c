"""One offline check of prefopt_fast on a machine with a GPU (``bash scripts/gpu_check.sh OUTDIR``).

For a machine with torch, Triton and a CUDA toolkit installed and no network: builds the
native extension in this source tree for the local GPU (``python setup.py build_ext
--inplace``: nothing is downloaded), then runs, each step bounded in time:

    environment       versions, the GPU, the driver (environment.json)
    build             the extension for the local GPU's architecture, in place
    gpu_tests         pytest -m "gpu and not slow" (CUDA and Triton backends against the torch
                      backend, every op, compiled and in place), TRITON_INTERPRET=0
    triton_tests      tests/test_triton_backend.py on the GPU, TRITON_INTERPRET=0
    memcheck          compute-sanitizer --tool memcheck over the CUDA kernels (a small driver)
    racecheck         compute-sanitizer --tool racecheck over the same
    benchmark         python -m benchmarks --op all --device cuda (default preset: every op,
                      every backend, the peers that import)

Everything lands in OUTDIR: one log per step, pytest's JUnit XML, the benchmark's JSON,
summary.json and summary.txt (printed at the end, with what could not be done and why).
Exit status: 0 when every step ran (or was --skip'ped) and passed, 1 when one failed or
ran out of time, 3 when none failed but some could not run (no GPU, no compute-sanitizer, no
time left), 2 on bad arguments. docs/cuda.md says how to read the summary.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "build", "gpu_tests", "triton_tests", "memcheck", "racecheck", "benchmark"]
# the most each step may take (seconds) within the total budget; the benchmark gets what is left
CAPS = {"environment": 60, "build": 150, "gpu_tests": 150, "triton_tests": 60, "memcheck": 60, "racecheck": 60}
RESERVE = 20  # seconds kept for every step still to run, so one slow step cannot starve the rest


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="Offline GPU check of prefopt_fast: build for the local GPU, GPU tests, Triton "
        "tests, compute-sanitizer, benchmark; results and a summary in OUTDIR.",
    )
    p.add_argument("outdir", help="folder for the logs, JSON results and summary (created; must be empty or new)")
    p.add_argument(
        "--arch", help="CUDA architectures to build (PREFOPT_CUDA_ARCHS syntax, e.g. 90); default: the local GPU's"
    )
    p.add_argument("--skip", default="", help=f"comma-separated steps not to run, of: {', '.join(STEPS[1:])}")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    args = p.parse_args(argv)
    skip = [s for s in args.skip.split(",") if s.strip()]
    bad = [s for s in skip if s not in STEPS[1:]]
    if bad:
        p.error(f"--skip: unknown step(s) {', '.join(bad)}; the steps are {', '.join(STEPS[1:])}")
    if not args.budget > 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    out = Path(args.outdir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        p.error(f"outdir {out} exists and is not an empty folder")
    args.skip = set(skip)
    return args


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.outdir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.steps = []
        self.env_info = {}
        self.py = sys.executable
        # this tree's prefopt_fast (and the in-place build) ahead of any installed copy
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.env["TRITON_INTERPRET"] = "0"
        self.env.pop("PREFOPT_STRICT", None)  # the peers count where they import, no more

    # ------------------------------------------------------------------ bookkeeping
    def record(self, name, status, detail, seconds=0.0, log=None, **extra):
        step = {"step": name, "status": status, "seconds": round(seconds, 1), "detail": detail}
        if log:
            step["log"] = os.path.relpath(log, self.out)
        step.update(extra)
        self.steps.append(step)
        print(f"[gpu_check] {name}: {status} ({seconds:.0f} s) {detail}", flush=True)
        return step

    def timeout_for(self, name):
        later = len([s for s in STEPS[STEPS.index(name) + 1 :] if s not in self.args.skip])
        left = self.deadline - time.monotonic() - RESERVE * later
        return min(CAPS.get(name, left), left)

    def run(self, name, cmd, env=None, extra_env=None):
        """Run cmd with the step's time limit; (returncode or None on timeout, seconds, log path)."""
        log = self.out / f"{name}.log"
        limit = self.timeout_for(name)
        if limit < 5:
            return "budget", 0.0, log
        e = dict(env or self.env, **(extra_env or {}))
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(str(c) for c in cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(
                [str(c) for c in cmd], cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the step's whole process group (pytest workers, nvcc)
                proc.wait()
                rc = None
        return rc, time.monotonic() - t0, log

    def finish_run(self, name, rc, seconds, log, ok_detail, **extra):
        if rc == "budget":
            return self.record(name, "skipped", "no time left in --budget", 0.0)
        if rc is None:
            return self.record(name, "timeout", f"stopped after {seconds:.0f} s (the step's limit)", seconds, log)
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            return self.record(name, "failed", f"exit {rc}: {tail[0][:200]}", seconds, log, **extra)
        return self.record(name, "passed", ok_detail, seconds, log, **extra)

    # ------------------------------------------------------------------ steps
    def environment(self):
        t0 = time.monotonic()
        probe = (
            "import json, platform, torch\n"
            "d = {'python': platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda,\n"
            "     'cuda_available': torch.cuda.is_available(), 'gpus': []}\n"
            "try:\n    import triton; d['triton'] = triton.__version__\n"
            "except Exception as e:\n    d['triton'] = None; d['triton_error'] = repr(e)\n"
            "if d['cuda_available']:\n"
            "    for i in range(torch.cuda.device_count()):\n"
            "        p = torch.cuda.get_device_properties(i)\n"
            "        d['gpus'].append({'name': p.name, 'capability': list(torch.cuda.get_device_capability(i)),\n"
            "                          'memory_gb': round(p.total_memory / 2**30, 1)})\n"
            "import importlib.util\n"
            "d['prefopt_fast_from'] = importlib.util.find_spec('prefopt_fast').origin\n"
            "print(json.dumps(d))\n"
        )
        res = subprocess.run(
            [self.py, "-c", probe], capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=120
        )
        if res.returncode != 0:
            (self.out / "environment.log").write_text(res.stdout + res.stderr)
            return self.record(
                "environment",
                "failed",
                "cannot import torch: " + res.stderr.strip()[-200:],
                time.monotonic() - t0,
                self.out / "environment.log",
            )
        info = json.loads(res.stdout.strip().splitlines()[-1])
        info["host"] = platform.node()
        info["nvidia_smi"] = _command_output(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        sys.path.insert(0, str(ROOT / "tools"))
        import cuda_build  # tools/cuda_build.py: the toolkit setup.py would use

        try:
            home = cuda_build.find_cuda_home()
        except RuntimeError as exc:
            home, info["cuda_home_error"] = None, str(exc)
        info["cuda_home"] = str(home) if home else None
        info["nvcc"] = cuda_build.cuda_version(home) if home else None
        sanitizer = (home / "bin" / "compute-sanitizer") if home else None
        if not (sanitizer and sanitizer.exists()):
            sanitizer = shutil.which("compute-sanitizer")
        info["compute_sanitizer"] = str(sanitizer) if sanitizer else None
        (self.out / "environment.json").write_text(json.dumps(info, indent=1) + "\n")
        if not str(info["prefopt_fast_from"]).startswith(str(ROOT / "prefopt_fast")):
            # an editable install's import hook wins over PYTHONPATH: the checks would test that copy
            return self.record(
                "environment",
                "failed",
                f"prefopt_fast imports from {info['prefopt_fast_from']}, not from this tree ({ROOT}): an "
                "editable install of another checkout? uninstall it or run the check from that checkout",
                time.monotonic() - t0,
            )
        self.env_info = info
        gpus = ", ".join(f"{g['name']} (sm_{g['capability'][0]}{g['capability'][1]})" for g in info["gpus"]) or "no GPU"
        return self.record(
            "environment",
            "passed",
            f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, nvcc {info['nvcc']}; {gpus}",
            time.monotonic() - t0,
        )

    def no_gpu_reason(self):
        if not self.env_info:
            return "the environment step failed"
        if not self.env_info["cuda_available"]:
            return (
                f"no CUDA device: torch.cuda.is_available() is False (torch {self.env_info['torch']}, "
                f"CUDA {self.env_info['torch_cuda']})"
            )
        return ""

    def build(self):
        info = self.env_info
        if not info:
            return self.record("build", "skipped", "the environment step failed")
        if not info.get("cuda_home"):
            why = info.get("cuda_home_error") or "no CUDA toolkit found (nvcc on PATH, CUDA_HOME or /usr/local/cuda)"
            return self.record("build", "skipped", why)
        arch = self.args.arch
        if not arch:
            if not info.get("gpus"):
                return self.record("build", "skipped", self.no_gpu_reason() + "; give --arch to build anyway")
            arch = ";".join(sorted({f"{g['capability'][0]}{g['capability'][1]}" for g in info["gpus"]}))
        env = dict(
            self.env,
            CUDA_HOME=info["cuda_home"],
            PREFOPT_CUDA="1",
            PREFOPT_CUDA_ARCHS=arch,
            PREFOPT_REQUIRE_EXTENSION="1",
        )
        env.pop("PREFOPT_NO_EXTENSION", None)
        # setup.py straight, not pip: no build isolation, no index, nothing fetched
        rc, secs, log = self.run("build", [self.py, "setup.py", "build_ext", "--inplace"], env=env)
        if rc != 0:
            return self.finish_run("build", rc, secs, log, "")
        # the extension this tree now loads (an editable install elsewhere can serve prefopt_fast._C
        # by name when this tree has none)
        probe = (
            "import json, prefopt_fast\n"
            "bi = prefopt_fast.build_info()\n"
            "from prefopt_fast import _C\n"
            "bi['extension_file'] = _C.__file__\n"
            "print(json.dumps(bi))\n"
        )
        res = subprocess.run(
            [self.py, "-c", probe], capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=120
        )
        bi = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}
        with open(log, "a") as f:
            f.write("\nbuild_info: " + json.dumps(bi) + "\n" + res.stderr)
        if bi and not str(bi.get("extension_file")).startswith(str(ROOT)):
            return self.record(
                "build", "failed", f"prefopt_fast._C loads from {bi.get('extension_file')}, not this tree", secs, log
            )
        if not bi.get("cuda"):
            return self.record(
                "build",
                "failed",
                "built, but the extension has no CUDA kernels: "
                + (bi.get("extension_error") or res.stderr.strip()[-200:]),
                secs,
                log,
            )
        return self.record(
            "build",
            "passed",
            f"CUDA {bi['cuda']} kernels for {', '.join(bi['cuda_archs'])} (stable ABI, torch {bi['torch']})",
            secs,
            log,
            build_info=bi,
        )

    def pytest_step(self, name, selection):
        if self.no_gpu_reason():
            return self.record(name, "skipped", self.no_gpu_reason())
        xml = self.out / f"{name}.xml"
        cmd = [self.py, "-m", "pytest", *selection, "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        rc, secs, log = self.run(name, cmd)
        counts = _junit_counts(xml)
        detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v) if counts else ""
        if rc == 5:  # pytest: no test collected
            return self.record(name, "failed", "no test selected", secs, log)
        return self.finish_run(name, rc, secs, log, detail, tests=counts)

    def sanitizer(self, tool):
        if self.no_gpu_reason():
            return self.record(tool, "skipped", self.no_gpu_reason())
        exe = self.env_info.get("compute_sanitizer")
        if not exe:
            return self.record(tool, "skipped", "compute-sanitizer not found (in the toolkit's bin/ or on PATH)")
        cmd = [exe, "--tool", tool, "--error-exitcode", "3", self.py, str(Path(__file__)), "--sanitizer-driver"]
        rc, secs, log = self.run(tool, cmd)
        if rc == 0:
            text = log.read_text(errors="replace")
            if "ERROR SUMMARY: 0 errors" not in text and "RACECHECK SUMMARY: 0 hazards" not in text:
                return self.record(tool, "failed", "no clean summary line from compute-sanitizer", secs, log)
        return self.finish_run(tool, rc, secs, log, "0 errors in the CUDA kernels (every variant, 3 dtypes)")

    def benchmark(self):
        if self.no_gpu_reason():
            return self.record("benchmark", "skipped", self.no_gpu_reason())
        out = self.out / "benchmark"
        cmd = [
            self.py,
            "-m",
            "benchmarks",
            "--op",
            "all",
            "--device",
            "cuda",
            "--out",
            out,
            "--no-plots",
            "--no-progress",
        ]
        rc, secs, log = self.run("benchmark", cmd)
        files = sorted(str(p.relative_to(self.out)) for p in out.glob("*.json")) if out.exists() else []
        return self.finish_run("benchmark", rc, secs, log, f"{len(files)} JSON result files in benchmark/", files=files)

    # ------------------------------------------------------------------ all
    def main(self):
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.environment()
        todo = {
            "build": self.build,
            "gpu_tests": lambda: self.pytest_step("gpu_tests", ["-m", "gpu and not slow", "tests"]),
            "triton_tests": lambda: self.pytest_step(
                "triton_tests", ["-m", "not slow", "tests/test_triton_backend.py"]
            ),
            "memcheck": lambda: self.sanitizer("memcheck"),
            "racecheck": lambda: self.sanitizer("racecheck"),
            "benchmark": self.benchmark,
        }
        for name in STEPS[1:]:
            if name in self.args.skip:
                self.record(name, "skipped", "--skip")
            else:
                todo[name]()
        return self.write_summary(started)

    def write_summary(self, started):
        failed = [s for s in self.steps if s["status"] in ("failed", "timeout")]
        not_done = [s for s in self.steps if s["status"] == "skipped"]
        unasked = [s for s in not_done if s["detail"] != "--skip"]
        doc = {
            "started": started,
            "budget_s": self.args.budget,
            "ok": not failed,
            "complete": not failed and not not_done,
            "environment": self.env_info,
            "steps": self.steps,
        }
        (self.out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
        e = self.env_info
        lines = [
            f"prefopt_fast GPU check, {started}, {e.get('host', '?')}",
            f"torch {e.get('torch')} (CUDA {e.get('torch_cuda')}), triton {e.get('triton')}, nvcc {e.get('nvcc')}, "
            f"GPU: {', '.join(g['name'] for g in e.get('gpus', [])) or 'none'}",
            "",
        ]
        for s in self.steps:
            lines.append(f"{s['step']:<13} {s['status'].upper():<8} {s['seconds']:>6.0f} s  {s['detail']}")
        lines.append("")
        if failed:
            lines.append("RESULT: FAILED: " + ", ".join(s["step"] for s in failed))
        elif unasked:
            lines.append(
                "RESULT: INCOMPLETE: nothing failed, but " + ", ".join(s["step"] for s in unasked) + " did not run"
            )
        else:
            lines.append("RESULT: OK")
        if not_done:
            lines.append("could not do:")
            lines += [f"  {s['step']}: {s['detail']}" for s in not_done]
        text = "\n".join(lines) + "\n"
        (self.out / "summary.txt").write_text(text)
        print("\n" + text + f"(logs, JSON results and summary.json in {self.out})")
        return 1 if failed else 3 if unasked else 0


def _command_output(cmd):
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return res.stdout.strip() if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _junit_counts(xml):
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"],
        "errors": n["errors"],
        "skipped": n["skipped"],
    }


def sanitizer_driver(device="cuda", backend="cuda"):
    """Every kernel variant of ``backend`` on small, awkward shapes, checked against
    backend="torch" (under compute-sanitizer: the CUDA kernels' memory accesses and
    shared-memory use). tests/test_gpu_check.py runs it with the cpu backend."""
    import torch

    import prefopt_fast as pf

    torch.manual_seed(0)
    every = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        # V = 1, odd V (element-wise heads and tails), rows longer than one pass of a block;
        # logits[:, :-1] (strided rows), an ignored label
        for n, v in ((3, 1), (5, 37), (4, 1000), (2, 9000)):
            base = (torch.randn(2, n + 1, v, device=device) * 3).to(dtype)
            ref = torch.randn(2, n, v, device=device).to(dtype)
            labels = torch.randint(0, v, (2, n), device=device)
            labels[0, 0] = -100
            for stats in ((), ("entropy",), every, ("kl",), ("entropy", "kl")):
                for inplace in (False, True):
                    got = {}
                    for b in (backend, "torch"):
                        leaf = base.detach().clone().requires_grad_(True)
                        x = (leaf * 1)[:, :-1]  # not a leaf: the in-place backward may overwrite it
                        r = pf.token_logprobs(
                            x,
                            labels,
                            stats=stats,
                            ref_logits=ref if "kl" in stats else None,
                            inplace_backward=inplace and b == backend,
                            backend=b,
                        )
                        lp = r if torch.is_tensor(r) else r.logprobs
                        loss = lp.float().sum()
                        if not torch.is_tensor(r):
                            loss = loss + sum(getattr(r, k).float().sum() for k in ("entropy", "kl") if k in stats)
                        loss.backward()
                        got[b] = (lp.detach().float(), leaf.grad.float())
                    for a, e in zip(got[backend], got["torch"]):
                        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer driver: every {backend} kernel variant ran and matched backend='torch'")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sanitizer-driver"]:  # [device backend], default cuda cuda
        sanitizer_driver(*sys.argv[2:4])
        sys.exit(0)
    sys.exit(Check(_parse(sys.argv[1:])).main())
