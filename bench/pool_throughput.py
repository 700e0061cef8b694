"""Pool iteration throughput: 2 worker processes of 1 thread each vs 1 worker of 1 thread.

    python bench/pool_throughput.py [--iterations 40] [--config FILE] [--set key=value ...]

Runs ``ea4llm-pool train --workers K --threads 1`` (a real coordinator and K real worker
processes over loopback TCP) for K = 1, 2, 1, 2, ... on the same config, one after another in this run,
and reads each iteration's time (lease to commit) from metrics.jsonl. The first iterations of each
run (start-up, sync) are skipped; held-out evaluation and checkpoints are switched off so only
iterations are timed. Alternating rounds and taking the median run of each setup keeps one
disturbed run on a shared machine from deciding the ratio.

Target: 2 workers at least 1.7× the iterations per second of 1 worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = 3


def one_run(workers: int, iterations: int, config, overrides, tmp: Path) -> float:
    out = tmp / f"w{workers}-{len(list(tmp.iterdir()))}"
    cmd = [sys.executable, "-m", "ea4llm_pool", "train", "--workers", str(workers), "--threads", "1",
           "--iterations", str(iterations), "--out", str(out),
           "--set", "run.eval_every=0", "--set", f"run.checkpoint_every={iterations * 10}"]
    if config:
        cmd += ["--config", config]
    for o in overrides:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"train failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [r["seconds"] for r in rows if r.get("seconds") is not None][SKIP:]
    pool = json.loads((out / "pool.json").read_text())
    split = ", ".join(f"{w['name']} {w['units_done']} units" for w in pool["workers"])
    return statistics.median(secs), split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", default=None, help="make the run directories under this directory")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of (1 worker, 2 workers)")
    args = ap.parse_args()
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        for k in (1, 2) * args.rounds:
            t, split = one_run(k, args.iterations, args.config, args.overrides, Path(tmp))
            times[k].append(t)
            print(f"  {k} worker{'s' if k > 1 else ' '} x 1 thread: {t * 1e3:7.1f} ms per iteration (median; {split})")
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"{'setup':28s} {'ms/iteration':>13s} {'iterations/s':>13s}")
    print(f"{'1 worker  x 1 thread':28s} {t1 * 1e3:13.1f} {1 / t1:13.2f}")
    print(f"{'2 workers x 1 thread':28s} {t2 * 1e3:13.1f} {1 / t2:13.2f}")
    print(f"speed-up 2 vs 1 worker: {t1 / t2:.2f}x   (target >= 1.7x)")


if __name__ == "__main__":
    main()
