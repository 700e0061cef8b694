"""Helpers for tests that run real coordinator and worker processes over loopback TCP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

POOL_CONFIG = {
    "run": {"seed": 3, "iterations": 12, "checkpoint_every": 4, "eval_every": 4, "eval_samples": 8},
    "data": {"seq_len": 32},
    # Antithetic pairs with rank shaping and Adam: the pool's units are pairs, and the liar tests bias
    # one sign of each pair.
    "es": {"population": 8, "samples_per_iteration": 16, "micro_batch": 16, "antithetic": True, "shaping": "rank",
           "optimizer": "adam", "alpha": 0.003},
    "runtime": {"threads": 1},
    "pool": {"heartbeat_s": 0.5, "worker_timeout_s": 3.0, "lease_s": 4.0},
}


def free_port_pair() -> int:
    """A port p such that p and p+1 (the bulk channel) are both free right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair")


def write_config(path: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(POOL_CONFIG))
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ea4llm_pool", *map(str, args)]


class Proc:
    def __init__(self, args, log: Path, env=None):
        self.log = log
        self.fh = open(log, "ab")
        e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.p = subprocess.Popen(args, stdout=self.fh, stderr=subprocess.STDOUT, env=e)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout=timeout)
        finally:
            self.fh.flush()

    def signal(self, sig) -> None:
        self.p.send_signal(sig)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.kill()
            self.p.wait()
        self.fh.close()


def coordinator(tmp: Path, cfg: Path, out: Path, port: int, *extra, name="coordinator") -> Proc:
    return Proc(cli("coordinator", "--config", cfg, "--out", out, "--bind", f"tcp://127.0.0.1:{port}", *extra),
                tmp / f"{name}.log")


def worker(tmp: Path, port: int, name: str, *extra, threads=1, dtype="fp32", hooks=()) -> Proc:
    """An ``ea4llm-pool worker`` process; ``hooks`` (options of tests/hooked_worker.py, e.g.
    ("--slowdown", 3)) run it with one part replaced."""
    args = ["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--dtype", dtype,
            "--threads", threads, "--name", name, "--cache", tmp / f"cache-{name}", *extra]
    if hooks:
        wrapper = Path(__file__).with_name("hooked_worker.py")
        cmd = [sys.executable, str(wrapper), *map(str, hooks), "--", *map(str, args[1:])]
        return Proc(cmd, tmp / f"{name}.log")
    return Proc(cli(*args), tmp / f"{name}.log")


def metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def last_iteration(out: Path) -> int:
    m = [r["iteration"] for r in metrics(out) if r.get("train_loss") is not None]
    return max(m) if m else 0


def wait_until(pred, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    logs = "\n".join(f"--- {p.log.name}\n{p.text()[-1500:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def final_hash(out: Path) -> str:
    rows = [r for r in metrics(out) if r.get("train_loss") is not None]
    return rows[-1]["state_hash"]


def reference_hash(tmp: Path, cfg: Path) -> str:
    """The same run without faults: evaluated in-process on one thread (same bits as CPU fp32 workers)."""
    out = tmp / "reference"
    subprocess.run(cli("train", "--config", cfg, "--out", out, "--workers", "0", "--threads", "1"),
                   check=True, capture_output=True, timeout=600)
    return final_hash(out)


# -- processes and keys (security and ending tests) ----------------------------------------------------
def children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def status(port: int, *extra, timeout: float = 30) -> dict:
    """``ea4llm-pool status --json`` of the coordinator on ``port``."""
    res = subprocess.run(cli("status", "--connect", f"tcp://127.0.0.1:{port}", "--json", "--timeout", "10", *extra),
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"status failed: {res.stderr}")
    return json.loads(res.stdout)


def invite(keys: Path, name: str, port: int) -> Path:
    """An invite for worker ``name`` (admitted in ``keys``) for a coordinator on loopback ``port``."""
    from ea4llm_pool.auth import write_invite

    return write_invite(keys, name, f"tcp://127.0.0.1:{port}")
