"""Noise generation speed: the integer-only ``NoiseSource`` against ``torch.randn``.

    python bench/noise_speed.py [--n 10000000] [--repeats 5]

Measures elements per second for 10^7 elements (fp32 ε, int32 Q, Rademacher ε; eager and compiled
kernels, see es/kernels.py) and for ``torch.randn`` writing into a preallocated fp32 buffer, with one
torch thread and with the default thread count, side by side in one process. The ratio column is NoiseSource / torch.randn (higher is
better; the target for Gaussian ε is ≥ 0.5×). Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from ea4llm_pool.es import kernels  # noqa: E402
from ea4llm_pool.es.noise import NoiseSource, tensor_id  # noqa: E402
from timing import best_seconds  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = args.n - args.n % 4
    default_threads = torch.get_num_threads()
    tid = tensor_id("model.layers.0.mlp.up_proj.weight")
    out_f = torch.empty(n, dtype=torch.float32)
    out_q = torch.empty(n, dtype=torch.int32)
    gauss, rade = NoiseSource("gaussian"), NoiseSource("rademacher")
    fast = NoiseSource("gaussian", compiled=kernels.probe("cpu")[0])
    gen = torch.Generator().manual_seed(0)

    rows = []
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        t_randn = best_seconds(lambda: torch.randn(n, generator=gen, out=out_f), args.repeats)
        cases = [
            ("NoiseSource.eps (gaussian, fp32)", lambda: gauss.eps(12345, tid, 0, n, out=out_f)),
            ("NoiseSource.q (gaussian, int32)", lambda: gauss.q(12345, tid, 0, n, out=out_q)),
            ("NoiseSource.eps (rademacher, fp32)", lambda: rade.eps(12345, tid, 0, n, out=out_f)),
        ]
        if fast.compiled:
            cases.append(("NoiseSource.eps (gaussian, fp32, compiled)", lambda: fast.eps(12345, tid, 0, n, out=out_f)))
        rows.append((threads, "torch.randn (fp32, CPU generator)", t_randn, t_randn))
        for name, fn in cases:
            rows.append((threads, name, best_seconds(fn, args.repeats), t_randn))
    torch.set_num_threads(default_threads)

    print(f"noise generation, {n:,} elements, best of {args.repeats}; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, default {default_threads} threads\n")
    print("| threads | generator | time (ms) | Melem/s | vs torch.randn |")
    print("|---:|---|---:|---:|---:|")
    for threads, name, t, t_ref in rows:
        print(f"| {threads} | {name} | {1e3 * t:.1f} | {n / t / 1e6:.0f} | {t_ref / t:.2f}× |")


if __name__ == "__main__":
    main()
