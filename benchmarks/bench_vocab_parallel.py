"""Vocabulary-parallel log-probs: per-rank time and memory against the unsharded run, and the
bytes communicated per call.

Standalone (the shared harness runs one process per measurement; this needs a process
group): the unsharded op runs in one spawned process, the sharded op in ``--world`` spawned
processes joined by a gloo group on this machine, each rank holding ``V / world`` of the
vocabulary. Every process uses ``--threads`` intra-op threads (default 1, so that the
sharded ranks do not compete for the cores of a small machine: on 2 cores, 2 ranks x 1
thread against 1 x 1 thread).

Ops (``--op``):
  token_logprobs  logits [N, V] -> log-probs + entropy, forward + backward (the logits
                  gradient of the local shard)
  linear          hidden [N, H] @ weight[V, H].T fused: log-probs + entropy, forward +
                  backward (gradients of hidden, all-reduced, and of the local weight rows)
  fsdp2           the data-parallel sharded head (FSDP2's layout): every rank its OWN N
                  tokens, the weight a Shard(0) DTensor; --algorithm gather_weight |
                  gather_tokens | auto (docs/distributed.md). The unsharded run is one
                  rank's N tokens against the whole head on one process.

Measured per process: the median wall time of forward, backward and the step, after a
barrier (ranks start each repeat together); the peak extra resident memory of one step
(VmHWM reset through /proc/self/clear_refs, minus the RSS before the step); and, on the
ranks, every collective the call issues with its payload bytes (what each rank contributes;
a ring all-reduce of P bytes sends about 2 P (R - 1) / R bytes per rank on the wire) and the
time spent inside the collectives.

    python benchmarks/bench_vocab_parallel.py                 # N=2048, V=32000, fp32, 2 ranks
    python benchmarks/bench_vocab_parallel.py --quick         # N=512,  V=8192
    python benchmarks/bench_vocab_parallel.py --op linear --hidden 512 --dtype bf16
    python benchmarks/bench_vocab_parallel.py --op fsdp2 --algorithm gather_tokens
    python benchmarks/bench_vocab_parallel.py --json out.json
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.multiprocessing as mp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _trim() -> None:
    """Return freed heap memory to the OS, so the next step's allocations show in the RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- communication counter


class _CommCounter:
    """Wraps torch.distributed's collectives to record (name, bytes, seconds) per call."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls, self.enabled = dist, [], False
        self._orig = {}
        for name in self.NAMES:
            if hasattr(dist, name):
                self._orig[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._orig[name]))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            res = fn(*args, **kwargs)
            if self.enabled:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [a for a in args if isinstance(a, (list, tuple))]
                # payload: what this rank contributes (the input tensor of the collective)
                t = tensors[0] if tensors else (lists[0][0] if lists and lists[0] else None)
                nbytes = 0 if t is None else t.numel() * t.element_size()
                self.calls.append(
                    (
                        name,
                        tuple(t.shape) if t is not None else (),
                        str(t.dtype) if t is not None else "",
                        nbytes,
                        time.perf_counter() - t0,
                    )
                )
            return res

        return wrapped


# --------------------------------------------------------------------------- the op


def _make(args, rank: int, world: int):
    """Inputs of the whole problem (same seed everywhere), cut to this rank's shard."""
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[args.dtype]
    N, V = args.tokens, args.vocab
    sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
    start, size = sum(sizes[:rank]), sizes[rank]
    labels = torch.randint(0, V, (N,), generator=g)
    labels[N - N // 8 :] = -100  # some padding
    if args.op == "token_logprobs":
        # generate the shard only: the sharded ranks must not pay for the full logits
        g2 = torch.Generator().manual_seed(1 + start)
        logits = (torch.randn(N, size, generator=g2) * 2).to(dt)
        return dict(logits=logits, labels=labels)
    H = args.hidden
    if args.op == "fsdp2":  # every rank its own tokens, the whole head (sharded by _step_fns)
        gr = torch.Generator().manual_seed(100 + rank)
        hidden = torch.randn(N, H, generator=gr).to(dt)
        weight = (torch.randn(V, H, generator=torch.Generator().manual_seed(1)) / H**0.5).to(dt)
        return dict(hidden=hidden, weight=weight, labels=labels)
    hidden = torch.randn(N, H, generator=g).to(dt)
    g2 = torch.Generator().manual_seed(1 + start)
    weight = (torch.randn(size, H, generator=g2) / H**0.5).to(dt)
    return dict(hidden=hidden, weight=weight, labels=labels)


def _step_fns(args, inputs, group):
    import prefopt_fast
    from prefopt_fast.linear import linear_token_logprobs

    kw = dict(backend=args.backend)
    if group is not None and args.op != "fsdp2":
        kw["process_group"] = group
    if args.op == "fsdp2" and group is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor
        from torch.distributed.tensor.placement_types import Shard

        os.environ["PREFOPT_SHARDED_HEAD"] = args.algorithm
        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(group),))
        inputs = {**inputs, "weight": distribute_tensor(inputs["weight"], mesh, [Shard(0)])}
    if args.op == "token_logprobs":
        x = inputs["logits"].requires_grad_()

        def fwd():
            out = prefopt_fast.token_logprobs(x, inputs["labels"], stats=("entropy",), **kw)
            return out.logprobs.sum() + 0.01 * out.entropy.sum(), (x,)
    else:
        h = inputs["hidden"].requires_grad_()
        w = inputs["weight"].requires_grad_()

        def fwd():
            out = linear_token_logprobs(h, w, inputs["labels"], stats=("entropy",), **kw)
            return out.logprobs.sum() + 0.01 * out.entropy.sum(), (h, w)

    return fwd


def _measure(args, rank, world, group, counter, barrier):
    fwd = _step_fns(args, _make(args, rank, world), group)

    def step_parts():
        barrier()
        t0 = time.perf_counter()
        loss, leaves = fwd()
        t1 = time.perf_counter()
        grads = torch.autograd.grad(loss, leaves)
        t2 = time.perf_counter()
        del grads
        return t1 - t0, t2 - t1

    step_parts()  # warm-up
    # peak extra memory of one step, from a fresh baseline
    _trim()
    barrier()
    have_hwm = _reset_peak()
    base = _rss_kib("VmRSS")
    if counter is not None:
        counter.calls.clear()
        counter.enabled = True
    step_parts()
    if counter is not None:
        counter.enabled = False
    peak = _rss_kib("VmHWM") - base if have_hwm else None
    comm = list(counter.calls) if counter is not None else []
    f, b = [], []
    for _ in range(args.repeats):
        tf, tb = step_parts()
        f.append(tf)
        b.append(tb)
    return {
        "fwd_ms": 1e3 * statistics.median(f),
        "bwd_ms": 1e3 * statistics.median(b),
        "step_ms": 1e3 * statistics.median([x + y for x, y in zip(f, b)]),
        "peak_extra_mib": None if peak is None else peak / 1024,
        "collectives": [dict(op=c[0], shape=c[1], dtype=c[2], bytes=c[3], ms=1e3 * c[4]) for c in comm],
    }


def _worker(rank, world, port, args, outdir):
    torch.set_num_threads(args.threads)
    res = {}
    try:
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
            counter = _CommCounter()
            res = _measure(args, rank, world, dist.group.WORLD, counter, dist.barrier)
            dist.destroy_process_group()
        else:
            res = _measure(args, 0, 1, None, None, lambda: None)
    except Exception as exc:  # report, don't hang the parent
        import traceback

        res = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    with open(os.path.join(outdir, f"{world}_{rank}.json"), "w") as f:
        json.dump(res, f)


def _run(world, args, timeout=900):
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, world, port, args, d)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                raise SystemExit(f"world={world}: a process did not finish within {timeout} s")
        out = []
        for r in range(world):
            with open(os.path.join(d, f"{world}_{r}.json")) as f:
                out.append(json.load(f))
    for r, res in enumerate(out):
        if "error" in res:
            raise SystemExit(f"world={world} rank {r} failed: {res['error']}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("token_logprobs", "linear", "fsdp2"), default="token_logprobs")
    ap.add_argument(
        "--algorithm", choices=("auto", "gather_weight", "gather_tokens"), default="auto", help="fsdp2 only"
    )
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=256, help="H of the linear op")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N=512, V=8192, 3 repeats")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens = args.tokens or 512
        args.vocab = args.vocab or 8192
        args.repeats = min(args.repeats, 3)
    args.tokens = args.tokens or 2048
    args.vocab = args.vocab or 32000

    single = _run(1, args)[0]
    ranks = _run(args.world, args)
    shape = (
        f"N={args.tokens}, V={args.vocab}"
        + (f", H={args.hidden}" if args.op in ("linear", "fsdp2") else "")
        + (f", algorithm={args.algorithm}, N tokens per rank" if args.op == "fsdp2" else "")
        + f", {args.dtype}, backend={args.backend}, {args.threads} thread(s) per process"
    )
    print(f"{args.op}: {shape}")
    print(f"{'run':<16}{'fwd ms':>10}{'bwd ms':>10}{'step ms':>10}{'peak extra MiB':>16}")

    def row(name, r):
        mem = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        print(f"{name:<16}{r['fwd_ms']:>10.1f}{r['bwd_ms']:>10.1f}{r['step_ms']:>10.1f}{mem:>16}")

    row("unsharded", single)
    for r, res in enumerate(ranks):
        row(f"rank {r}/{args.world}", res)
    coll = ranks[0]["collectives"]
    total = sum(c["bytes"] for c in coll)
    print(
        f"collectives per step on rank 0 ({len(coll)} calls, {total} payload bytes = "
        f"{total / max(1, args.tokens):.1f} B/token; the logits shard is "
        f"{args.tokens * args.vocab // args.world * torch.empty((), dtype=DTYPES[args.dtype]).element_size()} B):"
    )
    for c in coll:
        print(f"  {c['op']:<12} {str(list(c['shape'])):<14} {c['dtype']:<15} {c['bytes']:>10} B  {c['ms']:8.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": args.op, "args": vars(args), "unsharded": single, "ranks": ranks}, f, indent=1)


if __name__ == "__main__":
    main()
