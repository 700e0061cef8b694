"""Clean endings, with real processes: `train` killed by SIGKILL takes its workers with it, a worker
that cannot reach any coordinator gives up with one line, and a worker that comes back after the run
ended hears so and exits 0."""

from __future__ import annotations

import signal
import time

import pytest

from pooltools import (Proc, alive, children, cli, coordinator, free_port_pair, metrics, wait_until, worker,
                       write_config)

pytestmark = pytest.mark.slow


def test_train_killed_by_sigkill_leaves_no_process_behind(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 500})
    out = tmp_path / "run"
    train = Proc(cli("train", "--config", cfg, "--out", out, "--workers", "2", "--threads", "1"), tmp_path / "train.log")
    try:
        wait_until(lambda: any(r.get("train_loss") is not None for r in metrics(out)), 240, "training to start",
                   [train])
        kids = children(train.p.pid)
        workers = [k for k in kids if b"worker" in _cmdline(k)]
        assert len(workers) == 2, [_cmdline(k) for k in kids]
        train.p.send_signal(signal.SIGKILL)
        train.p.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.1)
        left = [(k, _cmdline(k)) for k in kids if alive(k)]
        assert not left, f"left behind: {left}"
    finally:
        for k in children(train.p.pid):
            _kill(k)
        train.kill()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ")
    except OSError:
        return b""


def _kill(pid: int) -> None:
    import os

    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def test_a_worker_that_reaches_no_coordinator_gives_up_with_one_line(tmp_path):
    port = free_port_pair()  # nothing listens there
    w = worker(tmp_path, port, "lonely", "--give-up-after", 5)
    t0 = time.monotonic()
    rc = w.wait(60)
    took = time.monotonic() - t0
    text = w.text()
    assert rc != 0, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no coordinator answered at tcp://127.0.0.1:{port} for 5 s; giving up "
                      "(--give-up-after)"], text
    assert "Traceback" not in text
    assert took < 40, took  # 5 s of trying, plus start-up (import, self-test)


def test_a_worker_back_after_the_run_ended_hears_so_and_exits_0(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 30},
                       pool={"heartbeat_s": 0.5, "worker_timeout_s": 2.0, "lease_s": 2.0})
    port, out = free_port_pair(), tmp_path / "run"
    c = coordinator(tmp_path, cfg, out, port, "--linger", 45)
    ws = [worker(tmp_path, port, "steady"), worker(tmp_path, port, "paused")]
    steady, paused = ws
    try:
        wait_until(lambda: "worker paused joined" in c.text() and "synced" in paused.text(), 180,
                   "the worker to join", [c, *ws])
        paused.signal(signal.SIGSTOP)  # a laptop closed, a partition: silent, not gone
        wait_until(lambda: "worker paused silent" in c.text(), 60, "the coordinator to drop it", [c, *ws])
        assert steady.wait(240) == 0, steady.text()[-2000:]
        wait_until(lambda: "telling returning workers so" in c.text(), 30, "the coordinator to linger", [c])
        assert c.p.poll() is None  # still there for the missing worker
        paused.signal(signal.SIGCONT)
        assert paused.wait(60) == 0, paused.text()[-2000:]
        assert "run over at iteration 30" in paused.text()
        assert c.wait(90) == 0, c.text()[-2000:]  # it stops lingering by --linger at the latest
    finally:
        for p in (c, *ws):
            p.signal(signal.SIGCONT) if p.p.poll() is None else None
            p.kill()
