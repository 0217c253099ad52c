"""Quick timing of the cpu backend row kernels against naive PyTorch and the memory bound.

    python benchmarks/cpu_kernel_check.py [--n 2048] [--v 128256] [--dtypes float32,bfloat16] [--reps 5]

Prints, per dtype: the bound of a fused forward+backward (one read of the logits forward,
one read + one write backward; the same calibration as ``python -m benchmarks``, see
benchmarks/calibration.py: the read-only rate forward, the in-place read-modify-write or the
copy rate plus first touch backward, and the exp ceiling), naive PyTorch (log_softmax +
gather + autograd), and the cpu kernels with a fresh gradient and in place. Times are the
minimum over --reps runs (the machine may be shared).
"""

import argparse
import os
import resource
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.calibration import exp_rate, first_touch_min_bytes, memory_rates, phase_bound  # noqa: E402
from prefopt_fast._rows import OUT_LSE, OUT_LSE_LO
from prefopt_fast.backends import cpu


def _status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_extra_bytes(fn):
    """Peak RSS growth while fn() runs (Linux: VmHWM reset through /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status_kib("VmRSS")
    keep = fn()
    peak = _status_kib("VmHWM")
    del keep
    return (peak - base) * 1024


def tmin(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bounds(nbytes, exps, reps):
    """Lower bounds (s) of forward + backward with a fresh gradient and in place."""
    rates = memory_rates(nbytes, repeats=reps)
    rates["first_touch_min_bytes"] = first_touch_min_bytes("cpu")[0]
    eps = exp_rate().get("exp_per_s")
    fwd = phase_bound({"read": nbytes}, rates, inplace=False, exps=exps, exp_per_s=eps)
    bwd = {"rw": 2 * nbytes}
    fresh = phase_bound(bwd, rates, inplace=False, alloc=nbytes, exps=exps, exp_per_s=eps)
    inplace = phase_bound(bwd, rates, inplace=True, exps=exps, exp_per_s=eps)
    print(
        f"  calibration: read {rates['read_Bps'] / 1e9:.1f}, rmw {rates['rmw_Bps'] / 1e9:.1f}, copy"
        f" {rates['copy_Bps'] / 1e9:.1f}, fresh copy {rates['fresh_copy_Bps'] / 1e9:.1f} GB/s;"
        f" exp {eps / 1e9 if eps else float('nan'):.1f} Gexp/s; fwd bound {fwd['bound_s'] * 1e3:.1f} ms"
        f" ({fwd['limit']})"
    )
    return fwd["bound_s"] + fresh["bound_s"], fwd["bound_s"] + inplace["bound_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--naive", type=int, default=1, help="also time naive PyTorch (slow, ~4x logits memory)")
    ap.add_argument("--stats", type=int, default=0, help="stats bit mask for the forward")
    args = ap.parse_args()
    N, V = args.n, args.v
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, N={N} V={V}, load average {load}")
    for name in args.dtypes.split(","):
        dt = getattr(torch, name)
        torch.manual_seed(0)
        logits = (torch.randn(N, V) * 2).to(dt)
        labels = torch.randint(0, V, (N,))
        it = torch.ones(N)
        c = torch.full((N,), -1.0 / N)
        nbytes = logits.numel() * logits.element_size()
        print(f"\n{name}: logits {nbytes / 2**30:.2f} GiB")
        bound, bound_ip = bounds(nbytes, N * V, args.reps)
        print(f"  bound: fwd + bwd {bound * 1e3:.1f} ms with a fresh gradient, {bound_ip * 1e3:.1f} ms in place")

        def fwd():
            return cpu.row_forward(logits, labels, it, -100, args.stats)

        out = fwd()
        lse, lse_lo = out[OUT_LSE].clone(), out[OUT_LSE_LO].clone()
        t_f = tmin(fwd, args.reps)
        grads = []

        def bwd_fresh():
            g = cpu.row_backward(logits, labels, it, lse, lse_lo, lse, c, None, -100, False)
            grads.append(g)
            del grads[:-1]  # keep one alive at a time, like an autograd step would

        def fwd_bwd_fresh():
            o = fwd()
            cpu.row_backward(logits, labels, it, o[OUT_LSE], o[OUT_LSE_LO], o[OUT_LSE], c, None, -100, False)

        t_bf = tmin(bwd_fresh, args.reps)
        grads.clear()
        t_fbf = tmin(fwd_bwd_fresh, args.reps)
        work = logits.clone()

        def fwd_bwd_inplace():
            o = cpu.row_forward(work, labels, it, -100, args.stats)
            cpu.row_backward(work, labels, it, o[OUT_LSE], o[OUT_LSE_LO], o[OUT_LSE], c, None, -100, True)

        # in place destroys the logits: re-copy between runs, outside the timing
        best_ip = float("inf")
        best_bip = float("inf")
        for _ in range(args.reps):
            work.copy_(logits)
            t0 = time.perf_counter()
            fwd_bwd_inplace()
            best_ip = min(best_ip, time.perf_counter() - t0)
            work.copy_(logits)
            t0 = time.perf_counter()
            cpu.row_backward(work, labels, it, lse, lse_lo, lse, c, None, -100, True)
            best_bip = min(best_bip, time.perf_counter() - t0)
        m_f = peak_extra_bytes(fwd)
        m_b = peak_extra_bytes(lambda: cpu.row_backward(logits, labels, it, lse, lse_lo, lse, c, None, -100, False))
        work.copy_(logits)
        m_ip = peak_extra_bytes(lambda: cpu.row_backward(work, labels, it, lse, lse_lo, lse, c, None, -100, True))
        work = None  # free the copy before the next size
        print(
            f"  peak extra memory: forward {m_f / 2**20:.1f} MiB, backward fresh {m_b / nbytes:.3f} x gradient, "
            f"in place {m_ip / 2**20:.1f} MiB ({m_ip / nbytes * 100:.2f}% of logits)"
        )
        print(f"  cpu forward            {t_f * 1e3:8.1f} ms  ({nbytes / t_f / 1e9:.1f} GB/s read)")
        print(f"  cpu backward fresh     {t_bf * 1e3:8.1f} ms")
        print(f"  cpu backward in place  {best_bip * 1e3:8.1f} ms")
        print(f"  cpu fwd+bwd fresh      {t_fbf * 1e3:8.1f} ms  = {t_fbf / bound:.2f} x bound")
        print(f"  cpu fwd+bwd in place   {best_ip * 1e3:8.1f} ms  = {best_ip / bound_ip:.2f} x bound")
        if args.naive:
            x = logits.clone().requires_grad_(True)

            def naive():
                x.grad = None
                lp = torch.log_softmax(x.float(), -1).gather(1, labels[:, None]).squeeze(1)
                (lp * c).sum().backward()

            t_n = tmin(naive, max(2, args.reps // 2))
            del x
            print(
                f"  naive fwd+bwd          {t_n * 1e3:8.1f} ms  -> cpu fresh {t_n / t_fbf:.1f}x faster, "
                f"in place {t_n / best_ip:.1f}x faster"
            )
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
