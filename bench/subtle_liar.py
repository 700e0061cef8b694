"""How far can a liar that always passes the fitness checks move the held-out loss?

    python bench/subtle_liar.py [--iterations 150] [--eval-every 50] [--deltas 0,2e-5,1e-3,4e-3]
                                [--share 0.333] [--liar-seed 0] [--check-plain] [--set KEY=VALUE ...]

Two answers for a unit (an antithetic pair on a data shard) agree when each member's mean reward
is within ``Tolerance.level`` and the pair difference r+ - r- within ``Tolerance.diff``
(ea4llm_pool/trust.py, docs/trust.md): 2e-5 nats between fp32 answers on one device type,
4e-3/sqrt(samples) when bf16 is involved (1e-3 at the default's 16 samples per member; 4e-3 is the
bound for a one-sample shard). A liar that adds delta to the mean reward of the sign -1 member of
each unit it answers shifts both the member and the pair difference by delta, so with delta at or
below the level bound (which is below the diff bound) every check passes.

The bench trains the embedded default (or --config) in-process, with the loop of
``ea4llm-pool train --workers 0`` (ea4llm_pool/local.py): Run plans, an evaluation replica built
from the run's checkpoint evaluates every member, Run closes and reports. Before the close, the
pairs the liar answered (each pair with probability --share, drawn by an RNG seeded from
(--liar-seed, run seed, iteration), so every delta lies on the same pairs) get delta added to the
member with sign -1. One run per delta, each in its own temporary directory; delta 0 is the clean
run. For each run the table gives the final held-out loss, its difference from the clean run's, the
held-out loss at each evaluation, how many commits the lie changed (the commit built from the
honest rewards has other integer weights), and the seconds taken. --check-plain also runs
``ea4llm-pool train --workers 0`` with the same settings and checks that its final state hash
equals the clean run's.
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from entry import parser, run_main  # noqa: E402
from ea4llm_pool import UserError  # noqa: E402
from ea4llm_pool.checkpoint import list_checkpoints, load_master_into, load_model_skeleton, read_meta  # noqa: E402
from ea4llm_pool.config import load as load_config  # noqa: E402
from ea4llm_pool.es.commit import close_iteration  # noqa: E402
from ea4llm_pool.replica import Replica  # noqa: E402
from ea4llm_pool.run import Run  # noqa: E402

DEFAULT_DELTAS = "0,2e-5,1e-3,4e-3"


def parse_deltas(text: str) -> list[float]:
    try:
        deltas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not deltas or any(not math.isfinite(d) or d < 0 for d in deltas):
        raise argparse.ArgumentTypeError(f"deltas must be finite and >= 0, got '{text}'")
    return deltas


def lying_pairs(liar_seed: int, run_seed: int, iteration: int, pairs: int, share: float) -> list[int]:
    """The pairs the liar answered in ``iteration``: the same for every delta, so runs differ only by delta."""
    rng = random.Random(f"subtle-liar/{liar_seed}/{run_seed}/{iteration}")
    return [k for k in range(pairs) if rng.random() < share]


def lie(members, rewards: list[float], pairs: list[int], delta: float) -> list[float]:
    """``rewards`` with ``delta`` added to the sign -1 member of each listed pair (members 2k, 2k+1)."""
    out = list(rewards)
    for k in pairs:
        for j in (2 * k, 2 * k + 1):
            if members[j].sign < 0:
                out[j] += delta
    return out


def train_with_liar(cfg, out: Path, delta: float, share: float, liar_seed: int) -> dict:
    """One in-process run whose liar adds ``delta``; returns evaluations, final hash and counts."""
    rt, es = cfg.runtime, cfg.es
    run = Run(cfg, out, say=lambda _msg: None)
    run.open_reporter()
    try:
        if rt.threads:
            torch.set_num_threads(rt.threads)
        ckpt = list_checkpoints(run.out)[-1][1]
        rep = Replica(load_model_skeleton(ckpt), es, rt.device, rt.dtype, rt.chunk_elements, rt.compile)
        load_master_into(ckpt, rep.master)
        evals = [(run.step, run.report_start()["heldout_loss"])]
        lied = changed = 0
        t_start = time.perf_counter()
        while run.step < run.cfg.run.iterations:
            t0 = time.perf_counter()
            plan = run.plan(run.step)
            ids, mask = run.train.batch(plan.indices)
            honest = []
            for m in plan.members:
                s, c = rep.evaluate_member(m.seed, m.sign, plan.sigma, ids, mask, es.micro_batch)
                honest.append(s / c)
            rewards = honest
            if delta > 0:
                pairs = lying_pairs(liar_seed, cfg.run.seed, plan.iteration, len(plan.members) // 2, share)
                lied += len(pairs)
                rewards = lie(plan.members, honest, pairs, delta)
                clean = close_iteration(es, plan.iteration, plan.members, honest, plan.alpha, plan.sigma, run.step)
            record = run.close(plan, rewards)
            if delta > 0 and clean["weights"] != record["weights"]:
                changed += 1
            rep.apply(record)
            if rep.state_hash() != run.state_hash:
                raise RuntimeError("evaluation replica diverged from the run's state")
            line = run.report(record, time.perf_counter() - t0, int(mask.sum().item()) * len(plan.members))
            if line["heldout_loss"] is not None:
                evals.append((run.step, line["heldout_loss"]))
        return {"evals": evals, "hash": run.state_hash, "lied": lied, "changed": changed,
                "seconds": time.perf_counter() - t_start, "pairs": es.population // 2}
    finally:
        run.reporter.close()


def plain_hash(config, overrides: list[str], out: Path) -> str:
    """Final state hash of ``ea4llm-pool train --workers 0`` with the same config."""
    cmd = [sys.executable, "-m", "ea4llm_pool", "train", "--workers", "0", "--out", str(out)]
    if config:
        cmd += ["--config", config]
    for o in overrides:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"plain train failed: {last[-1]}")
    return read_meta(list_checkpoints(out)[-1][1])["state_hash"]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", help="run config YAML (default: the embedded default)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, repeatable (e.g. es.sigma=0.02)")
    ap.add_argument("--iterations", type=int, default=150,
                    help="iterations per run (default 150: four runs fit in ~10 minutes on a loaded 2-core machine)")
    ap.add_argument("--eval-every", type=int, default=50, help="iterations between held-out evaluations")
    ap.add_argument("--deltas", type=parse_deltas, default=parse_deltas(DEFAULT_DELTAS), metavar="D[,D…]",
                    help=f"liar biases in nats, one run each; 0 = the clean run (default {DEFAULT_DELTAS})")
    ap.add_argument("--share", type=float, default=1 / 3,
                    help="probability that the liar answered a given pair (default 1/3: one of 3 workers)")
    ap.add_argument("--liar-seed", type=int, default=0, help="seed of the choice of lying pairs")
    ap.add_argument("--check-plain", action="store_true",
                    help="also run `ea4llm-pool train --workers 0` and compare its final state hash with the clean run's")
    run_main(ap, run_bench)


def run_bench(args) -> None:
    if args.iterations < 1 or args.eval_every < 1:
        raise UserError("--iterations and --eval-every must be >= 1")
    if not 0 < args.share <= 1:
        raise UserError(f"--share must be in (0, 1], got {args.share}")
    overrides = list(args.overrides) + [f"run.iterations={args.iterations}", f"run.eval_every={args.eval_every}"]
    deltas = args.deltas if 0.0 in args.deltas else [0.0] + args.deltas
    cfg0 = load_config(args.config, overrides)
    if not cfg0.es.antithetic:
        raise UserError("the liar lies on antithetic pairs: es.antithetic must be true")
    es, rt = cfg0.es, cfg0.runtime
    print(f"subtle liar: {args.iterations} iterations, population {es.population} ({es.population // 2} pairs), "
          f"{es.samples_per_iteration} samples/member, shaping {es.shaping}, pairing {es.pairing}, "
          f"optimizer {es.optimizer}; {rt.device} {rt.dtype}, {rt.threads} thread(s); liar share {args.share:.3f}")
    results = {}
    t_all = time.perf_counter()
    for d in deltas:
        with tempfile.TemporaryDirectory(prefix="ea4llm-liar-") as tmp:
            results[d] = train_with_liar(load_config(args.config, overrides), Path(tmp) / "run", d,
                                         args.share, args.liar_seed)
        r = results[d]
        print(f"  delta {d:g}: final held-out {r['evals'][-1][1]:.5f} in {r['seconds']:.0f} s", flush=True)
    clean = results[0.0]
    steps = [s for s, _ in clean["evals"]]
    print()
    head = f"{'delta':>8} {'final':>9} {'vs clean':>10} " + " ".join(f"{'@' + str(s):>8}" for s in steps) \
        + f" {'lied':>6} {'changed':>8} {'s':>5}"
    print(head)
    for d in deltas:
        r = results[d]
        final = r["evals"][-1][1]
        diff = final - clean["evals"][-1][1]
        cols = " ".join(f"{v:8.4f}" for _, v in r["evals"])
        print(f"{d:8.0e} {final:9.5f} {diff:+10.5f} {cols} {r['lied']:6d} {r['changed']:8d} {r['seconds']:5.0f}")
    n_pairs = clean["pairs"] * args.iterations
    print(f"\nfinal/@N: held-out loss (nats/token); vs clean: final minus the clean run's; lied: lying pairs of "
          f"{n_pairs}; changed: commits whose integer weights differ from the honest rewards' commit. "
          f"{time.perf_counter() - t_all:.0f} s in all. Clean run's final state hash {clean['hash'][:16]}…")
    if args.check_plain:
        with tempfile.TemporaryDirectory(prefix="ea4llm-plain-") as tmp:
            h = plain_hash(args.config, overrides, Path(tmp) / "run")
        verdict = "equals" if h == clean["hash"] else "DIFFERS FROM"
        print(f"`ea4llm-pool train --workers 0` final state hash {h[:16]}… {verdict} the clean run's")
        if h != clean["hash"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
