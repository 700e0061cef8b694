"""Bytes on the wire per worker per iteration, for a tiny model and a ~1B model.

    python bench/wire_bytes.py [--workers 2] [--big-preset paper-1b] [--big-iterations 2]

A real coordinator (this process) runs each model with the *same* ES and data settings (the
default config's), so only the parameter count differs; simulated workers in a second process
(bench/simworkers.py) take leases, answer at once and report state hashes, counting every
control-channel payload they send and receive after registration (ZeroMQ adds a few bytes of
framing per message). Joining workers also download a checkpoint once over the bulk channel;
that one-off transfer is printed separately and does grow with the model.

The ~1B run needs about 8 GB of RAM (fp32 master and working copy, SGD) and a few minutes on
two CPU cores: the coordinator applies every update to its own replica.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ea4llm_pool import quiet_transformers  # noqa: E402
from ea4llm_pool.config import from_dict  # noqa: E402
from ea4llm_pool.coordinator import Coordinator  # noqa: E402
from ea4llm_pool.model import count_parameters  # noqa: E402
from ea4llm_pool.run import Run  # noqa: E402
from simworkers import serve_with_simulated  # noqa: E402


def measure(preset: str, iterations: int, workers: int) -> dict:
    cfg = from_dict({
        "run": {"iterations": iterations, "eval_every": 0, "checkpoint_every": 10_000, "eval_samples": 8},
        "model": {"preset": preset},
        "es": {"optimizer": "sgd"},
        "pool": {"heartbeat_s": 1.0, "worker_timeout_s": 600.0, "lease_s": 600.0},
    }, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = Run(cfg, Path(tmp) / "run", say=lambda m: None)
        run.open_reporter()
        params = count_parameters(run.replica.model)
        ckpt, extra = run.files_for_sync()
        sync_bytes = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()) + sum(f.stat().st_size for f in extra)
        coord = Coordinator(run, "tcp://127.0.0.1:0", say=lambda m: None)
        try:
            stats = serve_with_simulated(coord, workers, run.state_hash, stop_after_s=3600.0)
        finally:
            run.reporter.close()
        seconds = time.perf_counter() - t0
    per = (stats["sent_bytes"] + stats["recv_bytes"]) / iterations / workers
    beats = sum(stats["by_type"].get(t, 0) for t in ("PING", "PONG")) / iterations / workers
    msgs = (stats["sent_msgs"] + stats["recv_msgs"]) / iterations / workers
    return {"preset": preset, "params": params, "per_worker_iteration": per, "heartbeats": beats,
            "messages": msgs, "seconds_per_iteration": seconds / iterations,
            "by_type": {k: v / iterations / workers for k, v in stats["by_type"].items()},
            "sync_bytes": sync_bytes, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=20, help="iterations of the tiny run")
    ap.add_argument("--big-preset", default="paper-1b", help="model preset of the large run ('' to skip)")
    ap.add_argument("--big-iterations", type=int, default=2)
    args = ap.parse_args()
    quiet_transformers()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure("tiny", args.iterations, args.workers)]
    if args.big_preset:
        rows.append(measure(args.big_preset, args.big_iterations, args.workers))
    print(f"{args.workers} simulated workers; same ES/data settings (population 16, 16 samples) for every model")
    print(f"{'model':10s} {'parameters':>14s} {'bytes/worker/iteration':>23s} {'of which work':>14s} "
          f"{'heartbeats':>11s} {'one-off sync download':>22s}")
    for r in rows:
        print(f"{r['preset']:10s} {r['params']:14,d} {r['per_worker_iteration']:23,.0f} "
              f"{r['per_worker_iteration'] - r['heartbeats']:14,.0f} {r['heartbeats']:11,.0f} {r['sync_bytes']:22,d}")
    for r in rows:
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(r["by_type"].items()))
        print(f"  {r['preset']}: {parts}")
    print("work = LEASE, RESULT, COMMIT, STATE, END; heartbeats (PING/PONG, one per second of silence) grow")
    print("with the time an iteration takes, here the CPU coordinator applying each update to its own replica.")
    if len(rows) == 2:
        a, b = rows
        wa, wb = (r["per_worker_iteration"] - r["heartbeats"] for r in rows)
        print(f"work bytes per iteration, {b['preset']} / {a['preset']}: {wb / wa:.3f} "
              f"for {b['params'] / a['params']:,.0f}x the parameters")


if __name__ == "__main__":
    main()
