"""The worker's control link: a thread that owns the DEALER socket to the coordinator.

Why a thread: a forward pass of a large model can take longer than the heartbeat interval, and a
worker that goes quiet while working is indistinguishable from a dead one. The link thread sends
PINGs on time whatever the main thread is doing (torch releases the GIL inside its kernels),
forwards everything the coordinator says to the main thread through a queue, and sends what the
main thread hands it through an inproc socket (ZeroMQ sockets must not be shared between threads).
"""

from __future__ import annotations

import os
import queue
import re
import threading
import time
from typing import Optional

import zmq

from . import protocol as P


def check_endpoint(address: str) -> str:
    """A coordinator address must read tcp://HOST:PORT; anything else is a one-line UserError."""
    from . import UserError

    m = re.fullmatch(r"tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})", address or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"'{address}' is not a coordinator address (use tcp://HOST:PORT, e.g. tcp://10.0.0.5:5555)")
    return address


PING_REFRESH = 5  # heartbeats between PINGs even when other messages keep the link busy
LOST = "LINK_LOST"  # pseudo message type: nothing heard from the coordinator for too long
AUTH_FAILED = "AUTH_FAILED"  # pseudo message type: the coordinator refused this worker's key


class Link(threading.Thread):
    def __init__(self, ctx: zmq.Context, endpoint: str, heartbeat_s: float = 1.0, silence_s: float = 30.0,
                 credentials=None):
        super().__init__(name="ea4llm-link", daemon=True)
        self.ctx = ctx
        self.endpoint = endpoint
        self.credentials = credentials  # auth.Credentials: CurveZMQ to the coordinator (None: plain TCP)
        self.heartbeat_s = heartbeat_s
        self.silence_s = silence_s
        self.inbox: "queue.Queue[object]" = queue.Queue()
        self._pipe_addr = f"inproc://link-{id(self)}-{os.getpid()}"
        self._pipe_in = ctx.socket(zmq.PAIR)
        self._pipe_in.bind(self._pipe_addr)
        self._pipe_out = ctx.socket(zmq.PAIR)   # used by the main thread only
        self._pipe_out.connect(self._pipe_addr)
        self._halt = threading.Event()
        self._lock = threading.Lock()
        # Heartbeat content, updated by the main thread.
        self.worker_id: Optional[str] = None
        self.iteration = -1
        self.state_hash = ""
        self.busy = False
        self.done_units = 0
        self.throughput = 0.0
        self.update_s = 0.0
        self.last_heard = time.monotonic()
        self.lost_reported = False

    # -- main-thread side -------------------------------------------------------------------------
    def send(self, msg_type: str, **fields) -> None:
        self._pipe_out.send(P.encode(msg_type, **fields))

    def recv(self, timeout: Optional[float]) -> Optional[object]:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def heard_recently(self) -> bool:
        return time.monotonic() - self.last_heard < self.silence_s

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self._pipe_out.close(linger=0)

    # -- the thread -----------------------------------------------------------------------------
    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        P.configure_socket_limits(sock)
        sock.setsockopt(zmq.RECONNECT_IVL, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 32000)
        monitor = None
        if self.credentials is not None:
            self.credentials.apply(sock)
            # A refused key shows only as a failed handshake: watch for it, so the worker can say so.
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._pipe_in, zmq.POLLIN)
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        # A PING goes out when the link has been otherwise silent for a heartbeat (any message
        # proves liveness), and at least every PING_REFRESH heartbeats (it carries throughput).
        next_ping = time.monotonic()
        last_ping = 0.0
        self.last_heard = time.monotonic()
        try:
            while not self._halt.is_set():
                timeout_ms = max(0, int((next_ping - time.monotonic()) * 1000))
                events = dict(poller.poll(min(timeout_ms, 200)))
                if monitor is not None and monitor in events:
                    try:
                        monitor.recv_multipart(zmq.NOBLOCK)
                        self.inbox.put(AUTH_FAILED)
                    except zmq.Again:
                        pass
                if self._pipe_in in events:
                    while True:
                        try:
                            frame = self._pipe_in.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        sock.send(frame)
                        next_ping = time.monotonic() + self.heartbeat_s
                if sock in events:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.last_heard = time.monotonic()
                        self.lost_reported = False
                        try:
                            msg = P.decode(frame)
                        except P.ProtocolError as err:
                            self.inbox.put(err)
                            continue
                        if msg.type != P.PONG:
                            self.inbox.put(msg)
                now = time.monotonic()
                if now >= next_ping or now - last_ping >= PING_REFRESH * self.heartbeat_s:
                    next_ping = now + self.heartbeat_s
                    last_ping = now
                    if self.worker_id is not None:
                        sock.send(P.encode(P.PING, worker_id=self.worker_id, iteration=self.iteration,
                                           state_hash=self.state_hash, busy=self.busy,
                                           done_units=self.done_units, throughput=float(self.throughput),
                                           update_s=float(self.update_s)))
                if not self.lost_reported and now - self.last_heard > self.silence_s:
                    self.lost_reported = True
                    self.inbox.put(LOST)
        finally:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=200)
            self._pipe_in.close(linger=0)
