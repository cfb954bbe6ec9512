"""benchmarks/: the harness runs and writes well-formed results; the quiet-round filter works.

No timing is asserted: these tests run on shared machines.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import harness  # noqa: E402

pytestmark = pytest.mark.skipif(harness.other_cpu_seconds() is None, reason="needs /proc/stat")


def _spin(seconds: float, started) -> None:
    started.set()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_round_with_a_busy_child_process_is_not_quiet():
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    child = ctx.Process(target=_spin, args=(30.0, started))
    child.start()
    try:
        assert started.wait(60)  # the child is running and spinning
        comp = harness.measure({"sleep": lambda: time.sleep(0.01)}, rounds=2, max_seconds=1.0,
                               round_seconds=0.2)
    finally:
        child.terminate()
        child.join()
    assert comp.measured >= 2
    assert all(r.other_cores is not None and r.other_cores >= 0.5 for r in comp.kept)
    assert comp.quiet == 0 and comp.busy  # the child's core counts against every round


def test_only_quiet_rounds_are_kept(monkeypatch):
    """A fake load counter: every other round, other processes take 10 s of CPU."""
    readings = iter(range(10**6))
    load = {"total": 0.0}

    def fake_other_cpu_seconds():
        n = next(readings)  # two readings per round: before and after
        if n % 4 == 1:  # the end of rounds 0, 2, 4, ...: a burst of load
            load["total"] += 10.0
        return load["total"]

    monkeypatch.setattr(harness, "other_cpu_seconds", fake_other_cpu_seconds)
    monkeypatch.setattr(harness, "PAUSE", 0.0)
    comp = harness.measure({"a": lambda: None, "b": lambda: None}, rounds=3, max_seconds=5.0,
                           round_seconds=0.001)
    assert comp.quiet == 3 and comp.measured == 6 and not comp.busy
    assert all(r.other_cores == 0 for r in comp.kept)


def test_quick_run_writes_well_formed_results(tmp_path):
    import bench

    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in results.values())
    figures = [k for k in results if k + "_iqr" in results]
    for key in ("forward_train_vs_torch_1t", "backward_vs_cs231n_conv", "forward_infer_vs_copy",
                "module_vs_torch", "folded_conv_vs_eval_b32", "recompute_vs_update_bn_conv"):
        assert key in figures
    for key in figures:
        assert results[key + "_iqr"] >= 0 and results[key + "_kept"] >= 1
    for key in bench.TARGETS:  # every target names a figure the run writes (suite times aside)
        assert key in results or key in bench.SUITE_KEYS
    rounds = machine["rounds"].values()
    assert rounds and all(r["kept"] <= r["measured"] >= r["quiet"] for r in rounds)
    assert machine["busy"] == sorted(g for g, r in machine["rounds"].items() if r["busy"])
    assert machine["unstable"] == "no earlier run on this machine to compare with"


def test_ratios_that_moved_by_more_than_their_spread_are_unstable():
    import bench

    here = {"cpu": "x", "cpu_count": "2", "torch_cpu_capability": "AVX2", "numpy": "2", "torch": "2"}
    old = {"a_vs_b": 2.0, "a_vs_b_iqr": 0.1, "c_vs_d": 1.0, "c_vs_d_iqr": 0.05, "e_ms": 1.0,
           "e_ms_iqr": 0.01}
    new = {"a_vs_b": 2.3, "a_vs_b_iqr": 0.2, "c_vs_d": 1.04, "c_vs_d_iqr": 0.01, "e_ms": 9.0,
           "e_ms_iqr": 0.01}
    moved = bench.unstable(old, new, here, here)
    assert moved == {"a_vs_b": {"before": 2.0, "now": 2.3, "spread": 0.2}}  # times are not ratios
    assert isinstance(bench.unstable(old, new, here, {**here, "cpu": "y"}), str)  # another machine
    assert bench.unstable({}, new, {}, here) == "no earlier run on this machine to compare with"
