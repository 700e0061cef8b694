"""Faults in the work itself, over loopback TCP with real processes: a device that returns NaN, and a
device whose evaluation fails (out of memory). Neither may stall a run or kill its worker."""

from __future__ import annotations

import json
import math

import pytest

from pooltools import coordinator, final_hash, free_port_pair, metrics, reference_hash, worker, write_config

pytestmark = pytest.mark.slow


def _run(tmp_path, cfg, workers, timeout=240):
    """A coordinator on ``cfg`` with the given worker specs [(name, hooks)]; returns (out, procs)."""
    port = free_port_pair()
    out = tmp_path / "run"
    c = coordinator(tmp_path, cfg, out, port)
    ws = [worker(tmp_path, port, name, hooks=hooks) for name, hooks in workers]
    try:
        rc = c.wait(timeout)
        assert rc == 0, c.text()[-3000:]
        for w in ws:
            assert w.wait(30) == 0, w.text()[-2000:]
    finally:
        for p in (c, *ws):
            p.kill()
    return out, ws


# NaN semantics are tested with verification off: with it on (the default), a device that returns
# NaN where others return numbers is a liar, quarantined like one (tests/test_liars.py).

def test_a_worker_returning_nan_never_stalls_the_run(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 6}, pool={"verify": "off"})
    # The honest worker is slowed down so that it cannot finish the run before the other has joined.
    out, _ = _run(tmp_path, cfg, [("honest", ("--slowdown", 6)), ("nan", ("--fitness", "nan"))])
    rows = [r for r in metrics(out) if r.get("train_loss") is not None]
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert sum(r.get("nonfinite", 0) for r in rows) > 0, rows
    # The train loss is the mean over the finite members; only an iteration without one has none.
    assert all(math.isfinite(r["train_loss"]) or r["nonfinite"] == 8 for r in rows), rows
    pool = json.loads((out / "pool.json").read_text())
    assert pool["counters"]["nonfinite"] > 0 and pool["counters"]["resyncs"] == 0


def test_a_pool_that_only_returns_nan_still_finishes_with_no_step(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 3}, pool={"verify": "off"})
    out, _ = _run(tmp_path, cfg, [("nan", ("--fitness", "nan"))])
    rows = [r for r in metrics(out) if r.get("train_loss") is not None]
    assert len(rows) == 3 and all(r["nonfinite"] == 8 for r in rows), rows  # every member, every iteration
    records = [json.loads(line) for line in (out / "commits.jsonl").read_text().splitlines()]
    assert all(set(r["weights"]) == {0} for r in records)


def test_a_failing_evaluation_goes_back_to_the_pool_and_its_worker_carries_on(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 5})
    ref = reference_hash(tmp_path, cfg)
    out, (honest, failing) = _run(tmp_path, cfg, [("honest", ()), ("oom", ("--fitness", "fail"))])
    assert final_hash(out) == ref  # no result of the failing device was used
    assert "evaluation failed (RuntimeError: CUDA out of memory" in failing.text()
    assert "run over at iteration 5" in failing.text()
    pool = json.loads((out / "pool.json").read_text())
    assert pool["counters"]["errors"] > 0
