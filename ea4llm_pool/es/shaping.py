"""Fitness shaping (paper Eq. 6–7, 10), producing *integer* weights.

Shaping runs once, on the coordinator, in Python floats. What leaves it is integers plus one exact
scale, so every replica accumulates the same update bits whatever its device (docs/design.md §2.3):

* ``rank``: w_j = 2·rank_j/(N−1) − 1 = W_j / (N−1) with the integer W_j = 2·rank_j − (N−1).
* ``zscore``: w_j = (r_j − μ)/(σ_r + 1e-8), quantised to W_j = round(w_j · 2^20), scale 2^-20.
* ``centered``: w_j = r_j − μ₋ⱼ, the reward minus the mean of the *other* members' rewards (a
  leave-one-out baseline, so the estimate stays unbiased), = N/(N−1)·(r_j − μ). No division by a
  spread: the step follows the size of the fitness differences, as a gradient does. Quantised to
  W_j = round(w_j · 2^b), scale 2^-b, with b = 20 unless the largest weight needs fewer bits.

Each function takes the rewards (already signed for antithetic pairs) and returns (W, scale), so
they swap. Ties in ``rank`` are broken by member index, so the result is a pure function of the input.
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


def centered_weights(rewards: Sequence[float]) -> tuple[list[int], float]:
    n = len(rewards)
    if n < 2:
        raise ValueError("centered shaping needs at least two rewards")
    mu = math.fsum(rewards) / n
    w = [(r - mu) * n / (n - 1) for r in rewards]
    top = max(abs(x) for x in w)
    bits = ZSCORE_BITS
    if top > 0:
        # Σ_j W_j·Q_j must stay inside int64 whatever the noise (|Q| < 2^24): |W| < 2^(39 − ⌈log2 N⌉).
        # Large fitness differences (a plugin's task reward) get fewer fraction bits; 2^-b stays exact.
        bits = min(ZSCORE_BITS, 38 - (n - 1).bit_length() - math.frexp(top)[1])
    q = math.ldexp(1.0, bits)
    return [int(round(x * q)) for x in w], math.ldexp(1.0, -bits)


SHAPERS = {"rank": rank_weights, "zscore": zscore_weights, "centered": centered_weights}


def worst_for_nonfinite(fitness: Sequence[float]) -> tuple[list[float], int]:
    """Each NaN or ±inf fitness replaced by the lowest finite one, and how many were replaced.

    A diverged member (overflow in bf16, a bad device) is the worst of its iteration rather than a
    reason to stall it; giving it the lowest finite value (not −inf) keeps z-scores finite, and
    rank ties with that value are broken by member index like any other tie. With no finite value
    at all there is nothing to substitute: the list is returned unchanged (the caller skips the step).
    """
    finite = [f for f in fitness if math.isfinite(f)]
    if not finite:
        return list(fitness), len(fitness)
    low = min(finite)
    return [f if math.isfinite(f) else low for f in fitness], len(fitness) - len(finite)


def shape(rewards: Sequence[float], kind: str) -> tuple[list[int], float]:
    """Integer weights W_j and the scale c such that the paper's w_j = c·W_j."""
    if any(not math.isfinite(r) for r in rewards):
        raise ValueError("non-finite reward reached shaping")
    return SHAPERS[kind](rewards)


def shape_paired(rewards: Sequence[float], signs: Sequence[int], kind: str) -> tuple[list[int], float]:
    """Paired antithetic shaping (OpenAI ES; EGGROLL): all raw rewards shaped together, member j
    weighted s_j·W(r_j), so seed k accumulates W(r₊ₖ) − W(r₋ₖ) on its base noise.

    Eq. 10 shapes the *signed* rewards instead: ranks then order each sign apart, and a z-score's
    σ_r measures the gap between the two sign clusters (≈ 2|r̄|), so the step follows the loss level
    rather than the spread of the rewards. Here σ_r is the rewards' own spread. The differences of
    integers are integers, with the same scale c, so the update stays exact.
    """
    if len(signs) != len(rewards) or any(s not in (1, -1) for s in signs):
        raise ValueError("paired shaping needs one sign (+1 or -1) per reward")
    weights, scale = shape(rewards, kind)
    return [s * w for s, w in zip(signs, weights)], scale
