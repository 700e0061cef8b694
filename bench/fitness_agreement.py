"""How far apart two honest workers' fitness values for the same unit can be, on the CPU.

    python bench/fitness_agreement.py [--preset small] [--units 200] [--shard-samples 16,4,1]
                                      [--commits 20] [--run DIR] [--config PATH] [--set key=value]

A unit is an antithetic pair on a data shard: members (seed, +1) and (seed, -1) evaluated on the
same K samples; each value is the mean per-sample R of ``Replica.evaluate_member``. Replicas are
built the way a worker builds them (checkpoint skeleton → Replica(dtype) → exact fp32 master →
replayed commits, every state hash checked), and the same units are evaluated on fp32 and bf16
working copies with 1 and 2 torch threads. For each pair of configurations the table gives the
spread of the per-member difference Δr and of the pair-difference difference Δd (d = r+ − r−),
a suggested agreement tolerance max(6·sd, 1.5·max|Δ|) (rounded up to two significant digits), and
the signal the tolerance has to leave intact: the sd of d across units and the sd of r across
members that share data, both on fp32 with 1 thread.

Without ``--run`` a fresh run is made in a temporary directory from the config (default: the
embedded default, tiny preset) and trained in-process for ``--commits`` iterations; units are
split evenly between the initial state and the state after those commits. Unit seeds are the
real member seeds of iterations s, s+1, … (antithetic pairs in member order) and their data the
real subsets D_t of those iterations cut into shards of K; every pair of one iteration shares a
shard, so members sharing data can be compared. With ``--run DIR`` an existing run is read (not
written): its latest checkpoint and, as the second state, the end of its commit log.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from entry import parser, run_main  # noqa: E402
from ea4llm_pool import UserError  # noqa: E402
from ea4llm_pool.checkpoint import list_checkpoints, load_master_into, load_model_skeleton, read_meta  # noqa: E402
from ea4llm_pool.config import load as load_config  # noqa: E402
from ea4llm_pool.data import SampleSet  # noqa: E402
from ea4llm_pool.plan import plan_iteration  # noqa: E402
from ea4llm_pool.replay import replay  # noqa: E402
from ea4llm_pool.replica import Replica  # noqa: E402
from ea4llm_pool.runlog import CommitLog  # noqa: E402

CONFIGS = (("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2))
PAIRS = ((("fp32", 1), ("fp32", 2)), (("fp32", 1), ("bf16", 1)), (("bf16", 1), ("bf16", 2)))


def parse_shards(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sample counts, got '{text}'") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"shard sizes must be >= 1, got '{text}'")
    return ks


def fresh_run(cfg, out: Path, commits: int, say) -> None:
    """A new run in ``out`` trained in-process for ``commits`` iterations (fp32, as a pool would)."""
    from ea4llm_pool.run import Run

    cfg.run.iterations = max(1, commits)
    run = Run(cfg, out, say=lambda _msg: None)
    t0 = time.perf_counter()
    for _ in range(commits):
        plan = run.plan(run.step)
        ids, mask = run.train.batch(plan.indices)
        rewards = []
        for m in plan.members:
            s, c = run.replica.evaluate_member(m.seed, m.sign, plan.sigma, ids, mask, cfg.es.micro_batch)
            rewards.append(s / c)
        run.close(plan, rewards)
    run.log.close()
    if commits:
        say(f"trained {commits} commits in-process in {time.perf_counter() - t0:.1f} s")


def worker_replica(ckpt: Path, cfg, dtype: str) -> Replica:
    """The replica a worker builds from a checkpoint it was sent (``Worker._load_checkpoint``)."""
    rep = Replica(load_model_skeleton(ckpt), cfg.es, "cpu", dtype, chunk=cfg.runtime.chunk_elements,
                  compile=cfg.runtime.compile, say=lambda _msg: None)
    load_master_into(ckpt, rep.master)
    if rep.state_hash() != read_meta(ckpt)["state_hash"]:
        raise UserError(f"{ckpt}: weights do not match their recorded state hash")
    return rep


def units_at(cfg, n_train: int, state: int, n_units: int):
    """(iteration, seed, sigma, subset) of ``n_units`` antithetic pairs from iterations state, state+1, …"""
    out = []
    t = state
    while len(out) < n_units:
        plan = plan_iteration(cfg, n_train, t)
        for plus in plan.members[0::2][: n_units - len(out)]:
            out.append((t, plus.seed, plan.sigma, plan.indices))
        t += 1
    return out


def evaluate(reps: dict, train: SampleSet, units, ks: list[int], micro_batch: int) -> dict:
    """r[(dtype, threads)][K] as an array [unit, sign(+,-)] of mean R."""
    out = {c: {k: np.empty((len(units), 2)) for k in ks} for c in CONFIGS}
    batches = {}
    for i, (t, _seed, _sigma, idx) in enumerate(units):
        for k in ks:
            shards = [idx[j: j + k] for j in range(0, len(idx) - k + 1, k)]
            batches[i, k] = train.batch(shards[t % len(shards)])
    for dtype, threads in CONFIGS:
        torch.set_num_threads(threads)
        rep = reps[dtype]
        for i, (_t, seed, sigma, _idx) in enumerate(units):
            for j, sign in enumerate((+1, -1)):
                for k in ks:
                    s, c = rep.evaluate_member(seed, sign, sigma, *batches[i, k], micro_batch)
                    out[dtype, threads][k][i, j] = s / c
    return out


def ceil_sig(x: float, digits: int = 2) -> float:
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / scale - 1e-9) * scale


def spread(delta: np.ndarray) -> tuple[float, float, float, float]:
    """mean, sd, max |Δ| and the fraction of exact zeros."""
    return (float(delta.mean()), float(delta.std(ddof=1)) if delta.size > 1 else 0.0,
            float(np.abs(delta).max()), float((delta == 0).mean()))


def within_group_sd(r: np.ndarray, groups: list[int]) -> float:
    """Pooled sd of member values around their iteration's mean (members sharing one shard)."""
    g = np.asarray(groups)
    dev, dof = 0.0, 0
    for key in np.unique(g):
        vals = r[g == key].ravel()
        if vals.size > 1:
            dev += float(((vals - vals.mean()) ** 2).sum())
            dof += vals.size - 1
    return math.sqrt(dev / dof) if dof else float("nan")


def label(c) -> str:
    return f"{c[0]}-{c[1]}t"


def report(results: dict, groups: list[int], ks: list[int], states_note: str) -> None:
    base = CONFIGS[0]
    print(f"\n### agreement of unit values (pooled over {states_note})\n")
    print("| K | pair | Δr mean | Δr sd | Δr max | r identical | Δd mean | Δd sd | Δd max | d identical "
          "| tol r | tol d | sd(r)/tol r | sd(d)/tol d |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        r_ref = results[base][k]
        d_ref = r_ref[:, 0] - r_ref[:, 1]
        sig_d = float(d_ref.std(ddof=1))
        sig_r = within_group_sd(r_ref, groups)
        for a, b in PAIRS:
            ra, rb = results[a][k], results[b][k]
            mr = spread((ra - rb).ravel())
            md = spread((ra[:, 0] - ra[:, 1]) - (rb[:, 0] - rb[:, 1]))
            tol_r = ceil_sig(max(6 * mr[1], 1.5 * mr[2]))
            tol_d = ceil_sig(max(6 * md[1], 1.5 * md[2]))
            ratio_r = f"{sig_r / tol_r:,.0f}" if tol_r > 0 else "exact"
            ratio_d = f"{sig_d / tol_d:,.0f}" if tol_d > 0 else "exact"
            print(f"| {k} | cpu {label(a)} vs {label(b)} | {mr[0]:+.2e} | {mr[1]:.2e} | {mr[2]:.2e} | "
                  f"{100 * mr[3]:.0f}% | {md[0]:+.2e} | {md[1]:.2e} | {md[2]:.2e} | {100 * md[3]:.0f}% | "
                  f"{tol_r:.2g} | {tol_d:.2g} | {ratio_r} | {ratio_d} |")


def report_signal(per_state: list[tuple[int, dict, list[int]]], ks: list[int]) -> None:
    base = CONFIGS[0]
    print(f"\n### signal on {label(base)}: sd across units of d = r+ − r−, sd of r across members "
          "sharing a shard, mean r\n")
    print("| state (commits) | K | units | sd(d) | sd(r) | mean r | bf16 sd(Δr) | bf16 sd(Δd) "
          "| corr(Δr+, Δr−) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    bf = ("bf16", 1)
    for state, results, groups in per_state:
        for k in ks:
            r = results[base][k]
            d = r[:, 0] - r[:, 1]
            dr = r - results[bf][k]
            dd = dr[:, 0] - dr[:, 1]
            # Near +1 the bf16 error is common to the two members and cancels in d; near 0 it adds.
            corr = float(np.corrcoef(dr[:, 0], dr[:, 1])[0, 1]) if r.shape[0] > 2 else float("nan")
            print(f"| {state} | {k} | {r.shape[0]} | {d.std(ddof=1):.2e} | {within_group_sd(r, groups):.2e} | "
                  f"{r.mean():.4f} | {dr.std(ddof=1):.2e} | {dd.std(ddof=1):.2e} | {corr:+.2f} |")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", help="run config YAML (default: the embedded default)")
    ap.add_argument("--preset", choices=["tiny", "small", "paper-1b"], help="model.preset (default: the config's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, repeatable (e.g. es.sigma=0.02)")
    ap.add_argument("--units", type=int, default=200, help="antithetic pairs evaluated (split across states)")
    ap.add_argument("--shard-samples", type=parse_shards, default=None, metavar="K[,K…]",
                    help="samples per shard (default: es.samples_per_iteration,4,1)")
    ap.add_argument("--commits", type=int, default=20,
                    help="in-process commits before the second state (0: the initial state only; "
                         "ignored with --run)")
    ap.add_argument("--run", help="read an existing run directory instead of making one")
    run_main(ap, run_bench)


def run_bench(args) -> None:
    if args.units < 1 or args.commits < 0:
        raise UserError("--units must be >= 1 and --commits >= 0")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fitness-agreement-") as tmp:
        if args.run:
            root = Path(args.run)
            if not (root / "config.yaml").is_file():
                raise UserError(f"--run: {root} holds no run (no config.yaml)")
            if args.config or args.preset or args.overrides:
                raise UserError("--run uses the run's own config: drop --config/--preset/--set")
            cfg = load_config(root / "config.yaml")
        else:
            overrides = ([f"model.preset={args.preset}"] if args.preset else []) + list(args.overrides)
            cfg = load_config(args.config, overrides)
            root = Path(tmp)
        es = cfg.es
        m = es.samples_per_iteration
        ks = args.shard_samples or sorted({k for k in (m, 4, 1) if k <= m}, reverse=True)
        if max(ks) > m:
            raise UserError(f"--shard-samples {max(ks)} exceeds es.samples_per_iteration {m}")
        if not args.run:
            torch.set_num_threads(1)  # commits are bit-exact at any thread count; one wastes least
            fresh_run(cfg, root, args.commits, say=print)
        found = list_checkpoints(root)
        if not found:
            raise UserError(f"{root} has no checkpoint")
        ckpt = found[0][1] if not args.run else found[-1][1]
        log = CommitLog(root / "commits.jsonl", readonly=True) if (root / "commits.jsonl").is_file() else None
        train = SampleSet.load(root / "data" / "train.npz")
        reps = {d: worker_replica(ckpt, cfg, d) for d in ("fp32", "bf16")}
        start = reps["fp32"].master.step
        end = start + sum(1 for _ in log.records(from_iteration=start)) if log else start
        states = [start] if end == start else [start, end]
        if args.units < len(states):
            raise UserError(f"--units {args.units} is fewer than the {len(states)} states measured")

        n_params = sum(p.numel() for p in reps["fp32"].model.parameters())
        print(f"preset {cfg.model.preset or cfg.model.name_or_path}: {n_params:,} parameters, "
              f"vocab {reps['fp32'].model.config.vocab_size}, seq_len {train.seq_len}, {len(train)} train samples; "
              f"fitness {getattr(es, 'fitness', 'logprob')}, σ={es.sigma:g}, population {es.population}, "
              f"M={es.samples_per_iteration}, "
              f"micro_batch {es.micro_batch}; torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")

        known = {d: {start: rep.state_hash()} for d, rep in reps.items()}
        per_state = []
        for n, state in enumerate(states):
            for d, rep in reps.items():
                if rep.master.step < state:
                    replay(rep, log.records(from_iteration=rep.master.step), known[d], to_step=state)
            if reps["fp32"].state_hash() != reps["bf16"].state_hash():
                raise RuntimeError("fp32 and bf16 replicas hold different masters")
            units = units_at(cfg, len(train), state, args.units // len(states) + (n < args.units % len(states)))
            t0 = time.perf_counter()
            results = evaluate(reps, train, units, ks, es.micro_batch)
            print(f"state after {state} commits (hash {reps['fp32'].state_hash()[:12]}…, same on both dtypes): "
                  f"{len(units)} units × 2 members × {len(ks)} shard sizes × {len(CONFIGS)} configurations "
                  f"in {time.perf_counter() - t0:.1f} s")
            per_state.append((state, results, [u[0] for u in units]))

    pooled = {c: {k: np.concatenate([res[c][k] for _, res, _ in per_state]) for k in ks} for c in CONFIGS}
    ids: dict = {}
    groups = [ids.setdefault((s, t), len(ids)) for s, _, g in per_state for t in g]
    report(pooled, groups, ks, " and ".join(f"{s} commits" for s in states))
    report_signal(per_state, ks)
    print(f"\nΔr: per-member difference of mean R; Δd: difference of d = r+ − r−; tol = max(6·sd, 1.5·max|Δ|) "
          f"rounded up; ratios use the fp32-1t signal of the table below. {time.perf_counter() - t_start:.0f} s in all.")


if __name__ == "__main__":
    main()
