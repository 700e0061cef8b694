"""The bulk channel over real loopback TCP: a ROUTER thread serving FileServer, a BulkClient."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import zmq

from ea4llm_pool import protocol as P
from ea4llm_pool.sync import BulkClient, FileServer, sha256_file


class Log:
    """A run log: records(from_iteration) of consecutive iterations."""

    def __init__(self, n: int):
        self.recs = [{"iteration": i, "attest": None, "seeds": [i, i + 1]} for i in range(n)]

    def records(self, from_iteration: int = 0):
        return iter(self.recs[from_iteration:])


class Served:
    """FileServer on a ROUTER socket in a thread, as the coordinator runs it; counts requests by
    type and the most requests found waiting at once. ``hold_s`` delays the first read, so
    pipelined requests pile up."""

    def __init__(self, server: FileServer, log=None, hold_s: float = 0.0, busy_fetches: int = 0):
        self.server, self.log, self.hold_s, self.busy_fetches = server, log, hold_s, busy_fetches
        self.counts: dict[str, int] = {}
        self.most_waiting = 0
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        P.configure_socket_limits(self.sock, linger_ms=0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            if self.hold_s:
                time.sleep(self.hold_s)
                self.hold_s = 0.0
            batch = []
            while True:
                try:
                    batch.append(self.sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            self.most_waiting = max(self.most_waiting, len(batch))
            for ident, frame in batch:
                msg = P.decode(frame)
                self.counts[msg.type] = self.counts.get(msg.type, 0) + 1
                if msg.type == P.FETCH and self.busy_fetches:
                    self.busy_fetches -= 1
                    reply = P.encode(P.ERROR, code="busy", reason="disk busy", retry_s=0.05)
                else:
                    reply = self.server.handle(msg, self.log)
                self.sock.send_multipart([ident, reply])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def blob(tmp_path) -> Path:
    path = tmp_path / "server" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 * P.CHUNK_SIZE + 12345))
    return path


def _client(ctx, served: Served, **kw) -> BulkClient:
    kw.setdefault("timeout_s", 10.0)
    return BulkClient(ctx, served.endpoint, **kw)


def _parts(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".part-" in p.name]


@pytest.mark.parametrize("window,chunk_size", [(1, P.CHUNK_SIZE), (8, P.CHUNK_SIZE), (8, 256 * 1024)])
def test_fetch_pipelined(ctx, tmp_path, blob, window, chunk_size):
    server = FileServer()
    server.offer("m", blob)
    (name, size, digest), = server.listing(["m"])
    served = Served(server, hold_s=0.2)
    client = _client(ctx, served, window=window, chunk_size=chunk_size)
    try:
        dest = client.fetch(name, size, digest, tmp_path / "cache" / "m.bin")
        assert dest.read_bytes() == blob.read_bytes()
        chunks = -(-size // chunk_size)
        assert served.counts[P.FETCH] == chunks
        assert served.most_waiting == min(window, chunks)  # requests really were in flight together
        assert not _parts(dest.parent)
        # a second fetch finds the file in the cache and asks for nothing
        assert client.fetch(name, size, digest, dest) == dest
        assert served.counts[P.FETCH] == chunks
    finally:
        client.close()
        served.close()


def test_fetch_errors_leave_nothing_behind(ctx, tmp_path, blob):
    server = FileServer()
    server.offer("m", blob)
    size, digest = blob.stat().st_size, sha256_file(blob)
    served = Served(server)
    client = _client(ctx, served, window=4)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(ConnectionError, match="m: checksum mismatch"):
            client.fetch("m", size, "0" * 64, cache / "a")
        with pytest.raises(ConnectionError, match="m: size mismatch.*listed as"):
            client.fetch("m", size + 10, digest, cache / "b")  # the server's file is shorter
        with pytest.raises(ConnectionError, match="m: size mismatch"):
            client.fetch("m", size - 10, digest, cache / "c")  # ... or longer
        with pytest.raises(ConnectionError, match="not_found: no file 'nope' on offer"):
            client.fetch("nope", 10, digest, cache / "d")
        assert sorted(p.name for p in cache.iterdir()) == []
        # a cached file with the wrong content is fetched again, and the client still works
        (cache / "e").write_bytes(b"x" * size)
        assert client.fetch("m", size, digest, cache / "e").read_bytes() == blob.read_bytes()
    finally:
        client.close()
        served.close()


def test_fetch_waits_out_busy(ctx, tmp_path, blob):
    server = FileServer()
    server.offer("m", blob)
    size, digest = blob.stat().st_size, sha256_file(blob)
    served = Served(server, busy_fetches=2)
    client = _client(ctx, served, window=8)
    try:
        dest = client.fetch("m", size, digest, tmp_path / "m")
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest
        assert served.counts[P.FETCH] > 4  # re-sent after the busy replies
    finally:
        client.close()
        served.close()


def test_sync_offer_retries_busy(ctx, blob):
    calls = []

    def offer(have_step, have_hash):
        calls.append((have_step, have_hash))
        if len(calls) < 3:
            return 0.05  # a fresh checkpoint is being written
        return {"checkpoint_iteration": 7, "files": server.listing(["m"]), "log_from": 7}

    server = FileServer(offer_fn=offer)
    server.offer("m", blob)
    served = Served(server)
    client = _client(ctx, served, busy_wait_s=5.0)
    try:
        t0 = time.monotonic()
        offer_msg = client.sync_offer(-1, "")
        assert time.monotonic() - t0 >= 0.1
        assert offer_msg.type == P.SYNC_OFFER and offer_msg.checkpoint_iteration == 7
        assert offer_msg.log_from == 7
        assert [list(f) for f in offer_msg.files] == [["m", blob.stat().st_size, sha256_file(blob)]]
        assert calls == [(-1, "")] * 3
    finally:
        client.close()
        served.close()


def test_sync_offer_gives_up_after_busy_wait(ctx):
    served = Served(FileServer(offer_fn=lambda step, h: 0.1))
    client = _client(ctx, served, busy_wait_s=0.35)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"SYNC_REQ: still busy after 0.35 s"):
            client.sync_offer(3, "abc")
        assert time.monotonic() - t0 < 2.0
        assert 3 <= served.counts[P.SYNC_REQ] <= 4
    finally:
        client.close()
        served.close()


def test_sync_req_without_offer_and_wrong_requests(ctx):
    served = Served(FileServer())
    client = _client(ctx, served)
    try:
        with pytest.raises(ConnectionError, match="bad_request: this bulk channel offers no sync point"):
            client.sync_offer(-1, "")
        with pytest.raises(ConnectionError, match="bad_request: this bulk channel serves no run log"):
            list(client.log_records(0))
    finally:
        client.close()
        served.close()
    reply = P.decode(FileServer().handle(P.decode(P.encode(P.PONG, iteration=1))))
    assert reply.type == P.ERROR and reply.code == "bad_request"


def test_silent_server_times_out(ctx):
    probe = ctx.socket(zmq.ROUTER)  # bound, never answers
    probe.bind("tcp://127.0.0.1:0")
    client = BulkClient(ctx, probe.getsockopt(zmq.LAST_ENDPOINT).decode(), timeout_s=0.2)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="did not answer within 0.2 s"):
            client.sync_offer(-1, "")
        assert time.monotonic() - t0 < 2.0
    finally:
        client.close()
        probe.close(linger=0)


def test_log_records_paging(ctx):
    log = Log(600)
    served = Served(FileServer(), log=log)
    client = _client(ctx, served)
    try:
        got = list(client.log_records(5))
        assert [r["iteration"] for r in got] == list(range(5, 600))
        assert got[0] == {"iteration": 5, "attest": None, "seeds": [5, 6]}
        assert served.counts[P.LOG_FETCH] == 3  # 256 + 256 + 83
        assert list(client.log_records(600)) == []
    finally:
        client.close()
        served.close()
    # a smaller page on request, never a larger one
    page = P.decode(FileServer().handle(P.decode(P.encode(P.LOG_FETCH, from_iteration=10, max_records=4)), log))
    assert [r["iteration"] for r in page.records] == [10, 11, 12, 13] and not page.last
    page = P.decode(FileServer().handle(P.decode(P.encode(P.LOG_FETCH, from_iteration=0, max_records=10**6)), log))
    assert len(page.records) == P.LOG_BATCH


def test_offer_from_another_thread_while_serving(ctx, tmp_path):
    server = FileServer()
    served = Served(server)
    client = _client(ctx, served)
    try:
        with pytest.raises(ConnectionError, match="not_found"):
            client.fetch("late", 5, "0" * 64, tmp_path / "late")
        src = tmp_path / "late.src"
        src.write_bytes(b"hello")
        server.offer("late", src)  # this thread offers, the server thread serves
        digest = sha256_file(src)
        assert client.fetch("late", 5, digest, tmp_path / "late").read_bytes() == b"hello"
        empty = tmp_path / "empty.src"
        empty.write_bytes(b"")
        server.offer("empty", empty)
        assert client.fetch("empty", 0, sha256_file(empty), tmp_path / "empty").read_bytes() == b""
        server.withdraw("late")
        with pytest.raises(ConnectionError, match="not_found"):
            client.fetch("late", 5, digest, tmp_path / "again")
    finally:
        client.close()
        served.close()
