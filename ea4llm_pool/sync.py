"""Bulk transfer on its own channel, so checkpoint bytes never delay heartbeats.

Server side (coordinator): a whitelist of files by name, served in CHUNK replies to FETCH requests,
and run-log records served to LOG_FETCH. Client side (worker): credit-based pulling — one request
in flight per chunk, so a slow link is never flooded — with SHA-256 checks and a local cache.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import zmq

from . import protocol as P

LOG_BATCH = 256


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileServer:
    """What the coordinator offers on the bulk channel."""

    def __init__(self):
        self.files: dict[str, Path] = {}
        self._meta: dict[str, tuple[int, str]] = {}

    def offer(self, name: str, path: Path) -> None:
        path = Path(path)
        self.files[name] = path
        self._meta[name] = (path.stat().st_size, sha256_file(path))

    def listing(self, names: list[str]) -> list[list]:
        return [[n, self._meta[n][0], self._meta[n][1]] for n in names]

    def handle(self, msg: P.Message, log) -> bytes:
        if msg.type == P.FETCH:
            path = self.files.get(msg.name)
            if path is None:
                return P.encode(P.ERROR, code="not_found", reason=f"no file {msg.name!r} on offer")
            with open(path, "rb") as fh:
                fh.seek(msg.offset)
                data = fh.read(msg.length)
            eof = msg.offset + len(data) >= path.stat().st_size
            return P.encode(P.CHUNK, name=msg.name, offset=msg.offset, data=data, eof=eof)
        if msg.type == P.LOG_FETCH:
            limit = min(msg.get("max_records") or LOG_BATCH, LOG_BATCH)
            recs = []
            last = True
            for rec in log.records(from_iteration=msg.from_iteration):
                if len(recs) >= limit:
                    last = False
                    break
                recs.append(rec)
            return P.encode(P.LOG_RECORDS, records=recs, last=last)
        return P.encode(P.ERROR, code="bad_request", reason=f"{msg.type} is not a bulk-channel request")


class BulkClient:
    """The worker's side of the bulk channel (used from the main thread only)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = 10.0):
        self.sock = ctx.socket(zmq.DEALER)
        P.configure_socket_limits(self.sock)
        self.sock.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)

    def _request(self, msg_type: str, **fields) -> P.Message:
        self.sock.send(P.encode(msg_type, **fields))
        if not self.sock.poll(self.timeout_ms):
            raise ConnectionError("the coordinator's bulk channel did not answer")
        reply = P.decode(self.sock.recv())
        if reply.type == P.ERROR:
            raise ConnectionError(f"bulk channel: {reply.reason}")
        return reply

    def fetch(self, name: str, size: int, sha256: str, dest: Path) -> Path:
        dest = Path(dest)
        if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
            return dest  # cached from an earlier sync
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own: workers on one machine may share a cache and fetch the same file at
        # once; each writes its own part file and the (identical) results replace one another.
        tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        h = hashlib.sha256()
        offset = 0
        with open(tmp, "wb") as fh:
            while offset < size:
                rep = self._request(P.FETCH, name=name, offset=offset, length=min(P.CHUNK_SIZE, size - offset))
                if rep.type != P.CHUNK or rep.offset != offset or not rep.data:
                    raise ConnectionError(f"bulk channel: unexpected reply while fetching {name}")
                fh.write(rep.data)
                h.update(rep.data)
                offset += len(rep.data)
        if h.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise ConnectionError(f"{name}: checksum mismatch after transfer")
        os.replace(tmp, dest)
        return dest

    def log_records(self, from_iteration: int) -> Iterator[dict]:
        nxt = from_iteration
        while True:
            rep = self._request(P.LOG_FETCH, from_iteration=nxt)
            for rec in rep.records:
                yield rec
                nxt = rec["iteration"] + 1
            if rep.last or not rep.records:
                return

    def close(self) -> None:
        self.sock.close(linger=0)
