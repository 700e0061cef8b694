"""Bad input at the pool's edges, with real processes over loopback TCP: one clear line, no traceback."""

from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest

from pooltools import cli, coordinator, free_port_pair, wait_until, worker, write_config

pytestmark = pytest.mark.slow


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def live_pool(tmp_path_factory):
    """A coordinator waiting for workers (none join, so it stays at iteration 0)."""
    tmp = tmp_path_factory.mktemp("live")
    cfg = write_config(tmp / "pool.yaml", run={"iterations": 3})
    port = free_port_pair()
    c = coordinator(tmp, cfg, tmp / "run", port)
    wait_until(lambda: "listening on" in c.text(), 120, "the coordinator to listen", [c])
    yield tmp, cfg, port, c
    c.kill()


def test_worker_with_another_protocol_version_is_rejected_with_a_reason(live_pool):
    tmp, _, port, c = live_pool
    w = worker(tmp, port, "oldversion", hooks=("--protocol-version", 99))
    rc = w.wait(120)
    text = w.text()
    assert rc != 0, text
    assert "rejected by the coordinator" in text and "protocol version mismatch" in text, text
    assert "v99" in text
    _no_traceback(text)


def test_worker_with_another_config_is_rejected_with_a_reason(live_pool):
    tmp, _, port, c = live_pool
    other = write_config(tmp / "other.yaml", run={"iterations": 3}, es={"sigma": 0.02})
    w = worker(tmp, port, "otherconfig", "--config", other)
    rc = w.wait(120)
    text = w.text()
    assert rc != 0, text
    assert "rejected by the coordinator: config mismatch" in text, text
    _no_traceback(text)
    assert "rejected otherconfig: config mismatch" in c.text()


def test_status_shows_iteration_counters_and_rejections(live_pool):
    tmp, _, port, c = live_pool
    res = subprocess.run(cli("status", "--connect", f"tcp://127.0.0.1:{port}", "--json"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    assert snap["iteration"] == 0 and snap["iterations"] == 3
    assert {"stale", "reissued", "rejected", "resyncs"} <= set(snap["counters"])
    res = subprocess.run(cli("status", "--connect", f"tcp://127.0.0.1:{port}"), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("iteration 0/3"), res.stdout


def test_worker_pointed_at_a_dead_address_says_so_and_backs_off(tmp_path):
    port = free_port_pair()  # nothing listens there
    w = worker(tmp_path, port, "lonely")
    try:
        wait_until(lambda: len(re.findall(r"retrying in", w.text())) >= 3, 90, "three retries", [w])
        assert w.p.poll() is None, "the worker must keep retrying"
    finally:
        w.kill()
    text = w.text()
    _no_traceback(text)
    assert f"no answer from tcp://127.0.0.1:{port}" in text
    waits = [float(x) for x in re.findall(r"retrying in ([0-9.]+) s", text)]
    assert waits[2] > waits[0], waits  # backs off (1 s, 2 s, 4 s, ... with jitter)


@pytest.mark.parametrize("args, message", [
    (["status", "--connect", "not-an-address"], "is not a coordinator address"),
    (["worker", "--connect", "tcp://127.0.0.1"], "is not a coordinator address"),
])
def test_malformed_addresses_get_one_line(args, message):
    res = subprocess.run(cli(*args), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    _no_traceback(res.stderr + res.stdout)


def test_status_of_a_dead_address_says_nobody_answered():
    port = free_port_pair()
    res = subprocess.run(cli("status", "--connect", f"tcp://127.0.0.1:{port}", "--timeout", "1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "no answer from" in res.stderr, res.stderr


def test_coordinator_whose_port_is_taken_says_so(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(cli("coordinator", "--config", cfg, "--out", tmp_path / "run",
                                 "--bind", f"tcp://127.0.0.1:{port}"), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines and f"cannot bind tcp://127.0.0.1:{port}" in lines[0] and "in use" in lines[0], res.stderr
    _no_traceback(res.stderr + res.stdout)
    assert not (tmp_path / "run").exists(), "a failed start must not leave a half-made run behind"
