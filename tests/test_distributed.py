"""Vocabulary-parallel ops over torch.distributed (gloo, CPU) against the single-process result.

Each test spawns ``world`` processes (torch.multiprocessing, a free TCP port, a hard time
limit); every rank builds the same full tensors from one seed, keeps its vocabulary shard,
runs the distributed op and compares outputs and gradients with the unsharded op computed in
the same process. Spawning is slow (seconds per process on a loaded machine), so each spawn
runs the whole list of checks and reports every mismatch at once.
"""

import json
import math
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
    procs = [
        ctx.Process(target=_worker, args=(rank, world, port, suite, str(tmp_path)), daemon=True)
        for rank in range(world)
    ]
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
        pytest.fail(
            f"ranks {hung} of {world} still running after {SPAWN_TIMEOUT} s (hang?); "
            f"finished checks: {[results.get(r, {}).get('ran') for r in range(world)]}"
        )
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
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
        )
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
            torch.testing.assert_close(
                got, want, rtol=rtol, atol=atol, equal_nan=True, check_dtype=False, msg=lambda m: m
            )
        except AssertionError as exc:
            self.report["failures"].append(f"{self.where} / {what}: {exc}")

    def check(self, what, ok: bool, detail=""):
        if not ok:
            self.report["failures"].append(f"{self.where} / {what}: {detail}")


def _layouts(world: int):
    """(name, V, sizes, starts or None) per rank; the shards tile [0, V)."""
    if world == 2:
        return [
            ("even", 40, [20, 20], None),
            ("uneven", 37, [23, 14], None),
            ("reversed", 37, [23, 14], [14, 0]),
        ]  # rank 0 holds the end of the vocabulary
    return [("even", 40, [10, 10, 10, 10], None), ("uneven+empty", 37, [11, 0, 16, 10], [16, 37, 0, 27])]


def _labels(B, T, V, sizes, starts, g):
    """Labels hitting every shard boundary, ignored tokens and one all-ignored sequence."""
    y = torch.randint(0, V, (B, T), generator=g)
    edges = []
    for s, n in zip(starts, sizes):
        edges += [s, s + n - 1, s - 1, s + n] if n else [s]
    edges = [e for e in sorted(set(edges)) if 0 <= e < V]
    flat = y.view(-1)
    flat[: len(edges)] = torch.tensor(edges)
    y[1] = -100  # a sequence without any real label
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
                out = token_logprobs(
                    loc,
                    y,
                    stats=stats,
                    temperature=temp,
                    backend=be,
                    process_group=env.group,
                    vocab_start=None if starts is None else s0,
                    vocab_size=V if lname != "even" else None,
                )
                (out.logprobs * gl + out.entropy * ge).sum().backward()
                tol = dict(rtol=2e-5, atol=2e-5)
                for f in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit"):
                    env.close(f"{tag} {f}", getattr(out, f), getattr(ref, f), **tol)
                env.check(
                    f"{tag} is_argmax",
                    torch.equal(out.is_argmax, ref.is_argmax),
                    f"{out.is_argmax.int().tolist()} != {ref.is_argmax.int().tolist()}",
                )
                gtol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=2e-2, atol=1e-4)
                env.close(f"{tag} grad", loc.grad, _shard(ref_in.grad, -1, s0, n0), **gtol)


def _one_layout(env):
    """The most uneven layout of this world size (explicit starts when it has them)."""
    lname, V, sizes, starts = _layouts(env.world)[-1]
    st = _starts(sizes, starts)
    kw = dict(process_group=env.group, vocab_start=st[env.rank] if starts is not None else None)
    return V, sizes, st, kw


def _check_kl_inplace(env):
    """The exact-KL statistic (backward through logp, entropy and kl) and the in-place backward."""
    from prefopt_fast import token_logprobs

    V, sizes, st, kw = _one_layout(env)
    s0, n0 = st[env.rank], sizes[env.rank]
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(2)
        B, T = 2, 10
        full = (torch.randn(B, T, V, generator=g) * 2).to(dt)
        ref_full = (full.float() + torch.randn(B, T, V, generator=g)).to(dt)
        ref_full[0, 2, :5] = float("-inf")  # q_v = 0 where p_v > 0: KL = +inf
        ref_full[1, 4] = full[1, 4]  # identical rows: KL = 0
        y = _labels(B, T, V, sizes, st, g)
        y[0, 2] = 7
        gl, ge, gk = (torch.randn(B, T, generator=g) for _ in range(3))
        gk[0, 2] = 0  # a zero upstream gradient on the infinite-KL row
        tag = str(dt)
        ref_in = full.clone().requires_grad_()
        ref = token_logprobs(ref_in, y, stats=("entropy", "kl"), ref_logits=ref_full, temperature=0.8)
        (ref.logprobs * gl + ref.entropy * ge + ref.kl * gk).sum().backward()
        loc = _shard(full, -1, s0, n0).clone().requires_grad_()
        out = token_logprobs(
            loc, y, stats=("entropy", "kl"), ref_logits=_shard(ref_full, -1, s0, n0).clone(), temperature=0.8, **kw
        )
        (out.logprobs * gl + out.entropy * ge + out.kl * gk).sum().backward()
        for f in ("logprobs", "entropy", "kl"):
            env.close(f"{tag} {f}", getattr(out, f), getattr(ref, f), rtol=2e-5, atol=2e-5)
        env.check(f"{tag} kl +inf", bool(torch.isposinf(out.kl[0, 2])), str(out.kl[0, 2]))
        gtol = dict(rtol=1e-5, atol=1e-6) if dt == torch.float32 else dict(rtol=2e-2, atol=1e-4)
        env.close(f"{tag} grad", loc.grad, _shard(ref_in.grad, -1, s0, n0), **gtol)

        # in place: the gradient lands in the shard's own buffer
        buf = _shard(full, -1, s0, n0).clone()
        loc2 = buf.clone().requires_grad_()
        x = loc2 * 1  # a non-leaf the backward may overwrite
        out2 = token_logprobs(x, y, stats=("entropy",), inplace_backward=True, backend="cpu", **kw)
        (out2.logprobs * gl + out2.entropy * ge).sum().backward()
        ref_in2 = full.clone().requires_grad_()
        ref2 = token_logprobs(ref_in2, y, stats=("entropy",), backend="cpu")
        (ref2.logprobs * gl + ref2.entropy * ge).sum().backward()
        env.close(f"{tag} in-place grad", loc2.grad, _shard(ref_in2.grad, -1, s0, n0), **gtol)


def _check_nonfinite(env):
    """NaN anywhere in a row (on one shard) -> NaN log-prob; +inf likewise; one shard all -inf."""
    from prefopt_fast import token_logprobs

    V, sizes, st, kw = _one_layout(env)
    s0, n0 = st[env.rank], sizes[env.rank]
    g = torch.Generator().manual_seed(3)
    full = torch.randn(4, V, generator=g)
    y = torch.tensor([0, V - 1, 3, V // 2])
    full[0, V - 1] = float("nan")
    full[1, 0] = float("inf")
    first = max(range(len(sizes)), key=lambda r: sizes[r])
    full[2, st[first] : st[first] + sizes[first]] = float("-inf")  # a whole shard masked
    y[2] = (st[first] + sizes[first]) % V
    ref = token_logprobs(full, y, stats=("entropy", "mean_logit"), backend="cpu")
    out = token_logprobs(_shard(full, -1, s0, n0).clone(), y, stats=("entropy", "mean_logit"), backend="cpu", **kw)
    env.check("NaN row", bool(torch.isnan(out.logprobs[0])), str(out.logprobs))
    env.check("+inf row", bool(torch.isnan(out.logprobs[1])), str(out.logprobs))
    env.close("masked shard logp", out.logprobs[2:], ref.logprobs[2:])
    env.close("masked shard entropy", out.entropy[2:], ref.entropy[2:])
    env.close("masked shard mean", out.mean_logit[2:], ref.mean_logit[2:])


def _check_losses(env):
    """sequence_logprobs (packed), logits_dpo_loss with ref_logits, ppo_loss with the exact KL."""
    from prefopt_fast import logits_dpo_loss, ppo_loss, sequence_logprobs

    V, sizes, st, kw = _one_layout(env)
    s0, n0 = st[env.rank], sizes[env.rank]
    g = torch.Generator().manual_seed(4)
    B, T = 4, 9
    full = (torch.randn(B, T, V, generator=g) * 2).to(torch.bfloat16)
    ref_full = (full.float() + 0.5 * torch.randn(B, T, V, generator=g)).to(torch.bfloat16)
    y = _labels(B, T, V, sizes, st, g)
    sh = lambda x: _shard(x, -1, s0, n0).clone()  # noqa: E731
    gtol = dict(rtol=2e-2, atol=1e-4)

    # packed sequences
    cu = torch.tensor([0, 5, 5, 20, B * T])
    a = full.view(B * T, V).clone().requires_grad_()
    ref = sequence_logprobs(a, y.view(-1), cu_seqlens=cu, average=True)
    ref.sum().backward()
    b = sh(full.view(B * T, V)).requires_grad_()
    out = sequence_logprobs(b, y.view(-1), cu_seqlens=cu, average=True, **kw)
    out.sum().backward()
    env.close("sequence_logprobs", out, ref)
    env.close("sequence_logprobs grad", b.grad, _shard(a.grad, -1, s0, n0), **gtol)

    # DPO family, reference logits sharded too
    for loss_type in ("sigmoid", "ipo"):
        a = full.clone().requires_grad_()
        ref_loss, ref_m = logits_dpo_loss(a, y, ref_logits=ref_full, beta=0.1, loss_type=loss_type)
        ref_loss.backward()
        b = sh(full).requires_grad_()
        loss, m = logits_dpo_loss(b, y, ref_logits=sh(ref_full), beta=0.1, loss_type=loss_type, **kw)
        loss.backward()
        env.close(f"dpo {loss_type} loss", loss, ref_loss)
        for k in ref_m:
            env.close(f"dpo {loss_type} metric {k}", m[k], ref_m[k])
        env.close(f"dpo {loss_type} grad", b.grad, _shard(a.grad, -1, s0, n0), **gtol)

    # PPO with the exact KL over the sharded vocabulary, entropy bonus, a loss mask
    old = torch.randn(B, T, generator=g) * 0.1 - 3
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    cfg = dict(kl_coef=0.05, kl_estimator="full", entropy_coef=0.01, clip_eps_high=0.28, loss_mask=mask)
    a = full.clone().requires_grad_()
    ref_loss, ref_m = ppo_loss(a, y, old, adv, ref_logits=ref_full, **cfg)
    ref_loss.backward()
    b = sh(full).requires_grad_()
    loss, m = ppo_loss(b, y, old, adv, ref_logits=sh(ref_full), **cfg, **kw)
    loss.backward()
    env.close("ppo loss", loss, ref_loss)
    for k in ref_m:
        env.close(f"ppo metric {k}", m[k], ref_m[k])
    env.close("ppo grad", b.grad, _shard(a.grad, -1, s0, n0), **gtol)


def _check_linear(env):
    """linear_token_logprobs (bias, LoRA, softcap, stats), linear_dpo_loss, linear_ppo_loss."""
    from prefopt_fast.linear import linear_dpo_loss, linear_ppo_loss, linear_token_logprobs

    V, sizes, st, kw = _one_layout(env)
    s0, n0 = st[env.rank], sizes[env.rank]
    stats = ("entropy", "log_sum_sq_probs", "mean_logit", "is_argmax")
    for dt in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(5)
        B, T, H, r = 2, 7, 16, 4
        hidden = torch.randn(B, T, H, generator=g).to(dt)
        weight = (torch.randn(V, H, generator=g) / 2).to(dt)
        bias = torch.randn(V, generator=g).to(dt)
        la = (torch.randn(r, H, generator=g) / 4).to(dt)
        lb = (torch.randn(V, r, generator=g) / 4).to(dt)
        y = _labels(B, T, V, sizes, st, g)
        gl, ge = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
        tol = dict(rtol=2e-5, atol=2e-5) if dt == torch.float32 else dict(rtol=1e-3, atol=1e-3)
        gtol = dict(rtol=1e-4, atol=1e-5) if dt == torch.float32 else dict(rtol=3e-2, atol=3e-3)
        # bf16: each rank's hidden / LoRA-A gradient is its shard's bf16 GEMM, then summed over
        # ranks: an absolute error of a bf16 ulp of the partial sums, not of the total
        htol = gtol if dt == torch.float32 else dict(rtol=3e-2, atol=1e-2)
        for softcap in (None, 5.0):
            tag = f"{dt} softcap={softcap}"
            leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias, la, lb)]
            h, w, b_, a_, B_ = leaves
            ref = linear_token_logprobs(
                h,
                w,
                y,
                bias=b_,
                lora=(a_, B_, 0.5),
                softcap=softcap,
                logit_scale=1.3,
                temperature=0.9,
                stats=stats,
                chunk_size=5,
            )
            (ref.logprobs * gl + ref.entropy * ge).sum().backward()
            mine = [
                hidden.clone(),
                _shard(weight, 0, s0, n0).clone(),
                _shard(bias, 0, s0, n0).clone(),
                la.clone(),
                _shard(lb, 0, s0, n0).clone(),
            ]
            mine = [x.requires_grad_() for x in mine]
            h2, w2, b2, a2, B2 = mine
            out = linear_token_logprobs(
                h2,
                w2,
                y,
                bias=b2,
                lora=(a2, B2, 0.5),
                softcap=softcap,
                logit_scale=1.3,
                temperature=0.9,
                stats=stats,
                chunk_size=5,
                **kw,
            )
            (out.logprobs * gl + out.entropy * ge).sum().backward()
            for f in ("logprobs", "entropy", "log_sum_sq_probs", "mean_logit"):
                env.close(f"{tag} {f}", getattr(out, f), getattr(ref, f), **tol)
            env.check(f"{tag} is_argmax", torch.equal(out.is_argmax, ref.is_argmax))
            env.close(f"{tag} grad hidden", h2.grad, h.grad, **htol)
            env.close(f"{tag} grad weight", w2.grad, _shard(w.grad, 0, s0, n0), **gtol)
            env.close(f"{tag} grad bias", b2.grad, _shard(b_.grad, 0, s0, n0), **gtol)
            env.close(f"{tag} grad lora A", a2.grad, a_.grad, **htol)
            env.close(f"{tag} grad lora B", B2.grad, _shard(B_.grad, 0, s0, n0), **gtol)

    # the losses, fp32
    g = torch.Generator().manual_seed(6)
    B, T, H = 4, 6, 8
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 2
    ref_hidden = hidden + 0.1 * torch.randn(B, T, H, generator=g)
    y = _labels(B, T, V, sizes, st, g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss, _ = linear_dpo_loss(h, w, y, ref_hidden=ref_hidden, ref_weight=weight, beta=0.2)
    ref_loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), _shard(weight, 0, s0, n0).clone().requires_grad_()
    loss, _ = linear_dpo_loss(h2, w2, y, ref_hidden=ref_hidden, ref_weight=_shard(weight, 0, s0, n0), beta=0.2, **kw)
    loss.backward()
    env.close("linear dpo loss", loss, ref_loss)
    env.close("linear dpo grad hidden", h2.grad, h.grad, rtol=1e-4, atol=1e-6)
    env.close("linear dpo grad weight", w2.grad, _shard(w.grad, 0, s0, n0), rtol=1e-4, atol=1e-6)

    old = torch.randn(B, T, generator=g) * 0.1 - 3
    ref_lp = torch.randn(B, T, generator=g) * 0.1 - 3
    adv = torch.randn(B, generator=g)
    cfg = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, loss_agg_mode="dapo", global_num_tokens=30.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss, ref_m = linear_ppo_loss(h, w, y, old, adv, ref_logps=ref_lp, **cfg)
    ref_loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), _shard(weight, 0, s0, n0).clone().requires_grad_()
    loss, m = linear_ppo_loss(h2, w2, y, old, adv, ref_logps=ref_lp, **cfg, **kw)
    loss.backward()
    env.close("linear ppo loss", loss, ref_loss)
    for k in ref_m:
        env.close(f"linear ppo metric {k}", m[k], ref_m[k])
    env.close("linear ppo grad hidden", h2.grad, h.grad, rtol=1e-4, atol=1e-6)
    env.close("linear ppo grad weight", w2.grad, _shard(w.grad, 0, s0, n0), rtol=1e-4, atol=1e-6)


def _check_dtensor(env):
    """DTensor logits Shard(-1) / weight Shard(0) on a 1-D CPU mesh (torch.chunk's uneven split)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from prefopt_fast import token_logprobs
    from prefopt_fast.linear import linear_token_logprobs

    mesh = init_device_mesh("cpu", (env.world,))
    V = 4 * env.world + 3  # uneven: torch.chunk sizes
    c = -(-V // env.world)
    s0 = min(env.rank * c, V)
    n0 = min(V, s0 + c) - s0
    g = torch.Generator().manual_seed(7)
    B, T, H = 2, 5, 6
    full = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 0] = -100
    gl, ge = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    d = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_()
    env.check("dtensor shard offset", torch.equal(d.to_local(), _shard(full, -1, s0, n0)))
    out = token_logprobs(d, y, stats=("entropy",))
    (out.logprobs * gl + out.entropy * ge).sum().backward()
    a = full.clone().requires_grad_()
    ref = token_logprobs(a, y, stats=("entropy",))
    (ref.logprobs * gl + ref.entropy * ge).sum().backward()
    env.check("dtensor output is a plain tensor", type(out.logprobs) is torch.Tensor, str(type(out.logprobs)))
    env.close("dtensor logprobs", out.logprobs, ref.logprobs)
    env.close("dtensor entropy", out.entropy, ref.entropy)
    # torch < 2.13 accumulates the gradient of an unevenly sharded DTensor leaf as Replicate (same
    # values; plain torch does it too): compare this rank's shard of it
    env.close(
        "dtensor grad",
        d.grad.redistribute(mesh, [Shard(2)]).to_local(),
        _shard(a.grad, -1, s0, n0),
        rtol=1e-5,
        atol=1e-6,
    )

    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    dw = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    h = hidden.clone().requires_grad_()
    out = linear_token_logprobs(h, dw, y)
    (out * gl).sum().backward()
    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = linear_token_logprobs(h0, w0, y)
    (ref * gl).sum().backward()
    env.close("dtensor linear logprobs", out, ref)
    env.close("dtensor linear grad hidden", h.grad, h0.grad, rtol=1e-5, atol=1e-6)
    env.close("dtensor linear grad weight", dw.grad.to_local(), _shard(w0.grad, 0, s0, n0), rtol=1e-5, atol=1e-6)

    # a loss on DTensor logits (ppo_loss: labels and the per-token inputs are plain tensors)
    from prefopt_fast import ppo_loss

    old = torch.randn(B, T, generator=g) - 3
    adv = torch.randn(B, generator=g)
    d = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_()
    loss, _ = ppo_loss(d, y, old, adv, entropy_coef=0.1)
    loss.backward()
    a = full.clone().requires_grad_()
    ref_loss, _ = ppo_loss(a, y, old, adv, entropy_coef=0.1)
    ref_loss.backward()
    env.close("dtensor ppo loss", loss, ref_loss)
    env.close(
        "dtensor ppo grad",
        d.grad.redistribute(mesh, [Shard(2)]).to_local(),
        _shard(a.grad, -1, s0, n0),
        rtol=1e-5,
        atol=1e-6,
    )

    if env.world == 4:
        # data x vocabulary parallel on a 2 x 2 mesh: rows split over "dp", vocabulary over "tp"
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp, tp = mesh2.get_local_rank("dp"), mesh2.get_local_rank("tp")
        V2 = 9
        full2 = torch.randn(4, 3, V2, generator=g)
        y2 = torch.randint(0, V2, (4, 3), generator=g)
        d2 = distribute_tensor(full2, mesh2, [Shard(0), Shard(2)]).requires_grad_()
        rows = slice(2 * dp, 2 * dp + 2)
        out = token_logprobs(d2, y2[rows], stats=("entropy",))
        (out.logprobs + out.entropy).sum().backward()
        a = full2[rows].clone().requires_grad_()
        ref = token_logprobs(a, y2[rows], stats=("entropy",))
        (ref.logprobs + ref.entropy).sum().backward()
        s2, n2 = (0, 5) if tp == 0 else (5, 4)
        env.close("2-D mesh logprobs", out.logprobs, ref.logprobs)
        env.close("2-D mesh entropy", out.entropy, ref.entropy)
        local = d2.grad.redistribute(mesh2, [Shard(0), Shard(2)]).to_local()  # Replicate on torch < 2.13
        env.close("2-D mesh grad", local, _shard(a.grad, -1, s2, n2), rtol=1e-5, atol=1e-6)


def _check_errors(env):
    """Bad input raises the same clear error on every rank (no rank left hanging)."""
    from prefopt_fast import token_logprobs

    kw = dict(process_group=env.group)
    n0 = 40 // env.world
    x = torch.randn(3, n0)
    cases = [
        ("label >= V", dict(labels=torch.tensor([0, 40, 1])), "labels must lie in [0, 40)"),
        ("vocab_size", dict(vocab_size=41), "vocab_size must equal"),
        ("overlap", dict(vocab_start=0), "must tile"),
        ("start on one rank", dict(vocab_start=0 if env.rank == 0 else None), "on all ranks"),
    ]
    for name, over, want in cases:
        args = dict(labels=torch.tensor([0, 39, 1]), **kw)
        args.update(over)
        labels = args.pop("labels")
        try:
            token_logprobs(x, labels, **args)
            env.check(name, False, "no error")
        except ValueError as exc:
            env.check(name, want in str(exc), str(exc))


def _check_huge(env):
    """Tied maxima at 1e30 across shards: the merged lse must keep log S (an fp64 sum
    m + log S drops it there; the gradient would be -1 everywhere but the label)."""
    import prefopt_fast
    from prefopt_fast import token_logprobs

    V, sizes, st, kw = _one_layout(env)
    s0, n0 = st[env.rank], sizes[env.rank]
    y = torch.tensor([0, V - 1, V // 2])
    expected = torch.full((3, V), -1.0 / V)
    expected[torch.arange(3), y] += 1.0
    for be in ("torch", "cpu"):
        if be not in prefopt_fast.available_backends():
            continue
        for mag in (1e8, 1e30):
            loc = torch.full((3, n0), mag, requires_grad=True)
            out = token_logprobs(loc, y, backend=be, **kw)
            out.sum().backward()
            env.close(f"{be} {mag:g} logprobs", out, torch.full((3,), -math.log(V)), rtol=1e-6, atol=1e-6)
            env.close(f"{be} {mag:g} grad", loc.grad, _shard(expected, -1, s0, n0), rtol=1e-5, atol=1e-6)

    # fused-linear at logits ~3e4 (fp32, where an fp32 lse has an ulp of 2e-3): the sharded head
    # matches the single device to fp32 precision (shards shifted by different offsets, merged)
    from prefopt_fast.linear import linear_token_logprobs

    g = torch.Generator().manual_seed(11)
    H = 8
    hidden = torch.randn(4, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.05
    bias = torch.full((V,), 3e4) + torch.randn(V, generator=g)
    y4 = torch.tensor([0, V - 1, V // 2, 1])
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    one = linear_token_logprobs(*leaves[:2], y4, bias=leaves[2], stats=("entropy",), chunk_size=2)
    (one.logprobs.sum() + one.entropy.sum()).backward()
    mine = [hidden.clone(), _shard(weight, 0, s0, n0).clone(), _shard(bias, 0, s0, n0).clone()]
    mine = [x.requires_grad_() for x in mine]
    out = linear_token_logprobs(*mine[:2], y4, bias=mine[2], stats=("entropy",), chunk_size=2, **kw)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    env.close("linear 3e4 logprobs", out.logprobs, one.logprobs, rtol=1e-6, atol=1e-6)
    env.close("linear 3e4 entropy", out.entropy, one.entropy, rtol=1e-6, atol=1e-6)
    env.close("linear 3e4 grad hidden", mine[0].grad, leaves[0].grad, rtol=1e-5, atol=1e-6)
    env.close("linear 3e4 grad bias", mine[2].grad, _shard(leaves[2].grad, 0, s0, n0), rtol=1e-5, atol=1e-6)

    # the exact KL against a sharded reference head (ref_weight / ref_bias sharded like weight)
    ref_h, ref_w = torch.randn(4, 5, generator=g), torch.randn(V, 5, generator=g)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    one = linear_token_logprobs(*leaves, y4, stats=("kl",), ref_hidden=ref_h, ref_weight=ref_w, chunk_size=2)
    one.kl.sum().backward()
    mine = [hidden.clone().requires_grad_(), _shard(weight, 0, s0, n0).clone().requires_grad_()]
    out = linear_token_logprobs(
        *mine, y4, stats=("kl",), ref_hidden=ref_h, ref_weight=_shard(ref_w, 0, s0, n0), chunk_size=2, **kw
    )
    out.kl.sum().backward()
    env.close("linear kl", out.kl, one.kl, rtol=1e-5, atol=1e-6)
    env.close("linear kl grad hidden", mine[0].grad, leaves[0].grad, rtol=1e-5, atol=1e-6)
    env.close("linear kl grad weight", mine[1].grad, _shard(leaves[1].grad, 0, s0, n0), rtol=1e-5, atol=1e-6)


def _check_triton(env):
    """The interpreted Triton kernels on a shard (small: the interpreter is slow)."""
    import prefopt_fast
    from prefopt_fast import token_logprobs

    if "triton" not in prefopt_fast.available_backends():
        return
    V, sizes, st, kw = _one_layout(env)
    s0, n0 = st[env.rank], sizes[env.rank]
    g = torch.Generator().manual_seed(8)
    full = torch.randn(6, V, generator=g)
    y = _labels(2, 3, V, sizes, st, g).view(-1)
    gl, ge = torch.randn(6, generator=g), torch.randn(6, generator=g)
    a = full.clone().requires_grad_()
    ref = token_logprobs(a, y, stats=("entropy", "is_argmax"), backend="triton")
    (ref.logprobs * gl + ref.entropy * ge).sum().backward()
    b = _shard(full, -1, s0, n0).clone().requires_grad_()
    out = token_logprobs(b, y, stats=("entropy", "is_argmax"), backend="triton", **kw)
    (out.logprobs * gl + out.entropy * ge).sum().backward()
    env.close("triton logprobs", out.logprobs, ref.logprobs)
    env.close("triton entropy", out.entropy, ref.entropy)
    env.check("triton is_argmax", torch.equal(out.is_argmax, ref.is_argmax))
    env.close("triton grad", b.grad, _shard(a.grad, -1, s0, n0), rtol=1e-5, atol=1e-6)


def _check_fsdp2(env):
    """Data-parallel sharded head (FSDP2 fully_shard): every rank its own tokens (and token
    count), the head's parameters Shard(0) DTensors over the ranks (V = 37: uneven shards).
    Each op must equal the unsharded head on the rank's tokens, and the weight's gradient must
    be this rank's shard of the gradient averaged over the ranks (what FSDP2 itself delivers)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import Shard

    from prefopt_fast.linear import linear_dpo_loss, linear_ppo_loss, linear_token_logprobs

    V, H, world, rank = 37, 8, env.world, env.rank

    def batch(r, dt):
        g = torch.Generator().manual_seed(100 + r)
        B, T = 2, 3 + r  # a different token count on every rank
        y = torch.randint(0, V, (B, T), generator=g)
        y[0, 0] = -100
        if r == 1:
            y[:] = -100  # a rank whose tokens are all ignored
        return torch.randn(B, T, H, generator=g).to(dt), y, torch.randn(B, T, generator=g)

    for dt, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))):
        torch.manual_seed(7)
        head = torch.nn.Linear(H, V).to(dt)
        w_full, b_full = head.weight.detach().clone(), head.bias.detach().clone()
        fully_shard(head)
        env.check("fsdp2 made the weight a DTensor", type(head.weight).__name__ == "DTensor", type(head.weight))
        start = sum(dist_sizes(head.weight.to_local().shape[0])[:rank])
        n = head.weight.to_local().shape[0]

        def run(h, y, w, b):
            out = linear_token_logprobs(h, w, y, bias=b, stats=("entropy",), chunk_size=2)
            return out

        # reference: every rank's gradient on the whole head, averaged
        gw, gb = torch.zeros(V, H), torch.zeros(V)
        for r in range(world):
            hr, yr, gl = batch(r, dt)
            w0, b0 = w_full.clone().requires_grad_(), b_full.clone().requires_grad_()
            h0 = hr.clone().requires_grad_()
            o = run(h0, yr, w0, b0)
            (o.logprobs * gl + o.entropy * gl.flip(-1)).sum().backward()
            gw += w0.grad.float() / world
            gb += b0.grad.float() / world
            if r == rank:
                want, want_h = o, h0.grad
        h, y, gl = batch(rank, dt)
        h = h.clone().requires_grad_()
        out = run(h, y, head.weight, head.bias)
        (out.logprobs * gl + out.entropy * gl.flip(-1)).sum().backward()
        env.check("fsdp2 output is a plain tensor", type(out.logprobs) is torch.Tensor, type(out.logprobs))
        env.close(f"fsdp2 {dt} logprobs", out.logprobs, want.logprobs, **tol)
        env.close(f"fsdp2 {dt} entropy", out.entropy, want.entropy, **tol)
        env.close(f"fsdp2 {dt} grad hidden", h.grad, want_h, **tol)
        env.close(f"fsdp2 {dt} grad weight shard", head.weight.grad.to_local().float(), gw[start : start + n], **tol)
        env.close(f"fsdp2 {dt} grad bias shard", head.bias.grad.to_local().float(), gb[start : start + n], **tol)

    # the losses: linear_dpo_loss and linear_ppo_loss with the exact KL against a replicated reference head
    torch.manual_seed(8)
    head = torch.nn.Linear(H, V, bias=False)
    w_full = head.weight.detach().clone()
    fully_shard(head)
    start, n = sum(dist_sizes(head.weight.to_local().shape[0])[:rank]), head.weight.to_local().shape[0]
    ref_w = torch.randn(V, 5, generator=torch.Generator().manual_seed(9))

    def loss_of(r, w, h=None):
        hr, yr, _ = batch(r, torch.float32)
        yr = yr.clamp(min=0) if r == 1 else yr  # the DPO pairs need labels
        hr = hr if h is None else h
        g = torch.Generator().manual_seed(200 + r)
        ref = torch.randn(hr.shape[0] // 2, generator=g) - 5
        dpo, _ = linear_dpo_loss(hr, w, yr, ref_chosen_logps=ref, ref_rejected_logps=ref - 1, beta=0.2)
        rh = torch.randn(*hr.shape[:-1], 5, generator=g)
        old, adv = torch.randn(hr.shape[:-1], generator=g) - 3, torch.randn(hr.shape[0], generator=g)
        ppo, _ = linear_ppo_loss(
            hr, w, yr, old, adv, kl_coef=0.1, kl_estimator="full", ref_hidden=rh, ref_weight=ref_w, chunk_size=2
        )
        return dpo + ppo

    gw = torch.zeros(V, H)
    for r in range(world):
        w0 = w_full.clone().requires_grad_()
        h0 = batch(r, torch.float32)[0].requires_grad_()
        lr = loss_of(r, w0, h0)
        lr.backward()
        gw += w0.grad / world
        if r == rank:
            want_loss, want_h = lr.detach(), h0.grad
    h = batch(rank, torch.float32)[0].requires_grad_()
    loss = loss_of(rank, head.weight, h)
    loss.backward()
    env.close("fsdp2 dpo+ppo loss", loss, want_loss)
    env.close("fsdp2 dpo+ppo grad hidden", h.grad, want_h, rtol=1e-5, atol=1e-6)
    env.close(
        "fsdp2 dpo+ppo grad weight shard", head.weight.grad.to_local(), gw[start : start + n], rtol=1e-5, atol=1e-6
    )

    # never guessed: a DTensor hidden that is neither plain nor replicated on the weight's mesh
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    dw = distribute_tensor(w_full, mesh, [Shard(0)])
    dh = distribute_tensor(torch.randn(world * 2, H), mesh, [Shard(0)])
    try:
        linear_token_logprobs(dh, dw, torch.zeros(2, dtype=torch.long))
        env.check("ambiguous layout refused", False, "no error")
    except ValueError as exc:
        env.check("ambiguous layout refused", "state the layout" in str(exc), str(exc))
    del dist


def _check_fsdp2_every_op(env):
    """Every fused-linear op and loss with an FSDP2 head (V = 37, uneven shards; a rank whose
    tokens are all ignored where the op allows it; a different batch size per rank), against
    the unsharded head: the value, the hidden gradient and this rank's shard of the averaged
    weight (and LoRA) gradient."""
    from torch.distributed.fsdp import fully_shard

    from prefopt_fast import linear as L

    V, H, world, rank = 37, 8, env.world, env.rank

    def batch(r):
        g = torch.Generator().manual_seed(300 + r)
        B, T = 2 * (1 + r % 2), 4  # pairs: 2 or 4 sequences per rank
        y = torch.randint(0, V, (B, T), generator=g)
        y[:, 0] = -100
        return torch.randn(B, T, H, generator=g), y, g

    ref_w = torch.randn(V, 5, generator=torch.Generator().manual_seed(11))

    def pairs(o):
        return (o["chosen_logps"] - 0.5 * o["rejected_logps"]).sum()

    def dpo_ref_head(h, w, y, g, lora):
        rh = torch.randn(*h.shape[:-1], 5, generator=g)
        return L.linear_dpo_loss(h, w, y, ref_hidden=rh, ref_weight=ref_w, beta=0.3, lora=lora)[0]

    ops = {
        "token_logprobs": lambda h, w, y, g, lora: (
            L.linear_token_logprobs(h, w, y, lora=lora, chunk_size=3) * torch.randn(y.shape, generator=g)
        ).sum(),
        "sequence_logprobs": lambda h, w, y, g, lora: (
            L.linear_sequence_logprobs(h, w, y, lora=lora, average=True) * torch.randn(y.shape[0], generator=g)
        ).sum(),
        "pair_logprobs": lambda h, w, y, g, lora: pairs(L.linear_pair_logprobs(h, w, y, lora=lora)),
        "dpo (reference head)": dpo_ref_head,
        "cpo": lambda h, w, y, g, lora: L.linear_cpo_loss(h, w, y, lora=lora, beta=0.2)[0],
        "simpo": lambda h, w, y, g, lora: L.linear_simpo_loss(h, w, y, lora=lora, beta=2.0)[0],
        "orpo": lambda h, w, y, g, lora: L.linear_orpo_loss(h, w, y, lora=lora, beta=0.2)[0],
    }
    for use_lora in (False, True):
        torch.manual_seed(21)
        head = torch.nn.Linear(H, V, bias=False)
        params = [head.weight]
        if use_lora:
            head.lora_A = torch.nn.Parameter(torch.randn(4, H) * 0.3)
            head.lora_B = torch.nn.Parameter(torch.randn(V, 4) * 0.3)
            params += [head.lora_A, head.lora_B]
        full = [p.detach().clone() for p in params]
        fully_shard(head)
        params = [head.weight] + ([head.lora_A, head.lora_B] if use_lora else [])
        local = [p.to_local().shape[0] for p in params]
        starts = [sum(dist_sizes(n)[:rank]) for n in local]

        def lora_of(ps):
            return (ps[1], ps[2], 0.5) if use_lora else None

        for name, op in ops.items():
            what = f"fsdp2 {name}{' lora' if use_lora else ''}"
            grads = [torch.zeros_like(f) for f in full]
            for r in range(world):
                ps = [f.clone().requires_grad_() for f in full]
                h0, y0, g = batch(r)
                h0.requires_grad_()
                lr = op(h0, ps[0], y0, g, lora_of(ps))
                lr.backward()
                for acc, p in zip(grads, ps):
                    acc += p.grad / world
                if r == rank:
                    want, want_h = lr.detach(), h0.grad
            for p in params:
                p.grad = None
            h, y, g = batch(rank)
            h.requires_grad_()
            got = op(h, params[0], y, g, lora_of(params))
            got.backward()
            env.close(f"{what} value", got, want)
            env.close(f"{what} grad hidden", h.grad, want_h, rtol=1e-5, atol=1e-6)
            for i, (p, acc) in enumerate(zip(params, grads)):
                shard = acc[starts[i] : starts[i] + local[i]]
                env.close(f"{what} grad param {i} shard", p.grad.to_local(), shard, rtol=1e-5, atol=1e-6)


def _check_ddp(env):
    """DDP works unchanged: a module whose forward computes linear_dpo_loss from its own head,
    wrapped in DistributedDataParallel, every rank its own pairs, gives the gradient of the
    mean of the ranks' losses (DDP's averaging), as one process over all the pairs would."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from prefopt_fast.linear import LinearDPOLoss

    V, H, world, rank = 29, 8, env.world, env.rank

    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(H, H)
            self.head = torch.nn.Linear(H, V, bias=False)
            self.loss = LinearDPOLoss(beta=0.3, chunk_size=3)

        def forward(self, x, y, rc, rr):
            return self.loss(torch.tanh(self.body(x)), self.head.weight, y, ref_chosen_logps=rc, ref_rejected_logps=rr)[
                0
            ]

    def batch(r):
        g = torch.Generator().manual_seed(300 + r)
        x = torch.randn(4, 5, H, generator=g)
        y = torch.randint(0, V, (4, 5), generator=g)
        y[:, 0] = -100
        rc = torch.randn(2, generator=g) - 8
        return x, y, rc, rc - 0.5

    torch.manual_seed(3)
    single = Policy()
    model = Policy()
    model.load_state_dict(single.state_dict())
    ddp = DDP(model)
    ddp(*batch(rank)).backward()
    total = sum(single(*batch(r)) for r in range(world)) / world
    total.backward()
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        env.close(f"ddp grad {name}", p.grad, q.grad, rtol=1e-5, atol=1e-6)


def _with_algorithm(env, algorithm: str, check):
    """Run ``check`` with the data-parallel sharded head computed by ``algorithm``."""
    os.environ["PREFOPT_SHARDED_HEAD"] = algorithm
    try:
        check(env)
    finally:
        del os.environ["PREFOPT_SHARDED_HEAD"]


def dist_sizes(n: int):
    """Every rank's local size n (an all-gather of one int)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, n)
    return out


SUITES = {
    "all": [
        ("token_logprobs", _check_token_logprobs),
        ("kl+inplace", _check_kl_inplace),
        ("nonfinite", _check_nonfinite),
        ("huge", _check_huge),
        ("losses", _check_losses),
        ("linear", _check_linear),
        ("dtensor", _check_dtensor),
        ("errors", _check_errors),
        ("triton", _check_triton),
    ],
    "fsdp2": [
        ("fsdp2 gather_weight", lambda env: _with_algorithm(env, "gather_weight", _check_fsdp2)),
        ("fsdp2 gather_tokens", lambda env: _with_algorithm(env, "gather_tokens", _check_fsdp2)),
        ("fsdp2 every op, gather_weight", lambda env: _with_algorithm(env, "gather_weight", _check_fsdp2_every_op)),
        ("fsdp2 every op, gather_tokens", lambda env: _with_algorithm(env, "gather_tokens", _check_fsdp2_every_op)),
        ("ddp", _check_ddp),
    ],
}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel(world, tmp_path):
    _spawn(world, "all", tmp_path)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_sharded_head(world, tmp_path):
    """FSDP2: a DTensor head with a plain hidden is data-parallel (issue 16), never vocabulary-parallel;
    DDP: unchanged, the replicated head's gradient averaged by DDP."""
    _spawn(world, "fsdp2", tmp_path)


# --------------------------------------------------------------------------- modules, one process
#
# The modules that touch the vocabulary take process_group / vocab_start / vocab_size and pass
# them to their function: on a world-size-1 gloo group (in this process, no spawn) the module
# gives exactly the function's result, and the call does go through the vocabulary-parallel
# path (its shard_layout runs).


# the one_process_group fixture: tests/conftest.py


_B, _T, _V, _H = 4, 6, 23, 8


def _mod_inputs():
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, _V, (_B, _T), generator=g)
    y[0, :2] = -100
    y[1] = -100
    return dict(
        logits=torch.randn(_B, _T, _V, generator=g) * 2,
        ref_logits=torch.randn(_B, _T, _V, generator=g) * 2,
        hidden=torch.randn(_B, _T, _H, generator=g),
        weight=torch.randn(_V, _H, generator=g) / 2,
        labels=y,
        old=torch.randn(_B, _T, generator=g) * 0.1 - 3,
        adv=torch.randn(_B, generator=g),
        ref_lp=torch.randn(_B, _T, generator=g) * 0.1 - 3,
    )


def _module_cases():
    """name -> (module class, shared config, call(obj, leaves, x) where obj is the module or the
    function with the config bound, leaf names)."""
    import prefopt_fast as pf

    return {
        "SequenceLogProbs": (
            pf.SequenceLogProbs,
            pf.sequence_logprobs,
            dict(average=True, temperature=0.9),
            lambda f, L, x: f(L[0], x["labels"]),
            ("logits",),
        ),
        "LogitsDPOLoss": (
            pf.LogitsDPOLoss,
            pf.logits_dpo_loss,
            dict(beta=0.2, loss_type="ipo"),
            lambda f, L, x: f(L[0], x["labels"], ref_logits=x["ref_logits"]),
            ("logits",),
        ),
        "PPOLoss": (
            pf.PPOLoss,
            pf.ppo_loss,
            dict(kl_coef=0.05, kl_estimator="full", entropy_coef=0.01),
            lambda f, L, x: f(L[0], x["labels"], x["old"], x["adv"], ref_logits=x["ref_logits"]),
            ("logits",),
        ),
        "LinearSequenceLogProbs": (
            pf.LinearSequenceLogProbs,
            pf.linear_sequence_logprobs,
            dict(softcap=5.0, chunk_size=3),
            lambda f, L, x: f(L[0], L[1], x["labels"]),
            ("hidden", "weight"),
        ),
        "LinearDPOLoss": (
            pf.LinearDPOLoss,
            pf.linear_dpo_loss,
            dict(beta=0.2, loss_type="sigmoid", chunk_size=5),
            lambda f, L, x: f(L[0], L[1], x["labels"], ref_hidden=x["hidden"] + 0.1, ref_weight=x["weight"]),
            ("hidden", "weight"),
        ),
        "LinearCPOLoss": (
            pf.LinearCPOLoss,
            pf.linear_cpo_loss,
            dict(beta=0.2, loss_type="sigmoid", cpo_alpha=0.5, chunk_size=5),
            lambda f, L, x: f(L[0], L[1], x["labels"]),
            ("hidden", "weight"),
        ),
        "LinearSimPOLoss": (
            pf.LinearSimPOLoss,
            pf.linear_simpo_loss,
            dict(beta=2.0, simpo_gamma=1.0, reduction="none"),
            lambda f, L, x: f(L[0], L[1], x["labels"]),
            ("hidden", "weight"),
        ),
        "LinearORPOLoss": (
            pf.LinearORPOLoss,
            pf.linear_orpo_loss,
            dict(beta=0.3, softcap=5.0),
            # every sequence with a label: ORPO's log odds are infinite for an empty completion
            lambda f, L, x: f(L[0], L[1], x["labels"].clamp(min=0)),
            ("hidden", "weight"),
        ),
        "LinearPPOLoss": (
            pf.LinearPPOLoss,
            pf.linear_ppo_loss,
            dict(kl_coef=0.1, entropy_coef=0.01, loss_agg_mode="grpo"),
            lambda f, L, x: f(L[0], L[1], x["labels"], x["old"], x["adv"], ref_logps=x["ref_lp"]),
            ("hidden", "weight"),
        ),
    }


def _run_case(call, obj, names, x):
    leaves = [x[n].clone().requires_grad_() for n in names]
    out = call(obj, leaves, x)
    loss = out[0] if isinstance(out, tuple) else out
    metrics = out[1] if isinstance(out, tuple) else {}
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), {k: v for k, v in metrics.items()}, [t.grad for t in leaves]


@pytest.mark.parametrize(
    "name",
    [
        "SequenceLogProbs",
        "LogitsDPOLoss",
        "PPOLoss",
        "LinearSequenceLogProbs",
        "LinearDPOLoss",
        "LinearCPOLoss",
        "LinearSimPOLoss",
        "LinearORPOLoss",
        "LinearPPOLoss",
    ],
)
@pytest.mark.parametrize("layout", ["group", "group+offsets"])
def test_module_process_group_matches_function(name, layout, one_process_group, monkeypatch):
    import prefopt_fast.distributed as D

    cls, fn, cfg, call, names = _module_cases()[name]
    vp = dict(process_group=one_process_group)
    if layout == "group+offsets":
        vp.update(vocab_start=0, vocab_size=_V)
    x = _mod_inputs()
    layouts = []
    real = D.shard_layout
    monkeypatch.setattr(D, "shard_layout", lambda *a, **k: layouts.append(1) or real(*a, **k))

    module = cls(**cfg, **vp)
    assert module.process_group is one_process_group
    got = _run_case(call, module, names, x)
    n_module = len(layouts)
    assert n_module > 0, f"{name}(process_group=...) did not take the vocabulary-parallel path"
    want = _run_case(call, lambda *a, **k: fn(*a, **k, **cfg, **vp), names, x)
    assert len(layouts) == 2 * n_module
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=0, atol=0, msg=lambda m: f"metric {k}: {m}")
    for n, a, b in zip(names, got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"grad {n}: {m}")
    # and the group of one is the single-device result
    single = _run_case(call, cls(**cfg), names, x)
    torch.testing.assert_close(got[0], single[0], rtol=1e-5, atol=1e-5)
    for n, a, b in zip(names, got[2], single[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {n} vs one device: {m}")


def test_module_vocab_layout_checked_at_call(one_process_group):
    """A module's vocab_size reaches the call: a wrong global size fails there, as the function's does."""
    import prefopt_fast as pf

    x = _mod_inputs()
    m = pf.SequenceLogProbs(process_group=one_process_group, vocab_size=_V + 1)
    with pytest.raises(ValueError, match="vocab_size must equal"):
        m(x["logits"], x["labels"])
