"""``ea4llm-pool worker``: evaluates leased members and applies every commit.

    ea4llm-pool worker --connect tcp://HOST:5555 --device cuda:0 --dtype bf16

Life of a worker: noise self-test (refuse to join on failure) → HELLO → WELCOME (or REJECT: print
the reason, exit non-zero) → sync (checkpoint files over the bulk channel, then replay the log) →
loop: LEASE → evaluate units → RESULT; COMMIT → apply with the core's update → STATE (hash); END →
exit 0. If the coordinator goes silent the worker backs off (1 s → 32 s, jittered) and registers
again; its state is kept, so after a coordinator restart it only replays the commits it missed.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import zmq

from . import UserError, protocol as P
from .checkpoint import load_master_into, read_meta
from .config import Config, from_dict
from .es.noise import known_answer_digest
from .link import LOST, Link, check_endpoint
from .replica import Replica, resolve_device
from .sync import BulkClient

EXIT_REJECTED = 2
EXIT_SELFTEST = 3


def noise_digest(device) -> str:
    """The digest a worker announces: known answers of both noise kinds, computed on its device."""
    h = hashlib.sha256()
    for kind in ("gaussian", "rademacher"):
        h.update(known_answer_digest(kind, device).encode())
    return h.hexdigest()


def bulk_endpoint(control: str, port: int) -> str:
    host = control.rsplit(":", 1)[0]
    return f"{host}:{port}"


class Resync(Exception):
    pass


class Worker:
    def __init__(self, connect: str, device: str = "cpu", dtype: str = "fp32", threads: int = 1,
                 name: Optional[str] = None, cache: Optional[str] = None, config: Optional[Config] = None,
                 slowdown: float = 1.0, say: Callable[[str], None] = print, protocol_version: Optional[int] = None):
        self.connect = check_endpoint(connect)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.threads = threads
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.cache = Path(cache or os.environ.get("EA4LLM_CACHE", Path.home() / ".cache" / "ea4llm-pool"))
        self.expected_config = config
        self.slowdown = slowdown
        self.say = say
        self.protocol_version = protocol_version
        self.ctx = zmq.Context.instance()
        self.link: Optional[Link] = None
        self.replica: Optional[Replica] = None
        self.cfg: Optional[Config] = None
        self.train = None
        self.run_id = ""
        self.pending: dict[int, dict] = {}
        self._unreported: Optional[tuple[int, str]] = None  # (iteration, hash) not yet reported
        self._hash_cache = None
        self.units_done = 0
        self.throughput = 0.0
        self.stopping = False

    # -- registration ----------------------------------------------------------------------------
    def _hello(self) -> bytes:
        state_it = self.replica.master.step if self.replica is not None else -1
        fields = dict(config_hash=self.expected_config.config_hash() if self.expected_config else "",
                      noise_digest=self.digest, device=str(self.device), dtype=self.dtype,
                      threads=max(1, torch.get_num_threads()), throughput=float(self.throughput),
                      worker_name=self.name, pid=os.getpid(), state_iteration=state_it,
                      state_hash=self.replica.state_hash() if self.replica is not None else "")
        if self.protocol_version is not None:  # test hook: pretend to speak another version
            import msgpack

            return msgpack.packb({"v": self.protocol_version, "type": P.HELLO, **fields})
        return P.encode(P.HELLO, **fields)

    def _register(self) -> P.Message:
        """HELLO until WELCOME; REJECT ends the process. Backs off 1 s → 32 s with jitter."""
        delay = 1.0
        while True:
            if self.link is not None:
                self.link.stop()
            self.link = Link(self.ctx, self.connect, heartbeat_s=1.0, silence_s=30.0)
            self.link.start()
            self.link._pipe_out.send(self._hello())
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                msg = self.link.recv(timeout=0.25)
                if isinstance(msg, P.VersionMismatch):
                    raise UserError(f"coordinator refused: {msg}")
                if isinstance(msg, P.Message):
                    if msg.type == P.WELCOME:
                        return msg
                    if msg.type == P.REJECT:
                        self.say(f"worker: rejected by the coordinator: {msg.reason}")
                        raise SystemExit(EXIT_REJECTED)
                    if msg.type == P.END:
                        self.say(f"worker: the run is over ({msg.reason})")
                        raise SystemExit(0)
            wait = delay * random.uniform(0.75, 1.25)
            self.say(f"worker: no answer from {self.connect}; retrying in {wait:.1f} s")
            time.sleep(wait)
            delay = min(delay * 2, 32.0)

    # -- sync ---------------------------------------------------------------------------------------
    def _sync(self, run_id: str, config_yaml: str, sync: dict, bulk_port: int) -> None:
        import yaml

        cfg = from_dict(yaml.safe_load(config_yaml), "coordinator config")
        if self.expected_config is not None and cfg.config_hash() != self.expected_config.config_hash():
            raise UserError("the coordinator's config differs from --config")
        self.cfg = cfg
        keep = (not sync["files"] and self.replica is not None and self.run_id == run_id
                and self.replica.master.step == sync["checkpoint_iteration"])
        bulk = BulkClient(self.ctx, bulk_endpoint(self.connect, bulk_port))
        try:
            if not keep:
                root = self.cache / run_id
                for name, size, digest in sync["files"]:
                    bulk.fetch(name, size, digest, root / name)
                from .data import SampleSet
                from .run import load_model_skeleton

                self.train = SampleSet.load(root / "data" / "train.npz")
                ckpt = root / f"step-{sync['checkpoint_iteration']:06d}"
                model = load_model_skeleton(ckpt)
                self.replica = Replica(model, cfg.es, self.device, self.dtype, chunk=cfg.runtime.chunk_elements)
                load_master_into(ckpt, self.replica.master)
                if self.replica.state_hash() != read_meta(ckpt)["state_hash"]:
                    raise Resync("checkpoint weights do not match their recorded state hash")
            self.run_id = run_id
            self.pending.clear()
            self._unreported = None
            for rec in bulk.log_records(self.replica.master.step):
                self._apply(rec, report=False)  # one STATE after the sync reports where it ended
        finally:
            bulk.close()
        self._publish_state()
        self.say(f"worker {self.name}: synced to iteration {self.replica.master.step} "
                 f"({self.device}, {self.dtype}, {torch.get_num_threads()} threads)")

    def _current_hash(self) -> str:
        """The replica's state hash, computed once per state (the master only changes in _apply
        and _sync)."""
        step = self.replica.master.step
        if self._hash_cache is None or self._hash_cache[0] != step or self._hash_cache[1] is not self.replica:
            self._hash_cache = (step, self.replica, self.replica.state_hash())
        return self._hash_cache[2]

    def _publish_state(self) -> None:
        self.link.iteration = self.replica.master.step
        self.link.state_hash = self._current_hash()

    def _flush_state(self) -> None:
        """Send the STATE report a RESULT was going to carry, if one is still pending."""
        if self._unreported is not None:
            it, h = self._unreported
            self._unreported = None
            self.link.send(P.STATE, iteration=it, state_hash=h)

    def _apply(self, rec: dict, report: bool = True) -> None:
        step = self.replica.master.step
        if rec["iteration"] < step:
            return
        if rec["iteration"] > step:
            raise Resync(f"missing commits between {step} and {rec['iteration']}")
        self._flush_state()  # the previous state's report goes out before the state moves on
        self.replica.apply(rec)
        got = self._current_hash()
        if got != rec["state_hash"]:
            raise Resync(f"state hash after iteration {rec['iteration']} is {got[:12]}…, "
                         f"coordinator has {rec['state_hash'][:12]}…")
        if report:  # reported by the next RESULT, or by a STATE if no lease follows
            self._unreported = (self.replica.master.step, got)

    def _catch_up(self, iteration: int, bulk_port: int) -> None:
        """Bring the replica to ``iteration`` commits using queued COMMITs, else the log."""
        while self.replica.master.step < iteration:
            rec = self.pending.pop(self.replica.master.step, None)
            if rec is None:
                bulk = BulkClient(self.ctx, bulk_endpoint(self.connect, bulk_port))
                try:
                    for r in bulk.log_records(self.replica.master.step):
                        self._apply(r)
                        if self.replica.master.step >= iteration:
                            break
                finally:
                    bulk.close()
                if self.replica.master.step < iteration:
                    raise Resync("the coordinator's log does not reach the leased iteration")
                break
            self._apply(rec)
        self.pending = {k: v for k, v in self.pending.items() if k >= self.replica.master.step}

    # -- work -----------------------------------------------------------------------------------------
    def _evaluate(self, lease: P.Message) -> None:
        results = []
        t0 = time.perf_counter()
        self.link.busy = True
        samples = 0
        for u in lease.units:
            t_unit = time.perf_counter()
            ids, mask = self.train.batch(u["indices"])
            s, c = self.replica.evaluate_member(u["seed"], u["sign"], lease.sigma, ids, mask, self.cfg.es.micro_batch)
            results.append({"member": u["member"], "sign": u["sign"], "sum_r": s, "count": c})
            samples += c
            if self.slowdown > 1.0:  # test hook: emulate a slower machine
                time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t_unit))
        dt = time.perf_counter() - t0
        self.units_done += len(results)
        self.throughput = samples / dt if dt > 0 else 0.0
        self.link.busy = False
        self.link.done_units = self.units_done
        self.link.throughput = self.throughput
        carried = {}
        if self._unreported is not None and self._unreported[0] == lease.iteration:
            carried = {"state_iteration": self._unreported[0], "state_hash": self._unreported[1]}
            self._unreported = None
        self._flush_state()
        self.link.send(P.RESULT, lease_id=lease.lease_id, iteration=lease.iteration, results=results, eval_s=dt,
                       **carried)

    # -- main loop ------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        self.digest = noise_digest(self.device)
        if self.digest != noise_digest("cpu") and self.device.type != "cpu":
            pass  # the coordinator compares against its own digest and rejects a mismatch
        from .es.noise import self_test

        for kind in ("gaussian", "rademacher"):
            ok, got = self_test(kind, self.device)
            if not ok:
                self.say(f"worker: noise known-answer test failed on {self.device} ({kind}: {got[:16]}…); "
                         "this device cannot reproduce the run's noise and must not join")
                return EXIT_SELFTEST
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        try:
            return self._serve()
        except KeyboardInterrupt:
            self.stopping = True
            return 130
        finally:
            if self.link is not None:
                if self.link.worker_id:
                    try:
                        self.link.send(P.BYE, worker_id=self.link.worker_id, reason="worker stopped")
                        time.sleep(0.2)
                    except zmq.ZMQError:
                        pass
                self.link.stop()

    def _serve(self) -> int:
        welcome = self._register()
        while True:
            bulk_port = int(welcome.get("bulk_port") or 0)
            # Heartbeats start at once: a sync (download, model load, replay) can take a while.
            self.link.heartbeat_s = welcome.heartbeat_s
            self.link.worker_id = welcome.worker_id
            try:
                self._sync(welcome.run_id, welcome.config_yaml, welcome.sync, bulk_port)
                self.link.send(P.STATE, iteration=self.replica.master.step, state_hash=self._current_hash())
                result = self._loop(bulk_port)
            except Resync as why:
                self.say(f"worker: resyncing ({why})")
                self.link.send(P.STATE, iteration=self.replica.master.step if self.replica else -1,
                               state_hash="resync")
                self.replica = None  # full resync: fresh checkpoint + log
                welcome = self._register()
                continue
            except ConnectionError as why:
                self.say(f"worker: lost the coordinator ({why}); registering again")
                welcome = self._register()
                continue
            if result == "reregister":
                welcome = self._register()
                continue
            return result

    def _loop(self, bulk_port: int):
        while not self.stopping:
            msg = self.link.recv(timeout=0.5)
            if msg is None:
                self._flush_state()
                continue
            if msg == LOST:
                self.say("worker: the coordinator went silent; registering again")
                return "reregister"
            if isinstance(msg, P.ProtocolError):
                self.say(f"worker: ignored a bad frame from the coordinator: {msg}")
                continue
            t = msg.type
            if t == P.LEASE:
                if msg.iteration < self.replica.master.step:
                    continue  # stale
                self._catch_up(msg.iteration, bulk_port)
                self._publish_state()
                self._evaluate(msg)
            elif t == P.COMMIT:
                rec = msg.record
                if rec["iteration"] == self.replica.master.step:
                    self._apply(rec)
                    self._publish_state()
                    if self.link.inbox.empty():
                        self._flush_state()  # no lease waiting to carry the report
                elif rec["iteration"] > self.replica.master.step:
                    self.pending[rec["iteration"]] = rec
            elif t == P.RESYNC:
                raise Resync(msg.reason)
            elif t == P.END:
                self.say(f"worker {self.name}: run over at iteration {msg.final_iteration} ({msg.reason}); "
                         f"state hash {'agrees' if self._current_hash() == msg.final_hash else 'DIFFERS'}")
                return 0 if self._current_hash() == msg.final_hash else 1
            elif t == P.ERROR:
                if msg.code == "unknown_worker":
                    return "reregister"
                self.say(f"worker: coordinator error: {msg.reason}")
            elif t in (P.WELCOME, P.REJECT):
                continue
        return 0


def main(connect: str, device: str, dtype: str, threads: int, name: Optional[str], cache: Optional[str],
         config: Optional[Config], slowdown: float, protocol_version: Optional[int] = None) -> int:
    w = Worker(connect, device, dtype, threads, name, cache, config, slowdown, protocol_version=protocol_version,
               say=lambda s: print(s, flush=True))
    return w.run()
