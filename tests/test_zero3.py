"""DeepSpeed ZeRO-3 partitioned heads (prefopt_fast.integrations._zero3) against a single-process run.

The end-to-end tests start two processes (DeepSpeed's CPU accelerator, gloo) running this
file as a script: every rank builds the same tiny model from one seed, wraps it with
``deepspeed.initialize`` (ZeRO-3, every parameter partitioned, plain SGD), and trains a few
steps on its half of each global batch with prefopt_fast computing the loss from the
partitioned head; beside it, in the same process, a plain copy of the model trains on the
whole global batch. The losses of every step and the parameters after the last step must
agree. The unit tests below them need no DeepSpeed: a stand-in parameter and
``GatheredParameters`` check the saved-tensor bookkeeping on one process.
"""

import copy
import json
import os
import socket
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import expected  # noqa: I001  (tests/expected.py: fails in strict mode where a peer is missing)
import pytest
import torch
from torch import nn

WORLD = 2
TIMEOUT = 240  # seconds for the whole two-process run, imports included (a hang fails)
V, H = 48, 16
STEPS = 3
LR = 0.5


# --------------------------------------------------------------------------- the models


class TinyLM(nn.Module):
    """Embedding -> linear -> tanh backbone and a biased lm_head (TRL passes the bias to the kernel)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.proj = nn.Linear(H, H)
        self.lm_head = nn.Linear(H, V)

    def hidden(self, ids):
        return torch.tanh(self.proj(self.embed(ids)))


class KernelLoss(nn.Module):
    """Loss from the patched TRL kernel (``PrefoptChunkedLogProbFunction.apply``), as TRL's fused head calls it.

    How the head reaches the kernel (``how``):

    * ``"attribute"``: ``lm_head.weight`` read inside the engine's forward: DeepSpeed's engine
      gathers it itself then (and registers it with the running module, which gathers it again
      in its backward);
    * ``"caller"``: the caller gathers it around the call, as TRL's ``add_fused_lm_head`` does
      (``maybe_gather_lm_head_ctx``, active under transformers' ZeRO-3 config);
    * ``"captured"``: references taken at construction, which DeepSpeed does not see being
      read: the kernel receives empty partitions, which would take a gradient: refused.
    """

    def __init__(self):
        super().__init__()
        self.lm = TinyLM()
        self.captured = [self.lm.lm_head.weight, self.lm.lm_head.bias]  # a list: not registered again

    def forward(self, ids, labels, how):
        from prefopt_fast.integrations.trl import PrefoptChunkedLogProbFunction

        h = self.lm.hidden(ids).reshape(-1, H)
        y = labels.reshape(-1)
        mask = (y != -100).float()
        if how == "captured":
            w, b = self.captured
            assert w.numel() == 0, "the captured head should be an empty partition here"
        else:
            w, b = self.lm.lm_head.weight, self.lm.lm_head.bias
        ctx = _gathered_by_caller(w, b) if how == "caller" else _nullctx()
        with ctx:
            logp, ent, *_ = PrefoptChunkedLogProbFunction.apply(
                h, w, b, y.clamp(min=0), 0.9, 4096, None, 1.0, ("entropy",)
            )
        n = mask.sum()
        return -(logp * mask).sum() / n - 0.1 * (ent * mask).sum() / n


def naive_kernel_loss(model, ids, labels):
    """KernelLoss on materialized fp64 logits (the single-process reference)."""
    h = model.lm.hidden(ids).reshape(-1, H).double()
    w, b = model.lm.lm_head.weight.double(), model.lm.lm_head.bias.double()
    y = labels.reshape(-1)
    mask = (y != -100).double()
    lp = torch.log_softmax((h @ w.t() + b) / 0.9, -1)
    logp = lp.gather(-1, y.clamp(min=0)[:, None])[:, 0]
    ent = -(lp.exp() * lp).sum(-1)
    n = mask.sum()
    return (-(logp * mask).sum() / n - 0.1 * (ent * mask).sum() / n).float()


def llama(tie=False):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


class HFDPOLoss(nn.Module):
    """DPO from a Hugging Face model's hidden states and head (``how``):

    * ``"linear"``: ``hf.hidden_and_head`` + ``hf.gathered_lm_head`` + ``linear_dpo_loss`` in the forward;
    * ``"sequence"``: ``hf.sequence_logprobs`` (which gathers the head by itself) + ``dpo_loss``;
    * ``"hidden"``: the forward returns the hidden states only; the loss is computed after it
      (:func:`dpo_after_forward`), where DeepSpeed does not gather the head: refused.
    """

    def __init__(self, tie=False):
        super().__init__()
        self.model = llama(tie)

    def forward(self, ids, am, completion, ref_logps, how):
        import prefopt_fast as pf
        from prefopt_fast.integrations import hf

        if how == "hidden":
            return hf.get_hidden_states(self.model, ids, am)
        ref_c, ref_r = ref_logps.chunk(2)
        if how == "sequence":
            logps = hf.sequence_logprobs(self.model, ids, completion, attention_mask=am)
            c, r = logps.chunk(2)
            return pf.dpo_loss(c, r, ref_c, ref_r, beta=0.5)[0]
        hidden, head = hf.hidden_and_head(self.model, ids, am)
        return _linear_dpo(hidden, head, ids, completion, ref_logps)


def _linear_dpo(hidden, head, ids, completion, ref_logps):
    import prefopt_fast as pf
    from prefopt_fast.integrations import hf

    ref_c, ref_r = ref_logps.chunk(2)
    labels = hf.shift_labels(ids, completion)
    with hf.gathered_lm_head(head) as full:
        loss, _ = pf.linear_dpo_loss(
            hidden, full.weight, labels, **full.kwargs(), ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.5
        )
    return loss  # its backward runs after the block: the head is gathered again then


def dpo_after_forward(engine, module, ids, am, completion, ref_logps):
    """The ``"hidden"`` way: the engine's forward gives the hidden states, the head is read after it."""
    from prefopt_fast.integrations import hf

    hidden = engine(ids, am, completion, ref_logps, how="hidden")
    head = hf.get_lm_head(module.model)
    assert head.weight.numel() == 0, "the head should be an empty partition after the forward"
    return _linear_dpo(hidden, head, ids, completion, ref_logps)


def naive_dpo_loss(module, ids, am, completion, ref_logps):
    """The same DPO loss from the model's own logits (the single-process reference)."""
    import prefopt_fast as pf
    from prefopt_fast import reference as R
    from prefopt_fast.integrations import hf

    logits = module.model(input_ids=ids, attention_mask=am).logits
    logps = R.sequence_logprobs(logits, hf.shift_labels(ids, completion), dtype=torch.float32)
    c, r = logps.chunk(2)
    ref_c, ref_r = ref_logps.chunk(2)
    return pf.dpo_loss(c, r, ref_c, ref_r, beta=0.5)[0]


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _gathered_by_caller(weight, bias):
    # TRL's own gather around its fused-head call (active under transformers' ZeRO-3 config:
    # HfDeepSpeedConfig, set up by the worker as accelerate does)
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(weight, bias)


# --------------------------------------------------------------------------- data


def kernel_batch(step, rank=None):
    """ids, labels [4, 6] of the global batch of ``step`` (rows of ``rank`` with a rank): equal token counts per half."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, V, (2 * WORLD, 6), generator=g)
    labels = torch.randint(0, V, (2 * WORLD, 6), generator=g)
    labels[:, :2] = -100
    if rank is None:
        return ids, labels
    rows = slice(2 * rank, 2 * rank + 2)
    return ids[rows], labels[rows]


def dpo_batch(step, rank=None):
    """ids, attention mask, completion mask [2P, 7] and reference log-probs [2P] ([chosen; rejected]), P = 2 per rank."""
    g = torch.Generator().manual_seed(200 + step)
    P = 2 * WORLD
    ids = torch.randint(0, V, (2 * P, 7), generator=g)
    am = torch.ones_like(ids)
    am[0, -1] = 0
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    completion &= am
    ref = -torch.rand(2 * P, generator=g) * 20
    if rank is None:
        return ids, am, completion, ref
    # rank r: pairs [2r, 2r + 2) -- its chosen rows and the matching rejected rows
    rows = torch.cat([torch.arange(2 * rank, 2 * rank + 2), P + torch.arange(2 * rank, 2 * rank + 2)])
    return ids[rows], am[rows], completion[rows], ref[rows]


# --------------------------------------------------------------------------- the worker (one rank)


# case -> the ways its steps read the head, in turn (see KernelLoss and HFDPOLoss)
WAYS = {"kernel": ("attribute", "caller"), "dpo": ("linear", "sequence"), "dpo_tied": ("linear", "sequence")}
CASES = tuple(WAYS)
CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    # every parameter partitioned, however small (the default keeps those under 1e5 elements whole)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips to norm 1.0 by default; the reference does not clip
    "steps_per_print": 10**9,
}


def _train(case: str, rank: int) -> dict:
    """STEPS steps of ``case`` under ZeRO-3 (this rank's half of each batch) and of a plain copy (the whole batch)."""
    import deepspeed

    torch.manual_seed(0)
    kernel = case.startswith("kernel")
    model = KernelLoss() if kernel else HFDPOLoss(tie=case.startswith("dpo_tied"))
    ref = copy.deepcopy(model)
    hf_ds_config = None
    if kernel:
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        hf_ds_config = HfDeepSpeedConfig(CONFIG)  # noqa: F841  (transformers holds it by a weak reference)
        assert is_deepspeed_zero3_enabled()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=CONFIG)
    head = model.lm.lm_head.weight if kernel else model.model.lm_head.weight
    report = {"partitioned": head.numel() == 0 and hasattr(head, "ds_id"), "losses": [], "ref_losses": []}
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    init = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ways = WAYS[case]
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        for step in range(STEPS):
            how = ways[step % len(ways)]
            if kernel:
                loss = engine(*kernel_batch(step, rank), how=how)
                ref_loss = naive_kernel_loss(ref, *kernel_batch(step))
            else:
                loss = engine(*dpo_batch(step, rank), how=how)
                ref_loss = naive_dpo_loss(ref, *dpo_batch(step))
            engine.backward(loss)
            engine.step()
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_opt.step()
            mean = loss.detach().clone()
            torch.distributed.all_reduce(mean)
            report["losses"].append(mean.item() / WORLD)
            report["ref_losses"].append(ref_loss.item())
    report["warnings"] = [str(w.message) for w in log]
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        report["max_abs_diff"] = {
            n: (params[n].detach() - p.detach()).abs().max().item() for n, p in ref.named_parameters()
        }
    if not kernel:
        # a reference after the forward, the head partitioned: gathered for the call (no gradient)
        from prefopt_fast import reference as R
        from prefopt_fast.integrations import hf

        ids, am, completion, _ = dpo_batch(0, rank)
        with torch.no_grad():
            got = hf.reference_sequence_logprobs(model.model, ids, completion, ref_model=model.model, attention_mask=am)
            logits = ref.model(input_ids=ids, attention_mask=am).logits
            want = R.sequence_logprobs(logits, hf.shift_labels(ids, completion), dtype=torch.float32)
        report["no_grad_logps_diff"] = (got - want).abs().max().item()
    ref_head = ref.lm.lm_head.weight if kernel else ref.model.lm_head.weight
    ref_head_name = next(n for n, p in ref.named_parameters() if p is ref_head)
    report["head_moved"] = (ref_head.detach() - init[ref_head_name]).abs().max().item()
    del hf_ds_config
    return report


def _refusals(rank: int) -> dict:
    """The messages of the two ways a partitioned head would be trained without DeepSpeed gathering it
    (each on a fresh engine: an exception inside a forward leaves DeepSpeed's bookkeeping mid-step)."""
    import deepspeed

    out = {}
    for case in ("kernel_captured", "dpo_hidden"):
        torch.manual_seed(0)
        model = KernelLoss() if case == "kernel_captured" else HFDPOLoss()
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=CONFIG
        )
        try:
            if case == "kernel_captured":
                engine(*kernel_batch(0, rank), how="captured")
            else:
                dpo_after_forward(engine, model, *dpo_batch(0, rank))
            out[case] = None
        except RuntimeError as exc:
            out[case] = str(exc)
    return out


def _worker(out: str) -> None:
    from datetime import timedelta

    import deepspeed
    import deepspeed.ops

    # no shared-memory all-reduce for the CPU accelerator: it is a C++ extension DeepSpeed would
    # compile on first use (minutes); gloo does every collective here
    deepspeed.ops.__compatible_ops__ = {}
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=90))
    rank = torch.distributed.get_rank()
    reports = {}
    for case in CASES:
        t0 = time.monotonic()
        reports[case] = _train(case, rank)
        reports[case]["seconds"] = time.monotonic() - t0
    reports["refusals"] = _refusals(rank)
    reports["seconds_to_start"] = T0 - T_START
    Path(out, f"rank{rank}.json").write_text(json.dumps(reports))


# --------------------------------------------------------------------------- the harness (pytest side)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path) -> list:
    """Both ranks' reports of every case (one two-process run: the imports are most of its time)."""
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ)
        env.update(
            DS_ACCELERATOR="cpu",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")]),
        )
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            cmd = [sys.executable, __file__, str(tmp_path), repr(time.time())]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT
    hung = []
    for rank, p in enumerate(procs):
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(rank)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    logs = {r: (tmp_path / f"rank{r}.log").read_text()[-4000:] for r in range(WORLD)}
    if hung:
        pytest.fail(f"ranks {hung} still running after {TIMEOUT} s (hang?); logs:\n{logs}")
    bad = {r: p.returncode for r, p in enumerate(procs) if p.returncode != 0}
    if bad:
        pytest.fail(f"ranks exited with {bad}; logs:\n" + "\n".join(f"--- rank {r}\n{logs[r]}" for r in bad))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def zero3_reports(tmp_path_factory):
    for component in ("deepspeed", "trl", "transformers"):
        expected.require(component)
    return _run(tmp_path_factory.mktemp("zero3"))


def test_zero3_partitioned_head_that_would_train_is_refused(zero3_reports):
    """A head captured outside the engine's forward, or read after it, is an empty partition whose
    gradient could not be stored: a RuntimeError that says where to read the head, on every rank."""
    for rank, reports in enumerate(zero3_reports):
        for case, message in reports["refusals"].items():
            assert message is not None, f"rank {rank}: {case} ran instead of raising"
            assert "not gathered" in message and "register_external_parameter" in message, (rank, case, message)


def test_zero3_reference_logps_gather_the_head(zero3_reports):
    """hf.reference_sequence_logprobs after the forward (head partitioned, no gradient): gathered for the call."""
    for rank, reports in enumerate(zero3_reports):
        for case in ("dpo", "dpo_tied"):
            assert reports[case]["no_grad_logps_diff"] < 1e-4, (rank, case, reports[case]["no_grad_logps_diff"])


@pytest.mark.parametrize("case", CASES)
def test_zero3_two_ranks_match_single_process(case, zero3_reports):
    """(kernel) the patched TRL kernel, the head read inside the forward or gathered by TRL's caller; (dpo) hf.gathered_lm_head +
    linear_dpo_loss and hf.sequence_logprobs + dpo_loss on a Llama; (dpo_tied) the same, lm_head tied to the
    embedding: losses of every step and parameters after the last one as a single process on the whole batch."""
    for rank, reports in enumerate(zero3_reports):
        rep = reports[case]
        assert rep["partitioned"], f"rank {rank}: the lm_head was not a partitioned ZeRO-3 parameter"
        for step, (got, want) in enumerate(zip(rep["losses"], rep["ref_losses"])):
            assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), f"rank {rank} step {step}: loss {got} != {want}"
        assert rep["head_moved"] > 1e-3, f"rank {rank}: the head did not train ({rep['head_moved']})"
        fallbacks = [m for m in rep["warnings"] if "own ChunkedLogProbFunction" in m]
        assert not fallbacks, f"rank {rank}: the patched kernel fell back to TRL's: {fallbacks}"
        bad = {k: v for k, v in rep["max_abs_diff"].items() if v > 2e-5}
        assert not bad, f"rank {rank}: parameters after {STEPS} steps differ from the single-process run: {bad}"


# --------------------------------------------------------------------------- without DeepSpeed (one process)


class _Status:
    AVAILABLE = "available"
    NOT_AVAILABLE = "not_available"


@pytest.fixture
def stand_in_deepspeed(monkeypatch):
    """A stand-in ``deepspeed`` whose GatheredParameters records what it is asked (the tensors stay whole)."""
    events = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            events.append(("gather", [p.ds_id for p in params], modifier_rank))

        def __enter__(self):
            events.append(("enter",))

        def __exit__(self, *exc):
            events.append(("exit",))

    ds = types.ModuleType("deepspeed")
    ds.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    pp = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    pp.ZeroParamStatus = _Status
    for name in ("deepspeed.runtime", "deepspeed.runtime.zero"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    monkeypatch.setitem(sys.modules, pp.__name__, pp)
    return events


def _zero3_param(t, ds_id, status, requires_grad=True):
    p = nn.Parameter(t, requires_grad=requires_grad)
    p.ds_id, p.ds_status = ds_id, status
    return p


def test_gathered_plain_tensors_are_a_no_op():
    from prefopt_fast.integrations import _zero3

    w = torch.randn(4, 3, requires_grad=True)
    with _zero3.gathered(w, None):  # no deepspeed import, nothing gathered
        pass
    assert not _zero3.is_zero3(w) and not _zero3.is_zero3(None)


def test_gathered_zero3_rules(stand_in_deepspeed):
    from prefopt_fast.integrations import _zero3

    events = stand_in_deepspeed
    w = _zero3_param(torch.randn(V, H), 7, _Status.NOT_AVAILABLE)
    b = _zero3_param(torch.randn(V), 8, _Status.AVAILABLE)
    # available (gathered by DeepSpeed's engine in its forward, or by the caller): left to DeepSpeed
    with _zero3.gathered(b, b):
        pass
    assert events == []
    # partitioned, and a gradient would reach it: refused, naming the way out
    with pytest.raises(RuntimeError, match=r"ds_id 7\).*not gathered.*register_external_parameter"):
        with _zero3.gathered(w, b):
            pass
    assert events == []
    # no gradient can reach it: gathered for the block, read-only, once per parameter
    with torch.no_grad(), _zero3.gathered(w, b, w):
        assert events == [("gather", [7], None), ("enter",)]
    assert events[-1] == ("exit",)
    events.clear()
    frozen = _zero3_param(torch.randn(V, H), 9, _Status.NOT_AVAILABLE, requires_grad=False)
    with _zero3.gathered(frozen):
        assert events == [("gather", [9], None), ("enter",)]


@pytest.fixture
def patched_kernel():
    # imported before the stand-in deepspeed is installed: importing TRL probes for deepspeed
    expected.require("trl")
    from prefopt_fast.integrations.trl import PrefoptChunkedLogProbFunction

    return PrefoptChunkedLogProbFunction


def test_patched_kernel_takes_zero3_head_without_fallback(patched_kernel, stand_in_deepspeed):
    """The patched TRL kernel no longer falls back for a ZeRO-3 head: gathered by DeepSpeed -> prefopt_fast's
    result; partitioned under no_grad -> gathered; partitioned with gradients -> the clear error."""
    from prefopt_fast.ops.linear_logprobs import linear_token_logprobs

    PrefoptChunkedLogProbFunction = patched_kernel  # noqa: N806
    events = stand_in_deepspeed
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, H, generator=g, requires_grad=True)
    y = torch.randint(0, V, (5,), generator=g)
    w = _zero3_param(torch.randn(V, H, generator=g), 1, _Status.AVAILABLE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        logp = PrefoptChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0, ())[0]
    logp.sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    h2 = h.detach().clone().requires_grad_(True)
    want = linear_token_logprobs(h2, w2, y)
    want.sum().backward()
    torch.testing.assert_close(logp, want)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(h.grad, h2.grad)
    assert events == []
    w.ds_status = _Status.NOT_AVAILABLE
    with pytest.raises(RuntimeError, match="not gathered"):
        PrefoptChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0, ())
    with torch.no_grad():
        out = PrefoptChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0, ())[0]
    torch.testing.assert_close(out, want.detach())
    assert events == [("gather", [1], None), ("enter",), ("exit",)]


if __name__ == "__main__":
    T0 = time.time()
    T_START = float(sys.argv[2])
    _worker(sys.argv[1])
