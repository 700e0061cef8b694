"""``ea4llm-pool worker`` with test hooks, for pool tests: the real worker process, with one part of
it replaced before it starts.

    python tests/hooked_worker.py [--slowdown X] [--protocol-version V] [--fitness nan|fail] -- <worker args>

--slowdown X           every member evaluation takes X times as long (a slower machine)
--protocol-version V   HELLO announces protocol version V
--fitness nan          every member's fitness is NaN (a diverged or broken device)
--fitness fail         every evaluation raises, as a GPU out of memory does
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slowdown", type=float, default=1.0)
    ap.add_argument("--protocol-version", type=int, default=None)
    ap.add_argument("--fitness", choices=["nan", "fail"], default=None)
    ours, _, worker_args = " ".join(sys.argv[1:]).partition(" -- ")
    args = ap.parse_args(ours.split())

    import ea4llm_pool.replica as replica
    import ea4llm_pool.worker as worker

    real_evaluate = replica.Replica.evaluate_member

    def evaluate(self, *a, **k):
        t0 = time.perf_counter()
        if args.fitness == "fail":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        s, c = real_evaluate(self, *a, **k)
        if args.slowdown > 1.0:
            time.sleep((args.slowdown - 1.0) * (time.perf_counter() - t0))
        return (float("nan"), c) if args.fitness == "nan" else (s, c)

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
