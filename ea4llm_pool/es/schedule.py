"""Step-decay schedules of paper Eq. 15: x_t = x_0 · γ^⌊t/S⌋ (S = 0 means constant).

Beyond the paper, α_t is further multiplied by a linear warm-up and a linear or cosine decay
(``es.alpha_warmup``, ``es.alpha_decay``…); both default to off. α_t only scales the fp32 update
constants of a commit, never the integer weights, so any schedule keeps replicas bit-identical.
"""

from __future__ import annotations

import math


def step_decay(x0: float, gamma: float, step: int, t: int) -> float:
    if step <= 0 or gamma == 1.0:
        return float(x0)
    return float(x0) * float(gamma) ** (t // step)


def warmup_decay(t: int, warmup: int, decay: str, end: int, floor: float) -> float:
    """The multiplier of α at iteration t: (t+1)/warmup during the warm-up, then 1 falling to
    ``floor`` at iteration ``end`` (linearly or along a half cosine), then ``floor``."""
    if warmup > 0 and t < warmup:
        return (t + 1) / warmup
    if decay == "none":
        return 1.0
    if t >= end:
        return float(floor)
    progress = (t - warmup) / (end - warmup)
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return float(floor) + (1.0 - float(floor)) * shape


def alpha_at(es, t: int) -> float:
    base = step_decay(es.alpha, es.schedule.alpha_gamma, es.schedule.alpha_step, t)
    if es.alpha_warmup == 0 and es.alpha_decay == "none":
        return base  # the paper's schedule, bit for bit
    return base * warmup_decay(t, es.alpha_warmup, es.alpha_decay, es.alpha_decay_end, es.alpha_decay_floor)


def sigma_at(es, t: int) -> float:
    return step_decay(es.sigma, es.schedule.sigma_gamma, es.schedule.sigma_step, t)
