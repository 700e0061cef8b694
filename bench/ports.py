"""Loopback ports for benchmarks that start a coordinator (the bulk channel takes port + 1)."""

from __future__ import annotations

import socket


def free_port_pair() -> int:
    """A port p such that p and p+1 are both free right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair on loopback")
