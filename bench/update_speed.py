"""Noise-and-update speed: the eager integer kernels against the compiled ones, side by side.

    python bench/update_speed.py [--n 16777216] [--seeds 8] [--repeats 2] [--threads 1,2] [--device cpu]

For each thread count, measures on one fp32 tensor of n elements:
  * update: ``apply_commit`` of one commit with ``--seeds`` seeds (sgd), reported as noise elements
    per second (n · seeds / s; each is one hash lane, one table lookup and one multiply-accumulate);
  * member noise: ``write_member`` (ε for n elements, then ×σ and +master), elements/s;
  * state hash: ``tensor_sum`` of the master, elements/s.
It first checks that the compiled kernels give the eager bits (master after the commit, ε, hash)
and exits non-zero if not. The ratio column is compiled / eager (target ≥ 2× for the update on a
CPU). Compile time is paid once, before timing, and printed (small when inductor's on-disk cache
already holds the kernels).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ea4llm_pool.es import kernels  # noqa: E402
from ea4llm_pool.es.noise import NoiseSource, default_chunk  # noqa: E402
from ea4llm_pool.es.perturb import write_member  # noqa: E402
from ea4llm_pool.es.state import MasterState  # noqa: E402
from ea4llm_pool.es.statehash import tensor_sum  # noqa: E402
from ea4llm_pool.es.update import apply_commit  # noqa: E402
from timing import best_seconds  # noqa: E402

NAME = "model.layers.0.mlp.up_proj.weight"
GROUPS = ("emb", "attn", "mlp", "ln", "head")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def commit(seeds: int) -> dict:
    return {"iteration": 0, "seeds": [1000 + 7 * j for j in range(seeds)],
            "weights": [(5 * j) % 11 - 5 or 1 for j in range(seeds)],
            "scales": {g: 2.0 ** -24 for g in GROUPS}, "adam": None}


def master(n: int, device: torch.device) -> MasterState:
    w = NoiseSource("gaussian", device).eps(1, 2, 0, n) * 0.02
    return MasterState.from_named([(NAME, w)], "sgd", device)


def check_bits(n: int, seeds: int, device: torch.device, chunk: int) -> tuple[bool, float]:
    """Eager and compiled apply the same commit, build the same member and hash the same: True.
    Returns also the seconds of the first compiled run (graphs the probe did not compile)."""
    a, b = master(n, device), master(n, device)
    eager = NoiseSource("gaussian", device, chunk=chunk)
    fast = NoiseSource("gaussian", device, chunk=chunk, compiled=True)
    apply_commit(a, commit(seeds), eager)
    t0 = time.perf_counter()
    apply_commit(b, commit(seeds), fast)
    tensor_sum(b.params[0].flat, compiled=True)
    write_member(b, {NAME: torch.empty(n, device=device)}, fast, 3, 1, 0.01, dict.fromkeys(GROUPS, 1.0))
    _sync(device)
    first = time.perf_counter() - t0
    same = torch.equal(a.params[0].flat.view(torch.int32), b.params[0].flat.view(torch.int32))
    same &= tensor_sum(a.params[0].flat) == tensor_sum(b.params[0].flat, compiled=True)
    wa, wb = torch.empty(n, device=device), torch.empty(n, device=device)
    gs = dict.fromkeys(GROUPS, 1.0)
    write_member(a, {NAME: wa}, eager, 3, -1, 0.01, gs)
    write_member(a, {NAME: wb}, fast, 3, -1, 0.01, gs)
    same &= torch.equal(wa.view(torch.int32), wb.view(torch.int32))
    return bool(same), first


def measure(n: int, seeds: int, device: torch.device, chunk: int, compiled: bool, repeats: int) -> dict[str, float]:
    state = master(n, device)
    src = NoiseSource("gaussian", device, chunk=chunk, compiled=compiled)
    rec = commit(seeds)
    working = {NAME: torch.empty(n, device=device)}
    gs = dict.fromkeys(GROUPS, 1.0)

    def timed(fn):
        def run():
            fn()
            _sync(device)
        return best_seconds(run, repeats)

    return {
        "update": n * seeds / timed(lambda: apply_commit(state, rec, src)),
        "member noise": n / timed(lambda: write_member(state, working, src, 3, 1, 0.01, gs)),
        "state hash": n / timed(lambda: tensor_sum(state.params[0].flat, compiled=compiled)),
    }


def run(n: int, seeds: int, device: torch.device, chunk: int, threads: list[int], repeats: int) -> dict:
    """Measure everything; returns {"bits_equal", "compile_s", "rows": [(threads, part, eager, compiled)]}."""
    t0 = time.perf_counter()
    ok, why = kernels.probe(device)        # compiles the kernels (or loads them from inductor's cache)
    if not ok:
        raise SystemExit(f"compiled kernels unavailable on {device}: {why}")
    probe_s = time.perf_counter() - t0
    same, first = check_bits(min(n, 1 << 20), seeds, device, chunk)
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        if device.type == "cpu":   # inductor's C++ kernels are specialised on the thread count
            measure(1 << 12, 2, device, chunk, True, 0)
        eager = measure(n, seeds, device, chunk, False, repeats)
        fast = measure(n, seeds, device, chunk, True, repeats)
        rows += [(t, part, eager[part], fast[part]) for part in eager]
    return {"bits_equal": same, "compile_s": probe_s + first, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24, help="elements of the tensor")
    ap.add_argument("--seeds", type=int, default=8, help="seeds in the commit")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk", type=int, default=0, help="chunk elements (0 = device default)")
    args = ap.parse_args()
    device = torch.device(args.device)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    chunk = args.chunk or default_chunk(device)
    out = run(args.n, args.seeds, device, chunk, threads, args.repeats)
    print(f"noise and update, {args.n:,} elements, {args.seeds} seeds, chunk {chunk:,}, best of {args.repeats}; "
          f"torch {torch.__version__}, {device}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"compiled bits equal eager: {'yes' if out['bits_equal'] else 'NO'}; "
          f"compile (probe and first run, inductor's disk cache counts): {out['compile_s']:.1f} s\n")
    print("| threads | part | eager (Melem/s) | compiled (Melem/s) | compiled / eager |")
    print("|---:|---|---:|---:|---:|")
    for t, part, e, c in out["rows"]:
        print(f"| {t} | {part} | {e / 1e6:.0f} | {c / 1e6:.0f} | {c / e:.2f}× |")
    if not out["bits_equal"]:
        raise SystemExit("compiled kernels differ from eager")


if __name__ == "__main__":
    main()
