"""``ea4llm-pool coordinator``: owns the run and hands out work to whoever is in the pool.

The coordinator only schedules. Its process holds no model; one explicit poller loop serves the
control socket (registration, leases, results, commits, heartbeats) and the keeper's pipe:

1. plan iteration t: members (seed, sign), the shared data subset, α_t, σ_t — pure functions of
   (run seed, t), so a resumed run hands out the same work;
2. lease units (member × data shard) to workers; the ledger (``ledger.py``, socket-free) decides
   sizes, expiry, backups and the quorum, this module carries its decisions out;
3. on a quorum of complete antithetic pairs: shape, append the COMMIT to the log (fsync), hand it
   to the keeper, announce it to every worker — all in microseconds, whatever the model's size;
4. the keeper (``keeper.py``, its own process) applies the commit to the reference replica and
   reports the state hash; workers' hash reports are checked against it as soon as it is known
   (a lag of an iteration or two), and a worker that disagrees is resynced.

Held-out evaluation, checkpoints and the bulk channel (checkpoint files and log records for joining
workers) are the keeper's work, never this loop's.
"""

from __future__ import annotations

import gc
import json
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import zmq

from . import UserError, protocol as P
from .config import Config, load as load_config
from .es.commit import close_iteration
from .keeper import KeeperHandle, bind_retrying
from .ledger import IterationLedger, WorkCost
from .plan import plan_iteration
from .runlog import CommitLog

LOG_NAME = "commits.jsonl"
IDLE_POLL_MS = 50
"""Longest sleep of the loop with nothing to read: expiry and backup scans run at this rate, and
an idle loop costs its process well under 1% of a core."""
KEEP_BEHIND = 8
"""A worker whose verified state is at most this many commits old keeps it and replays the rest."""


@dataclass
class Peer:
    """What the shell knows of a registered worker beyond scheduling (that is the ledger's)."""
    wid: str
    ident: bytes
    name: str
    device: str
    dtype: str
    threads: int
    joined: float
    last_seen: float
    step: int = -1
    state_hash: str = ""


def check_bind(bind: str) -> None:
    """Fail early, with one line, if the control address (or its bulk port + 1) cannot be bound."""
    ctx = zmq.Context.instance()
    socks = []
    try:
        for addr in _bind_pair(bind):
            s = ctx.socket(zmq.ROUTER)
            socks.append(s)
            try:
                s.bind(addr)
            except zmq.ZMQError as err:
                raise _bind_error(addr, err) from None
    finally:
        for s in socks:
            s.close(linger=0)


def _bind_error(addr: str, err: zmq.ZMQError) -> UserError:
    hint = " (is another coordinator running there?)" if err.errno == zmq.EADDRINUSE else ""
    return UserError(f"coordinator cannot bind {addr}: {err.strerror}{hint}")


def _bind_pair(bind: str) -> list[str]:
    host, port = bind.rsplit(":", 1) if ":" in bind.split("//", 1)[-1] else (bind, "")
    if port in ("0", "*", ""):
        return [bind]
    if not port.isdigit():
        raise UserError(f"'{bind}' is not a bind address (use tcp://HOST:PORT, e.g. tcp://*:5555)")
    return [bind, f"{host}:{int(port) + 1}"]


class Coordinator:
    def __init__(self, cfg: Optional[Config], out: str | Path, bind: str, *, resume: bool = False,
                 iterations: Optional[int] = None, shards: int = 1, device: str = "cpu", threads: int = 1,
                 say: Callable[[str], None] = print, progress=None, banner_workers: str = "pool"):
        self.out = Path(out)
        self.say = say
        self.progress = progress
        self.shards = shards
        self.ctx = zmq.Context.instance()
        self.log = self._open_log(cfg, resume)
        host, bind_port = bind.rsplit(":", 1)
        bulk_bind = f"{host}:0" if bind_port in ("0", "*") else f"{host}:{int(bind_port) + 1}"
        self.ctrl = None
        self.keeper = KeeperHandle({
            "config_yaml": None if resume else cfg.to_yaml(), "out": str(self.out), "resume": resume,
            "iterations": iterations, "device": device, "threads": threads, "bulk_bind": bulk_bind,
            "banner_workers": banner_workers})
        try:
            ready = self._wait_for("ready")
            # Workers are let in only now: a HELLO queued while the run was being built would go
            # unanswered for long enough that its worker registers again under a new identity.
            self.ctrl = self.ctx.socket(zmq.ROUTER)
            self.ctrl.setsockopt(zmq.ROUTER_MANDATORY, 1)
            P.configure_socket_limits(self.ctrl)
            try:
                bind_retrying(self.ctrl, bind)
            except zmq.ZMQError as err:
                raise _bind_error(bind, err) from None
        except BaseException:
            self.close()
            raise
        self.endpoint = self.ctrl.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.cfg = load_config(self.out / "config.yaml")
        if iterations is not None:
            self.cfg.run.iterations = iterations
        self.pool = self.cfg.pool
        self.step = int(ready["step"])
        last = self.log.last()
        if last is not None and last["iteration"] + 1 != self.step:
            self.close()
            raise UserError(f"{self.out / LOG_NAME} ends at iteration {last['iteration']} but the run's state is at "
                            f"step {self.step}")
        self.n_train = int(ready["n_train"])
        self.params = int(ready["params"])
        self.bulk_port = int(ready["bulk_port"])
        self.banner = ready["banner"]
        self.config_yaml = ready["config_yaml"]
        self.config_hash = self.cfg.config_hash()
        self.run_id = f"{self.config_hash}-{uuid.uuid5(uuid.NAMESPACE_URL, str(self.out.resolve())).hex[:8]}"
        self.reference: dict[int, str] = {int(k): v for k, v in ready["known"].items()}
        self.newest_ref = max(self.reference.items()) if self.reference else None
        from .es.selftest import known_answers

        self.selftest_ref = known_answers()
        es = self.cfg.es
        self.ledger = IterationLedger(
            quorum=self.pool.quorum, shards=shards, lease_floor_s=self.pool.lease_s,
            worker_timeout_s=self.pool.worker_timeout_s, samples_per_iteration=es.samples_per_iteration,
            cost=WorkCost.for_run(self.cfg, self.params),
            lease_prefix=uuid.uuid4().hex[:6])
        for step, h in self.reference.items():
            self.ledger.reference(step, h)
        self.peers: dict[str, Peer] = {}
        self.by_ident: dict[bytes, str] = {}
        self.departed: list[dict] = []
        self.counters = {"rejected": 0, "resyncs": 0}  # the shell's own; the ledger counts the rest
        self.plan = None
        self.started = time.monotonic()
        self.commits_done = 0
        self.final: Optional[dict] = None

    # -- set-up ------------------------------------------------------------------------------------
    def _open_log(self, cfg: Optional[Config], resume: bool) -> CommitLog:
        path = self.out / LOG_NAME
        if resume:
            if not (self.out / "config.yaml").is_file():
                raise UserError(f"--resume: {self.out} holds no run (no config.yaml)")
        elif (path.exists() and path.stat().st_size) or (self.out / "checkpoints").exists():
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it, or choose another --out")
        return CommitLog(path)

    def _wait_for(self, kind: str) -> dict:
        """Keeper messages until one of ``kind`` (start-up and shutdown; the control socket is
        served meanwhile once the loop runs)."""
        while True:
            if hasattr(self, "ledger"):
                self._poll(50)
                msg = self._pending_keeper.pop(kind, None)
                if msg is not None:
                    return msg
                continue
            msg = self.keeper.recv(0.2)
            if msg is None:
                continue
            if msg["kind"] == kind:
                return msg
            self._on_keeper(msg)

    def join_command(self) -> str:
        host = self.endpoint.split("//", 1)[1].rsplit(":", 1)[0]
        if host in ("0.0.0.0", "*", "[::]", "::"):
            host = socket.gethostname()
        return f"ea4llm-pool worker --connect tcp://{host}:{self.port} --device cpu"

    # -- sending -----------------------------------------------------------------------------------
    def _send(self, ident: bytes, msg_type: str, **fields) -> bool:
        return self._send_frame(ident, P.encode(msg_type, **fields))

    def _send_frame(self, ident: bytes, frame: bytes) -> bool:
        try:
            self.ctrl.send_multipart([ident, frame], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: the peer is gone; EAGAIN: it is not reading
            return False

    def _send_leases(self, leases) -> None:
        for lease in leases:
            peer = self.peers.get(lease.wid)
            ok = peer is not None and self._send(
                peer.ident, P.LEASE, lease_id=lease.lease_id, iteration=lease.iteration, alpha=lease.alpha,
                sigma=lease.sigma, units=lease.units, expires_s=lease.expires_s)
            if not ok:
                self.ledger.unsent(lease.lease_id)
                if peer is not None:
                    self._forget(peer, "is unreachable", count=True)

    # -- control messages --------------------------------------------------------------------------
    def _on_control(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = P.decode(frame)
        except P.VersionMismatch as err:
            self.counters["rejected"] += 1
            self._send(ident, P.REJECT, reason=str(err))
            return
        except P.ProtocolError as err:
            self._send(ident, P.ERROR, code="bad_request", reason=str(err)[:500])
            return
        t = msg.type
        if t == P.HELLO:
            return self._on_hello(ident, msg)
        if t == P.STATUS_REQ:
            self._send(ident, P.STATUS, snapshot=self.snapshot())
            return
        wid = self.by_ident.get(ident)
        peer = self.peers.get(wid) if wid else None
        if peer is None:
            if t != P.BYE:
                self._send(ident, P.ERROR, code="unknown_worker", reason="register again with HELLO")
            return
        peer.last_seen = time.monotonic()
        self.ledger.heard(wid)
        if t == P.PING:
            if msg.get("throughput"):
                self.ledger.note_throughput(wid, float(msg.throughput))
            if msg.get("update_s"):
                self.ledger.note_update_s(wid, float(msg.update_s))
            self._send(ident, P.PONG, iteration=self.step)
        elif t == P.RESULT:
            self._on_result(peer, msg)
        elif t == P.STATE:
            self._on_state(peer, msg.iteration, msg.state_hash)
        elif t == P.BYE:
            self._forget(peer, f"left ({msg.reason})", count=False)

    def _on_hello(self, ident: bytes, msg) -> None:
        reason = None
        if msg.config_hash and msg.config_hash != self.config_hash:
            reason = (f"config mismatch: worker has config {msg.config_hash}, this run is {self.config_hash}"
                      " (start the worker without --config, or with the run's config)")
        else:
            bad = sorted(k for k, v in self.selftest_ref.items() if msg.selftest.get(k) != v)
            if bad:
                reason = (f"{msg.device} failed the start-up self-test ({', '.join(bad)} differ from the known "
                          "answers), so it cannot reproduce the run bit for bit")
        if reason:
            self.counters["rejected"] += 1
            self.say(f"coordinator: rejected {msg.worker_name}: {reason}")
            self._send(ident, P.REJECT, reason=reason)
            return
        old = self.by_ident.get(ident)
        if old in self.peers:
            self._forget(self.peers[old], "registered again", count=False)
        wid = uuid.uuid4().hex[:8]
        now = time.monotonic()
        peer = Peer(wid, ident, msg.worker_name, msg.device, msg.dtype, msg.threads, now, now)
        self.peers[wid] = peer
        self.by_ident[ident] = wid
        self.ledger.join(wid, float(msg.throughput))
        s = msg.state_iteration
        keep = bool(0 <= s <= self.step and msg.state_hash and self.ledger.reference_hash(s) == msg.state_hash
                    and self.step - s <= KEEP_BEHIND)
        self._send(ident, P.WELCOME, worker_id=wid, run_id=self.run_id, config_yaml=self.config_yaml,
                   heartbeat_s=self.pool.heartbeat_s, bulk_port=self.bulk_port, keep_state=keep,
                   model_params=self.params)
        self.say(f"coordinator: worker {msg.worker_name} joined ({msg.device}, {msg.dtype}, {msg.threads} threads)"
                 f"{', keeps its state' if keep else ''}")

    def _on_state(self, peer: Peer, step: int, h: str) -> str:
        peer.step, peer.state_hash = step, h
        if h == "resync" or step < 0:
            self.ledger.set_ready(peer.wid, False)
            return "mismatch"
        verdict = self.ledger.report_state(peer.wid, step, h)
        if verdict == "mismatch":
            self._resync(peer, step)
        else:  # "ok", or "pending" until the reference replica reaches that step
            self.ledger.set_ready(peer.wid, True)
        return verdict

    def _resync(self, peer: Peer, step: int) -> None:
        self.counters["resyncs"] += 1
        self.ledger.set_ready(peer.wid, False)
        self.say(f"coordinator: worker {peer.name} state hash at step {step} disagrees; resyncing it")
        self._send(peer.ident, P.RESYNC, reason=f"state hash after {step} commits disagrees with the reference")

    def _on_result(self, peer: Peer, msg) -> None:
        if msg.get("state_hash") is not None and msg.get("state_iteration") is not None:
            if self._on_state(peer, msg.state_iteration, msg.state_hash) == "mismatch":
                return  # resynced; its result is not used
        if msg.get("update_s"):
            self.ledger.note_update_s(peer.wid, float(msg.update_s))
        if msg.get("error"):
            self.say(f"coordinator: worker {peer.name} could not evaluate lease {msg.lease_id}: {msg.error}")
            self.ledger.on_error(peer.wid, msg.lease_id, msg.iteration, msg.error)
            return
        self.ledger.on_result(peer.wid, msg.lease_id, msg.iteration, list(msg.results), float(msg.eval_s))
        if msg.iteration == self.ledger.iteration:
            self.eval_s += float(msg.eval_s)

    def _forget(self, peer: Peer, why: str, count: bool) -> None:
        """Forget a worker (``count``: it was dropped, not a goodbye); its leases go back in the queue."""
        view = self.ledger.leave(peer.wid, dropped=count)
        if view is None:  # the ledger dropped it already (silent): its last view is in departed
            view = next((v for v in reversed(self.ledger.departed) if v["id"] == peer.wid), {})
        self.departed.append(self._worker_row(peer, view))
        self.peers.pop(peer.wid, None)
        if self.by_ident.get(peer.ident) == peer.wid:
            self.by_ident.pop(peer.ident, None)
        self.say(f"coordinator: worker {peer.name} {why}")

    # -- keeper messages ---------------------------------------------------------------------------
    def _on_keeper(self, msg: dict) -> None:
        kind = msg["kind"]
        if kind == "say":
            self.say(msg["text"])
        elif kind == "fatal":
            raise UserError(msg["message"])
        elif kind == "line":
            if self.progress is not None:
                self.progress(msg["line"])
        elif kind == "hash":
            step, h = int(msg["step"]), msg["state_hash"]
            self.reference[step] = h
            self.newest_ref = (step, h)
            for old in [k for k in self.reference if k < step - 64]:
                del self.reference[old]
            for wid, s, agrees in self.ledger.reference(step, h):
                peer = self.peers.get(wid)
                if peer is not None and not agrees:
                    self._resync(peer, s)
        else:
            self._pending_keeper[kind] = msg

    # -- iterations ----------------------------------------------------------------------------------
    def _open(self) -> None:
        self.plan = plan_iteration(self.cfg, self.n_train, self.step)
        self.ledger.open(self.plan)
        self.t_open = time.perf_counter()
        self.cpu_open = time.process_time()
        self.eval_s = 0.0

    def _close(self) -> None:
        plan = self.plan
        closing = self.ledger.close()
        record = close_iteration(self.cfg.es, plan.iteration, closing.members, closing.rewards, plan.alpha,
                                 plan.sigma, self.step)
        record["attest"] = ({"step": self.newest_ref[0], "state_hash": self.newest_ref[1]}
                            if self.newest_ref else None)
        record["subset_digest"] = plan.subset_digest
        counters = self._counters()
        record["stats"] = {"workers": len(self.peers), **counters}
        record = self.log.append(record)  # durable before anyone hears of it
        frame = P.encode(P.COMMIT, record=record)  # encoded once, sent to everyone
        for peer in list(self.peers.values()):
            if not self._send_frame(peer.ident, frame):
                self._forget(peer, "is unreachable", count=True)
        self.step += 1
        self.commits_done += 1
        seconds = time.perf_counter() - self.t_open
        extra = {"workers": len(self.peers), "coordinator_cpu_s": round(time.process_time() - self.cpu_open, 6),
                 "worker_eval_s": round(self.eval_s, 4)}
        upd = self.ledger.update_seconds()
        if upd:
            extra["worker_update_s"] = round(upd, 4)
        self.keeper.send("commit", record=record, seconds=seconds, tokens=closing.samples * self.cfg.data.seq_len,
                         extra=extra)
        self.plan = None
        if self.step < self.cfg.run.iterations:
            self._open()
            self._send_leases(self.ledger.dispatch())

    def _counters(self) -> dict:
        return {**self.ledger.counters, **self.counters}

    # -- status --------------------------------------------------------------------------------------
    def _worker_row(self, peer: Peer, view: Optional[dict] = None) -> dict:
        if view is None:
            view = self.ledger.worker_view(peer.wid)
        ref = self.ledger.reference_hash(peer.step)
        return {"id": peer.wid, "name": peer.name, "device": peer.device, "dtype": peer.dtype,
                "threads": peer.threads, "last_seen_s": time.monotonic() - peer.last_seen, "iteration": peer.step,
                "state_agrees": bool(ref is not None and ref == peer.state_hash), **view}

    def snapshot(self) -> dict:
        minutes = max(1e-9, (time.monotonic() - self.started) / 60)
        ref = self.newest_ref or (-1, "")
        return {"iteration": self.step, "iterations": self.cfg.run.iterations, "state_hash": ref[1],
                "state_step": ref[0], "iterations_per_minute": self.commits_done / minutes,
                "counters": self._counters(), "model_params": self.params,
                "workers": [self._worker_row(p) for p in self.peers.values()]}

    # -- the loop ------------------------------------------------------------------------------------
    def _poll(self, timeout_ms: int) -> None:
        events = dict(self._poller.poll(timeout_ms))
        if self.ctrl in events:
            ctrl = self.ctrl
            for _ in range(1000):  # drain what is queued, then look at the keeper and the clock again
                if not ctrl.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                parts = ctrl.recv_multipart(zmq.NOBLOCK)
                if len(parts) == 2:
                    self._on_control(parts[0], parts[1])
        if self.keeper.fileno() in events or not self.keeper.proc.is_alive():
            for _ in range(100):
                msg = self.keeper.recv(0)
                if msg is None:
                    break
                self._on_keeper(msg)

    def serve(self, stop: Optional[Callable[[], bool]] = None) -> int:
        # Start-up objects live for the whole run: keep the cyclic GC from walking them again and
        # again while messages churn.
        gc.collect()
        gc.freeze()
        self._pending_keeper: dict[str, dict] = {}
        self._poller = zmq.Poller()
        self._poller.register(self.ctrl, zmq.POLLIN)
        self._poller.register(self.keeper.fileno(), zmq.POLLIN)
        t_start = time.perf_counter()
        limit = self.cfg.run.max_minutes * 60
        try:
            while self.step < self.cfg.run.iterations:
                if stop is not None and stop():
                    break
                if limit and time.perf_counter() - t_start > limit:
                    self.say(f"coordinator: run.max_minutes reached at iteration {self.step}")
                    break
                if self.plan is None:
                    self._open()
                self._poll(IDLE_POLL_MS)
                for wid, why in self.ledger.expire():  # the ledger has dropped them already
                    peer = self.peers.get(wid)
                    if peer is not None:
                        self._forget(peer, why, count=False)
                if self.ledger.ready_to_close():
                    self._close()
                    continue
                self._send_leases(self.ledger.dispatch())
            self._end("run complete" if self.step >= self.cfg.run.iterations else "run stopped")
        finally:
            self.close()
        return 0

    def _end(self, reason: str) -> None:
        complete = self.step >= self.cfg.run.iterations
        self.keeper.send("finish", complete=complete)
        self.final = self._wait_for("finished")
        final_step, final = int(self.final["step"]), self.final["state_hash"]
        # Let the last commit's state reports arrive so the summary covers every iteration.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(
                p.step < final_step and self.ledger.is_ready(p.wid) for p in self.peers.values()):
            self._poll(20)
        summary = self.snapshot()
        summary["departed"] = self.departed
        (self.out / "pool.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        for peer in list(self.peers.values()):
            self._send(peer.ident, P.END, reason=reason, final_iteration=final_step, final_hash=final)
        deadline = time.monotonic() + 3.0
        while self.peers and time.monotonic() < deadline:
            self._poll(50)

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.keeper.close()
        if self.ctrl is not None:
            self.ctrl.close(linger=500)
        self.log.close()
