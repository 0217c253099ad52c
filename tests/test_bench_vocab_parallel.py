"""Smoke test of benchmarks/bench_vocab_parallel.py: each op runs on 2 gloo ranks at a tiny
shape and reports its collectives (what the benchmark's figures rest on)."""

import json

import pytest

from benchmarks import bench_vocab_parallel as bvp


@pytest.mark.parametrize(
    "extra",
    [
        ["--op", "linear"],
        ["--op", "fsdp2", "--algorithm", "gather_weight"],
        ["--op", "fsdp2", "--algorithm", "gather_tokens"],
    ],
)
def test_runs_and_counts_collectives(extra, tmp_path):
    out = tmp_path / "r.json"
    bvp.main([*extra, "--tokens", "16", "--vocab", "64", "--hidden", "8", "--repeats", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    ops = [c["op"] for c in res["ranks"][0]["collectives"]]
    assert len(res["ranks"]) == 2 and ops
    if "gather_weight" in extra:  # the head is gathered: one [V/2, H] all-gather payload
        assert any(c["shape"] == [32, 8] for c in res["ranks"][0]["collectives"]), res["ranks"][0]["collectives"]
    if "gather_tokens" in extra:  # the tokens are: a [N, H] all-gather, no weight traffic
        shapes = [c["shape"] for c in res["ranks"][0]["collectives"]]
        assert [16, 8] in shapes and [32, 8] not in shapes and [64, 8] not in shapes, shapes
