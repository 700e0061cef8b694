"""``ea4llm-pool coordinator``: owns the run and hands out work to whoever is in the pool.

One explicit poller loop over two ROUTER sockets — control (registration, leases, results,
commits, heartbeats) and bulk (checkpoint files and log records, so bulk bytes never delay a
heartbeat). Each iteration:

1. plan: members (seed, sign), the shared data subset, α_t, σ_t — pure functions of (run seed, t);
2. lease units (member × data shard) to synced workers, sized by their measured throughput;
   when the queue runs dry, idle workers get backup copies of units still out (first result wins),
   so a slow or frozen worker never holds the iteration;
3. close on a quorum of complete antithetic pairs (never on particular workers): shape, write the
   COMMIT to the log and fsync, apply it to the coordinator's own replica, *then* announce it;
4. check every worker's reported state hash against the log; a worker that disagrees is resynced.

Stale results (another iteration) and duplicates (a unit already done) are dropped and counted.
"""

from __future__ import annotations

import gc
import json
import math
import random
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import zmq

from . import UserError, protocol as P
from .run import Plan, Run
from .sync import FileServer
from .worker import noise_digest

TARGET_LEASE_S = 0.5      # aim for leases that take about this long on the worker
MAX_COPIES = 2            # a unit is out on at most this many workers at once
EXPIRE_SCAN_S = 0.1       # how often leases and silent workers are checked for expiry
MIN_BACKUP_AFTER_S = 0.05  # a unit is never backed up sooner than this after it was leased
TAIL_SCAN_S = 0.05        # how often idle workers are matched with backup copies at an iteration's tail


@dataclass
class WorkerInfo:
    wid: str
    ident: bytes
    name: str
    device: str
    dtype: str
    threads: int
    throughput: float
    joined: float
    last_seen: float
    step: int = -1
    state_hash: str = ""
    synced: bool = False
    leases: set = field(default_factory=set)
    units_done: int = 0
    mismatches: int = 0
    verified: int = 0        # iterations whose STATE matched the log
    verified_from: int = -1  # the first of them
    verified_last: int = -1  # the latest of them
    verify_gaps: int = 0     # iterations skipped between two matching STATEs (a missed check)


@dataclass
class Lease:
    lease_id: str
    wid: str
    iteration: int
    units: list
    deadline: float
    issued: float


def _split(indices: list[int], shards: int) -> list[list[int]]:
    n = len(indices)
    shards = max(1, min(shards, n))
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    return [indices[bounds[i]: bounds[i + 1]] for i in range(shards)]


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
    def __init__(self, run: Run, bind: str, say: Callable[[str], None] = print, progress=None,
                 shards: int = 1):
        self.run = run
        self.cfg = run.cfg
        self.pool = run.cfg.pool
        self.say = say
        self.progress = progress
        self.shards = shards
        self.ctx = zmq.Context.instance()
        self.ctrl = self.ctx.socket(zmq.ROUTER)
        self.ctrl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        P.configure_socket_limits(self.ctrl)
        self.bulk = self.ctx.socket(zmq.ROUTER)
        P.configure_socket_limits(self.bulk)
        try:
            self.ctrl.bind(bind)
        except zmq.ZMQError as err:
            self.ctrl.close(linger=0)
            raise _bind_error(bind, err) from None
        self.endpoint = self.ctrl.getsockopt(zmq.LAST_ENDPOINT).decode()
        port = int(self.endpoint.rsplit(":", 1)[1])
        host = bind.rsplit(":", 1)[0]
        bind_port = bind.rsplit(":", 1)[1]
        try:
            if bind_port not in ("0", "*"):
                self.bulk.bind(f"{host}:{port + 1}")
            else:
                self.bulk.bind(f"{host}:0")
        except zmq.ZMQError as err:
            raise UserError(f"coordinator cannot bind its bulk channel next to {bind}: {err.strerror}") from None
        self.port = port
        self.bulk_port = int(self.bulk.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        self.files = FileServer()
        self.run_id = f"{run.cfg.config_hash()}-{uuid.uuid5(uuid.NAMESPACE_URL, str(run.out.resolve())).hex[:8]}"
        self.expected_digest = noise_digest("cpu")
        self.workers: dict[str, WorkerInfo] = {}
        self.by_ident: dict[bytes, str] = {}
        self.hash_at: dict[int, str] = {}
        self.counters = {"stale": 0, "duplicate": 0, "reissued": 0, "backups": 0, "resyncs": 0,
                         "rejected": 0, "dropped_workers": 0}
        self.leases: dict[str, Lease] = {}
        self.departed: list[WorkerInfo] = []
        self.plan: Optional[Plan] = None
        self.started = time.monotonic()
        self.commits_done = 0
        self._last_tail_scan = 0.0
        self._lease_prefix = uuid.uuid4().hex[:6]  # lease ids differ between coordinator restarts
        self._lease_seq = 0
        self._last_expire_scan = 0.0
        self._offer_latest()
        self._load_hashes()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _load_hashes(self) -> None:
        from .checkpoint import list_checkpoints, read_meta

        for step, d in list_checkpoints(self.run.out):
            self.hash_at[step] = read_meta(d)["state_hash"]
        for rec in self.run.log.records(0):
            self.hash_at[rec["iteration"] + 1] = rec["state_hash"]

    def _offer_latest(self) -> None:
        ckpt, extra = self.run.files_for_sync()
        names = []
        for f in sorted(ckpt.iterdir()):
            if f.is_file():
                name = f"{ckpt.name}/{f.name}"
                self.files.offer(name, f)
                names.append(name)
        for f in extra:
            name = f"data/{f.name}"
            self.files.offer(name, f)
            names.append(name)
        self.sync_step = int(ckpt.name[5:])
        self.sync_names = names

    def _sync_map(self, step: Optional[int] = None) -> dict:
        if step is not None:
            return {"checkpoint_iteration": step, "files": [], "log_from": step}
        return {"checkpoint_iteration": self.sync_step, "files": self.files.listing(self.sync_names),
                "log_from": self.sync_step}

    def join_command(self) -> str:
        host = self.endpoint.split("//", 1)[1].rsplit(":", 1)[0]
        if host in ("0.0.0.0", "*", "[::]", "::"):
            host = socket.gethostname()
        return f"ea4llm-pool worker --connect tcp://{host}:{self.port} --device cpu"

    def _send(self, ident: bytes, msg_type: str, **fields) -> bool:
        return self._send_frame(ident, P.encode(msg_type, **fields))

    def _send_frame(self, ident: bytes, frame: bytes) -> bool:
        try:
            self.ctrl.send_multipart([ident, frame])
            return True
        except zmq.ZMQError:  # EHOSTUNREACH: the peer is gone
            return False

    # -- messages ----------------------------------------------------------------------------------
    def _on_control(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = P.decode(frame)
        except P.VersionMismatch as err:
            self.counters["rejected"] += 1
            self._send(ident, P.REJECT, reason=str(err))
            return
        except P.ProtocolError as err:
            self._send(ident, P.ERROR, code="bad_request", reason=str(err))
            return
        t = msg.type
        if t == P.HELLO:
            return self._on_hello(ident, msg)
        if t == P.STATUS_REQ:
            self._send(ident, P.STATUS, snapshot=self.snapshot())
            return
        wid = self.by_ident.get(ident)
        w = self.workers.get(wid) if wid else None
        if w is None:
            if t == P.RESULT:
                self.counters["stale"] += 1
            if t != P.BYE:
                self._send(ident, P.ERROR, code="unknown_worker", reason="register again with HELLO")
            return
        w.last_seen = time.monotonic()
        if t == P.PING:
            if msg.get("throughput"):
                w.throughput = float(msg.throughput)
            self._send(ident, P.PONG, iteration=self.run.step)
        elif t == P.RESULT:
            self._on_result(w, msg)
        elif t == P.STATE:
            self._on_state(w, msg.iteration, msg.state_hash)
        elif t == P.BYE:
            self._drop(w, f"left ({msg.reason})", count=False)

    def _on_hello(self, ident: bytes, msg: P.Message) -> None:
        reason = None
        if msg.config_hash and msg.config_hash != self.cfg.config_hash():
            reason = (f"config mismatch: worker has config {msg.config_hash}, this run is {self.cfg.config_hash()}"
                      " (start the worker without --config, or with the run's config)")
        elif msg.noise_digest != self.expected_digest:
            reason = (f"noise known-answer digest from {msg.device} differs from the coordinator's; that device "
                      "cannot reproduce the run's noise bit for bit")
        if reason:
            self.counters["rejected"] += 1
            self.say(f"coordinator: rejected {msg.worker_name}: {reason}")
            self._send(ident, P.REJECT, reason=reason)
            return
        old = self.by_ident.get(ident)
        if old in self.workers:
            self._drop(self.workers[old], "registered again", count=False)
        wid = uuid.uuid4().hex[:8]
        now = time.monotonic()
        w = WorkerInfo(wid, ident, msg.worker_name, msg.device, msg.dtype, msg.threads, float(msg.throughput), now, now)
        self.workers[wid] = w
        self.by_ident[ident] = wid
        s = msg.state_iteration
        keep = 0 <= s <= self.run.step and msg.state_hash and self.hash_at.get(s) == msg.state_hash
        sync = self._sync_map(s if keep else None)
        self._send(ident, P.WELCOME, worker_id=wid, run_id=self.run_id, config_yaml=self.run.config_yaml,
                   sync=sync, heartbeat_s=self.pool.heartbeat_s, bulk_port=self.bulk_port)
        self.say(f"coordinator: worker {msg.worker_name} joined ({msg.device}, {msg.dtype}, {msg.threads} threads)"
                 f"{', keeps its state' if keep else ''}")

    def _on_state(self, w: WorkerInfo, step: int, h: str) -> None:
        w.step, w.state_hash = step, h
        expected = self.hash_at.get(step)
        if expected is not None and expected == h:
            w.synced = True
            if w.verified_from < 0:
                w.verified_from = step
            elif step > w.verified_last + 1:
                w.verify_gaps += 1
            if step > w.verified_last:
                w.verified += 1
                w.verified_last = step
            return
        if expected is None and step > self.run.step:
            expected = "unknown"
        w.synced = False
        w.mismatches += 1
        self.counters["resyncs"] += 1
        self._release(w)
        self.say(f"coordinator: worker {w.name} state hash at iteration {step} disagrees; resyncing it")
        self._send(w.ident, P.RESYNC, reason=f"state hash at iteration {step} disagrees with the run log",
                   sync=self._sync_map())

    def _on_result(self, w: WorkerInfo, msg: P.Message) -> None:
        if msg.get("state_hash") is not None and msg.get("state_iteration") is not None:
            self._on_state(w, msg.state_iteration, msg.state_hash)
            if not w.synced:
                return  # disagrees: resynced, and its result is not used
        lease = self.leases.pop(msg.lease_id, None)
        if lease is not None:
            w.leases.discard(msg.lease_id)
            if self.plan is not None and lease.iteration == self.plan.iteration:
                self.lease_durations.append(time.monotonic() - lease.issued)
        if self.plan is None or msg.iteration != self.plan.iteration:
            self.counters["stale"] += 1
            return
        if msg.get("error"):
            self.say(f"coordinator: worker {w.name} could not evaluate: {msg.error}")
            if lease is not None:
                self._requeue(lease.units)
            return
        samples = sum(int(r["count"]) for r in msg.results)
        if msg.eval_s > 0 and samples > 0:
            w.throughput = samples / msg.eval_s  # measured on this lease (samples per second)
        units = self.lease_units_history.get(msg.lease_id, [])
        if len(units) != len(msg.results):
            self.say(f"coordinator: dropped a malformed result from {w.name}")
            units = []
        for key, r in zip(units, msg.results):
            if key in self.results:
                self.counters["duplicate"] += 1
                continue
            if r["member"] != key[0] or not math.isfinite(r["sum_r"]) or r["count"] != len(self.shard_indices[key]):
                self.say(f"coordinator: dropped an invalid result from {w.name}")
                continue
            self.results[key] = (r["sum_r"], r["count"])
            self._count_done(key)
            self.in_flight.pop(key, None)
            w.units_done += 1
        if lease is not None:
            for key in lease.units:
                if key not in self.results and key not in self.todo:
                    copies = self.in_flight.get(key, set())
                    copies.discard(msg.lease_id)
                    if not copies:
                        self.in_flight.pop(key, None)
                        self.todo.append(key)

    # -- leases --------------------------------------------------------------------------------------
    def _requeue(self, units) -> None:
        for key in units:
            if key not in self.results and key not in self.todo:
                self.todo.appendleft(key)
                self.counters["reissued"] += 1

    def _release(self, w: WorkerInfo) -> None:
        for lid in list(w.leases):
            lease = self.leases.pop(lid, None)
            if lease is None:
                continue
            for key in lease.units:
                copies = self.in_flight.get(key)
                if copies is not None:
                    copies.discard(lid)
                    if not copies:
                        self.in_flight.pop(key, None)
            self._requeue(lease.units)
        w.leases.clear()

    def _drop(self, w: WorkerInfo, why: str, count: bool = True) -> None:
        self._release(w)
        self.departed.append(w)
        self.workers.pop(w.wid, None)
        if self.by_ident.get(w.ident) == w.wid:
            self.by_ident.pop(w.ident, None)
        if count:
            self.counters["dropped_workers"] += 1
        self.say(f"coordinator: worker {w.name} {why}")

    def _sizes(self, ready: list[WorkerInfo]) -> dict[str, tuple[int, int]]:
        """(lease size, most units out at once) per ready worker.

        A lease aims to take about TARGET_LEASE_S on its worker, and a worker may hold two (so
        the next is queued while it works), but no worker is given more than its share of the
        iteration by measured throughput: with two equal workers each gets half the units.
        Workers that have not measured their throughput yet count as average ones.
        """
        per_unit = max(1, self.cfg.es.samples_per_iteration // self.shards)
        known = [w.throughput for w in ready if w.throughput > 0]
        default = sum(known) / len(known) if known else 1.0
        tps = {w.wid: (w.throughput if w.throughput > 0 else default) for w in ready}
        total = sum(tps.values()) or 1.0
        units = len(self.shard_indices)
        # Shares of the iteration's units proportional to throughput, summing to the unit count
        # (largest remainders get the leftover units); everyone gets at least one.
        exact = {wid: units * tp / total for wid, tp in tps.items()}
        share = {wid: int(x) for wid, x in exact.items()}
        for wid in sorted(exact, key=lambda k: share[k] - exact[k])[:max(0, units - sum(share.values()))]:
            share[wid] += 1
        sizes = {}
        for w in ready:
            by_time = max(1, int(tps[w.wid] * TARGET_LEASE_S / per_unit)) if w.throughput > 0 else 1
            mine = max(1, share[w.wid])
            sizes[w.wid] = (min(by_time, mine), min(2 * by_time, mine))
        return sizes

    def _lease(self, w: WorkerInfo, keys: list, backup: bool = False) -> None:
        plan = self.plan
        self._lease_seq += 1
        lid = f"{self._lease_prefix}{self._lease_seq:x}"
        units = []
        for key in keys:
            m = plan.members[key[0]]
            units.append({"member": m.member, "seed": m.seed, "sign": m.sign, "indices": self.shard_indices[key]})
            self.in_flight.setdefault(key, set()).add(lid)
        expires = self.pool.lease_s
        now = time.monotonic()
        if not self._send(w.ident, P.LEASE, lease_id=lid, iteration=plan.iteration, alpha=plan.alpha,
                          sigma=plan.sigma, units=units, expires_s=expires):
            for key in keys:
                self.in_flight.get(key, set()).discard(lid)
            self._drop(w, "is unreachable")
            self._requeue(keys)
            return
        self.leases[lid] = Lease(lid, w.wid, plan.iteration, list(keys), now + expires, now)
        self.lease_units_history[lid] = list(keys)
        w.leases.add(lid)
        if backup:
            self.counters["backups"] += 1

    def _dispatch(self) -> None:
        now = time.monotonic()
        if not self.todo and now - self._last_tail_scan < TAIL_SCAN_S:
            return  # nothing queued; the backup scan below runs at most every TAIL_SCAN_S
        ready = [w for w in self.workers.values() if w.synced]
        random.shuffle(ready)
        ready.sort(key=lambda w: -w.throughput)
        sizes = self._sizes(ready) if self.todo else {}
        for w in ready:
            if not self.todo:
                break
            cap, most = sizes[w.wid]
            out = sum(len(self.leases[l].units) for l in w.leases if l in self.leases)
            while self.todo and out < most:
                take = []
                while self.todo and len(take) < min(cap, most - out):
                    key = self.todo.popleft()
                    if key not in self.results:
                        take.append(key)
                if take:
                    self._lease(w, take)
                    out += len(take)
        if self.todo:
            return
        self._last_tail_scan = now
        # Tail of the iteration: idle workers take backup copies of units still out elsewhere,
        # the longest-outstanding first.
        idle = [w for w in ready if not w.leases]
        if not idle:
            return
        # A unit earns a backup once it has been out twice as long as this iteration's typical
        # lease took (so instant answers do not trigger a storm of pointless copies).
        durations = sorted(self.lease_durations)
        patience = max(MIN_BACKUP_AFTER_S, 2 * durations[len(durations) // 2]) if durations else MIN_BACKUP_AFTER_S
        issued = {}
        for k, c in self.in_flight.items():
            if k in self.results or len(c) >= MAX_COPIES:
                continue
            live = [self.leases[l] for l in c if l in self.leases]
            first = min((l.issued for l in live), default=0.0)
            if now - first >= patience:
                issued[k] = (first, {l.wid for l in live})
        order = sorted(issued, key=lambda k: issued[k][0])
        for w in idle:
            for i, k in enumerate(order):
                if w.wid not in issued[k][1]:
                    self._lease(w, [k], backup=True)
                    order.pop(i)
                    break
            if not order:
                break

    def _expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expire_scan < EXPIRE_SCAN_S:
            return
        self._last_expire_scan = now
        for lid, lease in list(self.leases.items()):
            if lease.deadline < now:
                w = self.workers.get(lease.wid)
                if w is not None:
                    w.leases.discard(lid)
                self.leases.pop(lid, None)
                for key in lease.units:
                    copies = self.in_flight.get(key)
                    if copies is not None:
                        copies.discard(lid)
                        if not copies:
                            self.in_flight.pop(key, None)
                self._requeue(lease.units)
        for w in list(self.workers.values()):
            if now - w.last_seen > self.pool.worker_timeout_s:
                self._drop(w, f"silent for {now - w.last_seen:.0f} s; its leases go back in the queue")

    # -- iterations -----------------------------------------------------------------------------------
    def _open(self) -> None:
        self.plan = self.run.plan(self.run.step)
        shards = _split(self.plan.indices, self.shards)
        self.shard_indices = {}
        self.todo = deque()
        for m in self.plan.members:
            for s, idx in enumerate(shards):
                key = (m.member, s)
                self.shard_indices[key] = idx
                self.todo.append(key)
        self.results: dict = {}
        self.in_flight: dict = {}
        self.lease_units_history: dict = {}
        self.lease_durations: list[float] = []
        groups: dict[int, list[int]] = {}
        for m in self.plan.members:  # antithetic pairs share a base seed; they close together
            groups.setdefault(m.seed, []).append(m.member)
        self.pairs = list(groups.values())
        self.pair_of = {m: g for g, members in enumerate(self.pairs) for m in members}
        self.units_left = {m.member: len(shards) for m in self.plan.members}
        self.pairs_done: list[int] = []
        self.pairs_needed = max(1, math.ceil(self.pool.quorum * len(self.pairs) - 1e-9))
        self.t_open = time.perf_counter()

    def _count_done(self, key) -> None:
        """Track complete members and complete antithetic pairs as results arrive."""
        m = key[0]
        self.units_left[m] -= 1
        if self.units_left[m] == 0:
            g = self.pair_of[m]
            if all(self.units_left[j] == 0 for j in self.pairs[g]):
                self.pairs_done.append(g)

    def _ready_members(self) -> Optional[list[int]]:
        if len(self.pairs_done) < self.pairs_needed:
            return None
        return sorted(m for g in self.pairs_done for m in self.pairs[g])

    def _close(self, members: list[int]) -> dict:
        plan = self.plan
        used = [plan.members[j] for j in members]
        nshards = len({k[1] for k in self.shard_indices})
        rewards = []
        tokens = 0
        for j in members:
            s = sum(self.results[(j, k)][0] for k in range(nshards))
            c = sum(self.results[(j, k)][1] for k in range(nshards))
            rewards.append(s / c)
            tokens += c * self.cfg.data.seq_len
        sub = Plan(plan.iteration, plan.alpha, plan.sigma, used, plan.indices, plan.subset_digest)
        stats = {"workers": len(self.workers), **self.counters}
        record = self.run.close(sub, rewards, stats)
        self.hash_at[self.run.step] = record["state_hash"]
        for lid in list(self.leases):  # leftovers (backups) of the closed iteration are stale now
            lease = self.leases.pop(lid)
            w = self.workers.get(lease.wid)
            if w is not None:
                w.leases.discard(lid)
        frame = P.encode(P.COMMIT, record=record)  # encoded once, sent to everyone
        for w in list(self.workers.values()):
            if not self._send_frame(w.ident, frame):
                self._drop(w, "is unreachable")
        self.plan = None
        seconds = time.perf_counter() - self.t_open
        if self.run.step < self.cfg.run.iterations:
            # Workers start on the next iteration while this one is reported (held-out
            # evaluation, checkpoint, plot), which never changes the committed state.
            self._open()
            self._dispatch()
        line = self.run.report(record, seconds, tokens, extra={"workers": len(self.workers)})
        self.commits_done += 1
        if line.get("iteration") and self.run.step % self.cfg.run.checkpoint_every == 0:
            self._offer_latest()
        if self.progress is not None:
            self.progress(line)
        return line

    # -- the loop ---------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        now = time.monotonic()
        minutes = max(1e-9, (now - self.started) / 60)
        return {
            "iteration": self.run.step, "iterations": self.cfg.run.iterations, "state_hash": self.run.state_hash,
            "iterations_per_minute": self.commits_done / minutes, "counters": dict(self.counters),
            "workers": [{"id": w.wid, "name": w.name, "device": w.device, "dtype": w.dtype, "threads": w.threads,
                         "throughput": w.throughput, "last_seen_s": now - w.last_seen, "iteration": w.step,
                         "state_agrees": bool(w.synced and self.hash_at.get(w.step) == w.state_hash),
                         "units_done": w.units_done, "verified": w.verified, "verified_from": w.verified_from,
                         "verified_last": w.verified_last, "verify_gaps": w.verify_gaps,
                         "mismatches": w.mismatches}
                        for w in self.workers.values()],
        }

    def _poll(self, timeout_ms: int) -> None:
        poller = self._poller
        events = dict(poller.poll(timeout_ms))
        if self.ctrl in events:
            ctrl = self.ctrl
            # Drain what is queued (asking the socket is cheaper than a zmq.Again per wake-up).
            for _ in range(1000):
                if not ctrl.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                parts = ctrl.recv_multipart(zmq.NOBLOCK)
                if len(parts) == 2:
                    self._on_control(parts[0], parts[1])
        if self.bulk in events:
            for _ in range(100):
                try:
                    parts = self.bulk.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(parts) != 2:
                    continue
                ident, frame = parts
                try:
                    reply = self.files.handle(P.decode(frame), self.run.log)
                except P.ProtocolError as err:
                    reply = P.encode(P.ERROR, code="bad_request", reason=str(err))
                try:
                    self.bulk.send_multipart([ident, reply])
                except zmq.ZMQError:
                    pass

    def serve(self, stop: Optional[Callable[[], bool]] = None) -> int:
        # Everything allocated so far (torch, transformers, the model) lives for the whole run:
        # keep the cyclic GC from walking it again and again while messages churn.
        gc.collect()
        gc.freeze()
        self._poller = zmq.Poller()
        self._poller.register(self.ctrl, zmq.POLLIN)
        self._poller.register(self.bulk, zmq.POLLIN)
        t_start = time.perf_counter()
        limit = self.cfg.run.max_minutes * 60
        try:
            while self.run.step < self.cfg.run.iterations:
                if stop is not None and stop():
                    break
                if limit and time.perf_counter() - t_start > limit:
                    self.say(f"coordinator: run.max_minutes reached at iteration {self.run.step}")
                    break
                if self.plan is None:
                    self._open()
                self._poll(20)
                self._expire()
                members = self._ready_members()
                if members is not None:
                    self._close(members)
                    continue
                self._dispatch()
            if self.run.step < self.cfg.run.iterations or self.run.step % self.cfg.run.checkpoint_every:
                if self.run.step > 0 and not (self.run.out / "checkpoints" / f"step-{self.run.step:06d}").exists():
                    self.run.checkpoint(final=self.run.step >= self.cfg.run.iterations)
            self._end("run complete" if self.run.step >= self.cfg.run.iterations else "run stopped")
        finally:
            self.ctrl.close(linger=500)
            self.bulk.close(linger=0)
        return 0

    def _end(self, reason: str) -> None:
        final = self.run.state_hash
        # Let the last COMMIT's STATE reports arrive so the summary covers every iteration.
        deadline = time.monotonic() + 3.0
        while (time.monotonic() < deadline and
               any(w.synced and w.step < self.run.step for w in self.workers.values())):
            self._poll(20)
        summary = self.snapshot()
        summary["departed"] = [{"name": w.name, "verified": w.verified, "mismatches": w.mismatches,
                                "units_done": w.units_done} for w in self.departed]
        (self.run.out / "pool.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        for w in list(self.workers.values()):
            self._send(w.ident, P.END, reason=reason, final_iteration=self.run.step, final_hash=final)
        deadline = time.monotonic() + 3.0
        while self.workers and time.monotonic() < deadline:
            self._poll(50)
