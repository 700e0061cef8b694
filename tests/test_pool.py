"""The pool over loopback TCP: real coordinator and worker processes, no mocked sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from pooltools import (cli, coordinator, final_hash, free_port_pair, last_iteration, metrics, reference_hash,
                       wait_until, worker, write_config)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("poolcfg")
    cfg = write_config(tmp / "pool.yaml")
    return cfg, reference_hash(tmp, cfg)


def _start(tmp_path, cfg):
    """A coordinator for ``cfg`` on a fresh port pair: (port, run directory, process)."""
    port = free_port_pair()
    out = tmp_path / "run"
    return port, out, coordinator(tmp_path, cfg, out, port)


def _finish(coord, workers, timeout=240):
    procs = [coord, *workers]
    try:
        rc = coord.wait(timeout)
        assert rc == 0, coord.text()[-3000:]
        for w in workers:
            w_rc = w.wait(30)
            assert w_rc == 0, w.text()[-2000:]
    finally:
        for p in procs:
            p.kill()


def test_replicas_with_different_threads_and_dtypes_agree_after_every_iteration(tmp_path, pool_cfg):
    cfg, _ = pool_cfg
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 10})
    port, out, c = _start(tmp_path, cfg)
    ws = [worker(tmp_path, port, "w1", threads=1, dtype="fp32"),
          worker(tmp_path, port, "w2", threads=2, dtype="bf16"),
          worker(tmp_path, port, "w3", threads=1, dtype="bf16")]
    _finish(c, ws)
    pool = json.loads((out / "pool.json").read_text())
    assert len(pool["workers"]) == 3
    for w in pool["workers"]:
        # From the state it synced to, one verified STATE per iteration up to the last; no
        # disagreement, ever.
        assert w["mismatches"] == 0, pool
        assert 0 <= w["verified_from"] < 10, pool
        assert w["verified_last"] == 10 and w["verify_gaps"] == 0, pool
        assert w["verified"] == 10 - w["verified_from"] + 1, pool
    assert pool["counters"]["resyncs"] == 0
    replay = subprocess.run(cli("replay", "--run", out), capture_output=True, text=True, timeout=120)
    assert replay.returncode == 0, replay.stderr
    assert f"state hash {final_hash(out)}" in replay.stdout
    assert pool["state_hash"] == final_hash(out)


def test_worker_sigkilled_mid_iteration_changes_nothing(tmp_path, pool_cfg):
    cfg, ref = pool_cfg
    port, out, c = _start(tmp_path, cfg)
    a = worker(tmp_path, port, "a", hooks=("--slowdown", 3))
    b = worker(tmp_path, port, "b", hooks=("--slowdown", 3))
    wait_until(lambda: last_iteration(out) >= 3, 120, "iteration 3", [c, a, b])
    b.signal(signal.SIGKILL)
    _finish(c, [a])
    assert final_hash(out) == ref


def test_worker_frozen_past_its_lease_then_resumed_changes_nothing(tmp_path, pool_cfg):
    cfg, ref = pool_cfg
    port, out, c = _start(tmp_path, cfg)
    # Slow enough that the run is still going when b wakes up (a alone must not finish it).
    a = worker(tmp_path, port, "a", hooks=("--slowdown", 25))
    b = worker(tmp_path, port, "b", hooks=("--slowdown", 3))
    wait_until(lambda: last_iteration(out) >= 3, 120, "iteration 3", [c, a, b])
    b.signal(signal.SIGSTOP)
    time.sleep(6)  # past worker_timeout_s (3 s) and lease_s (4 s)
    b.signal(signal.SIGCONT)
    _finish(c, [a, b])
    assert final_hash(out) == ref
    pool = json.loads((out / "pool.json").read_text())
    assert pool["counters"]["dropped_workers"] >= 1


def test_worker_joining_at_iteration_5_syncs_and_changes_nothing(tmp_path, pool_cfg):
    cfg, ref = pool_cfg
    port, out, c = _start(tmp_path, cfg)
    a = worker(tmp_path, port, "a", hooks=("--slowdown", 20))  # leaves the late joiner iterations to work on
    wait_until(lambda: last_iteration(out) >= 5, 120, "iteration 5", [c, a])
    late = worker(tmp_path, port, "late")
    _finish(c, [a, late])
    assert final_hash(out) == ref
    assert "synced to iteration" in late.text()
    pool = json.loads((out / "pool.json").read_text())
    late_info = [w for w in pool["workers"] if w["name"] == "late"][0]
    assert late_info["units_done"] > 0 and late_info["mismatches"] == 0


def test_coordinator_sigkilled_and_resumed_ends_on_the_same_state(tmp_path, pool_cfg):
    cfg, ref = pool_cfg
    port, out, c = _start(tmp_path, cfg)
    a = worker(tmp_path, port, "a", hooks=("--slowdown", 2))
    b = worker(tmp_path, port, "b", hooks=("--slowdown", 2))
    wait_until(lambda: last_iteration(out) >= 6, 120, "iteration 6", [c, a, b])
    c.signal(signal.SIGKILL)
    c.wait(10)
    c2 = coordinator(tmp_path, cfg, out, port, "--resume", name="coordinator2")
    _finish(c2, [a, b])
    assert "resumed from" in c2.text()
    assert final_hash(out) == ref


def test_a_ten_times_slower_worker_does_not_stall_iterations(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 8}, pool={"lease_s": 60.0})

    def mean_iteration_seconds(tag, slow):
        port = free_port_pair()
        out = tmp_path / tag
        c = coordinator(tmp_path, cfg, out, port, name=f"coord-{tag}")
        ws = [worker(tmp_path, port, f"{tag}-fast1"), worker(tmp_path, port, f"{tag}-fast2")]
        if slow:
            ws.append(worker(tmp_path, port, f"{tag}-slow", hooks=("--slowdown", 10)))
        _finish(c, ws)
        secs = [r["seconds"] for r in metrics(out) if r.get("seconds")][2:]  # skip joins
        return sum(secs) / len(secs)

    fast = mean_iteration_seconds("fast", slow=False)
    mixed = mean_iteration_seconds("mixed", slow=True)
    # Were the slow worker waited for, each iteration would take ~10× a unit's time on it.
    assert mixed < 2.5 * fast, (fast, mixed)


def test_workers_sharing_one_cache_directory_both_sync(tmp_path):
    """Two workers on one machine with one cache fetch the same checkpoint files at the same time."""
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 3}, model={"preset": "small"})
    port, out, c = _start(tmp_path, cfg)
    shared = tmp_path / "shared-cache"
    ws = [worker(tmp_path, port, name, "--cache", shared) for name in ("s1", "s2")]
    _finish(c, ws)
    pool = json.loads((out / "pool.json").read_text())
    assert sorted(w["name"] for w in pool["workers"]) == ["s1", "s2"], pool
    assert not list(shared.rglob("*.part-*")), "no part files left behind"
