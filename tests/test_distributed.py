"""Vocabulary-parallel ops over torch.distributed (gloo, CPU) against the single-process result.

Each test spawns ``world`` processes (torch.multiprocessing, a free TCP port, a hard time
limit); every rank builds the same full tensors from one seed, keeps its vocabulary shard,
runs the distributed op and compares outputs and gradients with the unsharded op computed in
the same process. Spawning is slow (seconds per process on a loaded machine), so each spawn
runs the whole list of checks and reports every mismatch at once.
"""
import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

SPAWN_TIMEOUT = 240  # seconds for a whole spawn (start-up included); a hang fails the test


# --------------------------------------------------------------------------- harness (parent side)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, suite: str, tmp_path) -> dict:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, suite, str(tmp_path)), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = {}
    for r in range(world):
        f = tmp_path / f"rank{r}.json"
        if f.exists():
            results[r] = json.loads(f.read_text())
    if hung:
        pytest.fail(f"ranks {hung} of {world} still running after {SPAWN_TIMEOUT} s (hang?); "
                    f"finished checks: {[results.get(r, {}).get('ran') for r in range(world)]}")
    missing = [r for r in range(world) if r not in results]
    if missing:
        pytest.fail(f"ranks {missing} died without a report (exit codes {[p.exitcode for p in procs]})")
    failures = [f"[rank {r}] {msg}" for r in range(world) for msg in results[r]["failures"]]
    assert not failures, "\n".join(failures)
    return results


# --------------------------------------------------------------------------- worker side


def _worker(rank: int, world: int, port: int, suite: str, outdir: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    report = {"failures": [], "ran": [], "seconds": {}}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=90))
        env = _Env(rank, world, report)
        for name, fn in SUITES[suite]:
            t0 = time.perf_counter()
            env.where = name
            try:
                fn(env)
            except Exception:  # a check that raised: record it, keep going with the others
                report["failures"].append(f"{name}: {traceback.format_exc()}")
            report["ran"].append(name)
            report["seconds"][name] = round(time.perf_counter() - t0, 2)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        report["failures"].append(f"worker: {traceback.format_exc()}")
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


class _Env:
    def __init__(self, rank, world, report):
        import torch.distributed as dist

        self.rank, self.world, self.report = rank, world, report
        self.group = dist.group.WORLD
        self.where = ""

    def close(self, what, got, want, rtol=1e-5, atol=1e-5):
        """Record (never raise: the other ranks must not be left waiting in a collective)."""
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True,
                                       check_dtype=False, msg=lambda m: m)
        except AssertionError as exc:
            self.report["failures"].append(f"{self.where} / {what}: {exc}")

    def check(self, what, ok: bool, detail=""):
        if not ok:
            self.report["failures"].append(f"{self.where} / {what}: {detail}")


def _layouts(world: int):
    """(name, V, sizes, starts or None) per rank; the shards tile [0, V)."""
    if world == 2:
        return [("even", 40, [20, 20], None),
                ("uneven", 37, [23, 14], None),
                ("reversed", 37, [23, 14], [14, 0])]          # rank 0 holds the end of the vocabulary
    return [("even", 40, [10, 10, 10, 10], None),
            ("uneven+empty", 37, [11, 0, 16, 10], [16, 37, 0, 27])]


def _labels(B, T, V, sizes, starts, g):
    """Labels hitting every shard boundary, ignored tokens and one all-ignored sequence."""
    y = torch.randint(0, V, (B, T), generator=g)
    edges = []
    for s, n in zip(starts, sizes):
        edges += [s, s + n - 1, s - 1, s + n] if n else [s]
    edges = [e for e in sorted(set(edges)) if 0 <= e < V]
    flat = y.view(-1)
    flat[: len(edges)] = torch.tensor(edges)
    y[1] = -100               # a sequence without any real label
    y[0, -1] = -100
    return y


def _starts(sizes, starts):
    return starts if starts is not None else [sum(sizes[:r]) for r in range(len(sizes))]


def _shard(x, dim, start, size):
    return x.narrow(dim, start, size)


# --------------------------------------------------------------------------- checks


def _check_token_logprobs(env, backends=("torch", "cpu"), dtypes=(torch.float32, torch.bfloat16)):
    import prefopt_fast
    from prefopt_fast import token_logprobs

    avail = prefopt_fast.available_backends()
    stats = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
    for lname, V, sizes, starts in _layouts(env.world):
        st = _starts(sizes, starts)
        s0, n0 = st[env.rank], sizes[env.rank]
        for be in backends:
            if be not in avail:
                continue
            for dt in dtypes:
                g = torch.Generator().manual_seed(1)
                B, T = 3, 12
                full = (torch.randn(B, T, V, generator=g) * 3).to(dt)
                y = _labels(B, T, V, sizes, st, g)
                # a row where a whole region across shard boundaries is -inf (a vocabulary mask)
                full[0, 3, : V // 2 + 3] = float("-inf")
                y[0, 3] = V - 1
                # ties across shards: first argmax vs a later equal maximum
                full[2, 0] = 0
                full[2, 0, [1, V - 2]] = 5
                y[2, 0] = 1
                full[2, 1] = 0
                full[2, 1, [1, V - 2]] = 5
                y[2, 1] = V - 2
                temp = 0.5 + torch.rand(B, 1, generator=g)
                gl = torch.randn(B, T, generator=g)
                ge = torch.randn(B, T, generator=g)
                tag = f"{lname}/{be}/{dt}"

                ref_in = full.clone().requires_grad_()
                ref = token_logprobs(ref_in, y, stats=stats, temperature=temp, backend=be)
                (ref.logprobs * gl + ref.entropy * ge).sum().backward()

                loc = _shard(full, -1, s0, n0).clone().requires_grad_()
                out = token_logprobs(loc, y, stats=stats, temperature=temp, backend=be, process_group=env.group,
                                     vocab_start=None if starts is None else s0,
                                     vocab_size=V if lname != "even" else None)
                (out.logprobs * gl + out.entropy * ge).sum().backward()
                tol = dict(rtol=2e-5, atol=2e-5)
                for f in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit"):
                    env.close(f"{tag} {f}", getattr(out, f), getattr(ref, f), **tol)
                env.check(f"{tag} is_argmax", torch.equal(out.is_argmax, ref.is_argmax),
                          f"{out.is_argmax.int().tolist()} != {ref.is_argmax.int().tolist()}")
                gtol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=2e-2, atol=1e-4)
                env.close(f"{tag} grad", loc.grad, _shard(ref_in.grad, -1, s0, n0), **gtol)


SUITES = {
    "core": [("token_logprobs", _check_token_logprobs)],
}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel(world, tmp_path):
    _spawn(world, "core", tmp_path)
