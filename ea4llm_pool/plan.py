"""The plan of one iteration: a pure function of (config, training-set size, t).

Members (seed, sign), α_t, σ_t and the shared data subset D_t depend on nothing but the run
seed and t, so a resumed coordinator hands out exactly the work it would have handed out.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import digest_indices, subset_indices
from .es.population import Member, population
from .es.schedule import alpha_at, sigma_at


@dataclass(frozen=True)
class Plan:
    iteration: int
    alpha: float             # step size α_t
    sigma: float             # noise scale σ_t
    members: list[Member]    # the population, in member order
    indices: list[int]       # D_t: sorted training-sample indices every member is evaluated on
    subset_digest: str       # short digest of ``indices``, recorded in the commit

    def using(self, members: list[Member]) -> "Plan":
        """The same plan restricted to ``members`` (those a quorum closed with)."""
        return Plan(self.iteration, self.alpha, self.sigma, list(members), self.indices, self.subset_digest)


def plan_iteration(cfg, n_train: int, t: int) -> Plan:
    es = cfg.es
    idx = subset_indices(n_train, es.samples_per_iteration, cfg.run.seed, t)
    return Plan(t, alpha_at(es, t), sigma_at(es, t), population(cfg.run.seed, t, es.population, es.antithetic),
                idx, digest_indices(idx))
