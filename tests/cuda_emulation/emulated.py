"""The CUDA row kernels run on the CPU through cuda_host_emulation.h (for tests).

``row_forward`` / ``row_backward`` take CPU tensors and have the signatures of a
backend module (prefopt_fast._rows contract); ``threads`` / ``blocks`` override the
launch configuration (e.g. fewer blocks than rows: the grid-stride loop). The shared
library is compiled with the host C++ compiler on first use and cached under
build/cuda_emulation/ by a hash of its sources.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from prefopt_fast import _rows

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SOURCES = (
    sorted((ROOT / "csrc").glob("*.h"))
    + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
    + sorted((ROOT / "csrc" / "cuda").glob("*.h"))
    + [HERE / "cuda_host_emulation.h", HERE / "emu_driver.cpp"]
)
N_OUT = _rows.N_OUT
MAX_LEAD = 16
_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    h = hashlib.sha256()
    for p in SOURCES:
        h.update(p.read_bytes())
    out = ROOT / "build" / "cuda_emulation" / f"emu-{h.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [
            compiler(),
            "-std=c++17",
            "-O1",
            "-fPIC",
            "-shared",
            "-pthread",
            "-DPF_CUDA_HOST_EMULATION",
            f"-I{ROOT / 'csrc'}",
            f"-I{ROOT / 'csrc' / 'cuda'}",
            f"-I{HERE}",
            str(HERE / "emu_driver.cpp"),
            "-o",
            str(tmp),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    assert lib.emu_sizeof_rows() == ctypes.sizeof(Rows)
    assert lib.emu_sizeof_forward_args() == ctypes.sizeof(ForwardArgs)
    assert lib.emu_sizeof_backward_args() == ctypes.sizeof(BackwardArgs)
    return lib


class Rows(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("nlead", ctypes.c_int),
        ("V", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("lead_sizes", ctypes.c_int64 * MAX_LEAD),
        ("lead_strides", ctypes.c_int64 * MAX_LEAD),
    ]


class ForwardArgs(ctypes.Structure):
    _fields_ = [
        ("labels", ctypes.c_void_p),
        ("inv_temp", ctypes.c_void_p),
        ("ignore_index", ctypes.c_int64),
        ("stats", ctypes.c_int),
        ("out", ctypes.c_void_p),
    ]


class BackwardArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "labels",
            "inv_temp",
            "lse",
            "lse_lo",
            "entropy",
            "grad_logp",
            "grad_entropy",
            "grad_kl",
            "ref_lse",
            "kl",
        )
    ]
    _fields_ += [("ignore_index", ctypes.c_int64)]


def rows_of(t: torch.Tensor) -> Rows:
    """The kernels' view of t [..., V] (leading dims coalesced as the binding does)."""
    assert t.dtype in _DTYPE and (t.shape[-1] <= 1 or t.stride(-1) == 1)
    r = Rows()
    r.data = t.data_ptr()
    r.dtype = _DTYPE[t.dtype]
    r.V = t.shape[-1]
    r.rows = 1
    sizes, strides = [], []
    for s, st in zip(t.shape[:-1], t.stride()[:-1]):
        r.rows *= s
        if s == 1:
            continue
        if sizes and strides[-1] == st * s:
            sizes[-1] *= s
            strides[-1] = st
            continue
        sizes.append(s)
        strides.append(st)
    if r.rows == 0:
        sizes, strides = [], []
    r.nlead = len(sizes)
    for i, (s, st) in enumerate(zip(sizes, strides)):
        r.lead_sizes[i] = s
        r.lead_strides[i] = st
    return r


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def row_forward(
    logits, labels, inv_temp, ignore_index: int, stats: int, ref_logits=None, *, threads: int = 0, blocks: int = 0
) -> torch.Tensor:
    n = labels.numel()
    out = torch.full((N_OUT, n), float("nan"), dtype=torch.float32)  # every row must be written
    L = rows_of(logits)
    R = rows_of(ref_logits) if ref_logits is not None else None
    A = ForwardArgs(_ptr(labels), _ptr(inv_temp), ignore_index, stats, _ptr(out))
    library().emu_row_forward(
        ctypes.byref(L), ctypes.byref(R) if R is not None else None, ctypes.byref(A), threads, blocks
    )
    return out


def row_backward(
    logits,
    labels,
    inv_temp,
    lse,
    lse_lo,
    entropy,
    grad_logp,
    grad_entropy,
    ignore_index: int,
    inplace: bool,
    grad_kl=None,
    ref_logits=None,
    ref_lse=None,
    kl=None,
    *,
    threads: int = 0,
    blocks: int = 0,
) -> torch.Tensor:
    L = rows_of(logits)
    grad = logits if inplace else torch.full(logits.shape, float("nan"), dtype=logits.dtype)
    has_kl = grad_kl is not None
    R = rows_of(ref_logits) if has_kl else None
    A = BackwardArgs(
        _ptr(labels),
        _ptr(inv_temp),
        _ptr(lse),
        _ptr(lse_lo),
        _ptr(entropy),
        _ptr(grad_logp),
        _ptr(grad_entropy),
        _ptr(grad_kl),
        _ptr(ref_lse),
        _ptr(kl),
        ignore_index,
    )
    library().emu_row_backward(
        ctypes.byref(L),
        ctypes.byref(R) if R is not None else None,
        ctypes.byref(A),
        None if inplace else ctypes.c_void_p(grad.data_ptr()),
        threads,
        blocks,
    )
    return grad
