"""Bytes on the wire per worker per iteration, for a tiny model and a ~1B model.

    python bench/wire_bytes.py [--workers 2] [--big-preset paper-1b] [--big-iterations 2]
    python bench/wire_bytes.py --codec-only

A real coordinator (this process) runs each model with the *same* ES and data settings (the
default config's), so only the parameter count differs; simulated workers in a second process
(bench/simworkers.py) take leases, answer at once and report state hashes, counting every
control-channel payload they send and receive after registration (ZeroMQ adds a few bytes of
framing per message). Joining workers also download a checkpoint once over the bulk channel;
that one-off transfer is printed separately and does grow with the model.

First it prints what the messages cost to build and check: encode + decode (validation on both
sides) of a LEASE of 64 units x 16 indices and of a RESULT of 64 unit results.

The ~1B run needs about 8 GB of RAM (fp32 master and working copy, SGD) and a few minutes on
two CPU cores: the coordinator's keeper applies every update to its own replica.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ea4llm_pool import protocol as P, quiet_transformers  # noqa: E402
from ea4llm_pool.checkpoint import list_checkpoints  # noqa: E402
from ea4llm_pool.config import from_dict  # noqa: E402
from ea4llm_pool.coordinator import Coordinator  # noqa: E402
from simworkers import serve_with_simulated  # noqa: E402


def codec_costs(repeat: int = 7, number: int = 300) -> dict[str, tuple[int, float, float]]:
    """Per message type: (frame bytes, encode µs, decode µs), best of ``repeat`` timings."""
    units = [{"member": m, "seed": 2**63 + m, "sign": 1 if m % 2 else -1,
              "indices": list(range(16 * m, 16 * m + 16))} for m in range(64)]
    results = [{"member": m, "sign": 1, "sum_r": -3.25 * m, "count": 16} for m in range(64)]
    samples = {
        "LEASE 64x16": (P.LEASE, dict(lease_id="L-12-3", iteration=12, alpha=5e-4, sigma=1e-3,
                                      units=units, expires_s=30.0)),
        "RESULT 64": (P.RESULT, dict(lease_id="L-12-3", iteration=12, results=results, eval_s=1.5)),
    }

    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - t0) / number * 1e6)
        return min(times)

    out = {}
    for name, (msg_type, fields) in samples.items():
        frame = P.encode(msg_type, **fields)
        out[name] = (len(frame), best(lambda: P.encode(msg_type, **fields)), best(lambda: P.decode(frame)))
    return out


def measure(preset: str, iterations: int, workers: int) -> dict:
    cfg = from_dict({
        "run": {"iterations": iterations, "eval_every": 0, "checkpoint_every": 10_000, "eval_samples": 8},
        "model": {"preset": preset},
        "es": {"optimizer": "sgd"},
        "pool": {"heartbeat_s": 1.0, "worker_timeout_s": 600.0, "lease_s": 600.0},
    }, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        coord = Coordinator(cfg, out, "tcp://127.0.0.1:0", say=lambda m: None)
        params = coord.params
        stats = serve_with_simulated(coord, workers, coord.reference[0], stop_after_s=3600.0)
        seconds = time.perf_counter() - t0
        # what a joiner downloads: the newest checkpoint and the training data
        ckpt = list_checkpoints(out)[-1][1]
        sync_bytes = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
        sync_bytes += (out / "data" / "train.npz").stat().st_size
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
    ap.add_argument("--codec-only", action="store_true", help="print the encode/decode costs only")
    args = ap.parse_args()
    print(f"protocol v{P.PROTOCOL_VERSION}: encode + decode, each validating (best of 7 x 300)")
    for name, (size, enc, dec) in codec_costs().items():
        print(f"  {name:12s} {size:6,d} bytes  encode {enc:6.0f} µs  decode {dec:6.0f} µs  "
              f"total {enc + dec:6.0f} µs")
    if args.codec_only:
        return
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
