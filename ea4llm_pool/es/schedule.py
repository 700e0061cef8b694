"""Step-decay schedules of paper Eq. 15: x_t = x_0 · γ^⌊t/S⌋ (S = 0 means constant)."""

from __future__ import annotations


def step_decay(x0: float, gamma: float, step: int, t: int) -> float:
    if step <= 0 or gamma == 1.0:
        return float(x0)
    return float(x0) * float(gamma) ** (t // step)


def alpha_at(es, t: int) -> float:
    return step_decay(es.alpha, es.schedule.alpha_gamma, es.schedule.alpha_step, t)


def sigma_at(es, t: int) -> float:
    return step_decay(es.sigma, es.schedule.sigma_gamma, es.schedule.sigma_step, t)
