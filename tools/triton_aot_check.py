"""Compile every Triton kernel variant ahead of time for sm_80 and sm_90, without a GPU.

Variants: each logits dtype x each compiled flag set x ALIGN (hinted / not), for the
forward kernel, the backward kernel and the in-place backward kernel, with the launch
configs of ``prefopt_fast.kernels.config``. Pointer arguments get the 16-byte
divisibility Triton gives aligned tensors at run time; the int arguments are not
specialized (``do_not_specialize``), so these are exactly the binaries a GPU would JIT.

Reports per kernel: registers, bytes of stack + local memory (register spills; a Triton
kernel has no other use for them) and the number of vector (16-byte) global loads and
stores in the PTX, from the cubin through the ``cuobjdump`` that Triton ships. Also checks that no
int argument is specialized by the JIT, and that the temperature product ``x = z * inv_temp``
is rounded before use (column ``tfma``: PTX instructions that would let it be contracted
into an FMA, see ``temperature_product_problems``). Exit status 1 on any compile failure,
any spill, any such contraction or any specialized int argument.

    python tools/triton_aot_check.py [--arch 80 90] [--jobs 2] [--all-stat-combos]

Must run without TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""

import argparse
import concurrent.futures as cf
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PTR_TYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_ELT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _modules():
    try:
        import prefopt_fast  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prefopt_fast.backends.triton import kernel_modules

    return kernel_modules()


def _forward_signature(t):
    return {
        "logits_ptr": f"*{t}",
        "row_off_ptr": "*i64",
        "ref_ptr": f"*{t}",
        "ref_off_ptr": "*i64",
        "labels_ptr": "*i64",
        "inv_temp_ptr": "*fp32",
        "out_ptr": "*fp32",
        "N": "i32",
        "V": "i32",
        "ignore_index": "i32",
    }


def _backward_signature(t):
    return {
        "logits_ptr": f"*{t}",
        "row_off_ptr": "*i64",
        "grad_ptr": f"*{t}",
        "labels_ptr": "*i64",
        "inv_temp_ptr": "*fp32",
        "lse_ptr": "*fp32",
        "lse_lo_ptr": "*fp32",
        "ent_ptr": "*fp32",
        "grad_logp_ptr": "*fp32",
        "grad_ent_ptr": "*fp32",
        "ref_ptr": f"*{t}",
        "ref_off_ptr": "*i64",
        "ref_lse_ptr": "*fp32",
        "kl_ptr": "*fp32",
        "grad_kl_ptr": "*fp32",
        "V": "i32",
        "ignore_index": "i32",
    }


def variants(all_stat_combos=False):
    """[(kind, dtype name, constexprs)] for every kernel binary the backend can launch."""
    import torch

    config, fwd, _ = _modules()
    out = []
    for dname in ("float32", "float16", "bfloat16"):
        dtype = getattr(torch, dname)
        aligns = (16 // _ELT_SIZE[dname], 1)
        fc, bc = config.FORWARD[dtype], config.BACKWARD[dtype]
        stat_sets = range(fwd.SUPPORTED_STATS + 1) if all_stat_combos else fwd.STAT_VARIANTS
        for stats in stat_sets:
            for align in aligns:
                out.append(
                    ("forward", dname, fc.num_warps, dict(BLOCK_V=fc.block_v, ALIGN=align, **fwd.stat_flags(stats)))
                )
        for inplace in (False, True):
            for has_ent in (False, True):
                for has_kl in (False, True):
                    for align in aligns:
                        out.append(
                            (
                                "backward_inplace" if inplace else "backward",
                                dname,
                                bc.num_warps,
                                dict(BLOCK_V=bc.block_v, ALIGN=align, HAS_ENT=has_ent, HAS_KL=has_kl, INPLACE=inplace),
                            )
                        )
    return out


def specialization_problems():
    """Int arguments the JIT would specialize (== 1, divisible by 16): each distinct
    class of value would compile a new binary, and a value of 1 would become a constant."""
    _, fwd, bwd = _modules()
    problems = []
    for fn, sig in (
        (fwd.row_forward_kernel, _forward_signature("fp32")),
        (bwd.row_backward_kernel, _backward_signature("fp32")),
    ):
        for p in fn.params:
            if sig.get(p.name, "").startswith("i") and not p.do_not_specialize:
                problems.append(f"{fn.__name__}: int argument {p.name} is not in do_not_specialize")
    return problems


def _cuobjdump():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


_PTX_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+([^;]*);")
_PTX_REG = re.compile(r"%\w+")


def _ptx_instructions(ptx):
    """[(opcode, dests, sources, text)] of a PTX listing (inline-asm blocks included)."""
    out = []
    for line in ptx.splitlines():
        m = _PTX_INSTR.match(line)
        if not m or line.lstrip().startswith((".", "//")):
            continue
        op, args = m.groups()
        if op.startswith(("st.", "bra", "ret", "bar")):  # no destination register
            dests, srcs = [], _PTX_REG.findall(args)
        elif args.startswith("{"):  # vector destination: { %r1, %r2 }, [addr]
            head, _, rest = args.partition("}")
            dests, srcs = _PTX_REG.findall(head), _PTX_REG.findall(rest)
        else:
            first, _, rest = args.partition(",")
            dests, srcs = _PTX_REG.findall(first), _PTX_REG.findall(rest)
        out.append((op, dests, srcs, line.strip()))
    return out


def temperature_product_problems(ptx, kernel_name, param_index):
    """(products, problems) for the fp32 value loaded through pointer argument
    ``param_index`` (``inv_temp_ptr``) of ``kernel_name`` in a PTX listing.

    ``products``: multiplies taking that value. ``problems``: instructions that let a product
    be contracted with a later add/sub (the rounding of ``x = z * inv_temp`` skipped, which
    made fp32 log-probs slightly positive on the cpu/cuda backends): an ``fma`` taking the
    value, or a plain ``mul.f32`` of it (ptxas may fuse those) whose result feeds an add,
    sub or fma. ``mul.rn.f32`` is never contracted, by LLVM or ptxas."""
    ins = _ptx_instructions(ptx)
    param = re.compile(rf"\[\s*{re.escape(kernel_name)}_param_{param_index}\s*\]")
    ptr, temp = set(), set()
    for _ in range(2):  # to a fixpoint over loop back edges (address math is straight-line)
        for op, dests, srcs, text in ins:
            if op.startswith("ld.param") and param.search(text):
                ptr.update(dests)
            elif op.startswith("ld.global"):
                if ptr.intersection(srcs):
                    temp.update(dests)
            elif op.startswith("mov") and temp.intersection(srcs):
                temp.update(dests)
            elif ptr.intersection(srcs) and not op.startswith(("st.", "setp")):
                ptr.update(dests)  # pointer arithmetic
    users = {}
    for op, dests, srcs, text in ins:
        for r in srcs:
            users.setdefault(r, []).append((op, text))
    products, problems = [], []
    for op, dests, srcs, text in ins:
        if not temp.intersection(srcs) or op.startswith(("ld.", "mov")):
            continue
        if op.startswith("fma"):
            products.append(text)
            problems.append(f"FMA consumes inv_temp: {text}")
        elif op.startswith("mul") and op.endswith(".f32"):
            products.append(text)
            if ".rn" not in op:
                for uop, utext in (u for d in dests for u in users.get(d, [])):
                    if uop.startswith(("add", "sub", "fma")):
                        problems.append(f"unrounded {text} feeds {utext} (ptxas may contract it)")
    return products, problems


def _compile(kind, dname, num_warps, constexprs, arch):
    """-> (compiled kernel, jit function) or (None, error message)."""
    import triton
    from triton.backends.compiler import GPUTarget

    _, fwd, bwd = _modules()
    t = _PTR_TYPE[dname]
    if kind == "forward":
        fn, sig = fwd.row_forward_kernel, _forward_signature(t)
    else:
        fn, sig = bwd.row_backward_kernel, _backward_signature(t)
    names = list(fn.arg_names)
    if set(names) != set(sig) | set(constexprs):
        return None, f"signature drift: kernel args {names}, checked {list(sig) + list(constexprs)}"
    sig = dict(sig, **{k: "constexpr" for k in constexprs})
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v.startswith("*")}
    try:
        k = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "enable_fp_fusion": fwd.FP_FUSION},
        )
    except Exception as exc:  # report every failure, not just the first
        return None, f"{type(exc).__name__}: {exc}"
    return k, fn


def temperature_check(kind, dname, num_warps, constexprs, arch):
    """-> (products, problems) of ``temperature_product_problems`` for one variant's PTX."""
    k, fn = _compile(kind, dname, num_warps, constexprs, arch)
    if k is None:
        raise RuntimeError(fn)
    return temperature_product_problems(k.asm["ptx"], fn.__name__, list(fn.arg_names).index("inv_temp_ptr"))


def compile_one(kind, dname, num_warps, constexprs, arch):
    """-> dict(regs, spill, vec_ld, vec_st, tfma, seconds) or dict(error=...)."""
    t0 = time.perf_counter()
    k, fn = _compile(kind, dname, num_warps, constexprs, arch)
    if k is None:
        return dict(error=fn)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
    usage = res.stdout
    reg = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)  # where ptxas puts spilled registers
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", usage)]
    if res.returncode or not reg or not local or not stack:
        return dict(error=f"cuobjdump failed ({res.returncode}): {res.stderr.strip() or usage}")
    ptx = k.asm["ptx"]
    products, problems = temperature_product_problems(ptx, fn.__name__, list(fn.arg_names).index("inv_temp_ptr"))
    if not products:  # the checker lost track of inv_temp: fail rather than pass vacuously
        problems = ["no product of inv_temp found in the PTX (checker out of date?)"]
    return dict(
        regs=int(reg.group(1)),
        spill=int(stack.group(1)) + int(local.group(1)) + sum(spills),
        vec_ld=len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)),
        vec_st=len(re.findall(r"st\.global(?:\.\w+)*\.v[24]\.", ptx)),
        tfma=len(problems),
        tfma_detail=problems[:3],
        seconds=seconds,
    )


def _label(kind, dname, constexprs):
    flags = ",".join(k for k, v in constexprs.items() if k not in ("BLOCK_V", "ALIGN", "INPLACE") and v is True)
    return f"{kind:<16} {dname:<8} BLOCK_V={constexprs['BLOCK_V']:<5} ALIGN={constexprs['ALIGN']:<2} {flags or '-'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--all-stat-combos",
        action="store_true",
        help="all 32 forward flag combinations, not only the compiled flag sets",
    )
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    problems = specialization_problems()
    for msg in problems:
        print(msg, file=sys.stderr)
    jobs = [(v, arch) for v in variants(args.all_stat_combos) for arch in args.arch]
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(compile_one, *v, arch) for v, arch in jobs]
        results = [f.result() for f in futures]
    rows = {}
    for ((kind, dname, _, cx), arch), r in zip(jobs, results):
        rows.setdefault(_label(kind, dname, cx), {})[arch] = r
    bad = 0
    header = "".join(f" | sm_{a}: regs spill vld vst tfma" for a in args.arch)  # spill: bytes
    print(f"{'kernel variant':<62}{header}")
    for label, per_arch in rows.items():
        cells = []
        for a in args.arch:
            r = per_arch[a]
            if "error" in r:
                cells.append(f" | sm_{a}: COMPILE ERROR")
                bad += 1
            else:
                bad += r["spill"] > 0 or r["tfma"] > 0
                cells.append(
                    f" | sm_{a}: {r['regs']:>4} {r['spill']:>5} {r['vec_ld']:>3} {r['vec_st']:>3} {r['tfma']:>4}"
                )
        print(f"{label:<62}{''.join(cells)}")
    for ((kind, dname, _, cx), arch), r in zip(jobs, results):
        if "error" in r:
            print(f"\nsm_{arch} {_label(kind, dname, cx)}:\n{r['error']}", file=sys.stderr)
        elif r["tfma"]:
            print(
                f"\nsm_{arch} {_label(kind, dname, cx)}: temperature product not rounded:\n  "
                + "\n  ".join(r["tfma_detail"]),
                file=sys.stderr,
            )
    print(
        f"\n{len(jobs)} compilations, {bad} failing (compile error, spill or unrounded temperature product), "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 1 if bad or problems else 0


if __name__ == "__main__":
    sys.exit(main())
