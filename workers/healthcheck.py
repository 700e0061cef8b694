"""Container health check: healthy while the coordinator answers a STATUS request.

    python workers/healthcheck.py                                   # tcp://127.0.0.1:5555, 3 s
    python workers/healthcheck.py --connect tcp://coordinator:5555 --timeout 3
    python workers/healthcheck.py --invite /invites/compose-workers.invite     # a pool with keys

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


def check(connect: str, timeout: float, credentials=None) -> tuple[bool, str]:
    import zmq

    from ea4llm_pool import protocol as P

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    try:
        P.configure_socket_limits(sock)
        if credentials is not None:  # a pool with keys: CurveZMQ with an authorized key
            credentials.apply(sock)
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
    ap.add_argument("--invite", default=os.environ.get("EA4LLM_HEALTH_INVITE"),
                    help="a worker's invite file, for a pool with keys (default $EA4LLM_HEALTH_INVITE)")
    ap.add_argument("--key", help="an authorized secret key, e.g. KEYS/coordinator.key_secret")
    ap.add_argument("--server-key", help="the coordinator's public key (with --key)")
    args = ap.parse_args(argv)
    try:
        from ea4llm_pool.auth import client_credentials

        creds = client_credentials(args.invite, args.key, args.server_key)
    except Exception as err:  # a missing or damaged key file is unhealthy, never a traceback
        print(f"unhealthy: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
        return 1
    ok, line = check(args.connect, args.timeout, creds)
    print(("healthy: " if ok else "unhealthy: ") + line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
