"""The benchmark harness's own logic (benchmarks/spec.py, measure.py, bound.py, report.py,
cli.py): byte counting, the bound, skipping absent peers, the JSON schema, and a --quick --dry-run smoke run.

These assert the harness's arithmetic and plumbing, never timings.
"""

import json
import os
import sys

import expected  # tests/expected.py
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_token_logprobs as TL  # noqa: E402
from benchmarks import bound, calibration, cli, measure, report, spec  # noqa: E402

# --------------------------------------------------------------------------- a tiny op for plumbing tests


def _naive(inputs):
    x, y = inputs["logits"], inputs["labels"]
    return torch.log_softmax(x, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _tiny_op(extra_providers=()):
    return spec.OpSpec(
        name="tiny",
        module=TL.__name__,
        make_inputs=TL.make_inputs,
        grad_inputs=("logits",),
        main_bytes=TL.main_bytes,
        bytes_moved=TL.bytes_moved,
        alloc_bytes=TL.main_bytes,
        make_shape=TL.make_shape,
        tokens=lambda s: s["B"] * s["T"],
        vocab=lambda s: s["V"],
        presets={
            "dry-run": [TL.make_shape(8, 50)],
            "quick": [TL.make_shape(8, 50)],
            "default": [TL.make_shape(8, 50)],
            "full": [TL.make_shape(8, 50), TL.make_shape(8, 100)],
        },
        preset_dtypes={"default": ["fp32"]},
        providers=[spec.Provider("naive", lambda: _naive)] + list(extra_providers),
    )


# --------------------------------------------------------------------------- byte counting and the bound


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_token_logprobs_bytes_moved(dtype, itemsize):
    shape = TL.make_shape(2048, 128256)
    n, s = 2048, 2048 * 128256 * itemsize
    assert TL.main_bytes(shape, dtype) == s
    b = bound.bytes_by_phase(TL.OP, shape, dtype)
    small = n * (8 + 4)  # int64 labels and one fp32 per token (log-prob out / grad in)
    assert b["fwd"] == s + small  # one read of the logits
    assert b["bwd"] == 2 * s + small  # one read + one write of the gradient
    assert b["step"] == b["fwd"] + b["bwd"]
    assert b["fwd_nograd"] == b["fwd"]
    # split by access pattern: the forward only reads, the backward's gradient is read + written
    t = bound.traffic_by_phase(TL.OP, shape, dtype)
    assert t["fwd"] == {"read": s + small, "rw": 0, "write": 0}
    assert t["bwd"] == {"read": small, "rw": 2 * s, "write": 0}
    assert bound.exps_by_phase(TL.OP, shape, dtype) == {
        "fwd": n * 128256,
        "bwd": n * 128256,
        "step": 2 * n * 128256,
        "fwd_nograd": n * 128256,
    }


# synthetic calibration: bytes moved per second of each pattern (rmw / copy count read + write)
RATES = {
    "read_Bps": 40e9,
    "rmw_Bps": 30e9,
    "copy_Bps": 20e9,
    "write_Bps": 50e9,
    "fresh_copy_Bps": 5e9,
    "first_touch_min_bytes": 32 << 20,
}


def test_phase_bound_charges_each_pattern_at_its_rate():
    t = {"read": 4e9, "rw": 6e9, "write": 1e9}
    inplace = calibration.phase_bound(t, RATES, inplace=True)
    assert inplace["memory_s"] == pytest.approx(4e9 / 40e9 + 6e9 / 30e9 + 1e9 / 50e9)
    assert inplace["bound_s"] == inplace["warm_s"] == inplace["memory_s"] and inplace["limit"] == "memory"
    # a fresh gradient: the rw part at the copy rate, plus the first touch of what it allocates
    fresh = calibration.phase_bound(t, RATES, inplace=False, alloc=3e9)
    warm = 4e9 / 40e9 + 6e9 / 20e9 + 1e9 / 50e9
    touch = 3e9 * (2 / 5e9 - 2 / 20e9)  # the fresh copy's extra time over the warm one
    assert fresh["warm_s"] == pytest.approx(warm)
    assert fresh["first_touch_s"] == pytest.approx(touch)
    assert fresh["bound_s"] == pytest.approx(warm + touch)
    # in place never allocates; allocations below the mmap threshold can come back mapped
    assert calibration.phase_bound(t, RATES, inplace=True, alloc=3e9)["first_touch_s"] == 0.0
    assert calibration.phase_bound(t, RATES, inplace=False, alloc=(32 << 20) - 1)["first_touch_s"] == 0.0
    no_min = dict(RATES, first_touch_min_bytes=None)
    assert calibration.phase_bound(t, no_min, inplace=False, alloc=3e9)["first_touch_s"] == 0.0
    # a plain number is all read (the fastest pattern); unknown parts are an error
    assert calibration.phase_bound(1e9, RATES, inplace=False)["bound_s"] == pytest.approx(1e9 / 40e9)
    with pytest.raises(ValueError, match="unknown traffic parts"):
        calibration.traffic_parts({"read": 1, "reads": 2})


def test_phase_bound_is_the_largest_of_memory_exp_and_gemm():
    t = {"read": 4e9}  # 0.1 s at 40 GB/s
    assert calibration.phase_bound(t, RATES, inplace=True, exps=1e9, exp_per_s=20e9)["limit"] == "memory"
    b = calibration.phase_bound(t, RATES, inplace=True, exps=4e9, exp_per_s=20e9)
    assert b["limit"] == "exp" and b["bound_s"] == pytest.approx(0.2) and b["memory_s"] == pytest.approx(0.1)
    b = calibration.phase_bound(t, RATES, inplace=True, exps=4e9, exp_per_s=20e9, flops=1e12, flops_per_s=2e12)
    assert b["limit"] == "gemm" and b["bound_s"] == pytest.approx(0.5)
    # no measured ceiling: memory only
    assert calibration.phase_bound(t, RATES, inplace=True, exps=4e9, exp_per_s=None)["bound_s"] == pytest.approx(0.1)


def _timed(fwd, bwd, step, nograd=None):
    return {
        "time_s": {
            "fwd": measure.summarize(fwd),
            "bwd": measure.summarize(bwd),
            "step": measure.summarize(step),
            "fwd_nograd": measure.summarize(nograd or []),
        }
    }


def test_derive_uses_the_providers_pattern():
    shape = TL.make_shape(2048, 32000)  # fp32 logits: 262 MB, above the first-touch threshold
    d = torch.float32
    s, small = TL.main_bytes(shape, d), 2048 * 12
    fwd = (s + small) / 40e9
    bwd_inplace = small / 40e9 + 2 * s / 30e9
    bwd_fresh = small / 40e9 + 2 * s / 20e9 + s * (2 / 5e9 - 2 / 20e9)
    r = _timed([fwd * 4], [bwd_inplace * 2], [3 * (fwd + bwd_inplace), 2 * (fwd + bwd_inplace)])
    bound.derive(r, TL.OP, shape, d, RATES, inplace=True)
    assert r["bound_s"]["fwd"] == pytest.approx(fwd) and r["bound_s"]["bwd"] == pytest.approx(bwd_inplace)
    assert (
        r["bound_s"]["step"] == pytest.approx(fwd + bwd_inplace) and r["bound_s"]["fwd_nograd"] == r["bound_s"]["fwd"]
    )
    assert r["x_bound"]["step"] == pytest.approx(2.5) and r["x_bound"]["fwd"] == pytest.approx(4.0)
    assert r["gbps"]["step"] == pytest.approx(r["bytes_moved"]["step"] / (2.5 * (fwd + bwd_inplace)) / 1e9)
    assert "fwd_nograd" not in r["x_bound"] and r["calibration_error"] == {}
    assert r["bound_terms"]["bwd"]["limit"] == "memory" and "in place" in r["bound_pattern"]
    # the same times against a fresh gradient's bound: copy rate plus first touch, backward only
    bound.derive(r, TL.OP, shape, d, RATES, inplace=False)
    assert r["bound_s"]["fwd"] == pytest.approx(fwd) and r["bound_s"]["bwd"] == pytest.approx(bwd_fresh)
    assert r["bound_warm_s"]["bwd"] == pytest.approx(bwd_fresh - s * (2 / 5e9 - 2 / 20e9))
    assert r["x_bound_warm"]["step"] > r["x_bound"]["step"]
    # the exp ceiling: one exp per logit forward and backward
    exps = 2048 * 32000
    bound.derive(r, TL.OP, shape, d, RATES, inplace=True, exp={"exp_per_s": exps / (2 * fwd)})
    assert r["bound_s"]["fwd"] == pytest.approx(2 * fwd) and r["bound_terms"]["fwd"]["limit"] == "exp"
    assert r["exps"]["step"] == 2 * exps
    # a provider computing its gradient in the forward: no backward bound, so no bwd ratio
    # nor flag (its bwd is far below bwd_inplace here), the step keeps the whole work
    r["time_s"]["bwd"] = measure.summarize([bwd_inplace * 0.1])
    bound.derive(r, TL.OP, shape, d, RATES, inplace=True, grad_in_forward=True)
    assert r["bound_s"]["bwd"] is None and "bwd" not in r["x_bound"] and r["calibration_error"] == {}
    assert r["bound_s"]["step"] == pytest.approx(fwd + bwd_inplace)


def test_a_time_below_the_bound_is_flagged_as_a_calibration_error(tmp_path):
    """A run faster than a lower bound is reported as a calibration error in the JSON, the
    table (marker) and the notes, never as a speed."""
    shape = TL.make_shape(2048, 32000)
    d = torch.float32
    bound.derive(probe := _timed([1.0], [1.0], [1.0]), TL.OP, shape, d, RATES, inplace=True)
    b = probe["bound_s"]
    # bwd's fastest repeat beats its bound; its median does not
    fast = _timed(
        [b["fwd"] * 1.5] * 5, [b["bwd"] * 0.9] + [b["bwd"] * 1.2] * 4, [b["step"] * 1.3] * 5, [b["fwd"] * 1.5] * 5
    )
    slow = _timed([b["fwd"] * 1.5] * 5, [b["bwd"] * 1.1] * 5, [b["step"] * 1.3] * 5, [b["fwd"] * 1.5] * 5)
    base = {
        "kind": "ours",
        "shape": shape,
        "tokens": 2048,
        "vocab": 32000,
        "dtype": "fp32",
        "device": "cpu",
        "status": "ok",
        "mem_bytes": {"step": 0},
        "mem_method": "x",
        "x_naive": {},
    }
    results = [dict(base, provider="fast", **fast), dict(base, provider="slow", **slow)]
    for r in results:
        bound.derive(r, TL.OP, shape, d, RATES, inplace=True)
    assert results[0]["calibration_error"] == {"bwd": pytest.approx(0.9)}
    assert results[1]["calibration_error"] == {}
    notes = bound.calibration_error_notes(results)
    assert len(notes) == 1 and "CALIBRATION ERROR" in notes[0] and "fast" in notes[0] and "bwd" in notes[0]
    rows = {r[0]: r for r in report.table_rows(results)}
    col = report.TABLE_COLUMNS.index("x bound")
    mark = report.BELOW_BOUND_MARK
    assert rows["fast"][col].endswith(mark) and not rows["slow"][col].endswith(mark)
    doc = {
        "schema": report.SCHEMA,
        "op": "tiny",
        "preset": "quick",
        "created": "t",
        "machine": {"device": "cpu", "torch": "2", "cpu_count": 2, "torch_threads": 2},
        "settings": {},
        "calibration": {"memory": [dict(RATES, nbytes=1, for_main_bytes=1)], "exp": None, "gemm": []},
        "calibration_errors": notes,
        "providers": [],
        "notes": [],
        "results": results,
    }
    assert report.validate_doc(doc) == []
    text = report.report_text(doc, TL.OP)
    assert notes[0] in text and report.BELOW_BOUND_MARK.strip() in text


def test_every_timed_preset_takes_at_least_five_repeats():
    for name, st in measure.PRESET_SETTINGS.items():
        if name != "dry-run":
            assert st["min_repeats"] >= 5 and st["repeats"] >= st["min_repeats"], name
    # the loop honours min_repeats even with no time budget left
    runner_settings = dict(measure.PRESET_SETTINGS["quick"], dry_run=False)
    res = measure.measure_case(
        _tiny_op(), _tiny_op().providers[0], spec.Case.make(TL.make_shape(8, 50), "fp32", "cpu"), runner_settings
    )
    assert res["time_s"]["step"]["n"] == 5 and res["time_s"]["fwd_nograd"]["n"] == 5


def test_merge_best_keeps_the_better_rate_of_each_pattern():
    a = {"read_Bps": 10.0, "copy_Bps": 5.0, "methods": {"read": "sum", "copy": "copy_"}}
    b = {"read_Bps": 8.0, "copy_Bps": 7.0, "methods": {"read": "amax", "copy": "memmove"}}
    m = calibration.merge_best(a, b)
    assert (m["read_Bps"], m["copy_Bps"]) == (10.0, 7.0)
    assert m["methods"] == {"read": "sum", "copy": "memmove"}
    assert m["rounds"]["copy_Bps"] == [5.0, 7.0] and a["copy_Bps"] == 5.0  # a is not modified


def test_rates_of_buffers_beyond_the_caches_are_pooled():
    llc = 32 << 20
    small = {"nbytes": 8 << 20, "read_Bps": 100e9, "copy_Bps": 90e9}  # in cache: its own rates
    a = {"nbytes": 512 << 20, "read_Bps": 40e9, "copy_Bps": 20e9, "methods": {"read": "sum", "copy": "copy_"}}
    b = {"nbytes": 1 << 30, "read_Bps": 30e9, "copy_Bps": 25e9, "methods": {"read": "sum", "copy": "memmove"}}
    ps, pa, pb = calibration.pool_dram_rates([small, a, b], llc)
    assert ps is small
    assert (pa["read_Bps"], pa["copy_Bps"]) == (40e9, 25e9) and (pb["read_Bps"], pb["copy_Bps"]) == (40e9, 25e9)
    assert "memmove" in pa["methods"]["copy"] and pb["methods"]["copy"] == "memmove"
    assert pa["pooled_with"] == [1 << 30] and b["read_Bps"] == 30e9  # inputs unchanged
    assert calibration.pool_dram_rates([small, a], llc)[1] is a  # nothing to pool with


def test_first_touch_is_charged_only_where_malloc_maps_fresh_memory(monkeypatch):
    from benchmarks import calibration as C

    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(k, raising=False)
    import platform

    floor, _ = C.first_touch_min_bytes("cpu")
    assert floor == (C.GLIBC_MMAP_THRESHOLD_MAX if platform.libc_ver()[0] == "glibc" else None)
    assert C.first_touch_min_bytes("cuda")[0] is None
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4294967296")
    assert C.first_touch_min_bytes("cpu")[0] is None


def test_logits_layout_counts_only_labelled_rows():
    """Rows with an ignored label need no read and no exp: only their zero gradient is written."""
    from benchmarks import bench_support as S

    lay = S.LogitsLayout(batch=4, prompt=0.25, ref_logits=True, small_per_token=8)
    shape = lay.make_shape(64, 100)  # T = 16: 4 rows per sequence ignored
    row, ign, act = 100 * 2, 16, 48
    b = lay.bytes_moved(shape, torch.bfloat16)
    assert b["fwd"] == {"read": 2 * act * row + 64 * 8}
    assert b["bwd"] == {"read": act * row + 64 * 8, "rw": 2 * act * row, "write": ign * row}
    assert lay.exps(shape, torch.bfloat16) == {"fwd": 2 * act * 100, "bwd": act * 100}


def test_summarize_and_speedups():
    s = measure.summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] <= s["median"] <= s["q3"]
    assert measure.summarize([]) is None
    one = measure.summarize([0.5])
    assert one["q1"] == one["q3"] == one["median"] == 0.5

    def res(p, t):
        return {
            "provider": p,
            "shape": {"V": 1},
            "dtype": "fp32",
            "status": "ok",
            "time_s": {"step": measure.summarize([t])},
        }

    rs = [
        res("naive", 4.0),
        res("fast", 1.0),
        {"provider": "x", "shape": {"V": 1}, "dtype": "fp32", "status": "skipped", "note": "n"},
    ]
    bound.add_speedups(rs, ("naive",))
    assert rs[1]["x_naive"]["step"] == pytest.approx(4.0)
    assert rs[0]["x_naive"]["step"] == pytest.approx(1.0)
    assert "x_naive" not in rs[2]


def test_calibration_measures_every_pattern():
    c = calibration.memory_rates(1 << 20, "cpu", repeats=2, min_time=0.0)
    assert c["nbytes"] == 1 << 20
    for pat in calibration.MEMORY_PATTERNS:
        assert c[f"{pat}_Bps"] >= c[f"{pat}_Bps_median"] > 0, pat
    assert set(c["methods"]) == set(calibration.MEMORY_PATTERNS)
    g = calibration.gemm_throughput(torch.float32, "cpu", size=64, repeats=2)
    assert g["flops_per_s"] >= g["flops_per_s_median"] > 0
    e = calibration.exp_rate("cpu", repeats=2, min_time=0.0)
    if "error" in e:  # no C compiler here: the bound is memory only, and says so
        assert "memory only" in e["error"]
    else:
        assert e["exp_per_s"] >= e["exp_per_s_median"] > 0 and e["threads"] == torch.get_num_threads()


def test_memprobe_sees_a_touched_allocation():
    probe = measure.MemProbe("cpu")
    probe.start()
    x = torch.ones(40_000_000 // 4)  # 40 MB, touched
    extra = probe.peak_extra()
    del x
    assert extra >= 35e6
    if probe.method.startswith("rss VmHWM"):  # resettable: a new region starts from zero
        probe.start()
        assert probe.peak_extra() < 20e6


# --------------------------------------------------------------------------- providers and planning


def test_absent_peer_is_a_note_not_an_error(tmp_path):
    ghost = spec.Provider(
        "ghost", lambda: _naive, kind="peer", requires=("no_such_module_prefopt_xyz",), install="pip install ghost"
    )
    assert "not installed" in spec.availability(ghost) and "pip install ghost" in spec.availability(ghost)
    op = _tiny_op([ghost])
    doc = cli.run(op, preset="default", dry_run=True, outdir=str(tmp_path), plots=False, progress=False, quiet=True)
    prov = {p["name"]: p for p in doc["providers"]}
    assert prov["ghost"]["status"] == "skipped" and "no_such_module_prefopt_xyz" in prov["ghost"]["note"]
    assert any("ghost" in n for n in doc["notes"])
    assert {r["provider"] for r in doc["results"]} == {"naive"}
    assert all(r["status"] == "ok" for r in doc["results"])


def test_per_case_checks_and_memory_guard():
    cuda_only = spec.Provider("cuda-only", lambda: _naive, check=spec.needs_cuda)
    op = _tiny_op([cuda_only])
    jobs, skipped = cli.plan(op, op.providers, [TL.make_shape(8, 50)], ["fp32", "bf16"], "cpu", avail=None)
    assert [j["provider"] for j in jobs] == ["naive"] and jobs[0]["dtypes"] == ["fp32", "bf16"]
    assert {(r["provider"], r["status"]) for r in skipped} == {("cuda-only", "skipped")}
    assert all("CUDA" in r["note"] for r in skipped)
    # a case that cannot fit is skipped with the estimate
    big = spec.Case.make(TL.make_shape(8192, 256000), "fp32", "cpu")
    note = cli.memory_guard(op, op.providers[0], big, avail=4 << 30)
    assert note and "GB available" in note
    assert cli.memory_guard(op, op.providers[0], spec.Case.make(TL.make_shape(8, 50), "fp32", "cpu"), 4 << 30) is None


def test_provider_selection():
    slow = spec.Provider("compiled", lambda: _naive, slow_setup=True)
    op = _tiny_op([slow])
    chosen, notes = cli.select_providers(op, None, "quick")
    assert [p.name for p in chosen] == ["naive"] and any("compiled" in n for n in notes)
    chosen, _ = cli.select_providers(op, None, "default")
    assert [p.name for p in chosen] == ["naive", "compiled"]
    chosen, notes = cli.select_providers(op, ["comp*", "nope"], "quick")
    assert [p.name for p in chosen] == ["compiled"] and any("nope" in n for n in notes)


def test_shapes_from_args():
    s = cli.shapes_from_args(TL.OP, "full", ["1024", "4096"], ["32000"], False)
    assert s == [TL.make_shape(1024, 32000), TL.make_shape(4096, 32000)]
    assert cli.shapes_from_args(TL.OP, "quick", None, None, False) is None
    with pytest.raises(ValueError, match="multiple of"):
        TL.make_shape(1023, 10)


def test_prefopt_fast_providers_follow_the_available_backends():
    import prefopt_fast

    names = {p.name for p in TL.OP.providers}
    for b in prefopt_fast.available_backends():
        assert f"prefopt_fast.{b}" in names and f"prefopt_fast.{b}+inplace" in names
    inplace = TL.OP.provider(f"prefopt_fast.{prefopt_fast.available_backends()[0]}+inplace")
    assert inplace.mutates == ("logits",)


def test_inplace_provider_inputs_are_restored():
    """A provider that overwrites its logits gets them back before every call."""

    def clobber(inputs):
        out = _naive(inputs)
        with torch.no_grad():
            inputs["logits"].zero_()
        return out

    prov = spec.Provider("clobber", lambda: clobber, mutates=("logits",))
    op = _tiny_op([prov])
    runner = measure.CaseRunner(op, prov, spec.Case.make(TL.make_shape(8, 50), "fp32", "cpu"))
    before = runner.inputs["logits"].detach().clone()
    runner.step()
    assert runner.inputs["logits"].abs().sum() == 0
    runner.prepare()
    assert torch.equal(runner.inputs["logits"], before)
    runner.close()


def test_worker_subprocess_roundtrip():
    job = {
        "module": TL.__name__,
        "provider": "naive",
        "shape": TL.make_shape(8, 50),
        "dtypes": ["fp32"],
        "device": "cpu",
        "settings": dict(measure.PRESET_SETTINGS["quick"], dry_run=False),
    }
    (res,) = measure.run_job_subprocess(job, timeout=120)
    assert res["status"] == "ok", res
    assert res["time_s"]["step"]["n"] >= 2 and res["mem_bytes"]["step"] >= 0
    # a provider failing (here: unknown) is an error result, not a crash; checked in-process
    (res,) = measure.run_job(dict(job, provider="does-not-exist"))
    assert res["status"] == "error" and "does-not-exist" in res["note"]


def test_validate_doc_catches_problems():
    assert report.validate_doc({"schema": "x"})  # many missing keys
    doc = {
        "schema": report.SCHEMA,
        "op": "o",
        "preset": "p",
        "created": "t",
        "machine": {"device": "cpu", "torch": "2", "cpu_count": 2, "torch_threads": 2},
        "settings": {},
        "calibration": {"memory": [], "exp": None, "gemm": []},
        "calibration_errors": [],
        "providers": [],
        "notes": [],
        "results": [
            {
                "provider": "a",
                "kind": "baseline",
                "shape": {},
                "tokens": 1,
                "vocab": 1,
                "dtype": "fp32",
                "device": "cpu",
                "status": "weird",
            }
        ],
    }
    errs = report.validate_doc(doc)
    assert any("status" in e for e in errs)


# --------------------------------------------------------------------------- the op scripts: bytes, FLOPs, variants

from benchmarks import OPS  # noqa: E402
from benchmarks import bench_support as S  # noqa: E402


def _op(name):
    return spec.load_op(OPS[name])


@pytest.mark.parametrize(
    "name,k,small,prompt",
    [
        ("sequence_logprobs", 1, 8, 0.25),
        ("sequence_logprobs_packed", 1, 8, 0.25),
        ("dpo", 1, 8, 0.25),
        ("ppo_loss_k1", 1, 24, 0.125),
        ("ppo_loss_full_kl", 2, 24, 0.125),
    ],
)
def test_logits_ops_bytes_moved(name, k, small, prompt):
    """k logits tensors read forward; read again plus one gradient written backward; the
    prompt rows (ignored labels) only get their zero gradient written."""
    op = _op(name)
    shape = op.make_shape(4096, 128256)
    n, s = 4096, 4096 * 128256 * 2
    assert op.main_bytes(shape, torch.bfloat16) == s
    ign = int(s * prompt)  # the prompt fraction of every sequence
    b = bound.bytes_by_phase(op, shape, torch.bfloat16)
    assert b["fwd"] == k * (s - ign) + n * small
    assert b["bwd"] == (k + 1) * (s - ign) + ign + n * small
    assert b["step"] == b["fwd"] + b["bwd"] and b["fwd_nograd"] == b["fwd"]
    t = bound.traffic_by_phase(op, shape, torch.bfloat16)["bwd"]
    assert t["rw"] == 2 * (s - ign) and t["write"] == ign
    assert bound.exps_by_phase(op, shape, torch.bfloat16)["fwd"] == k * (n - int(n * prompt)) * 128256


@pytest.mark.parametrize("name", ["linear_token_logprobs", "linear_sequence_logprobs", "linear_dpo", "linear_ppo"])
def test_linear_ops_flops_and_bound(name):
    op = _op(name)
    shape = op.make_shape(2048, 128256)  # T = 2048 / B, first min(64, T / 4) positions ignored
    t = shape["T"]
    m = shape["B"] * (t - min(64, t // 4))
    f = bound.flops_by_phase(op, shape, torch.bfloat16)
    assert f["fwd"] == 2.0 * m * 2048 * 128256 and f["bwd"] == 2 * f["fwd"] and f["step"] == 3 * f["fwd"]
    b = bound.bytes_by_phase(op, shape, torch.bfloat16)
    w, h = 128256 * 2048 * 2, m * 2048 * 2
    assert b["fwd"] == w + h and b["bwd"] == 2 * (w + h)
    # the bound is the GEMM term at these sizes, and derive() uses it
    gemm = {"flops_per_s": 1e11}
    r = {"time_s": {"step": measure.summarize([2 * f["step"] / 1e11]), "fwd": None, "bwd": None, "fwd_nograd": None}}
    bound.derive(r, op, shape, torch.bfloat16, RATES, gemm)
    assert r["bound_s"]["step"] == pytest.approx(f["step"] / 1e11)
    assert r["bound_terms"]["fwd"]["limit"] == r["bound_terms"]["bwd"]["limit"] == "gemm"
    assert r["x_bound"]["step"] == pytest.approx(2.0)


def test_bradley_terry_bytes_are_the_last_rows():
    op = _op("bradley_terry")
    shape = op.presets["quick"][0]
    b = bound.bytes_by_phase(op, shape, torch.float32)
    assert b["fwd"] == (shape["B"] + 1) * shape["H"] * 4 and b["bwd"] == 2 * b["fwd"]


def test_registry_and_variants():
    """Every registered op loads, names itself as registered, and round-trips through its module spec
    (what the workers import); the PPO script covers every estimator."""
    assert {f"ppo_loss_{k}" for k in ("k1", "k2", "k3", "abs", "low_var_kl")} | {"ppo_loss_full_kl"} <= set(OPS)
    for name, module in OPS.items():
        op = spec.load_op(module)
        assert op.name == name and op.module == module
        assert {"dry-run", "quick", "default", "full"} <= set(op.presets)
        assert any(p.kind == "ours" for p in op.providers), name
        assert op.provider("naive")
        full = op.presets["full"]
        if name != "bradley_terry":  # --full sweeps the vocabulary and the token count
            assert {op.vocab(s) for s in full} == set(S.FULL_VOCABS)
            assert len({op.tokens(s) for s in full}) >= 2
    with pytest.raises(KeyError, match="estimator"):
        spec.load_op("benchmarks.bench_ppo:k9")
    assert cli.select_ops("ppo_loss_k*,dpo", list(OPS), "default", False) == [
        "ppo_loss_k1",
        "ppo_loss_k2",
        "ppo_loss_k3",
        "dpo",
    ]
    assert cli.select_ops(None, list(OPS), "quick", False) == list(OPS)
    assert cli.select_ops(None, list(OPS), "default", False) == ["token_logprobs"]
    with pytest.raises(KeyError):
        cli.select_ops("nope*", list(OPS), "default", False)


def test_packed_inputs_are_consistent():
    op = _op("sequence_logprobs_packed")
    shape = op.make_shape(64, 100)
    x = op.make_inputs(shape, torch.float32, "cpu")
    cu = x["cu_seqlens"]
    assert x["logits"].shape == (64, 100) and x["labels"].shape == (64,)
    assert cu[0] == 0 and cu[-1] == 64 and (cu[1:] >= cu[:-1]).all() and len(set(cu.diff().tolist())) > 1
    # the naive provider and ours compute the same per-sequence sums
    import prefopt_fast

    ref = op.provider("naive").make()(x)
    ours = prefopt_fast.sequence_logprobs(x["logits"], x["labels"], cu_seqlens=cu)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "name,peer",
    [
        ("dpo", "trl"),
        ("ppo_loss_low_var_kl", "prefopt_fast.cpu"),
        ("linear_dpo", "torch-linear-ce"),
        ("linear_token_logprobs", "trl"),
    ],
)
def test_providers_compute_the_same_loss(name, peer):
    """The naive provider and a peer / ours agree on the op's value (not just its cost)."""
    op = _op(name)
    prov = next(p for p in op.providers if p.name == peer)
    component = {"trl": "trl", "prefopt_fast.cpu": "cpu-extension"}.get(peer)
    if component:
        expected.require(component)  # a failure in strict runs, where the set-up installed it
    assert spec.availability(prov) is None, spec.availability(prov)
    if peer == "torch-linear-ce" and prov.check(None):  # a torch feature (2.13), not an installed component
        pytest.skip(prov.check(None))
    x = op.make_inputs(op.presets["dry-run"][0], torch.float32, "cpu")
    a, b = op.provider("naive").make()(x), prov.make()(x)
    if name == "linear_token_logprobs":  # ours / naive give [B, T]; the peers the completion rows
        a = a[x["labels"] != S.IGN]
    torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-3)


def test_liger_dpo_matches_naive_reference_free():
    op = _op("linear_dpo")
    liger = op.provider("liger")
    expected.require("liger-kernel")
    assert spec.availability(liger) is None, spec.availability(liger)
    x = op.make_inputs(op.presets["dry-run"][0], torch.float32, "cpu")
    ref_free = dict(x, ref_chosen=torch.zeros_like(x["ref_chosen"]), ref_rejected=torch.zeros_like(x["ref_rejected"]))
    torch.testing.assert_close(liger.make()(x), op.provider("naive").make()(ref_free), rtol=1e-4, atol=1e-4)


def test_absent_peers_of_real_ops_are_skipped(tmp_path, monkeypatch):
    """Hide TRL, Liger and cut-cross-entropy: their providers become notes, the run still succeeds."""
    hidden = {"trl", "liger_kernel", "cut_cross_entropy"}
    real = spec.importlib.util.find_spec
    monkeypatch.setattr(
        spec.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name.split(".")[0] in hidden else real(name, *a, **k),
    )
    op = _op("linear_dpo")
    doc = cli.run(
        op,
        preset="quick",
        dry_run=True,
        outdir=str(tmp_path),
        plots=False,
        progress=False,
        quiet=True,
        providers=["naive", "trl", "liger", "cce*", "prefopt_fast.cpu"],
    )
    prov = {p["name"]: p for p in doc["providers"]}
    for name, mod in (
        ("trl", "trl"),
        ("liger", "liger_kernel"),
        ("cce", "cut_cross_entropy"),
        ("cce-compile", "cut_cross_entropy"),
    ):
        assert prov[name]["status"] == "skipped" and mod in prov[name]["note"], prov[name]
        assert "pip install" in prov[name]["note"]
    assert {r["provider"] for r in doc["results"]} == {"naive", "prefopt_fast.cpu"}
    assert all(r["status"] == "ok" for r in doc["results"])
    assert report.validate_doc(doc) == []


def test_preset_providers_memory_cap_and_grouping():
    op = _op("ppo_loss_k1")
    chosen, notes = cli.select_providers(op, None, "full")
    assert {p.name for p in chosen} <= {"naive"} | {p.name for p in op.providers if p.kind == "ours"}
    assert any("not in the full preset" in n for n in notes)
    chosen, _ = cli.select_providers(op, ["token_logprobs+entropy.*"], "full")  # --providers overrides
    assert chosen and all(p.name.startswith("token_logprobs+entropy.") for p in chosen)
    # the cap applies even when the machine has the memory
    big = spec.Case.make(op.make_shape(4096, 256000), "fp32", "cpu")
    naive = op.provider("naive")
    assert "cap 16 GiB" in cli.memory_guard(op, naive, big, avail=1 << 40)
    assert cli.memory_guard(op, naive, big, avail=1 << 40, cap=None) is None
    # --full: one job per provider holding every shape
    shapes = [op.make_shape(64, 100), op.make_shape(64, 200)]
    jobs, _ = cli.plan(op, [naive], shapes, ["fp32"], "cpu", None, per="provider")
    assert len(jobs) == 1 and [c["shape"] for c in jobs[0]["cases"]] == shapes
    assert measure.job_cases(jobs[0]) == [(shapes[0], "fp32"), (shapes[1], "fp32")]


def test_full_preset_runs_per_provider_in_a_worker():
    """A job with several shapes in one worker process gives one result per (shape, dtype)."""
    job = {
        "module": OPS["dpo"],
        "provider": "naive",
        "device": "cpu",
        "cases": [
            {"shape": S.LogitsLayout(batch=4).make_shape(32, 50), "dtypes": ["fp32"]},
            {"shape": S.LogitsLayout(batch=4).make_shape(32, 80), "dtypes": ["fp32", "bf16"]},
        ],
        "settings": dict(measure.PRESET_SETTINGS["dry-run"], dry_run=True),
    }
    res = measure.run_job_subprocess(job, timeout=120)
    assert [(r["shape"]["V"], r["dtype"], r["status"]) for r in res] == [
        (50, "fp32", "ok"),
        (80, "fp32", "ok"),
        (80, "bf16", "ok"),
    ], res
    # --full's default: one worker per op running every provider; results name their provider
    op = _op("dpo")
    provs = [op.provider("naive"), op.provider("prefopt_fast.cpu"), op.provider("trl")]
    (ojob,), _ = cli.plan(op, provs, [job["cases"][0]["shape"]], ["fp32"], "cpu", None, per="op")
    assert [j["provider"] for j in ojob["subjobs"]] == ["naive", "prefopt_fast.cpu", "trl"]
    ojob["settings"] = job["settings"]
    res = measure.run_job(dict(ojob, subjobs=ojob["subjobs"][:2] + [dict(ojob["subjobs"][0], provider="nope")]))
    assert [(r["provider"], r["status"]) for r in res] == [
        ("naive", "ok"),
        ("prefopt_fast.cpu", "ok"),
        ("nope", "error"),
    ], res


# --------------------------------------------------------------------------- the smoke run


def test_quick_dry_run_smoke(tmp_path, capsys):
    """``python -m benchmarks --quick --dry-run``: every op, every provider of --quick, once."""
    rc = cli.main(["--quick", "--dry-run", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "x bound" in out and f"{len(OPS)} ops in" in out
    try:
        import matplotlib  # noqa: F401

        has_mpl = True
    except ImportError:
        has_mpl = False
    for name in OPS:
        path = tmp_path / f"{name}_dry-run_cpu.json"
        doc = json.loads(path.read_text())
        assert doc["op"] == name and report.validate_doc(doc) == [], name
        assert (tmp_path / f"{name}_dry-run_cpu.md").exists()
        assert not [r for r in doc["results"] if r["status"] == "error"], (name, doc["results"])
        ok = [r for r in doc["results"] if r["status"] == "ok"]
        assert {r["dtype"] for r in ok} == set(doc["settings"]["dtypes"]), name
        assert any(r["provider"] == "naive" for r in ok) and any(r["kind"] == "ours" for r in ok), name
        for r in ok:
            assert r["time_s"]["step"]["n"] == 1  # dry run: each phase once
            assert r["x_naive"].get("step") is not None
        if has_mpl:
            assert doc.get("plots") and all((tmp_path / p).exists() for p in doc["plots"])
        else:
            assert any("matplotlib" in n for n in doc["notes"])


def test_summary_picks_the_largest_case_and_the_fastest_of_each_role(capsys, tmp_path):
    from benchmarks import summary

    def res(provider, vocab, ms, mb, dtype="bf16", tokens=256, phase="step"):
        return {
            "provider": provider,
            "vocab": vocab,
            "tokens": tokens,
            "dtype": dtype,
            "status": "ok",
            "time_s": {phase: {"median": ms / 1e3}},
            "mem_bytes": {phase: mb * 1e6},
            "x_bound": {phase: ms / 10},
        }

    doc = {
        "op": "dpo",
        "results": [
            res("naive", 32000, 5, 50),
            res("prefopt_fast.cpu", 32000, 1, 5),  # smaller V: ignored
            res("naive", 256000, 200, 500),
            res("trl", 256000, 150, 400),
            res("liger", 256000, 100, 300),
            res("matmul-floor", 256000, 10, 1),  # not a peer
            res("prefopt_fast.torch", 256000, 40, 30),
            res("prefopt_fast.cpu+inplace", 256000, 20, 0),
            dict(res("prefopt_fast.cpu", 256000, 1, 0), status="error"),  # failed: ignored
            res("naive", 256000, 300, 700, dtype="fp32"),
            res("prefopt_fast.cpu", 256000, 30, 10, dtype="fp32", phase="fwd_nograd"),
        ],
    }
    rows = summary.summarize_doc(doc)
    assert [(r["dtype"], r["vocab"]) for r in rows] == [("bf16", 256000), ("fp32", 256000)]
    bf = rows[0]
    assert (bf["peer"], bf["ours"]) == ("liger", "cpu+inplace")
    assert bf["x_naive"] == pytest.approx(10.0) and bf["x_bound"] == pytest.approx(2.0)
    assert rows[1]["peer"] is None and rows[1]["ours_ms"] == pytest.approx(30.0)  # forward-only phase
    (tmp_path / "dpo_full_cpu.json").write_text(json.dumps(doc))
    summary.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| dpo | bf16 | 256 x 256000 | 200 ms | liger 100 ms | cpu+inplace 20 ms | 10.0 | 2.0 | 0 / 500 MB |" in out
    assert "none ran" in out
    # a result measured below its bound keeps its calibration-error mark in the summary
    doc["results"][7]["calibration_error"] = {"bwd": 0.9}
    assert "| 10.0 | 2.0 ! |" in summary.markdown(summary.summarize_doc(doc))


def test_strict_run_names_providers_broken_by_the_install(monkeypatch):
    """PREFOPT_STRICT (scripts/bench.sh): a peer not installed or failing to import, or a
    missing native cpu backend, is named (the run then exits 1); a provider that cannot serve
    this device is not; PREFOPT_ALLOW_MISSING leaves the named ones out."""
    doc = {
        "machine": {"device": "cpu"},
        "providers": [
            {"name": "trl", "requires": ["trl"], "status": "ok", "note": None},
            {"name": "liger", "requires": ["liger_kernel"], "status": "skipped", "note": "not installed: liger_kernel"},
            {"name": "cce", "requires": ["cut_cross_entropy"], "status": "ok", "note": None},
        ],
        "results": [
            {"provider": "trl", "status": "skipped", "note": "import failed: ImportError: CUDAProperties"},
            {"provider": "cce", "status": "skipped", "note": "needs a CUDA device"},
        ],
        "notes": [
            "prefopt_fast.cpu: skipped (the native extension prefopt_fast._C could not be imported)",
            "prefopt_fast.cuda: skipped (no CUDA device)",
        ],
    }
    monkeypatch.delenv("PREFOPT_ALLOW_MISSING", raising=False)
    broken = cli.broken_providers(doc)
    assert [b.split(":")[0] for b in broken] == ["liger", "trl", "prefopt_fast.cpu"], broken
    monkeypatch.setenv("PREFOPT_ALLOW_MISSING", "liger-kernel,trl")
    assert [b.split(":")[0] for b in cli.broken_providers(doc)] == ["prefopt_fast.cpu"]
    monkeypatch.setenv("PREFOPT_ALLOW_MISSING", "all")
    assert cli.broken_providers(doc) == []
    monkeypatch.setenv("PREFOPT_STRICT", "1")
    assert cli.strict_mode()
