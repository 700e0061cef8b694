"""Container health check: healthy while the coordinator answers a STATUS request.

    python workers/healthcheck.py                                   # tcp://127.0.0.1:5555, 3 s
    python workers/healthcheck.py --connect tcp://coordinator:5555 --timeout 3

The same as ``ea4llm-pool status --connect ... --timeout 3`` without printing the table: one DEALER
round trip, using the pool's own wire format (a bad or foreign answer is unhealthy too). In the
coordinator's container it says "the coordinator is serving"; in a worker's container, "my
coordinator is reachable". The address also comes from EA4LLM_HEALTH_CONNECT.

Exit 0 = healthy, 1 = unhealthy (one line on stdout says why; docker keeps it in `inspect`).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONNECT = "tcp://127.0.0.1:5555"


def check(connect: str, timeout: float) -> tuple[bool, str]:
    import zmq

    from ea4llm_pool import protocol as P

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    try:
        P.configure_socket_limits(sock)
        sock.connect(connect)
        sock.send(P.encode(P.STATUS_REQ))
        if not sock.poll(int(timeout * 1000)):
            return False, f"no STATUS answer from {connect} within {timeout:g} s"
        msg = P.decode(sock.recv())
        if msg.type != P.STATUS:
            return False, f"{connect} answered {msg.type}, not STATUS"
        snap = msg.snapshot
        return True, (f"{connect}: iteration {snap.get('iteration')}/{snap.get('iterations')}, "
                      f"{len(snap.get('workers', []))} workers")
    except Exception as err:  # a health check reports, it never crashes
        return False, f"{connect}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        sock.close(linger=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connect", default=os.environ.get("EA4LLM_HEALTH_CONNECT", DEFAULT_CONNECT),
                    help=f"coordinator control address (default $EA4LLM_HEALTH_CONNECT or {DEFAULT_CONNECT})")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = ap.parse_args(argv)
    ok, line = check(args.connect, args.timeout)
    print(("healthy: " if ok else "unhealthy: ") + line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
