"""The runnable examples in examples/ exit 0 with a few steps (PREFOPT_EXAMPLE_STEPS)."""

import os
import subprocess
import sys
from pathlib import Path

import expected  # tests/expected.py

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, steps: int = 3, timeout: int = 240):
    env = dict(os.environ, PREFOPT_EXAMPLE_STEPS=str(steps), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == steps and "reward acc" in lines[-1], proc.stdout[-3000:]
    assert "done:" in proc.stdout
    return proc.stdout


def test_trl_dpo_lora_example():
    expected.require("trl")
    expected.require("peft")
    _run("trl_dpo_lora.py")


def test_custom_loop_dpo_example():
    expected.require("transformers")
    _run("custom_loop_dpo.py")


def test_distributed_layouts_example():
    """docs/distributed.md's three layouts, launched as users launch them (torchrun, 2 gloo ranks)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(EXAMPLES / "distributed_layouts.py"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "done: replicated, vocabulary-parallel and FSDP2 layouts match one process on 2 ranks" in proc.stdout
