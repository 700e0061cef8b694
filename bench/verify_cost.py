"""What verifying fitness values by replication costs, and how often it wrongs an honest worker.

    python bench/verify_cost.py [--iterations 60] [--workers fp32:1,fp32:2,bf16:1,bf16:2]
                                [--keeper on|off] [--set key=value ...]

Runs a real coordinator (``pool.verify: on``, the default) and one honest worker process per
``DTYPE:THREADS`` entry over loopback TCP, on the embedded default model, and reads the run's
metrics.jsonl and pool.json. Every metrics line carries the iteration's ``pool_answers`` (units
the pool's workers evaluated: first answers and checks), ``pool_used`` (units whose value came from
a pool worker), ``reference_answers`` (units the coordinator's replica evaluated) and
``untrusted_workers``. Iterations are split into those where some worker was still new (all of
its units are checked) and those where every worker was trusted (a spot-checked share only).

Printed per phase:
* validation share of pool throughput = 1 − pool_used / pool_answers (pool work that went into
  checks rather than into values the update used);
* validation share of all evaluations = (pool_answers + reference_answers − units) /
  (pool_answers + reference_answers).

With an honest pool every wrong answer is a false positive: the false-positive rate is
wrong_answers / checks, with the agreement bounds that produced it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ports import free_port_pair

ROOT = Path(__file__).resolve().parents[1]


def parse_workers(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        dtype, _, threads = item.strip().partition(":")
        if dtype not in ("fp32", "bf16") or not threads.isdigit() or int(threads) < 1:
            sys.exit(f"--workers: '{item}' is not DTYPE:THREADS (fp32 or bf16, threads >= 1)")
        out.append((dtype, int(threads)))
    return out


def run_pool(out: Path, iterations: int, workers: list[tuple[str, int]], keeper: bool, overrides: list[str],
             timeout_s: float) -> None:
    port = free_port_pair()
    py = [sys.executable, "-m", "ea4llm_pool"]
    sets = [f"run.iterations={iterations}", "run.eval_every=0", f"run.checkpoint_every={iterations * 10}",
            f"pool.keeper_verifies={'true' if keeper else 'false'}", *overrides]
    cmd = py + ["coordinator", "--out", str(out), "--bind", f"tcp://127.0.0.1:{port}", "--threads", "1"]
    for s in sets:
        cmd += ["--set", s]
    logs = out.parent
    coord = subprocess.Popen(cmd, stdout=open(logs / "coordinator.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    procs = []
    for k, (dtype, threads) in enumerate(workers):
        name = f"{dtype}-{threads}t-{k}"
        procs.append(subprocess.Popen(
            py + ["worker", "--connect", f"tcp://127.0.0.1:{port}", "--device", "cpu", "--dtype", dtype,
                  "--threads", str(threads), "--name", name, "--cache", str(logs / f"cache-{k}")],
            stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        rc = coord.wait(timeout_s)
    except subprocess.TimeoutExpired:
        coord.kill()
        sys.exit(f"the pool did not finish {iterations} iterations in {timeout_s:.0f} s (raise --timeout); "
                 f"logs in {logs}")
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    if rc != 0:
        sys.exit(f"coordinator failed (exit {rc}): {(logs / 'coordinator.log').read_text()[-2000:]}")


def phase(rows: list[dict], units: int) -> dict:
    pool = sum(r["pool_answers"] for r in rows)
    used = sum(r["pool_used"] for r in rows)
    ref = sum(r["reference_answers"] for r in rows)
    total = pool + ref
    return {"iterations": len(rows), "pool_answers": pool, "pool_used": used, "reference_answers": ref,
            "pool_share": 1 - used / pool if pool else float("nan"),
            "all_share": (total - units * len(rows)) / total if total else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--workers", default="fp32:1,fp32:2,bf16:1,bf16:2", help="DTYPE:THREADS per honest worker")
    ap.add_argument("--keeper", choices=["on", "off"], default="on", help="pool.keeper_verifies")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = ap.parse_args()
    if args.iterations < 2:
        sys.exit("--iterations must be at least 2")
    workers = parse_workers(args.workers)
    tmp = tempfile.TemporaryDirectory()
    base = args.keep or Path(tmp.name)
    base.mkdir(parents=True, exist_ok=True)
    out = base / "run"
    t0 = time.perf_counter()
    run_pool(out, args.iterations, workers, args.keeper == "on", args.overrides, args.timeout)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "pool_answers" in r]
    pool = json.loads((out / "pool.json").read_text())
    from ea4llm_pool.config import load

    cfg = load(out / "config.yaml")
    units = (cfg.es.population // (2 if cfg.es.antithetic else 1))  # one shard: a unit per pair
    new = phase([r for r in rows if r["untrusted_workers"] > 0], units)
    trusted = phase([r for r in rows if r["untrusted_workers"] == 0], units)
    c = pool["counters"]
    from ea4llm_pool.trust import tolerance

    kinds = sorted({("cpu", d) for d, _ in workers} | {("cpu", "fp32")})
    print(f"verify cost: {len(workers)} honest workers ({args.workers}), reference replica checks: {args.keeper}, "
          f"{args.iterations} iterations of {units} units, {wall:.0f} s")
    print(f"{'phase':<26}{'iters':>6}{'pool ans':>10}{'pool used':>10}{'ref ans':>9}{'pool share':>12}{'all share':>11}")
    for name, p in (("some worker still new", new), ("every worker trusted", trusted)):
        print(f"{name:<26}{p['iterations']:>6}{p['pool_answers']:>10}{p['pool_used']:>10}{p['reference_answers']:>9}"
              f"{p['pool_share']:>12.1%}{p['all_share']:>11.1%}")
    checks, wrong = c["checks"], c["wrong_answers"]
    print(f"checks {checks}, agreed {c['agreed']}, disagreements {c['disagreements']}, wrong answers {wrong}, "
          f"quarantines {c['quarantines']}, bans {c['verify_bans']}")
    print(f"false-positive rate: {wrong}/{checks} = {wrong / checks if checks else float('nan'):.4f} "
          f"(every worker is honest)")
    for a in kinds:
        for b in kinds:
            if a <= b:
                t = tolerance(a, b, cfg.pool.verify_tolerance, samples=cfg.es.samples_per_iteration)
                print(f"bounds {a[1]} vs {b[1]} on {cfg.es.samples_per_iteration} samples: |Δ mean R| ≤ {t.level:g}, "
                      f"|Δ(r₊ − r₋)| ≤ {t.diff:g}")
    for w in pool["workers"] + pool["departed"]:
        print(f"  {w['name']:<14} {w['trust']:<12} units {w['units_done']:>5}  agreements {w['agreements']:>4}  "
              f"wrong {w['wrong_answers']}")


if __name__ == "__main__":
    main()
