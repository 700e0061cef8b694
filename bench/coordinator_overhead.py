"""The coordinator's loop time per iteration, for the tiny, small and ~1B models, with simulated
workers that answer instantly.

    python bench/coordinator_overhead.py [--presets tiny,small,paper-1b] [--workers 50] [--iterations 20]

For each preset a real coordinator (this process, one torch thread) runs a real run; ``--workers``
simulated workers in a second process (bench/simworkers.py) register, take leases, answer at once
and report state hashes over loopback TCP. The coordinator records the CPU time its process spent
on each iteration (``coordinator_cpu_s`` in metrics.jsonl: message handling, leasing, quorum,
shaping, the log append and its fsync, the COMMIT broadcast). The keeper (its own process) builds
the model, follows the commits and writes the metrics; its cost is not the coordinator's. The
runs use ``es.group_alpha`` = 0 so the keeper's updates are trivial and the bench ends soon after
the loop does: the coordinator's work is the same whatever the step size.

Target (issue: scale): the ~1B model's coordinator CPU per iteration ≤ 1.5× the tiny model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ea4llm_pool.config import from_dict  # noqa: E402
from ea4llm_pool.coordinator import Coordinator  # noqa: E402
from simworkers import serve_with_simulated  # noqa: E402


def measure(preset: str, args) -> dict:
    cfg = from_dict({
        "run": {"iterations": args.iterations, "eval_every": 0, "checkpoint_every": 10_000, "eval_samples": 1},
        "model": {"preset": preset},
        "data": {"seq_len": 64},
        "es": {"population": args.population, "samples_per_iteration": args.samples, "micro_batch": args.samples,
               "optimizer": "sgd", "group_alpha": {g: 0.0 for g in ("emb", "attn", "mlp", "ln", "head")}},
        "pool": {"heartbeat_s": 1.0, "worker_timeout_s": 60.0},
    }, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        coord = Coordinator(cfg, out, "tcp://127.0.0.1:0", threads=2, say=lambda m: None)
        setup = time.perf_counter() - t0
        serve_with_simulated(coord, args.workers, coord.reference[0])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cpu = [r["coordinator_cpu_s"] for r in rows if "coordinator_cpu_s" in r][2:]  # skip registration
    wall = [r["seconds"] for r in rows if r.get("seconds")][2:]
    return {"preset": preset, "params": coord.params, "setup_s": setup, "iterations": len(cpu),
            "cpu_ms": 1e3 * statistics.median(cpu), "cpu_ms_max": 1e3 * max(cpu),
            "wall_ms": 1e3 * statistics.median(wall)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small,paper-1b")
    ap.add_argument("--workers", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--population", type=int, default=64, help="members per iteration (one unit each)")
    ap.add_argument("--samples", type=int, default=8, help="samples per iteration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [measure(p, args) for p in args.presets.split(",")]
    print(f"coordinator loop, {args.workers} simulated workers, population {args.population}, "
          f"{args.iterations} iterations (median after the first two)")
    print(f"{'preset':10s}{'parameters':>15s}{'CPU/iteration':>16s}{'max':>10s}{'wall/iteration':>17s}{'set-up':>10s}")
    for r in results:
        print(f"{r['preset']:10s}{r['params']:>15,d}{r['cpu_ms']:>13.2f} ms{r['cpu_ms_max']:>7.1f} ms"
              f"{r['wall_ms']:>14.1f} ms{r['setup_s']:>9.0f} s")
    base = results[0]
    for r in results[1:]:
        print(f"ratio {r['preset']} / {base['preset']}: {r['cpu_ms'] / base['cpu_ms']:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
