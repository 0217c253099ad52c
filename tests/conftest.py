"""Shared fixtures: the backend matrix, the device each backend runs on, a fixed seed."""

import contextlib
import os

# Before anything imports triton: run Triton kernels in the interpreter on CPU tensors.
# A GPU run sets TRITON_INTERPRET=0 explicitly.
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# tools/accuracy_rule.py (the accuracy rule over prefopt_fast.reference) is shared with
# tools/accuracy_table.py, which must not import tests/: the tests import it from tools/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import expected  # noqa: E402  (tests/expected.py: what must be here, and how its absence fails)
import pytest  # noqa: E402
import torch  # noqa: E402

# Every backend name the package may offer. Parametrizing over this static list (and
# skipping the ones not available here) keeps collection independent of the package.
KNOWN_BACKENDS = ("torch", "cpu", "triton", "cuda")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_device(name: str) -> torch.device:
    """The device the tests of backend ``name`` put their tensors on."""
    if name == "cuda" or (name == "triton" and not _interpreting()):
        return torch.device("cuda")
    return torch.device("cpu")


def _available():
    import prefopt_fast

    return list(prefopt_fast.available_backends())


@pytest.fixture(scope="session")
def backends():
    """The list ``prefopt_fast.available_backends()`` (imported lazily)."""
    return _available()


@pytest.fixture(params=KNOWN_BACKENDS)
def backend(request):
    """Each backend available here, by name. An absent cpu backend (the native extension) or
    Triton under the interpreter is a broken install (tests/expected.py: a failure in strict
    mode); backends that need a GPU are skipped with the reason where there is none."""
    name = request.param
    if name == "cpu" or (name == "triton" and _interpreting()):
        expected.require("cpu-extension" if name == "cpu" else "triton")
    avail = _available()
    if name not in avail:
        reason = "not available"
        try:
            import importlib

            mod = importlib.import_module(f"prefopt_fast.backends.{'torch_backend' if name == 'torch' else name}")
            reason = mod.unavailable_reason() or reason
        except Exception as e:  # a missing module is just "not here"
            reason = f"{reason} ({type(e).__name__}: {e})"
        pytest.skip(f"backend {name!r}: {reason}")
    return name


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    return 0


@contextlib.contextmanager
def one_process_group_ctx():
    """A world-size-1 gloo group in this process (no spawn), torn down on exit unless one was
    already initialized: vocabulary-parallel code paths run with it as on a real group."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture
def one_process_group():
    with one_process_group_ctx() as group:
        yield group
