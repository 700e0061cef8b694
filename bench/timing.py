"""Timing helper shared by the micro-benchmarks."""

from __future__ import annotations

import time


def best_seconds(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call (allocations,
    first touch of buffers); the minimum is the least disturbed by other load on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
