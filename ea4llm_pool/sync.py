"""Bulk transfer on its own channel, so checkpoint bytes never delay heartbeats.

Server side (coordinator): :class:`FileServer` answers one request at a time, from whatever
thread runs the bulk socket: SYNC_REQ (through a callback: the newest sync point, or "busy"),
FETCH from a whitelist of files by name (CHUNK replies), LOG_FETCH from the run log.

Client side (worker): :class:`BulkClient` keeps a window of FETCH requests in flight, writes
chunks at their offsets as they arrive, hashes them in order and checks the SHA-256 at the end,
so a transfer costs one round trip per window rather than one per chunk while a slow link is
still never sent more than ``window`` chunks ahead. ERROR "busy" replies are retried after
their ``retry_s``, for at most ``busy_wait_s`` in all.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import zmq

from . import protocol as P

LOG_BATCH = P.LOG_BATCH

OfferFn = Callable[[int, str], Union[dict, float]]
"""``offer_fn(have_step, have_hash)``: a SYNC_OFFER's fields, or seconds after which to ask again."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileServer:
    """What the coordinator offers on the bulk channel. ``offer`` and ``handle`` may run in
    different threads."""

    def __init__(self, offer_fn: Optional[OfferFn] = None):
        self.offer_fn = offer_fn
        self._lock = threading.Lock()
        self._files: dict[str, tuple[Path, int, str]] = {}  # name -> (path, size, sha256)

    def offer(self, name: str, path: Path) -> None:
        """Serve ``path`` as ``name`` (hashed now, outside the lock; replaces an earlier offer)."""
        path = Path(path)
        meta = (path, path.stat().st_size, sha256_file(path))
        with self._lock:
            self._files[name] = meta

    def withdraw(self, name: str) -> None:
        with self._lock:
            self._files.pop(name, None)

    def listing(self, names: list[str]) -> list[list]:
        """[[name, size, sha256], ...] of offered files, for a SYNC_OFFER."""
        with self._lock:
            return [[n, self._files[n][1], self._files[n][2]] for n in names]

    def handle(self, msg: P.Message, log=None) -> bytes:
        """The reply to one bulk-channel request. ``log.records(from_iteration=i)``: the run-log
        records from iteration i on (any iterable of dicts). Raises OSError if a file cannot be read."""
        if msg.type == P.FETCH:
            return self._chunk(msg.name, msg.offset, msg.length)
        if msg.type == P.LOG_FETCH:
            if log is None:
                return _error("bad_request", "this bulk channel serves no run log")
            return self._records(log, msg.from_iteration, msg.max_records)
        if msg.type == P.SYNC_REQ:
            if self.offer_fn is None:
                return _error("bad_request", "this bulk channel offers no sync point")
            offer = self.offer_fn(msg.have_step, msg.have_hash)
            if isinstance(offer, dict):
                return P.encode(P.SYNC_OFFER, **offer)
            return P.encode(P.ERROR, code="busy", reason="the sync point is being prepared",
                            retry_s=float(offer))
        return _error("bad_request", f"{msg.type} is not a bulk-channel request")

    def _chunk(self, name: str, offset: int, length: int) -> bytes:
        with self._lock:
            meta = self._files.get(name)
        if meta is None:
            return _error("not_found", f"no file {name!r} on offer")
        path, size, _ = meta
        if offset > size:
            return _error("bad_request", f"offset {offset} is beyond the end of {name!r} ({size} bytes)")
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(min(length, size - offset))
        return P.encode(P.CHUNK, name=name, offset=offset, data=data, eof=offset + len(data) >= size)

    @staticmethod
    def _records(log, from_iteration: int, max_records: Optional[int]) -> bytes:
        limit = min(max_records or LOG_BATCH, LOG_BATCH)
        recs: list[dict] = []
        last = True
        for rec in log.records(from_iteration=from_iteration):
            if rec["iteration"] < from_iteration:
                continue
            if len(recs) >= limit:
                last = False
                break
            recs.append(rec)
        return P.encode(P.LOG_RECORDS, records=recs, last=last)


def _error(code: str, reason: str) -> bytes:
    return P.encode(P.ERROR, code=code, reason=reason)


class BulkClient:
    """The worker's side of the bulk channel (one thread at a time).

    ``timeout_s``: the longest wait for any one reply; ``busy_wait_s``: the longest time, in all,
    spent waiting out ERROR "busy" replies of one request; ``window``: FETCH requests in flight.
    After a timeout the socket is replaced, so a late reply cannot be taken for a later answer.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = 30.0,
                 busy_wait_s: float = 300.0, window: int = 8, chunk_size: int = P.CHUNK_SIZE,
                 credentials=None):
        if window < 1:
            raise ValueError(f"window must be ≥ 1, got {window}")
        if not 1 <= chunk_size <= P.CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{P.CHUNK_SIZE}, got {chunk_size}")
        self.ctx, self.endpoint = ctx, endpoint
        self.timeout_s, self.busy_wait_s = float(timeout_s), float(busy_wait_s)
        self.window, self.chunk_size = int(window), int(chunk_size)
        self.credentials = credentials  # auth.Credentials: CurveZMQ (None: plain TCP)
        self.sock = self._connect()

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        P.configure_socket_limits(sock, linger_ms=0)
        if self.credentials is not None:
            self.credentials.apply(sock)
        sock.connect(self.endpoint)
        return sock

    def _reset(self) -> None:
        """A fresh socket: answers to requests sent on the old one can no longer arrive."""
        self.sock.close(linger=0)
        self.sock = self._connect()

    def _recv(self) -> P.Message:
        """The next reply; a ConnectionError (and a fresh socket) if none comes within timeout_s."""
        if not self.sock.poll(int(self.timeout_s * 1000)):
            self._reset()
            raise ConnectionError(f"the coordinator's bulk channel did not answer within {self.timeout_s:g} s")
        return P.decode(self.sock.recv(copy=False).buffer)  # no copy of a chunk before unpacking

    def _busy_pause(self, reply: P.Message, waited_until: float, what: str) -> None:
        """Sleep out a "busy" reply, or raise once the total wait would pass busy_wait_s."""
        pause = reply.retry_s if reply.retry_s is not None else 1.0
        if time.monotonic() + pause > waited_until:
            raise ConnectionError(f"bulk channel: {what}: still busy after {self.busy_wait_s:g} s "
                                  f"({reply.reason})")
        time.sleep(pause)

    def _request(self, msg_type: str, expect: str, **fields) -> P.Message:
        frame = P.encode(msg_type, **fields)
        give_up = time.monotonic() + self.busy_wait_s
        while True:
            self.sock.send(frame)
            reply = self._recv()
            if reply.type == expect:
                return reply
            if reply.type == P.ERROR and reply.code == "busy":
                self._busy_pause(reply, give_up, msg_type)
                continue
            if reply.type == P.ERROR:
                raise ConnectionError(f"bulk channel: {msg_type}: {reply.code}: {reply.reason}")
            raise ConnectionError(f"bulk channel: {msg_type} was answered by {reply.type}")

    def sync_offer(self, have_step: int, have_hash: str) -> P.Message:
        """Ask how to reach the current state from ``have_step`` (hash ``have_hash``): a
        SYNC_OFFER message (checkpoint_iteration, files, log_from)."""
        return self._request(P.SYNC_REQ, P.SYNC_OFFER, have_step=have_step, have_hash=have_hash)

    def fetch(self, name: str, size: int, sha256: str, dest: Path) -> Path:
        """``name`` into ``dest`` (kept if already there with that size and hash); ConnectionError
        on a size or checksum mismatch, an unknown file or a silent server."""
        dest = Path(dest)
        if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
            return dest  # cached from an earlier sync
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: workers on one machine may share a cache and fetch the same file at
        # once; each writes its own part file and the (identical) results replace one another.
        tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                digest = self._pull(name, size, fh)
            if digest != sha256:
                raise ConnectionError(f"{name}: checksum mismatch after transfer "
                                      f"(got {digest[:16]}..., expected {sha256[:16]}...)")
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            self._reset()  # requests of the failed transfer may still be answered
            raise
        return dest

    def _pull(self, name: str, size: int, fh) -> str:
        """Fetch ``size`` bytes of ``name`` into ``fh``, ``window`` requests in flight; the
        SHA-256 of what arrived, hashed in offset order."""
        h = hashlib.sha256()
        pending: dict[int, int] = {}  # offset -> length, requested and not yet answered
        early: dict[int, bytes] = {}  # arrived ahead of the hashed prefix
        next_offset = hashed = 0
        give_up = time.monotonic() + self.busy_wait_s

        def send(offset: int, length: int) -> None:
            self.sock.send(P.encode(P.FETCH, name=name, offset=offset, length=length))

        while hashed < size:
            while next_offset < size and len(pending) < self.window:
                length = min(self.chunk_size, size - next_offset)
                pending[next_offset] = length
                send(next_offset, length)
                next_offset += length
            reply = self._recv()
            if reply.type == P.ERROR and reply.code == "busy":
                # The reply does not say which request it answers: ask again for all of them;
                # answers to the duplicates are dropped below.
                self._busy_pause(reply, give_up, f"fetching {name}")
                for offset, length in pending.items():
                    send(offset, length)
                continue
            if reply.type == P.ERROR:
                raise ConnectionError(f"bulk channel: fetching {name}: {reply.code}: {reply.reason}")
            if reply.type != P.CHUNK:
                raise ConnectionError(f"bulk channel: FETCH of {name} was answered by {reply.type}")
            want = pending.get(reply.offset) if reply.name == name else None
            if want is None:
                continue  # a duplicate or a late answer to an earlier transfer
            if len(reply.data) != want or reply.eof != (reply.offset + want >= size):
                raise ConnectionError(
                    f"{name}: size mismatch: the server sent {len(reply.data)} bytes at offset "
                    f"{reply.offset} (eof {reply.eof}) for a file listed as {size} bytes")
            del pending[reply.offset]
            fh.seek(reply.offset)
            fh.write(reply.data)
            early[reply.offset] = reply.data
            while hashed in early:
                data = early.pop(hashed)
                h.update(data)
                hashed += len(data)
        return h.hexdigest()

    def log_records(self, from_iteration: int) -> Iterator[dict]:
        """Run-log records from ``from_iteration`` on, page by page, until the server says last."""
        nxt = from_iteration
        while True:
            rep = self._request(P.LOG_FETCH, P.LOG_RECORDS, from_iteration=nxt)
            for rec in rep.records:
                if rec["iteration"] < nxt:
                    raise ConnectionError(f"bulk channel: log record {rec['iteration']} arrived "
                                          f"after {nxt - 1}")
                yield rec
                nxt = rec["iteration"] + 1
            if rep.last or not rep.records:
                return

    def close(self) -> None:
        self.sock.close(linger=0)
