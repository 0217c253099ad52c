"""Compiling the CUDA part of prefopt_fast._C: toolkit discovery, architectures, nvcc
command lines, ptxas reports. Used by setup.py and by tools/cuda_build_check.py (no
torch import here: setup.py loads this before anything else).

Environment:
    CUDA_HOME / CUDA_PATH   the toolkit (bin/nvcc, include/, lib64/ or lib/ with
                            libcudart_static.a); else found through `nvcc` on PATH
                            (wrappers too: nvcc --dryrun reports its real TOP)
    PREFOPT_CUDA            "0": never build CUDA code; "1": fail without a toolkit;
                            unset / "auto": build it when a toolkit is found
    PREFOPT_CUDA_ARCHS      architectures, e.g. "80;86;89;90;100;120+PTX" (the default of
                            wheels), "80;90+PTX" (the default of in-place / editable
                            builds), "sm_80 sm_90+PTX", "8.0,9.0", "compute_90" (PTX only)
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

DEFAULT_ARCHS = "80;86;89;90;100;120+PTX"
# what a development build (scripts/setup.sh) asks for: SASS for Ampere and Hopper, PTX
# that the driver JIT-compiles for anything newer
DEV_ARCHS = "80;90+PTX"


class Arch(NamedTuple):
    num: int  # 80, 90, 100, 120, ...
    sass: bool  # sm_XX code
    ptx: bool  # compute_XX PTX


def parse_archs(spec: Optional[str] = None) -> List[Arch]:
    """PREFOPT_CUDA_ARCHS (or ``spec``) as a sorted list of Arch."""
    if spec is None:
        spec = os.environ.get("PREFOPT_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    out: Dict[int, Arch] = {}
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?i)(sm_|compute_)?(\d+)(?:\.(\d))?([a-z]?)(\+ptx)?", item)
        if not m or m.group(4):
            raise ValueError(
                f"PREFOPT_CUDA_ARCHS: cannot parse {item!r} (expected e.g. 80, 8.0, sm_80, "
                f"compute_90 or 90+PTX; arch-specific 'a'/'f' variants are not used)"
            )
        prefix, major, minor, _, plus_ptx = m.groups()
        num = int(major) * 10 + int(minor) if minor is not None else int(major)
        if num < 75:
            raise ValueError(f"PREFOPT_CUDA_ARCHS: {item!r} is older than sm_75 (CUDA 13 dropped it)")
        ptx_only = (prefix or "").lower() == "compute_"
        prev = out.get(num, Arch(num, False, False))
        out[num] = Arch(num, prev.sass or not ptx_only, prev.ptx or ptx_only or bool(plus_ptx))
    if not out:
        raise ValueError("PREFOPT_CUDA_ARCHS: no architecture given")
    return [out[k] for k in sorted(out)]


def arch_names(archs: Sequence[Arch]) -> List[str]:
    """e.g. ['sm_80', 'sm_90', 'compute_90']."""
    names = [f"sm_{a.num}" for a in archs if a.sass]
    return names + [f"compute_{a.num}" for a in archs if a.ptx]


def gencode_flags(archs: Sequence[Arch]) -> List[str]:
    flags = []
    for a in archs:
        codes = ([f"sm_{a.num}"] if a.sass else []) + ([f"compute_{a.num}"] if a.ptx else [])
        flags.append(f"-gencode=arch=compute_{a.num},code=[{','.join(codes)}]")
    return flags


def _has_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists()


def find_cuda_home() -> Optional[Path]:
    """The CUDA toolkit to build with, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v:
            home = Path(v)
            if not _has_toolkit(home):
                raise RuntimeError(f"{var}={v} is not a CUDA toolkit (needs bin/nvcc and include/cuda_runtime.h)")
            return home.resolve()
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if _has_toolkit(home):
            return home
        # a wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one): ask nvcc
        try:
            res = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True,
                text=True,
                timeout=60,
            )
            m = re.search(r"^#\$ TOP=(.+)$", res.stderr + res.stdout, re.M)
            if m and _has_toolkit(Path(m.group(1).strip())):
                return Path(m.group(1).strip()).resolve()
        except (OSError, subprocess.SubprocessError):
            pass
    if _has_toolkit(Path("/usr/local/cuda")):
        return Path("/usr/local/cuda").resolve()
    return None


def nvcc_path(home: Path) -> Path:
    return home / "bin" / "nvcc"


def cuda_version(home: Path) -> str:
    """'13.0' (from CUDART_VERSION in cuda_runtime_api.h)."""
    text = (home / "include" / "cuda_runtime_api.h").read_text(errors="replace")
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    if not m:
        raise RuntimeError(f"cannot read CUDART_VERSION from {home}/include/cuda_runtime_api.h")
    v = int(m.group(1))
    return f"{v // 1000}.{v % 1000 // 10}"


def cudart_static(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        p = home / sub / "libcudart_static.a"
        if p.exists():
            return p
    raise RuntimeError(f"libcudart_static.a not found under {home} (lib64/ or lib/)")


def link_args(home: Path) -> List[str]:
    """Link the CUDA runtime statically, its symbols hidden (so that calls bind to this
    copy, not to a libcudart another library loaded into the process)."""
    return [str(cudart_static(home)), "-ldl", "-lrt", "-lpthread", "-Wl,--exclude-libs,libcudart_static.a"]


def nvcc_command(
    home: Path,
    src: Path,
    obj: Path,
    archs: Sequence[Arch],
    include_dirs: Sequence[Path],
    threads: int = 1,
    extra: Sequence[str] = (),
) -> List[str]:
    return [
        str(nvcc_path(home)),
        "-c",
        str(src),
        "-o",
        str(obj),
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        *[f"-I{d}" for d in include_dirs],
        *gencode_flags(archs),
        "-Xptxas",
        "-v,-warn-spills",
        "-Xcompiler",
        "-fPIC,-fvisibility=hidden",
        f"--threads={max(1, threads)}",
        *extra,
    ]


def object_dir(root: Path, home: Path, archs: Sequence[Arch]) -> Path:
    """Where the CUDA objects of one (toolkit, architectures) build are kept: separate
    per configuration, so a wheel build and a development build do not evict each other."""
    key = hashlib.sha1(f"{Path(home).resolve()}|{','.join(arch_names(archs))}".encode()).hexdigest()[:10]
    return Path(root) / "build" / f"cuda-{key}"


class Compiled(NamedTuple):
    obj: Path
    log: str  # nvcc's stderr (the ptxas -v report)
    rebuilt: bool


def compile_sources(
    home: Path,
    sources: Sequence[Path],
    out_dir: Path,
    archs: Sequence[Arch],
    include_dirs: Sequence[Path],
    depends: Sequence[Path] = (),
    force: bool = False,
    jobs: Optional[int] = None,
    extra: Sequence[str] = (),
) -> List[Compiled]:
    """nvcc each source into out_dir/<stem>.o (in parallel). A source is recompiled when the
    object is older than it or than any of ``depends``, or when the command line changed;
    the ptxas report is kept next to the object (<stem>.ptxas.log)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
    threads = max(1, (os.cpu_count() or 1) // max(1, min(jobs, len(sources))))

    def one(src: Path) -> Compiled:
        obj = out_dir / f"{src.stem}.o"
        log_path = out_dir / f"{src.stem}.ptxas.log"
        cmd_path = out_dir / f"{src.stem}.cmd"
        cmd = nvcc_command(home, src, obj, archs, include_dirs, threads, extra)
        cmd_text = " ".join(cmd)
        newest = max([src.stat().st_mtime] + [Path(d).stat().st_mtime for d in depends])
        fresh = (
            not force
            and obj.exists()
            and log_path.exists()
            and cmd_path.exists()
            and obj.stat().st_mtime >= newest
            and cmd_path.read_text() == cmd_text
        )
        if fresh:
            return Compiled(obj, log_path.read_text(), False)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"nvcc failed on {src} (exit {res.returncode}):\n{' '.join(cmd)}\n{res.stdout}{res.stderr}"
            )
        log_path.write_text(res.stderr)
        cmd_path.write_text(cmd_text)
        return Compiled(obj, res.stderr, True)

    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(sources)))) as pool:
        return list(pool.map(one, sources))


class KernelReport(NamedTuple):
    kernel: str  # demangled, namespaces trimmed
    arch: str  # sm_80
    registers: int
    stack: int  # bytes stack frame
    spill_stores: int
    spill_loads: int


def _demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_ptxas(log: str) -> List[KernelReport]:
    """Per-kernel registers, stack and spills from `ptxas -v` output."""
    rows = []
    cur = None
    stack = (0, 0, 0)
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+\w*)'", line)
        if m:
            cur, stack = (m.group(1), m.group(2)), (0, 0, 0)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            stack = tuple(int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            rows.append((cur[0], cur[1], int(m.group(1)), *stack))
            cur = None
    names = _demangle([r[0] for r in rows])
    out = []
    for name, r in zip(names, rows):
        name = re.sub(r"prefopt_cuda::(\(anonymous namespace\)|_GLOBAL__N_\w+)::", "", name)
        name = re.sub(r"^void ", "", name)
        out.append(KernelReport(name, r[1], r[2], r[3], r[4], r[5]))
    return out


def spill_warnings(log: str) -> List[str]:
    """ptxas's own -warn-spills lines."""
    return [ln.strip() for ln in log.splitlines() if "spill" in ln.lower() and "warning" in ln.lower()]


def format_table(reports: Sequence[KernelReport]) -> str:
    """kernel | registers per arch | spill bytes per arch."""
    archs = sorted({r.arch for r in reports}, key=lambda a: int(re.sub(r"\D", "", a)))
    by_kernel: Dict[str, Dict[str, KernelReport]] = {}
    for r in reports:
        by_kernel.setdefault(r.kernel, {})[r.arch] = r
    width = max([len(k) for k in by_kernel] + [6])
    head = f"{'kernel':<{width}} | " + " | ".join(f"{a + ' regs/spill/stack':>24}" for a in archs)
    lines = [head, "-" * len(head)]
    for k in sorted(by_kernel):
        cells = []
        for a in archs:
            r = by_kernel[k].get(a)
            cells.append(
                f"{'-':>24}" if r is None else f"{r.registers:>10} / {r.spill_stores + r.spill_loads:>4} / {r.stack:>4}"
            )
        lines.append(f"{k:<{width}} | " + " | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":  # quick look: python tools/cuda_build.py
    home = find_cuda_home()
    print("CUDA_HOME:", home)
    if home:
        print("version:", cuda_version(home), "cudart:", cudart_static(home))
    print("archs:", arch_names(parse_archs()), file=sys.stderr)
