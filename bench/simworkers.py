"""Simulated pool workers for the coordinator benchmarks: real sockets, instant answers.

``run_simulated(endpoint, n, initial_hash, ...)`` opens ``n`` DEALER sockets to a real
coordinator and speaks the real protocol on each, as ``ea4llm-pool worker`` does: HELLO, STATE
after WELCOME, a RESULT for every LEASE at once (a made-up fitness, deterministic in the member
seed), a state report after every COMMIT (the state the commit attests, echoing its hash as an
honest worker would have computed it) carried by the next RESULT or sent as a STATE when no lease
came with the commit, PING after a heartbeat of silence.
No model is evaluated, so what remains is the coordinator's own cost and the bytes it exchanges.

Run in its own process (``multiprocessing``) so the simulated side does not share the
coordinator's interpreter. Returns, through a queue, the control-channel bytes and messages
counted per direction after registration.
"""

from __future__ import annotations

import math
import time

import zmq

from ea4llm_pool import protocol as P


def _fitness(seed: int, sign: int, count: int) -> float:
    # A smooth made-up fitness so that shaping has distinct values to rank.
    return count * (-6.9 + 1e-3 * math.sin(seed * 1e-3) * sign)


def run_simulated(endpoint: str, n: int, initial_hash: str, selftest: dict, throughput: float,
                  result_queue, stop_after_s: float = 600.0) -> None:
    ctx = zmq.Context()
    socks = []
    poller = zmq.Poller()
    for k in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        P.configure_socket_limits(s)
        s.connect(endpoint)
        s.send(P.encode(P.HELLO, config_hash="", selftest=selftest, device="sim", dtype="fp32", threads=1,
                        throughput=throughput, worker_name=f"sim-{k}", pid=k, state_iteration=-1, state_hash=""))
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    wid = {}
    step = {}
    unreported = {}
    counted = {"sent_bytes": 0, "recv_bytes": 0, "sent_msgs": 0, "recv_msgs": 0, "commits": 0}
    by_type: dict[str, int] = {}
    heartbeat = 1.0
    last_sent = {}  # like the real link: PING only after a heartbeat of silence
    deadline = time.monotonic() + stop_after_s
    ended = 0

    def send(s, msg_type, **fields):
        frame = P.encode(msg_type, **fields)
        if s in wid:  # count only after registration: sync traffic is a one-off, not per iteration
            counted["sent_bytes"] += len(frame)
            counted["sent_msgs"] += 1
            by_type[msg_type] = by_type.get(msg_type, 0) + len(frame)
        s.send(frame)
        last_sent[s] = time.monotonic()

    while ended < n and time.monotonic() < deadline:
        for s, _ in poller.poll(100):
            while True:
                try:
                    frame = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = P.decode(frame)
                if s in wid and msg.type != P.WELCOME:
                    counted["recv_bytes"] += len(frame)
                    counted["recv_msgs"] += 1
                    by_type[msg.type] = by_type.get(msg.type, 0) + len(frame)
                if msg.type == P.WELCOME:
                    heartbeat = msg.heartbeat_s
                    wid[s] = msg.worker_id
                    step[s] = 0
                    send(s, P.STATE, iteration=step[s], state_hash=initial_hash)
                elif msg.type == P.LEASE:
                    results = [{"member": u["member"], "sign": u["sign"], "count": len(u["indices"]),
                                "sum_r": _fitness(u["seed"], u["sign"], len(u["indices"]))} for u in msg.units]
                    carried = {}
                    if s in unreported and unreported[s][0] == msg.iteration:  # as the real worker does
                        it, h = unreported.pop(s)
                        carried = {"state_iteration": it, "state_hash": h}
                    send(s, P.RESULT, lease_id=msg.lease_id, iteration=msg.iteration, results=results, eval_s=0.0,
                         **carried)
                elif msg.type == P.COMMIT:
                    rec = msg.record
                    if s in unreported:
                        send(s, P.STATE, iteration=unreported[s][0], state_hash=unreported.pop(s)[1])
                    step[s] = rec["iteration"] + 1
                    counted["commits"] += 1
                    if rec.get("attest"):
                        unreported[s] = (rec["attest"]["step"], rec["attest"]["state_hash"])
                elif msg.type == P.END:
                    ended += 1
                elif msg.type in (P.REJECT, P.ERROR):
                    raise SystemExit(f"simulated worker got {msg.type}: {msg.reason}")
        for s in list(unreported):  # no lease came with the commit: report the state on its own
            send(s, P.STATE, iteration=unreported[s][0], state_hash=unreported.pop(s)[1])
        now = time.monotonic()
        for s in socks:
            if s in wid and now - last_sent.get(s, 0.0) >= heartbeat:
                send(s, P.PING, worker_id=wid[s], iteration=step[s], state_hash="", busy=False,
                         done_units=0)
    for s in socks:
        s.close(0)
    ctx.term()
    result_queue.put({**counted, "by_type": by_type, "workers": n})


def serve_with_simulated(coord, n: int, initial_hash: str, throughput: float = 16.0,
                         stop_after_s: float = 600.0) -> dict:
    """Run ``coord.serve()`` here while ``n`` simulated workers (another process) work for it;
    returns their counts (see :func:`run_simulated`)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    sim = ctx.Process(target=run_simulated, args=(coord.endpoint, n, initial_hash, coord.selftest_ref,
                                                  throughput, q, stop_after_s))
    sim.start()
    try:
        coord.serve()
        return q.get(timeout=120)
    finally:
        sim.join(10)
        if sim.is_alive():
            sim.kill()
