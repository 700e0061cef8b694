"""Coordinator time per iteration with many simulated workers that answer instantly.

    python bench/coordinator_overhead.py [--workers 200] [--iterations 30] [--population 200]

A real coordinator (this process, one torch thread) runs a real tiny-model run; ``--workers``
simulated workers in a second process (bench/simworkers.py) register, take leases, answer at once
and report state hashes over loopback TCP. Printed per iteration, after the first two (which
include registration):

- wall time per iteration (includes the simulated side's latency on a shared CPU);
- coordinator CPU per iteration, split into the model work in ``Run.close`` / ``Run.report``
  (apply the commit to its replica, state hash, log fsync, metrics) and everything else (message
  handling, leasing, quorum, bookkeeping): the part that grows with the number of workers.

Target: the bookkeeping part at most 20 ms per iteration with 200 workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ea4llm_pool.config import from_dict  # noqa: E402
from ea4llm_pool.coordinator import Coordinator  # noqa: E402
from ea4llm_pool.run import Run  # noqa: E402
from simworkers import serve_with_simulated  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=200)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--population", type=int, default=200, help="members per iteration (one unit each)")
    ap.add_argument("--samples", type=int, default=8, help="samples per iteration")
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = from_dict({
        "run": {"iterations": args.iterations, "eval_every": 0, "checkpoint_every": 10_000, "eval_samples": 8},
        "es": {"population": args.population, "samples_per_iteration": args.samples, "micro_batch": args.samples},
        "pool": {"heartbeat_s": 1.0, "worker_timeout_s": 30.0},
    }, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp) / "run", say=lambda m: None)
        run.open_reporter()
        coord = Coordinator(run, "tcp://127.0.0.1:0", say=lambda m: None)

        model_cpu = {"t": 0.0}
        marks = []

        def timed(fn):
            def inner(*a, **k):
                t0 = time.thread_time()
                try:
                    return fn(*a, **k)
                finally:
                    model_cpu["t"] += time.thread_time() - t0
            return inner

        run.close = timed(run.close)
        run.report = timed(run.report)
        coord.progress = lambda line: marks.append((time.perf_counter(), time.thread_time(), model_cpu["t"]))

        try:
            stats = serve_with_simulated(coord, args.workers, run.state_hash)
        finally:
            run.reporter.close()

    skip = 2
    rows = [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks[skip:], marks[skip + 1:])]
    wall = statistics.median(r[0] for r in rows) * 1e3
    cpu = statistics.median(r[1] for r in rows) * 1e3
    model = statistics.median(r[2] for r in rows) * 1e3
    book = statistics.median((r[1] - r[2]) for r in rows) * 1e3
    book_max = max((r[1] - r[2]) for r in rows) * 1e3
    print(f"coordinator, {args.workers} simulated workers, population {args.population} "
          f"({args.population} units/iteration), {len(rows)} iterations measured (median)")
    print(f"{'wall time per iteration':42s} {wall:8.1f} ms")
    print(f"{'coordinator CPU per iteration':42s} {cpu:8.1f} ms")
    print(f"{'  of which model work (apply, hash, log)':42s} {model:8.1f} ms")
    print(f"{'  of which bookkeeping (messages, leases)':42s} {book:8.1f} ms   (max {book_max:.1f} ms; target <= 20)")
    print(f"simulated workers saw {stats['commits'] // max(1, args.workers)} commits each; "
          f"{stats['recv_msgs'] + stats['sent_msgs']} control messages after registration")


if __name__ == "__main__":
    main()
