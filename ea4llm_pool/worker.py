"""``ea4llm-pool worker``: evaluates leased members and applies every commit.

    ea4llm-pool worker --connect tcp://HOST:5555 --device cuda:0 --dtype bf16

Life of a worker: self-test on its own device (noise, update, Adam, state hash against the known
answers; the coordinator refuses a device that fails) → HELLO → WELCOME (or REJECT: print the
reason, exit non-zero) → sync (ask the bulk channel for the newest sync point, fetch its files with
several chunks in flight, replay the log from there) → loop: LEASE → evaluate units → RESULT;
COMMIT → apply with the core's update → report the state hash; END → exit 0. An evaluation that
fails (out of memory, say) goes back as ``RESULT.error`` and the worker carries on. If the
coordinator goes silent the worker backs off (1 s → 32 s, jittered) and registers again; its
state is kept, so after a coordinator restart it only replays the commits it missed.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import zmq

from . import UserError, protocol as P
from .checkpoint import load_master_into, load_model_skeleton, read_meta
from .config import Config, from_dict
from .fitness_plugins import available as available_fitness
from .link import AUTH_FAILED, LOST, Link, check_endpoint
from .replay import ReplayMismatch, replay
from .replica import Replica, resolve_device
from .sync import BulkClient

EXIT_REJECTED = 2
EXIT_SELFTEST = 3
EXIT_ORPHANED = 4
GIVE_UP_AFTER_S = 600.0
"""A worker that has heard from no coordinator for this long exits non-zero (``--give-up-after``)."""
KEY_REFUSED = ("the coordinator refused this worker's key: it is not among its authorized keys "
               "(ask the coordinator's operator for an invite)")


def bulk_endpoint(control: str, port: int) -> str:
    host = control.rsplit(":", 1)[0]
    return f"{host}:{port}"


class Resync(Exception):
    pass


class Worker:
    def __init__(self, connect: str, device: str = "cpu", dtype: str = "fp32", threads: int = 1,
                 name: Optional[str] = None, cache: Optional[str] = None, config: Optional[Config] = None,
                 say: Callable[[str], None] = print, credentials=None, give_up_after: float = GIVE_UP_AFTER_S,
                 parent_pid: Optional[int] = None):
        self.connect = check_endpoint(connect)
        self.credentials = credentials  # auth.Credentials (None: a plain-TCP pool)
        self.give_up_after = float(give_up_after)
        self.parent_pid = parent_pid
        self.device = resolve_device(device)
        self.dtype = dtype
        self.threads = threads
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.cache = Path(cache or os.environ.get("EA4LLM_CACHE", Path.home() / ".cache" / "ea4llm-pool"))
        self.expected_config = config
        self.say = say
        self.ctx = zmq.Context.instance()
        self.link: Optional[Link] = None
        self.replica: Optional[Replica] = None
        self.cfg: Optional[Config] = None
        self.train = None
        self.run_id = ""
        self.pending: dict[int, dict] = {}
        self.known: dict[int, str] = {}   # state hash per recent step (checked against attestations)
        self.update_s = 0.0               # seconds the last commit took to apply
        self.model_params = 0
        self._unreported: Optional[tuple[int, str]] = None  # (iteration, hash) not yet reported
        self._hash_cache = None
        self.units_done = 0
        self.throughput = 0.0
        self.stopping = False

    # -- registration ----------------------------------------------------------------------------
    def _hello(self) -> bytes:
        state_it = self.replica.master.step if self.replica is not None else -1
        fields = dict(config_hash=self.expected_config.config_hash() if self.expected_config else "",
                      selftest=self.selftest, device=str(self.device), dtype=self.dtype,
                      threads=max(1, torch.get_num_threads()), throughput=float(self.throughput),
                      worker_name=self.name, pid=os.getpid(), state_iteration=state_it,
                      state_hash=self.replica.state_hash() if self.replica is not None else "",
                      fitness=available_fitness())  # names from package metadata; imports no plugin
        return P.encode(P.HELLO, **fields)

    def _register(self) -> P.Message:
        """HELLO until WELCOME; REJECT ends the process. Backs off 1 s → 32 s with jitter."""
        delay = 1.0
        # Out of touch since the coordinator was last heard (or since this worker started).
        lost_since = self.link.last_heard if self.link is not None else time.monotonic()
        while True:
            if self.link is not None:
                self.link.stop()
            self.link = Link(self.ctx, self.connect, heartbeat_s=1.0, silence_s=30.0, credentials=self.credentials)
            self.link.start()
            self.link._pipe_out.send(self._hello())
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                msg = self.link.recv(timeout=0.25)
                if msg == AUTH_FAILED:
                    raise UserError(KEY_REFUSED)
                if isinstance(msg, P.VersionMismatch):
                    raise UserError(f"coordinator refused: {msg}")
                if isinstance(msg, P.Message):
                    if msg.type == P.WELCOME:
                        return msg
                    if msg.type == P.REJECT:
                        self.say(f"worker: rejected by the coordinator: {msg.reason}")
                        raise SystemExit(EXIT_REJECTED)
                    if msg.type == P.END:
                        mine = self.replica.master.step if self.replica is not None else -1
                        self.say(f"worker {self.name}: run over at iteration {msg.final_iteration} ({msg.reason}); "
                                 f"this worker was at iteration {mine}")
                        raise SystemExit(0)
            left = self.give_up_after - (time.monotonic() - lost_since)
            if left <= 0:
                raise UserError(f"no coordinator answered at {self.connect} for {self.give_up_after:g} s; "
                                "giving up (--give-up-after)")
            wait = min(delay * random.uniform(0.75, 1.25), left)
            self.say(f"worker: no answer from {self.connect}; retrying in {wait:.1f} s")
            time.sleep(wait)
            delay = min(delay * 2, 32.0)

    # -- sync ---------------------------------------------------------------------------------------
    def _bulk(self, bulk_port: int) -> BulkClient:
        # Replies come from the keeper's bulk thread at once, except a fresh sync point, which is
        # written on demand: allow for writing a checkpoint of this model's size (~20 MB/s, pessimistic).
        busy_s = 60.0 + 4 * self.model_params / 20e6
        return BulkClient(self.ctx, bulk_endpoint(self.connect, bulk_port), timeout_s=60.0, busy_wait_s=busy_s,
                          credentials=self.credentials)

    def _sync(self, welcome: P.Message) -> None:
        import yaml

        cfg = from_dict(yaml.safe_load(welcome.config_yaml), "coordinator config")
        if self.expected_config is not None and cfg.config_hash() != self.expected_config.config_hash():
            raise UserError("the coordinator's config differs from --config")
        self.cfg = cfg
        self.model_params = int(welcome.get("model_params") or 0)
        run_id = welcome.run_id
        keep = bool(welcome.keep_state and self.replica is not None and self.run_id == run_id)
        bulk = self._bulk(int(welcome.bulk_port))
        try:
            if not keep:
                have = self.replica.master.step if self.replica is not None and self.run_id == run_id else -1
                offer = bulk.sync_offer(have, self._current_hash() if have >= 0 else "")
                if offer.files:
                    self._load_checkpoint(bulk, run_id, offer)
            self.run_id = run_id
            self.pending.clear()
            self._unreported = None
            # One STATE after the sync reports where it ended.
            self._replay(bulk.log_records(self.replica.master.step), report=False)
        finally:
            bulk.close()
        self._publish_state()
        self.say(f"worker {self.name}: synced to iteration {self.replica.master.step} "
                 f"({self.device}, {self.dtype}, {torch.get_num_threads()} threads)")

    def _load_checkpoint(self, bulk: BulkClient, run_id: str, offer: P.Message) -> None:
        from .data import SampleSet

        root = self.cache / run_id
        for name, size, digest in offer.files:
            bulk.fetch(name, size, digest, root / name)
        self.replica = None  # the old replica's memory goes before the new one is built
        self.train = SampleSet.load(root / "data" / "train.npz")
        ckpt = root / f"step-{offer.checkpoint_iteration:06d}"
        model = load_model_skeleton(ckpt)
        self.replica = Replica(model, self.cfg.es, self.device, self.dtype, chunk=self.cfg.runtime.chunk_elements,
                               compile=self.cfg.runtime.compile, say=self.say)
        self._check_compiled()
        load_master_into(ckpt, self.replica.master)
        got, meta = self.replica.state_hash(), read_meta(ckpt)
        if got != meta["state_hash"]:
            raise Resync("checkpoint weights do not match their recorded state hash")
        self.known = {self.replica.master.step: got}
        self._hash_cache = (self.replica.master.step, self.replica, got)

    def _check_compiled(self) -> None:
        """The compiled kernels get the same known-answer test as the eager ones before they are trusted."""
        if not self.replica.compiled:
            return
        from .es.selftest import check

        ok, why = check(self.device, compiled=True)
        if not ok:
            self.say(f"worker: compiled kernels failed the self-test on {self.device} ({why}); using the eager ones")
            self.replica.use_eager()

    def _current_hash(self) -> str:
        """The replica's state hash, computed once per state (replay remembers each step's)."""
        step = self.replica.master.step
        if self._hash_cache is None or self._hash_cache[0] != step or self._hash_cache[1] is not self.replica:
            h = self.known.get(step) or self.replica.state_hash()
            self.known[step] = h
            self._hash_cache = (step, self.replica, h)
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

    def _replay(self, records, report: bool = True, to_step: Optional[int] = None) -> None:
        """Apply commits through the one replay loop; a disagreement with an attested hash resyncs."""
        def done(rec: dict, h: str) -> None:
            self.update_s = time.perf_counter() - t[0]
            self.link.update_s = self.update_s
            if report:  # reported by the next RESULT, or by a STATE if no lease follows
                self._unreported = (self.replica.master.step, h)
            t[0] = time.perf_counter()

        t = [time.perf_counter()]
        self._flush_state()  # the previous state's report goes out before the state moves on
        try:
            replay(self.replica, records, self.known, to_step=to_step, on_step=done)
        except ReplayMismatch as err:
            raise Resync(str(err)) from None

    def _catch_up(self, iteration: int, bulk_port: int) -> None:
        """Bring the replica to ``iteration`` commits using queued COMMITs, else the log."""
        queued = []
        while self.replica.master.step + len(queued) in self.pending:
            queued.append(self.pending.pop(self.replica.master.step + len(queued)))
        self._replay(queued, to_step=iteration)
        if self.replica.master.step < iteration:
            bulk = self._bulk(bulk_port)
            try:
                self._replay(bulk.log_records(self.replica.master.step), to_step=iteration)
            finally:
                bulk.close()
            if self.replica.master.step < iteration:
                raise Resync("the coordinator's log does not reach the leased iteration")
        self.pending = {k: v for k, v in self.pending.items() if k >= self.replica.master.step}

    # -- work -----------------------------------------------------------------------------------------
    def _evaluate(self, lease: P.Message) -> None:
        results = []
        t0 = time.perf_counter()
        self.link.busy = True
        samples = 0
        error = None
        try:
            for u in lease.units:
                ids, mask = self.train.batch(u["indices"])
                s, c = self.replica.evaluate_member(u["seed"], u["sign"], lease.sigma, ids, mask,
                                                    self.cfg.es.micro_batch)
                results.append({"member": u["member"], "sign": u["sign"], "sum_r": s, "count": c})
                samples += c
        except (RuntimeError, MemoryError, ValueError, IndexError) as err:
            # Out of memory on a GPU, a driver fault, a batch this device cannot take: the units go
            # back to the coordinator to be leased elsewhere, and this worker carries on.
            error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            self.say(f"worker {self.name}: evaluation failed ({error}); the lease goes back")
            results = []
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        dt = time.perf_counter() - t0
        self.units_done += len(results)
        if results:
            self.throughput = samples / dt if dt > 0 else 0.0
        self.link.busy = False
        self.link.done_units = self.units_done
        self.link.throughput = self.throughput
        carried = {}
        if self._unreported is not None and self._unreported[0] == lease.iteration:
            carried = {"state_iteration": self._unreported[0], "state_hash": self._unreported[1]}
            self._unreported = None
        self._flush_state()
        if error is not None:
            carried["error"] = error
        self.link.send(P.RESULT, lease_id=lease.lease_id, iteration=lease.iteration, results=results, eval_s=dt,
                       update_s=float(self.update_s), **carried)

    # -- main loop ------------------------------------------------------------------------------------
    def run(self) -> int:
        if self.parent_pid is not None:
            exit_with_parent(self.parent_pid, self.say)
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        from .es.selftest import check, run_selftest

        # The digests go to the coordinator, which refuses a device whose answers differ from its
        # own; a device that cannot even pass locally says why and stops here.
        self.selftest = run_selftest(self.device)
        ok, why = check(self.device)
        if not ok:
            self.say(f"worker: start-up self-test failed on {self.device}: {why}; this device cannot reproduce "
                     "the run bit for bit and must not join")
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
            bulk_port = int(welcome.bulk_port)
            # Heartbeats start at once: a sync (download, model load, replay) can take a while.
            self.link.heartbeat_s = welcome.heartbeat_s
            self.link.worker_id = welcome.worker_id
            try:
                self._sync(welcome)
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
            if msg == AUTH_FAILED:  # revoked: the link reconnected and the key was refused
                self.say(f"worker: {KEY_REFUSED}")
                return EXIT_REJECTED
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
                    self._replay([rec])
                    self._publish_state()
                    if self.link.inbox.empty():
                        self._flush_state()  # no lease waiting to carry the report
                elif rec["iteration"] > self.replica.master.step:
                    self.pending[rec["iteration"]] = rec
            elif t == P.RESYNC:
                raise Resync(msg.reason)
            elif t == P.END and self.replica.master.step != msg.final_iteration:
                # Back after the run ended without it (a partition, a paused machine): nothing is wrong.
                self.say(f"worker {self.name}: run over at iteration {msg.final_iteration} ({msg.reason}); "
                         f"this worker was at iteration {self.replica.master.step}")
                return 0
            elif t == P.END:
                self.say(f"worker {self.name}: run over at iteration {msg.final_iteration} ({msg.reason}); "
                         f"state hash {'agrees' if self._current_hash() == msg.final_hash else 'DIFFERS'}")
                return 0 if self._current_hash() == msg.final_hash else 1
            elif t == P.ERROR:
                if msg.code == "unknown_worker":
                    return "reregister"
                if msg.code == "banned":
                    self.say(f"worker: banned by the coordinator: {msg.reason}")
                    return EXIT_REJECTED
                self.say(f"worker: coordinator error: {msg.reason}")
            elif t == P.REJECT:  # the coordinator cut this worker off (its key was revoked)
                self.say(f"worker: rejected by the coordinator: {msg.reason}")
                return EXIT_REJECTED
            elif t == P.WELCOME:
                continue
        return 0


def exit_with_parent(pid: int, say: Callable[[str], None]) -> None:
    """End this process when process ``pid`` (its parent, e.g. ``train``) ends, however it ends.

    Linux: the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG), even if this process is
    stuck in a kernel; everywhere: a thread notices the parent is gone (re-parenting) within 0.5 s.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watcher below still works

    def gone() -> bool:
        return os.getppid() != pid

    def watch() -> None:
        while not gone():
            time.sleep(0.5)
        say("worker: the process that started it is gone; exiting")
        os._exit(EXIT_ORPHANED)

    if gone():  # it died before the death signal was armed
        os._exit(EXIT_ORPHANED)
    threading.Thread(target=watch, name="ea4llm-parent-watch", daemon=True).start()


def main(connect: str, device: str, dtype: str, threads: int, name: Optional[str], cache: Optional[str],
         config: Optional[Config], credentials=None, give_up_after: float = GIVE_UP_AFTER_S,
         parent_pid: Optional[int] = None) -> int:
    w = Worker(connect, device, dtype, threads, name, cache, config, say=lambda s: print(s, flush=True),
               credentials=credentials, give_up_after=give_up_after, parent_pid=parent_pid)
    return w.run()
