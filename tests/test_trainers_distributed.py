"""TRL trainers with prefopt_fast under ``accelerate launch`` with an FSDP2 config (2 CPU processes, gloo).

One launch (tests/distributed_trainer_script.py) trains, a few SGD steps each: ``trl.DPOTrainer``
under ``patch_trl()``, prefopt_fast's ``DPOTrainer``, and prefopt_fast's ``GRPOTrainer`` (grpo with
KL and entropy bonus; dapo with sequence-level ratios) on fixed rollouts. A one-process run of
TRL's own trainers and kernel over the same global batches is the reference: every logged value
of every step and the trained parameters must agree within the tolerances of
tests/test_trl_integration.py.

accelerate 1.16 ignores an FSDP config on CPU (it runs DDP); the script re-enables it (see
``allow_fsdp_on_cpu`` there), and this test checks that the run really was FSDP2.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import expected  # noqa: I001  (tests/expected.py: fails in strict mode where a peer is missing)
import pytest
import torch

expected.require_module("trl")
expected.require_module("transformers")
expected.require_module("datasets")

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "distributed_trainer_script.py"
TIMEOUT = 420  # seconds for both launches together (start-up included); a hang fails the test
RTOL, ATOL = 1e-5, 1e-6  # tests/test_trl_integration.py's for the logs; the parameters too (there atol 1e-7:
# here the two ranks' gradient reduction changes the summation order; measured up to 1.8e-7 after 3 steps)
_SKIP_LOG = ("runtime", "per_second", "time", "total_flos")  # total_flos counts padding, which differs

FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
use_cpu: true
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
"""
CASES = ("dpo_patch", "dpo_sub", "grpo", "dapo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(cmds, env, logs):
    """Run the commands side by side, each in its own process group; fail on a non-zero exit or a hang."""
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        for i in hung:
            os.killpg(procs[i].pid, signal.SIGKILL)
            procs[i].wait(10)
    for i, (p, log) in enumerate(zip(procs, logs)):
        if i in hung or p.returncode != 0:
            tail = Path(log).read_text()[-4000:]
            what = f"still running after {TIMEOUT} s" if i in hung else f"exit code {p.returncode}"
            pytest.fail(f"{' '.join(map(str, cmds[i]))}: {what}\n{tail}")


@pytest.mark.slow
def test_trl_trainers_under_accelerate_fsdp2_match_one_process(tmp_path):
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(SCRIPT), "--save-models", str(model)], env=env, check=True, timeout=180)
    cfg = tmp_path / "fsdp2.yaml"
    cfg.write_text(FSDP2_CONFIG)
    dist, ref = tmp_path / "fsdp2", tmp_path / "one"
    dist.mkdir()
    ref.mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--num_processes", "2"]
    launch += ["--main_process_port", str(_free_port()), str(SCRIPT), str(model), str(dist)]
    one = [sys.executable, str(SCRIPT), str(model), str(ref), "--reference"]
    _run_all([launch, one], env, [tmp_path / "fsdp2.log", tmp_path / "one.log"])

    for case in CASES:
        d = json.loads((dist / f"{case}.json").read_text())
        r = json.loads((ref / f"{case}.json").read_text())
        # the launch really was FSDP2, and the patched head ran on every rank
        assert d["num_processes"] == 2 and d["is_fsdp2"] and d["fsdp_version"] == 2, (case, d)
        assert d["model_class"].startswith("FSDP") and d["lm_head_weight"] == "DTensor", (case, d)
        assert len(d["weight_types"]) == 2 and all(d["weight_types"]), (case, d["weight_types"])
        assert r["num_processes"] == 1 and r["weight_types"] == [[]], (case, r)  # the reference: TRL alone

        logs_d, logs_r = d["log_history"], r["log_history"]
        assert len(logs_d) == len(logs_r) >= 3, case
        for i, (a, b) in enumerate(zip(logs_d, logs_r)):
            assert set(a) == set(b), f"{case} log {i}: keys differ: {set(a) ^ set(b)}"
            for k, vb in b.items():
                if any(s in k for s in _SKIP_LOG) or not isinstance(vb, (int, float)):
                    continue
                torch.testing.assert_close(float(a[k]), float(vb), rtol=RTOL, atol=ATOL, msg=f"{case} log {i} {k!r}")
        assert any("loss" in e for e in logs_r), case

        pd = torch.load(dist / f"{case}.pt")
        pr = torch.load(ref / f"{case}.pt")
        assert pd.keys() == pr.keys(), case
        for n in pr:
            torch.testing.assert_close(pd[n], pr[n], rtol=RTOL, atol=ATOL, msg=f"{case} parameter {n}")
        assert r["moved"] > 1e-4, f"{case}: training hardly moved the model ({r['moved']})"
