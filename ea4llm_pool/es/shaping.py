"""Fitness shaping (paper Eq. 6–7, 10), producing *integer* weights.

Shaping runs once, on the coordinator, in Python floats. What leaves it is integers plus one exact
scale, so every replica accumulates the same update bits whatever its device (docs/design.md §2.3):

* ``rank``: w_j = 2·rank_j/(N−1) − 1 = W_j / (N−1) with the integer W_j = 2·rank_j − (N−1).
* ``zscore``: w_j = (r_j − μ)/(σ_r + 1e-8), quantised to W_j = round(w_j · 2^20), scale 2^-20.

Both functions take the rewards (already signed for antithetic pairs) and return (W, scale), so they
swap. Ties in ``rank`` are broken by member index, so the result is a pure function of the input.
"""

from __future__ import annotations

import math
from typing import Sequence

ZSCORE_BITS = 20


def rank_weights(rewards: Sequence[float]) -> tuple[list[int], float]:
    n = len(rewards)
    if n < 2:
        raise ValueError("rank shaping needs at least two rewards")
    order = sorted(range(n), key=lambda j: (rewards[j], j))
    weights = [0] * n
    for rank, j in enumerate(order):
        weights[j] = 2 * rank - (n - 1)
    return weights, 1.0 / (n - 1)


def zscore_weights(rewards: Sequence[float]) -> tuple[list[int], float]:
    n = len(rewards)
    if n < 1:
        raise ValueError("z-score shaping needs at least one reward")
    mu = math.fsum(rewards) / n
    sd = math.sqrt(math.fsum((r - mu) ** 2 for r in rewards) / n)
    q = float(1 << ZSCORE_BITS)
    return [int(round((r - mu) / (sd + 1e-8) * q)) for r in rewards], 1.0 / q


SHAPERS = {"rank": rank_weights, "zscore": zscore_weights}


def shape(rewards: Sequence[float], kind: str) -> tuple[list[int], float]:
    """Integer weights W_j and the scale c such that the paper's w_j = c·W_j."""
    if any(not math.isfinite(r) for r in rewards):
        raise ValueError("non-finite reward reached shaping")
    return SHAPERS[kind](rewards)
