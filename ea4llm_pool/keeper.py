"""The keeper: the coordinator's model work, in a process of its own, off the critical path.

The coordinator only schedules: it closes an iteration, appends the COMMIT to the log and
announces it at once. Everything that touches the model happens here, beside it:

* the reference replica follows every commit and reports its state hash (the coordinator checks
  the workers' reports against it, and the next records attest it);
* held-out evaluation, metrics and the loss plot, checkpoints;
* checking units when the pool verifies fitness values: the reference replica evaluates the
  members it is leased at the state they belong to (commits and leases arrive in order);
* the bulk channel (a thread): checkpoint files, log records, and the newest sync point — when a
  worker asks to join and the latest checkpoint is more than FRESH_STEPS commits old, a checkpoint
  of the current state is written for it, so a late joiner never replays hundreds of commits.

It talks to the coordinator over a pipe (msgpack frames, never pickle). A new run is built here
(tokenizer, samples, initial model and checkpoint), so the coordinator process never holds a model.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

import msgpack

from . import UserError

FRESH_STEPS = 2
"""A sync point at most this many commits old is good enough for a joining worker."""
KEEP_SNAPSHOTS = 2
"""Checkpoints written only for joining workers: the newest this many are kept."""


def bind_retrying(sock, addr: str, patience_s: float = 2.0) -> None:
    """Bind, waiting a moment for a port that ``check_bind`` (or a previous run) released just now:
    ZeroMQ closes sockets in its I/O thread, so the port may still be held for a few milliseconds."""
    import zmq

    deadline = time.monotonic() + patience_s
    while True:
        try:
            sock.bind(addr)
            return
        except zmq.ZMQError as err:
            if err.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- the coordinator's side -------------------------------------------------------------------------
class KeeperHandle:
    """Starts the keeper process and exchanges messages with it."""

    def __init__(self, spec: dict):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=keeper_main, args=(child, spec), name="ea4llm-keeper", daemon=True)
        self.proc.start()
        child.close()

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, kind: str, **fields) -> None:
        try:
            self.conn.send_bytes(msgpack.packb({"kind": kind, **fields}, use_bin_type=True))
        except (OSError, EOFError, BrokenPipeError):
            pass  # a dead keeper is noticed by recv()

    def recv(self, timeout: float = 0.0) -> Optional[dict]:
        """One message, or None if none is waiting; a dead keeper raises UserError."""
        try:
            if not self.conn.poll(timeout):
                if not self.proc.is_alive():
                    raise UserError(f"the coordinator's keeper process died (exit code {self.proc.exitcode})")
                return None
            return msgpack.unpackb(self.conn.recv_bytes(), raw=False, strict_map_key=False)
        except (EOFError, OSError):
            raise UserError(f"the coordinator's keeper process died (exit code {self.proc.exitcode})") from None

    def close(self, timeout: float = 10.0) -> None:
        self.send("quit")
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


# -- the keeper process ---------------------------------------------------------------------------------
def keeper_main(conn, spec: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the coordinator decides
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import quiet_transformers

    quiet_transformers()

    def send(kind: str, **fields) -> None:
        try:
            conn.send_bytes(msgpack.packb({"kind": kind, **fields}, use_bin_type=True))
        except (OSError, BrokenPipeError):
            os._exit(0)  # the coordinator is gone

    keeper = None
    try:
        keeper = Keeper(spec, send)
        keeper.serve(conn)
    except UserError as err:
        send("fatal", message=str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Exception as err:  # a bug: one line to the coordinator, the traceback on request
        first = str(err).splitlines()[0] if str(err) else ""
        if os.environ.get("EA4LLM_DEBUG"):
            traceback.print_exc()
        send("fatal", message=f"internal error in the keeper ({type(err).__name__}: {first}); "
                              "rerun with EA4LLM_DEBUG=1 for the traceback")
    finally:
        if keeper is not None:
            keeper.close()


class _Records:
    """The log records the keeper has seen, served to LOG_FETCH from the bulk thread."""

    def __init__(self):
        self._recs: list[dict] = []
        self._first = 0
        self._lock = threading.Lock()

    def add(self, rec: dict) -> None:
        with self._lock:
            if not self._recs:
                self._first = rec["iteration"]
            self._recs.append(rec)

    def records(self, from_iteration: int = 0):
        with self._lock:
            start = max(0, from_iteration - self._first)
            return list(self._recs[start:])


class Keeper:
    def __init__(self, spec: dict, send):
        import torch

        from .config import from_dict
        from .run import Run

        self.send = send
        self.spec = spec
        torch.set_num_threads(max(1, int(spec.get("threads") or 1)))
        cfg = None
        if spec.get("config_yaml") is not None:
            import yaml

            cfg = from_dict(yaml.safe_load(spec["config_yaml"]), "config")
        say = lambda text: send("say", text=text)  # noqa: E731
        self.run = Run(cfg, spec["out"], resume=spec["resume"], device=spec.get("device", "cpu"),
                       iterations=spec.get("iterations"), say=say, writer=False)
        self.run.open_reporter()
        self.records = _Records()
        if self.run.log is not None:
            for rec in self.run.log.records(0):
                self.records.add(rec)
        self.lock = threading.Lock()
        self.step = self.run.step
        self.want_snapshot = False
        self.sync_point: tuple[int, list[str]] = (-1, [])
        self.snapshots: list[Path] = []
        self._halt = threading.Event()
        from .sync import FileServer

        self.files = FileServer(offer_fn=self._offer)
        self._offer_checkpoint(self._latest_checkpoint())
        self._bulk_ready = threading.Event()
        self._bulk_error: Optional[str] = None
        self.bulk_malformed = 0      # frames on the bulk channel that were not a valid request
        self.bulk_unauthorized = 0   # requests from keys revoked after they connected
        self.bulk = threading.Thread(target=self._serve_bulk, args=(spec["bulk_bind"],), name="ea4llm-bulk",
                                     daemon=True)
        self.bulk.start()
        self._bulk_ready.wait(10)
        if self._bulk_error:
            raise UserError(self._bulk_error)
        from .model import count_parameters

        send("ready", step=self.step, state_hash=self.run.state_hash, n_train=len(self.run.train),
             params=count_parameters(self.run.replica.model), bulk_port=self.bulk_port,
             banner=self.run.banner(spec.get("banner_workers", "pool")), config_yaml=self.run.config_yaml,
             known={str(k): v for k, v in self.run.known.items()})
        if self.step == 0 and not spec["resume"]:
            send("line", line=self._clean(self.run.report_start()))

    # -- sync points -------------------------------------------------------------------------------
    def _latest_checkpoint(self) -> Path:
        from .checkpoint import list_checkpoints

        return list_checkpoints(self.run.out)[-1][1]

    def _offer_checkpoint(self, ckpt: Path) -> None:
        names = []
        for f in sorted(ckpt.iterdir()):
            if f.is_file():
                name = f"{ckpt.name}/{f.name}"
                self.files.offer(name, f)
                names.append(name)
        train = self.run.out / "data" / "train.npz"
        self.files.offer("data/train.npz", train)
        names.append("data/train.npz")
        with self.lock:
            self.sync_point = (int(ckpt.name[5:]), names)

    def _offer(self, have_step: int, have_hash: str):
        """SYNC_REQ from a joining worker (bulk thread): the sync point, or seconds to retry."""
        with self.lock:
            c, names = self.sync_point
            if 0 <= have_step <= self.step and have_step >= c and self.run.known.get(have_step) == have_hash:
                return {"checkpoint_iteration": have_step, "files": [], "log_from": have_step}
            if self.step - c <= FRESH_STEPS:
                return {"checkpoint_iteration": c, "files": self.files.listing(names), "log_from": c}
            self.want_snapshot = True
        return 2.0

    def _snapshot(self) -> None:
        """A checkpoint of the current state for joining workers (older such ones are pruned)."""
        from .checkpoint import step_dir

        self.want_snapshot = False
        d = step_dir(self.run.out, self.run.step)
        if not d.exists():
            d = self.run.checkpoint(final=False)
            self.snapshots.append(d)
        self._offer_checkpoint(d)
        while len(self.snapshots) > KEEP_SNAPSHOTS:
            shutil.rmtree(self.snapshots.pop(0), ignore_errors=True)

    def _serve_bulk(self, bind: str) -> None:
        import zmq

        from . import protocol as P

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        P.configure_socket_limits(sock, max_bytes=P.MAX_REQUEST_BYTES)  # requests are small
        ring = authenticator = None
        try:
            if self.spec.get("keys"):
                # The same allow-list as the control socket, read by this process on its own.
                from .auth import KeyRing

                ring = KeyRing(self.spec["keys"], create=False)
                authenticator = ring.start_authenticator(ctx)
                ring.serve(sock)
            bind_retrying(sock, bind)
        except (zmq.ZMQError, UserError) as err:
            why = err.strerror if isinstance(err, zmq.ZMQError) else str(err)
            self._bulk_error = f"coordinator cannot bind its bulk channel {bind}: {why}"
            sock.close(linger=0)
            if authenticator is not None:
                authenticator.stop()
            self._bulk_ready.set()
            return
        self.bulk_port = int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        self._bulk_ready.set()
        from .auth import user_id

        next_keys = 0.0
        try:
            while not self._halt.is_set():
                if ring is not None and time.monotonic() >= next_keys:
                    ring.refresh()  # a revoked key's next request is refused
                    next_keys = time.monotonic() + 0.1
                if not sock.poll(100 if ring is not None else 200):
                    continue
                for _ in range(64):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if len(frames) != 2:
                        self.bulk_malformed += 1
                        continue
                    ident, frame = frames[0].bytes, frames[1].bytes
                    if ring is not None and ring.name_of(user_id(frames[1])) is None:
                        self.bulk_unauthorized += 1
                        reply = P.encode(P.ERROR, code="unauthorized", reason="this key is no longer authorized")
                        try:
                            sock.send_multipart([ident, reply], zmq.NOBLOCK)
                        except zmq.ZMQError:
                            pass
                        continue
                    try:
                        msg = P.decode(frame)
                        if msg.type not in (P.FETCH, P.LOG_FETCH, P.SYNC_REQ):
                            self.bulk_malformed += 1  # a valid message, but not a bulk-channel request
                        reply = self.files.handle(msg, self.records)
                    except P.ProtocolError as err:
                        self.bulk_malformed += 1
                        reply = P.encode(P.ERROR, code="bad_request", reason=str(err)[:500])
                    except OSError as err:  # a pruned file, a full disk: the worker retries its sync
                        reply = P.encode(P.ERROR, code="busy", reason=f"bulk read failed: {err}", retry_s=1.0)
                    try:
                        sock.send_multipart([ident, reply], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
        finally:
            sock.close(linger=0)
            if authenticator is not None:
                authenticator.stop()

    # -- the loop ----------------------------------------------------------------------------------
    def serve(self, conn) -> None:
        while True:
            if self.want_snapshot:
                self._snapshot()
            if not conn.poll(0.1):
                continue
            try:
                msg = msgpack.unpackb(conn.recv_bytes(), raw=False, strict_map_key=False)
            except (EOFError, OSError):
                return
            kind = msg["kind"]
            if kind == "commit":
                self._commit(msg)
            elif kind == "evaluate":
                self._evaluate(msg)
            elif kind == "finish":
                self._finish(bool(msg.get("complete")))
            elif kind == "quit":
                return

    def _commit(self, msg: dict) -> None:
        from .checkpoint import step_dir

        rec = msg["record"]
        self.records.add(rec)
        t0 = time.perf_counter()
        h = self.run.follow(rec)
        apply_s = time.perf_counter() - t0
        with self.lock:
            self.step = self.run.step
        self.send("hash", step=self.run.step, state_hash=h, apply_s=apply_s, bulk_malformed=self.bulk_malformed,
                  bulk_unauthorized=self.bulk_unauthorized)
        extra = dict(msg.get("extra") or {})
        extra["keeper_apply_s"] = round(apply_s, 4)
        line = self.run.report(rec, msg["seconds"], msg["tokens"], extra=extra)
        if step_dir(self.run.out, self.run.step).exists() and self.sync_point[0] < self.run.step:
            self._offer_checkpoint(step_dir(self.run.out, self.run.step))
        self.send("line", line=self._clean(line))

    def _evaluate(self, msg: dict) -> None:
        """A lease for the reference replica: the members' fitness, as a worker computes it."""
        run, results, error = self.run, [], None
        t0 = time.perf_counter()
        if run.step != int(msg["iteration"]):
            error = f"the reference replica is at step {run.step}, the lease is for iteration {msg['iteration']}"
        else:
            try:
                for u in msg["units"]:
                    ids, mask = run.train.batch(u["indices"])
                    s, c = run.replica.evaluate_member(int(u["seed"]), int(u["sign"]), float(msg["sigma"]), ids, mask,
                                                       run.cfg.es.micro_batch)
                    results.append({"member": u["member"], "sign": u["sign"], "sum_r": s, "count": c})
            except (RuntimeError, MemoryError, ValueError, IndexError) as err:
                error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                results = []
        self.send("result", lease_id=msg["lease_id"], iteration=msg["iteration"], results=results,
                  eval_s=time.perf_counter() - t0, error=error)

    def _finish(self, complete: bool) -> None:
        from .checkpoint import step_dir

        if self.run.step > 0 and not step_dir(self.run.out, self.run.step).exists():
            self.run.checkpoint(final=complete)
        self._close_reporter()
        self.send("finished", step=self.run.step, state_hash=self.run.state_hash, bulk_malformed=self.bulk_malformed,
                  bulk_unauthorized=self.bulk_unauthorized)

    @staticmethod
    def _clean(line: dict) -> dict:
        """A metrics line as plain msgpack-able values (NaN stays a float)."""
        return {k: (float(v) if isinstance(v, float) else v) for k, v in line.items()
                if v is None or isinstance(v, (int, float, str, bool))}

    def close(self) -> None:
        self._halt.set()
        if hasattr(self, "bulk"):
            self.bulk.join(2)
        self._close_reporter()

    def _close_reporter(self) -> None:
        if not getattr(self, "_reporter_closed", False):
            self._reporter_closed = True
            self.run.reporter.close()
