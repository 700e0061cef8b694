"""``ea4llm-pool coordinator``: owns the run and hands out work to whoever is in the pool.

The coordinator only schedules. Its process holds no model; one explicit poller loop serves the
control socket (registration, leases, results, commits, heartbeats) and the keeper's pipe:

1. plan iteration t: members (seed, sign), the shared data subset, α_t, σ_t — pure functions of
   (run seed, t), so a resumed run hands out the same work;
2. lease units (antithetic pair × data shard) to workers; the ledger (``ledger.py``, socket-free) decides
   sizes, expiry, backups and the quorum, this module carries its decisions out;
3. on a quorum of complete antithetic pairs: shape, append the COMMIT to the log (fsync), hand it
   to the keeper, announce it to every worker — all in microseconds, whatever the model's size;
4. the keeper (``keeper.py``, its own process) applies the commit to the reference replica and
   reports the state hash; workers' hash reports are checked against it as soon as it is known
   (a lag of an iteration or two), and a worker that disagrees is resynced;
5. fitness values are checked by replication (``trust.py``, ``pool.verify``): a new worker's
   answers are used once another answer agrees (the keeper's replica checks units too, and is
   never outvoted), trusted workers are spot-checked, and wrong answers quarantine and then ban.

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
from .auth import KeyRing, user_id as frame_user_id
from .config import Config, load as load_config
from .guard import ADMIT, Guard
from .es.commit import close_iteration
from .keeper import KeeperHandle, bind_retrying
from .ledger import IterationLedger, WorkCost
from .plan import plan_iteration
from .runlog import CommitLog
from .trust import TrustPolicy

LOG_NAME = "commits.jsonl"
IDLE_POLL_MS = 50
"""Longest sleep of the loop with nothing to read: expiry and backup scans run at this rate, and
an idle loop costs its process well under 1% of a core."""
KEEP_BEHIND = 8
"""A worker whose verified state is at most this many commits old keeps it and replays the rest."""
KEYS_SCAN_S = 0.1
"""How often the authorized keys folder is looked at (a revoked worker is cut off within this)."""
CTRL_RCVHWM = 256
"""Frames queued per connection on the control socket before libzmq stops reading from it."""
MAX_LABEL = 256
"""Longest name, hash or id string a worker may send (longer ones are malformed)."""
MAX_REASON = 1000
"""Longest free-text reason (BYE, RESULT.error) a worker may send."""
ANSWER_MALFORMED = 3
"""Malformed frames of one peer that get an ERROR back (a buggy client learns why; a flood costs no replies)."""
KEEPER_WID = "keeper"
"""The ledger's name for the coordinator's own replica when it checks units."""
VERIFY_METRICS = ("checks", "disagreements", "wrong_answers", "quarantines", "verify_bans")
"""Verification counters written to every metrics line (running totals)."""


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
    key_name: Optional[str] = None  # the authorized key it joined with: its identity (None: plain TCP)
    user: Optional[str] = None      # that key in Z85, as the ZAP handler stamped it on every frame
    guard_id: str = ""              # its record in the Guard (per key, or per connection without keys)
    trust_id: str = ""              # whose standing its answers build: its key, or its name without keys


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
                 say: Callable[[str], None] = print, progress=None, banner_workers: str = "pool",
                 keys: Optional[str | Path] = None, linger_s: Optional[float] = 0.0, trust: tuple = ()):
        self.out = Path(out)
        self.say = say
        self.progress = progress
        self.shards = shards
        self.ctx = zmq.Context.instance()
        # keys: CurveZMQ on both sockets, only the keys in KEYS/authorized may connect.
        self.keyring = KeyRing(keys) if keys else None
        self.authenticator = None
        if self.keyring is not None and self.keyring.created:
            say(f"coordinator: made a key pair in {self.keyring.dir} (give workers {self.keyring.dir}/coordinator.key "
                "or an invite)")
        self.linger_s = linger_s  # None: 2 x pool.worker_timeout_s, once the config is known
        self.trust = set(trust)   # key names (or worker names without keys) vouched for from the start
        self.log = self._open_log(cfg, resume)
        host, bind_port = bind.rsplit(":", 1)
        bulk_bind = f"{host}:0" if bind_port in ("0", "*") else f"{host}:{int(bind_port) + 1}"
        self.ctrl = None
        self.keeper = KeeperHandle({
            "config_yaml": None if resume else cfg.to_yaml(), "out": str(self.out), "resume": resume,
            "iterations": iterations, "device": device, "threads": threads, "bulk_bind": bulk_bind,
            "banner_workers": banner_workers, "keys": str(keys) if keys else None})
        try:
            ready = self._wait_for("ready")
            # Workers are let in only now: a HELLO queued while the run was being built would go
            # unanswered for long enough that its worker registers again under a new identity.
            self.ctrl = self.ctx.socket(zmq.ROUTER)
            self.ctrl.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # Workers only send small messages: a larger frame drops its connection before it is
            # buffered, and few frames wait per connection, so no peer can fill this process.
            P.configure_socket_limits(self.ctrl, max_bytes=P.MAX_REQUEST_BYTES)
            self.ctrl.setsockopt(zmq.RCVHWM, CTRL_RCVHWM)
            if self.ctrl.getsockopt(zmq.MAXMSGSIZE) != P.MAX_REQUEST_BYTES:
                raise UserError("the control socket did not take its message size limit")
            if self.keyring is not None:
                self.authenticator = self.keyring.start_authenticator(self.ctx)
                self.keyring.serve(self.ctrl)
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
        if self.linger_s is None:
            self.linger_s = 2.0 * self.pool.worker_timeout_s
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
        self.policy = TrustPolicy.for_pool(self.pool)
        self.ledger = IterationLedger(
            quorum=self.pool.quorum, shards=shards, lease_floor_s=self.pool.lease_s,
            worker_timeout_s=self.pool.worker_timeout_s, samples_per_iteration=es.samples_per_iteration,
            cost=WorkCost.for_run(self.cfg, self.params),
            lease_prefix=uuid.uuid4().hex[:6], policy=self.policy)
        if self.policy is not None and self.cfg.es.fitness != "logprob" and not self.pool.verify_tolerance:
            say(f"coordinator: warning: the agreement bounds of pool.verify were measured for the log-prob fitness; "
                f"set pool.verify_tolerance for '{self.cfg.es.fitness}' (the largest difference two honest "
                "devices give), or verification may quarantine honest workers")
        if self.policy is not None and self.pool.keeper_verifies:
            import torch

            self.ledger.join(KEEPER_WID, kind=(torch.device(device).type, "fp32"), verifier=True)
            self.ledger.set_ready(KEEPER_WID, True)
        for step, h in self.reference.items():
            self.ledger.reference(step, h)
        self.peers: dict[str, Peer] = {}
        self.by_ident: dict[bytes, str] = {}
        self.departed: list[dict] = []
        self.counters = {"rejected": 0, "resyncs": 0,  # the shell's own; the ledger counts the rest
                         "unauthorized": 0, "revoked": 0, "banned_workers": 0}
        self.guard = Guard()
        self.missing: dict[str, str] = {}  # wid -> name of workers dropped (not gone by choice) that may return
        self.ended: Optional[dict] = None  # END's fields once the run is over
        self._next_keys = 0.0
        self._stop: Optional[Callable[[], bool]] = None
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
        if self.keyring is not None:
            keys = self.keyring.dir
            return (f"ea4llm-pool invite NAME --keys {keys} --connect tcp://{host}:{self.port}\n"
                    f"  then, on the worker's machine:  ea4llm-pool worker --invite NAME.invite --device cpu\n"
                    f"  (or: ea4llm-pool worker --connect tcp://{host}:{self.port} --key NAME.key_secret "
                    f"--server-key {keys}/coordinator.key, with NAME.key in {keys}/authorized/)")
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
            if lease.wid == KEEPER_WID:
                self.keeper.send("evaluate", lease_id=lease.lease_id, iteration=lease.iteration, sigma=lease.sigma,
                                 units=lease.units)
                continue
            peer = self.peers.get(lease.wid)
            ok = peer is not None and self._send(
                peer.ident, P.LEASE, lease_id=lease.lease_id, iteration=lease.iteration, alpha=lease.alpha,
                sigma=lease.sigma, units=lease.units, expires_s=lease.expires_s)
            if not ok:
                self.ledger.unsent(lease.lease_id)
                if peer is not None:
                    self._forget(peer, "is unreachable", count=True)

    # -- control messages --------------------------------------------------------------------------
    def _on_control(self, ident: bytes, frame: bytes, user: Optional[str] = None) -> None:
        """One frame from ``ident`` (``user``: its authenticated key). Each frame is counted once by
        the guard: dropped unread (banned, throttled), malformed (a strike), or served."""
        gid = f"key:{user}" if user else f"conn:{ident.hex()}"
        if self.guard.admit(gid, self.keyring.name_of(user) if user else None) != ADMIT:
            return
        try:
            msg = P.decode(frame)
        except P.VersionMismatch as err:
            self.counters["rejected"] += 1
            self._send(ident, P.REJECT, reason=str(err))
            return
        except P.ProtocolError as err:
            self._strike(gid, ident, str(err))
            if self.guard.malformed_of(gid) <= ANSWER_MALFORMED:
                self._send(ident, P.ERROR, code="bad_request", reason=str(err)[:500])
            return
        bad = self._out_of_bounds(msg)
        if bad is not None:
            self._strike(gid, ident, bad)
            if self.guard.malformed_of(gid) <= ANSWER_MALFORMED:
                self._send(ident, P.ERROR, code="bad_request", reason=bad)
            return
        if self.ended is not None:
            return self._answer_after_end(ident, msg)
        t = msg.type
        if t == P.HELLO:
            return self._on_hello(ident, msg, user, gid)
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
            self._forget(peer, f"left ({msg.reason})", count=False, may_return=False)

    def _out_of_bounds(self, msg) -> Optional[str]:
        """Why a well-formed message still breaks this run's bounds (None if it does not): strings
        longer than any honest worker sends, more results than the iteration has units."""
        t = msg.type
        if t == P.RESULT:
            most = self.cfg.es.population * self.shards
            if len(msg.results) > most:
                return f"RESULT.results: {len(msg.results)} entries, but an iteration has only {most} units"
            if msg.error is not None and len(msg.error) > MAX_REASON:
                return f"RESULT.error: longer than {MAX_REASON} characters"
            labels = [("lease_id", msg.lease_id), ("state_hash", msg.state_hash or "")]
        elif t == P.HELLO:
            if len(msg.selftest) > P.MAX_SELFTEST:
                return "HELLO.selftest: too many entries"
            labels = [(f, msg[f]) for f in ("config_hash", "device", "dtype", "worker_name", "state_hash")]
            labels += [("selftest", k + v) for k, v in msg.selftest.items()]
        elif t in (P.PING, P.STATE):
            labels = [("state_hash", msg.state_hash)] + ([("worker_id", msg.worker_id)] if t == P.PING else [])
        elif t == P.BYE:
            if len(msg.reason) > MAX_REASON:
                return f"BYE.reason: longer than {MAX_REASON} characters"
            labels = [("worker_id", msg.worker_id)]
        else:
            return None
        for name, value in labels:
            if len(value) > MAX_LABEL:
                return f"{t}.{name}: longer than {MAX_LABEL} characters"
        return None

    def _strike(self, gid: str, ident: bytes, reason: str, malformed: bool = True) -> None:
        """A strike against a peer; enough of them ban it, and a banned worker's sessions end."""
        seconds = self.guard.strike(gid, reason, malformed)
        if not seconds:
            return
        sessions = [p for p in self.peers.values() if p.guard_id == gid]
        label = sessions[0].name if sessions else gid[:24]
        self.say(f"coordinator: banned {label} for {seconds:.0f} s after repeated bad messages "
                 f"(last: {reason[:120]})")
        self._send(ident, P.ERROR, code="banned", reason=f"too many bad messages; banned for {seconds:.0f} s",
                   retry_s=seconds)
        for peer in sessions:
            self.counters["banned_workers"] += 1
            self._forget(peer, "was banned; its leases go back in the queue", count=True, may_return=False)

    def _unauthorized(self, ident: bytes, user: Optional[str]) -> None:
        """A frame from a connection whose key is no longer admitted (it was revoked after it
        connected: CurveZMQ checks keys only at the handshake)."""
        self.counters["unauthorized"] += 1
        if self.guard.admit(f"key:{user}") != ADMIT:
            return
        wid = self.by_ident.get(ident)
        if wid in self.peers:
            self._forget(self.peers[wid], "was cut off: its key is no longer authorized", count=True,
                         may_return=False)
        self._send(ident, P.REJECT, reason="this worker's key is not authorized by the coordinator (it was revoked)")

    def _check_keys(self) -> None:
        """Re-read the authorized keys; the sessions of every revoked key end now, leases back in the queue."""
        now = time.monotonic()
        if self.keyring is None or now < self._next_keys:
            return
        self._next_keys = now + KEYS_SCAN_S
        if not self.keyring.refresh():
            return
        for peer in list(self.peers.values()):
            if self.keyring.name_of(peer.user) is None:
                self.counters["revoked"] += 1
                self._send(peer.ident, P.REJECT, reason=f"this worker's key ({peer.key_name}) was removed from the "
                                                        "coordinator's authorized keys")
                self._forget(peer, f"was cut off: its key {peer.key_name} was revoked; its leases go back in the queue",
                             count=True, may_return=False)

    def _answer_after_end(self, ident: bytes, msg) -> None:
        """The run is over: whoever speaks is told so, and a worker back from a partition exits 0."""
        t = msg.type
        if t == P.STATUS_REQ:
            self._send(ident, P.STATUS, snapshot=self.snapshot())
            return
        wid = self.by_ident.get(ident)
        if t == P.BYE:
            if wid in self.peers:
                self._forget(self.peers[wid], f"left ({msg.reason})", count=False, may_return=False)
            return
        if t == P.PING:
            self.missing.pop(msg.worker_id, None)
        elif t == P.HELLO:
            for k in [k for k, name in self.missing.items() if name == msg.worker_name]:
                del self.missing[k]
        self._send(ident, P.END, **self.ended)

    def _on_hello(self, ident: bytes, msg, user: Optional[str] = None, gid: str = "") -> None:
        reason = None
        if msg.config_hash and msg.config_hash != self.config_hash:
            reason = (f"config mismatch: worker has config {msg.config_hash}, this run is {self.config_hash}"
                      " (start the worker without --config, or with the run's config)")
        else:
            bad = sorted(k for k, v in self.selftest_ref.items() if msg.selftest.get(k) != v)
            have = msg.fitness if msg.fitness is not None else ["logprob"]  # a worker from before plugins
            if bad:
                reason = (f"{msg.device} failed the start-up self-test ({', '.join(bad)} differ from the known "
                          "answers), so it cannot reproduce the run bit for bit")
            elif self.cfg.es.fitness not in have:
                reason = (f"this run's fitness '{self.cfg.es.fitness}' is not installed on the worker "
                          f"(it has: {', '.join(have)})")
        key_name = self.keyring.name_of(user) if self.keyring is not None else None
        trust_id = f"key:{key_name}" if key_name else f"name:{msg.worker_name}"
        banned = self.ledger.banned_for(trust_id)
        if not reason and banned > 0:
            reason = (f"banned for another {banned:.0f} s: this worker's fitness values disagreed with other workers' "
                      "too often (check its device, dtype and installed versions)")
        if reason:
            self.counters["rejected"] += 1
            self.say(f"coordinator: rejected {msg.worker_name}: {reason}")
            self._send(ident, P.REJECT, reason=reason)
            return
        old = self.by_ident.get(ident)
        if old in self.peers:
            self._forget(self.peers[old], "registered again", count=False, may_return=False)
        for k in [k for k, name in self.missing.items() if name == msg.worker_name]:
            del self.missing[k]
        wid = uuid.uuid4().hex[:8]
        now = time.monotonic()
        peer = Peer(wid, ident, msg.worker_name, msg.device, msg.dtype, msg.threads, now, now,
                    key_name=key_name, user=user, guard_id=gid or f"conn:{ident.hex()}", trust_id=trust_id)
        self.peers[wid] = peer
        self.by_ident[ident] = wid
        self.guard.pin(peer.guard_id, key_name or msg.worker_name)
        vouched = (key_name or msg.worker_name) in self.trust or (
            self.keyring is not None and key_name in self.keyring.trusted)
        self.ledger.join(wid, float(msg.throughput), identity=key_name, trust_id=peer.trust_id,
                         kind=(msg.device.split(":", 1)[0], msg.dtype), vouched=vouched)
        s = msg.state_iteration
        keep = bool(0 <= s <= self.step and msg.state_hash and self.ledger.reference_hash(s) == msg.state_hash
                    and self.step - s <= KEEP_BEHIND)
        self._send(ident, P.WELCOME, worker_id=wid, run_id=self.run_id, config_yaml=self.config_yaml,
                   heartbeat_s=self.pool.heartbeat_s, bulk_port=self.bulk_port, keep_state=keep,
                   model_params=self.params)
        self.say(f"coordinator: worker {msg.worker_name} joined ({msg.device}, {msg.dtype}, {msg.threads} threads"
                 f"{f', key {key_name}' if key_name else ''}){', keeps its state' if keep else ''}")

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
        outcome = self.ledger.on_result(peer.wid, msg.lease_id, msg.iteration, list(msg.results), float(msg.eval_s))
        if outcome["invalid"]:
            self._strike(peer.guard_id, peer.ident, f"{outcome['invalid']} results that do not answer their units",
                         malformed=False)
        if msg.iteration == self.ledger.iteration:
            self.eval_s += float(msg.eval_s)
        self._verdicts()

    def _verdicts(self) -> None:
        """Carry out the ledger's quarantines and bans for wrong fitness values."""
        for ev in self.ledger.take_events():
            sessions = [self.peers[w] for w in ev["wids"] if w in self.peers]
            label = sessions[0].name if sessions else ev["trust_id"]
            if ev["event"] == "quarantine":
                self.say(f"coordinator: quarantined {label} after {ev['reason']}: its fitness values are no longer "
                         "used, and its unverified ones in this iteration were discarded")
                continue
            seconds = ev["seconds"]
            self.say(f"coordinator: banned {label} for {seconds:.0f} s after {ev['reason']}")
            for peer in sessions:
                self._send(peer.ident, P.ERROR, code="banned", retry_s=seconds,
                           reason=f"banned for {seconds:.0f} s: this worker's fitness values disagreed with other "
                                  "workers' too often (check its device, dtype and installed versions)")
                self.counters["banned_workers"] += 1
                self._forget(peer, "was banned for wrong fitness values; its leases go back in the queue",
                             count=True, may_return=False)

    def _forget(self, peer: Peer, why: str, count: bool, may_return: bool = True) -> None:
        """Forget a worker (``count``: it was dropped, not a goodbye); its leases go back in the queue.
        ``may_return``: it did not leave by choice and may come back (told at the end that the run is over)."""
        if peer.wid not in self.peers:
            return
        if may_return:
            self.missing[peer.wid] = peer.name
        if not any(p.guard_id == peer.guard_id for p in self.peers.values() if p.wid != peer.wid):
            self.guard.unpin(peer.guard_id)
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
        elif kind == "result":
            self.ledger.heard(KEEPER_WID)
            if msg.get("error"):
                self.say(f"coordinator: the reference replica could not check lease {msg['lease_id']}: {msg['error']}")
                self.ledger.on_error(KEEPER_WID, msg["lease_id"], int(msg["iteration"]), msg["error"])
            else:
                self.ledger.on_result(KEEPER_WID, msg["lease_id"], int(msg["iteration"]), list(msg["results"]),
                                      float(msg["eval_s"]))
                self._verdicts()
        elif kind == "hash":
            self._bulk_counters(msg)
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
            if kind == "finished":
                self._bulk_counters(msg)
            self._pending_keeper[kind] = msg

    def _bulk_counters(self, msg: dict) -> None:
        for name in ("bulk_malformed", "bulk_unauthorized"):
            if name in msg:
                self.counters[name] = int(msg[name])

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
        if self.policy is not None:
            extra.update({name: self.ledger.counters[name] for name in VERIFY_METRICS})
            # This iteration's work: units answered by pool workers (first answers and checks), how
            # many of the values used came from them, and what the reference replica answered.
            extra.update(pool_answers=closing.pool_answers, pool_used=closing.pool_used,
                         reference_answers=closing.reference_answers,
                         untrusted_workers=sum(self.ledger.worker_view(w)["trust"] == "new" for w in self.peers))
        self.keeper.send("commit", record=record, seconds=seconds, tokens=closing.samples * self.cfg.data.seq_len,
                         extra=extra)
        self.plan = None
        if self.step < self.cfg.run.iterations:
            self._open()
            self._send_leases(self.ledger.dispatch())

    def _counters(self) -> dict:
        return {**self.ledger.counters, **self.counters, **self.guard.counters}

    # -- status --------------------------------------------------------------------------------------
    def _worker_row(self, peer: Peer, view: Optional[dict] = None) -> dict:
        if view is None:
            view = self.ledger.worker_view(peer.wid)
        ref = self.ledger.reference_hash(peer.step)
        return {"id": peer.wid, "name": peer.name, "key": peer.key_name, "device": peer.device, "dtype": peer.dtype,
                "threads": peer.threads, "last_seen_s": time.monotonic() - peer.last_seen, "iteration": peer.step,
                "state_agrees": bool(ref is not None and ref == peer.state_hash), **self.guard.view(peer.guard_id),
                **view}

    def snapshot(self) -> dict:
        minutes = max(1e-9, (time.monotonic() - self.started) / 60)
        ref = self.newest_ref or (-1, "")
        return {"iteration": self.step, "iterations": self.cfg.run.iterations, "state_hash": ref[1],
                "state_step": ref[0], "iterations_per_minute": self.commits_done / minutes,
                "counters": self._counters(), "model_params": self.params,
                "workers": [self._worker_row(p) for p in self.peers.values()],
                "security": {"keys": self.keyring is not None,
                             "authorized_keys": len(self.keyring.allowed) - 1 if self.keyring is not None else None,
                             "peers_tracked": len(self.guard), "offenders": self.guard.offenders()},
                "verify": self._verify_view()}

    def _verify_view(self) -> dict:
        if self.policy is None:
            return {"on": False}
        view = {"on": True, "keeper_verifies": self.pool.keeper_verifies, "trust_after": self.policy.trust_after,
                "spot_check": self.policy.spot_check, "untrusted_share": self.policy.untrusted_share,
                **{name: self.ledger.counters[name] for name in ("checks", "agreed", "disagreements",
                                                                  "third_evaluations", "spot_checks", "wrong_answers",
                                                                  "quarantines", "verify_bans", "discarded",
                                                                  "shadow_checks")},
                "open_iteration": self.ledger.progress()}
        if self.ledger.is_ready(KEEPER_WID):
            view["reference_units"] = self.ledger.worker_view(KEEPER_WID)["units_done"]
        return view

    # -- the loop ------------------------------------------------------------------------------------
    def _poll(self, timeout_ms: int) -> None:
        self._check_keys()
        events = dict(self._poller.poll(timeout_ms))
        if self.ctrl in events:
            ctrl = self.ctrl
            keyring = self.keyring
            for _ in range(1000):  # drain what is queued, then look at the keeper and the clock again
                if not ctrl.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                user = None
                if keyring is None:
                    parts = ctrl.recv_multipart(zmq.NOBLOCK)
                    ident = parts[0]
                else:  # frames, for the key the ZAP handler stamped on them
                    frames = ctrl.recv_multipart(zmq.NOBLOCK, copy=False)
                    ident, user = frames[0].bytes, frame_user_id(frames[-1])
                    if keyring.name_of(user) is None:
                        self._unauthorized(ident, user)
                        continue
                    parts = [f.bytes for f in frames]
                if len(parts) == 2:
                    self._on_control(ident, parts[1], user)
                else:  # a message of several frames: not one of ours
                    gid = f"key:{user}" if user else f"conn:{ident.hex()}"
                    if self.guard.admit(gid) == ADMIT:
                        self._strike(gid, ident, f"{len(parts) - 1} frames where one message is one frame")
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
        self._stop = stop
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
        self.ended = {"reason": reason, "final_iteration": final_step, "final_hash": final}
        told = set()
        for peer in list(self.peers.values()):
            self._send(peer.ident, P.END, **self.ended)
            told.add(peer.name)
        # A dropped session of a worker that is here now (it registered again) is not missing.
        self.missing = {wid: name for wid, name in self.missing.items() if name not in told}
        deadline = time.monotonic() + 3.0
        while self.peers and time.monotonic() < deadline:
            self._poll(50)
        # Workers dropped while silent (a partition, a paused machine) may still be alive: keep
        # answering for a while, so that one coming back hears that the run is over and exits 0.
        if self.missing and self.linger_s > 0:
            self.say(f"coordinator: run over; telling returning workers so for up to {self.linger_s:.0f} s "
                     f"({len(self.missing)} dropped: {', '.join(sorted(set(self.missing.values())))[:200]})")
            deadline = time.monotonic() + self.linger_s
            while self.missing and time.monotonic() < deadline and not (self._stop and self._stop()):
                self._poll(50)
            # A returning worker may hear END on its old connection just as it gives that up and
            # registers anew: answer the new one too.
            deadline = min(deadline, time.monotonic() + 3.0)
            while time.monotonic() < deadline and not (self._stop and self._stop()):
                self._poll(50)

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.keeper.close()
        if self.ctrl is not None:
            self.ctrl.close(linger=500)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.log.close()
