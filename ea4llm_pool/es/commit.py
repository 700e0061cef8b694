"""Closing an iteration: signed rewards → shaping → integer weights and exact fp32 scales.

Runs on the coordinator only. The returned record is everything a replica needs to apply the
update (``update.apply_commit``) and everything the run log keeps.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

from .groups import GROUPS
from .noise import FRAC_BITS
from .perturb import fp32
from .population import Member
from .shaping import shape, shape_paired, worst_for_nonfinite


def close_iteration(es, iteration: int, members: Sequence[Member], rewards: Sequence[float],
                    alpha: float, sigma: float, step: int) -> dict:
    """Build the update record from the members' fitness values (mean R on the shared subset).

    ``step`` is the number of commits applied before this one (for Adam's bias correction).
    Signed rewards s_j·r_j are shaped together (paper Eq. 10), and each weight multiplies its
    seed's *base* noise ε_b, so an antithetic pair contributes ≈ (r₊ − r₋)·ε_b.
    With ``es.pairing: paired`` the raw rewards are shaped together instead and the pair
    contributes (W(r₊) − W(r₋))·ε_b.

    A NaN or ±inf fitness counts as the iteration's lowest finite fitness (before signing); if no
    member is finite, every weight and scale is 0, so applying the record changes no weight and no
    optimizer moment. ``record["nonfinite"]`` counts such members; ``record["rewards"]`` keeps the
    values as reported.

    With ``es.weight_decay`` > 0 the record also carries ``decay``: per group the fp32 constant of
    decoupled weight decay (``decay_constants``).
    """
    fitness, nonfinite = worst_for_nonfinite(rewards)
    n = len(members)
    step_taken = nonfinite < n
    signed = [m.sign * r for m, r in zip(members, fitness)] if es.antithetic else list(fitness)
    if step_taken and es.antithetic and es.pairing == "paired":
        # Raw rewards shaped together; the sign goes on the weight (es/shaping.py, shape_paired).
        w_int, w_scale = shape_paired(fitness, [m.sign for m in members], es.shaping)
    elif step_taken:
        w_int, w_scale = shape(signed, es.shaping)
    else:
        w_int, w_scale = [0] * n, 0.0
    per_seed: "OrderedDict[int, int]" = OrderedDict()
    for m, w in zip(members, w_int):
        per_seed[m.seed] = per_seed.get(m.seed, 0) + w
    s = sigma if es.nes_scaling else 1.0
    # ĝ_g per unit of int64 accumulator: (1/N) · w_scale · 2^-16, divided by s (Eq. 14). With
    # step_scale "rms" the sum is divided by √N instead: z-score weights have Σ w_j² = N, so the
    # step's RMS per weight is α whatever N, and a larger population sharpens the direction
    # without shrinking the step.
    ghat = w_scale / (n if es.step_scale == "mean" else math.sqrt(n)) / s / float(1 << FRAC_BITS)
    record = {
        "iteration": iteration,
        "alpha": alpha,
        "sigma": sigma,
        "seeds": list(per_seed.keys()),
        "weights": list(per_seed.values()),
        "members": [[m.member, m.seed, m.sign] for m in members],
        "rewards": [float(r) for r in rewards],
        "nonfinite": nonfinite,
    }
    ga = es.group_alpha.as_dict()
    if es.optimizer == "sgd":
        record["scales"] = {g: fp32(alpha * ga[g] * ghat) for g in GROUPS}
        record["adam"] = None
    else:
        t = step + 1
        b1, b2 = es.adam_beta1, es.adam_beta2
        # A zero scale leaves the group's moments alone too (apply_commit skips the group).
        record["scales"] = {g: (fp32(ghat) if ga[g] > 0 and step_taken else 0.0) for g in GROUPS}
        record["adam"] = {
            "beta1": fp32(b1), "one_minus_beta1": fp32(1.0 - b1),
            "beta2": fp32(b2), "one_minus_beta2": fp32(1.0 - b2),
            "inv_bc2": fp32(1.0 / (1.0 - b2 ** t)), "eps": fp32(es.adam_eps),
            "lr_over_bc1": {g: fp32(alpha * ga[g] / (1.0 - b1 ** t)) for g in GROUPS},
        }
    if es.weight_decay > 0:  # absent otherwise, so records of runs without decay are unchanged
        record["decay"] = decay_constants(es, alpha, record["scales"])
    return record


NOT_DECAYED = ("ln",)
"""Norm gains are centred on 1, not 0: decaying them towards 0 rescales every activation. Biases are
not split out: the models this targets (Qwen3) have none."""


def decay_constants(es, alpha: float, scales: dict) -> dict:
    """Per group, the exact fp32 c_g = α_t·α_g·λ of decoupled weight decay θ ← θ − c_g·θ (AdamW's
    form: with Adam, α_t·α_g is the group's learning rate). A group that takes no step (scale 0: α_g
    = 0, or an iteration with no finite fitness) is not decayed either, so such a commit still
    changes nothing."""
    ga = es.group_alpha.as_dict()
    return {g: (fp32(alpha * ga[g] * es.weight_decay) if g not in NOT_DECAYED and float(scales[g]) != 0.0 else 0.0)
            for g in GROUPS}
