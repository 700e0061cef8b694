"""``ea4llm-pool worker`` with test hooks, for pool tests: the real worker process, with one part of
it replaced before it starts.

    python tests/hooked_worker.py [--slowdown X] [--protocol-version V] [--fitness nan|fail] -- <worker args>

--slowdown X           every member evaluation takes X times as long (a slower machine)
--protocol-version V   HELLO announces protocol version V
--fitness nan          every member's fitness is NaN (a diverged or broken device)
--fitness fail         every evaluation raises, as a GPU out of memory does
--fitness random       a liar: every member's fitness is random
--fitness best         a liar: every member's fitness is the best this worker has seen
--fitness bias:D       a subtle liar: members of sign -1 get D added to their mean fitness
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slowdown", type=float, default=1.0)
    ap.add_argument("--protocol-version", type=int, default=None)
    ap.add_argument("--fitness", default=None, help="nan, fail, random, best or bias:D")
    ours, _, worker_args = " ".join(sys.argv[1:]).partition(" -- ")
    args = ap.parse_args(ours.split())

    import ea4llm_pool.replica as replica
    import ea4llm_pool.worker as worker

    real_evaluate = replica.Replica.evaluate_member
    lie = args.fitness or ""
    rng = random.Random()
    best = [-math.inf]

    def evaluate(self, seed, sign, *a, **k):
        t0 = time.perf_counter()
        if lie == "fail":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        s, c = real_evaluate(self, seed, sign, *a, **k)
        if args.slowdown > 1.0:
            time.sleep((args.slowdown - 1.0) * (time.perf_counter() - t0))
        if lie == "nan":
            return float("nan"), c
        if lie == "random":
            return rng.uniform(-10.0, -1.0) * c, c
        if lie == "best":
            best[0] = max(best[0], s / c)
            return best[0] * c, c
        if lie.startswith("bias:") and sign < 0:
            return s + float(lie[5:]) * c, c
        return s, c

    replica.Replica.evaluate_member = evaluate
    if args.protocol_version is not None:
        import msgpack

        from ea4llm_pool import protocol as P

        real_hello = worker.Worker._hello

        def hello(self):
            fields = msgpack.unpackb(real_hello(self), raw=False)
            fields["v"] = args.protocol_version
            return msgpack.packb(fields)

        worker.Worker._hello = hello
        assert P.HELLO
    from ea4llm_pool.cli import main as cli_main

    sys.argv = ["ea4llm-pool", "worker", *worker_args.split()]
    cli_main()


if __name__ == "__main__":
    main()
