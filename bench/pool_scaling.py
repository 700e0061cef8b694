"""Pool scaling: iterations per minute with 1, 2 and 4 local workers, and the parallel efficiency.

    python bench/pool_scaling.py [--iterations 30] [--workers 1,2,4] [--config FILE] [--set key=value ...]

Runs ``ea4llm-pool train --workers K --threads 1 --set model.preset=small`` (a real coordinator
and K real worker processes over loopback TCP) once per K, one after another, and reads each
run's metrics.jsonl. Iterations per minute come from the ``wall_s`` of the first iteration after
start-up (``--skip`` iterations: worker start, sync, late joiners) and of the last one, so
start-up never counts. Parallel efficiency is ipm_K / (K · ipm_1): 1.0 is perfect scaling.
Held-out evaluation runs only at the start and the end, and checkpoints only at the end.

Each worker gets one thread, so K workers need K cores: beyond ``nproc`` workers the figure
measures oversubscription (workers sharing cores), not the pool's scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def train(workers: int, iterations: int, config: Path, overrides: list[str], out: Path,
          timeout_s: float) -> float:
    """One ``ea4llm-pool train`` run into ``out``; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "ea4llm_pool", "train", "--config", str(config),
           "--workers", str(workers), "--threads", "1", "--iterations", str(iterations), "--out", str(out),
           "--set", "model.preset=small", "--set", "run.eval_every=0",
           "--set", f"run.checkpoint_every={iterations * 10}"]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        sys.exit(f"train --workers {workers} did not finish in {timeout_s:.0f} s (raise --timeout)")
    if res.returncode != 0:
        sys.exit(f"train --workers {workers} failed (exit {res.returncode}):\n"
                 f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def iterations_per_minute(metrics: Path, skip: int) -> tuple[float, int, int]:
    """(iterations per minute, first, last iteration timed) from the metrics lines' ``wall_s``."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    timed = [r for r in rows if r.get("event") is None and r.get("wall_s") is not None]
    if len(timed) < skip + 2:
        sys.exit(f"{metrics}: {len(timed)} timed iterations; need more than --skip {skip} + 1 "
                 f"(raise --iterations)")
    first, last = timed[skip], timed[-1]
    span = last["wall_s"] - first["wall_s"]
    done = last["iteration"] - first["iteration"]
    if span <= 0:
        sys.exit(f"{metrics}: wall_s does not advance between iterations {first['iteration']} and "
                 f"{last['iteration']}")
    return done / span * 60.0, first["iteration"], last["iteration"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (1 must come first)")
    ap.add_argument("--skip", type=int, default=3, help="start-up iterations left out of the timing")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run")
    ap.add_argument("--keep", default=None, help="make the run directories under this directory")
    args = ap.parse_args()
    try:
        counts = [int(k) for k in args.workers.split(",")]
    except ValueError:
        sys.exit(f"--workers: expected comma-separated integers, got {args.workers!r}")
    if not counts or counts[0] != 1 or min(counts) < 1:
        sys.exit("--workers must start with 1 (the efficiency baseline) and list positive counts")

    cores = os.cpu_count() or 1
    print(f"nproc: {cores}; 1 thread per worker, so beyond {cores} workers the efficiency measures "
          f"oversubscription (workers sharing cores), not the pool's scaling")
    print(f"config {args.config.name} with model.preset=small, {args.iterations} iterations per run, "
          f"first {args.skip} left out")
    ipm = {}
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        for k in counts:
            out = Path(tmp) / f"workers-{k}"
            wall = train(k, args.iterations, args.config, args.overrides, out, args.timeout)
            ipm[k], first, last = iterations_per_minute(out / "metrics.jsonl", args.skip)
            print(f"  {k} worker{'s' if k > 1 else ' '}: {ipm[k]:8.1f} iterations/min over iterations "
                  f"{first}..{last} ({wall:.0f} s for the whole run)")
    print(f"{'workers':>8s} {'iterations/min':>15s} {'efficiency':>11s}")
    for k in counts:
        eff = ipm[k] / (k * ipm[1])
        note = "  (oversubscribed: more workers than cores)" if k > cores else ""
        print(f"{k:8d} {ipm[k]:15.1f} {eff:11.2f}{note}")


if __name__ == "__main__":
    main()
