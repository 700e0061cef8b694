"""Whether a worker's fitness values can be believed: when two answers agree, and how agreements and
disagreements turn into trust, strikes, quarantine and bans. Socket-free and clock-injected; the
ledger (``ledger.py``) applies these rules to the units of an iteration.

A unit is an antithetic pair on one data shard, evaluated by one worker, so a bias of the worker's
device (bf16 rounding, another BLAS) shifts r₊ and r₋ alike and cancels in r₊ − r₋. Two answers
for a unit agree when each member's mean reward is within ``Tolerance.level`` and the pair
difference within ``Tolerance.diff``; both bounds depend on the two answers' (device type, dtype).

Trust (BOINC-style adaptive replication):

* vouched: the coordinator's own replica, keys the operator marks as trusted, and the local
  workers of ``train``; their answers are used as they come and they check others from the start;
* new: every unit is re-evaluated by another worker (a vouched or trusted one when there is one)
  and used only once two independent answers agree; ``trust_after`` agreements in a row make it
* trusted: its answers are used as they come, except a random ``spot_check`` share that is
  re-evaluated first;
* a disagreement is settled by a third evaluation (or the reference replica's answer, which is
  never outvoted); each losing answer is a strike, and a strike ends the streak (and earned trust);
* ``quarantine_after`` strikes: quarantined, its answers are only compared, never used;
* ``ban_after`` strikes: banned, for ``ban_s`` doubling with each ban.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

Kind = tuple[str, str]   # (device type, dtype): "cpu"/"cuda"/"mps", "fp32"/"bf16"

REFERENCE = "reference"
"""The identity of the coordinator's own replica (the keeper) when it evaluates units."""


@dataclass(frozen=True)
class Tolerance:
    level: float   # largest |Δ mean R| of one member between two honest answers
    diff: float    # largest |Δ (r₊ − r₋)| of a pair between two honest answers


# Measured with bench/fitness_agreement.py on CPU (docs/trust.md): fp32 answers with 1 and 2 threads
# were bit-identical, and so were bf16 ones; fp32 against bf16 differed by sd 2.5e-4 (tiny) to 6.5e-4
# (small) per member on one sample, largest 2e-3, shrinking as 1/sqrt(samples), and the error did
# not cancel in r+ - r- (the two members' errors are uncorrelated). The bounds leave a margin over
# the largest difference seen, and stay far below the spread of the rewards that the update ranks
# (sd of r+ - r- 8e-3 to 4e-2).
SAME_FP32 = Tolerance(level=2e-5, diff=2e-5)          # fp32 on both, same device type
CROSS_FP32 = Tolerance(level=1e-4, diff=1e-4)         # fp32 on both, different device types
BF16_PER_SAMPLE = Tolerance(level=4e-3, diff=6e-3)    # bf16 on either side, for one sample


def tolerance(a: Kind, b: Kind, override: float = 0.0, samples: int = 1) -> Tolerance:
    """The agreement bounds for answers from devices of kinds ``a`` and ``b`` on ``samples`` samples
    (``override`` > 0: the operator's bound, for both)."""
    if override > 0:
        return Tolerance(override, override)
    if a[1] == "fp32" and b[1] == "fp32":
        return SAME_FP32 if a[0] == b[0] else CROSS_FP32
    shrink = math.sqrt(max(1, samples))  # rounding errors of independent samples average out
    return Tolerance(BF16_PER_SAMPLE.level / shrink, BF16_PER_SAMPLE.diff / shrink)


def agree(a: dict[int, float], b: dict[int, float], tol: Tolerance) -> bool:
    """Whether two answers (member → mean R, the same members) agree. A non-finite value agrees
    only with a non-finite value (a model that diverges does so on every honest device)."""
    if a.keys() != b.keys():
        return False
    for m in a:
        fa, fb = math.isfinite(a[m]), math.isfinite(b[m])
        if fa != fb:
            return False
        if fa and abs(a[m] - b[m]) > tol.level:
            return False
    members = sorted(a)
    if len(members) == 2 and all(math.isfinite(a[m]) for m in members):
        da = a[members[0]] - a[members[1]]
        db = b[members[0]] - b[members[1]]
        if abs(da - db) > tol.diff:
            return False
    return True


@dataclass(frozen=True)
class TrustPolicy:
    trust_after: int = 8            # agreements in a row that make a new worker trusted
    spot_check: float = 0.1         # share of a trusted worker's units re-evaluated before use
    quarantine_after: int = 2       # strikes (answers that lost a vote) that quarantine a worker
    ban_after: int = 4              # strikes that ban it
    forgive_after: int = 64         # agreements that take one strike away (an honest worker's rare slip)
    untrusted_share: float = 0.5    # most of one iteration's units a single untrusted worker may answer first
    max_answers: int = 5            # answers to one unit with no two agreeing: all are dropped, the unit starts over
    ban_s: float = 60.0             # first ban; doubles with each ban
    max_ban_s: float = 3600.0
    tolerance_override: float = 0.0  # > 0: one bound for every pair of devices

    @classmethod
    def for_pool(cls, pool) -> Optional["TrustPolicy"]:
        """The policy of a config's ``pool`` section (None: verification is off)."""
        if pool.verify == "off":
            return None
        return cls(trust_after=pool.trust_after, spot_check=pool.spot_check, untrusted_share=pool.untrusted_share,
                   tolerance_override=pool.verify_tolerance)


@dataclass
class Standing:
    """What the pool knows of one identity (a key, or a worker name in a pool without keys);
    it outlives sessions, so reconnecting does not wipe a record."""
    vouched: bool = False
    earned: bool = False        # trusted by a streak of agreements
    streak: int = 0
    agreements: int = 0
    strikes: int = 0
    strikes_total: int = 0
    quarantined: bool = False
    bans: int = 0
    banned_until: float = 0.0
    forgiven_at: int = 0        # agreements when a strike was last forgiven

    @property
    def trusted(self) -> bool:
        return not self.quarantined and (self.vouched or self.earned)

    @property
    def state(self) -> str:
        if self.quarantined:
            return "quarantined"
        if self.vouched:
            return "vouched"
        return "trusted" if self.earned else "new"

    def agreed(self, policy: TrustPolicy) -> None:
        self.agreements += 1
        self.streak += 1
        if self.streak >= policy.trust_after and not self.quarantined:
            self.earned = True
        if self.strikes and self.agreements - self.forgiven_at >= policy.forgive_after:
            self.strikes -= 1
            self.forgiven_at = self.agreements

    def lost(self, policy: TrustPolicy, now: float) -> str:
        """One wrong answer; returns what it leads to: "strike", "quarantine" or "ban"."""
        self.strikes += 1
        self.strikes_total += 1
        self.streak = 0
        self.earned = False
        self.forgiven_at = self.agreements
        if self.strikes >= policy.ban_after:
            self.quarantined = True
            seconds = min(policy.max_ban_s, policy.ban_s * 2 ** self.bans)
            self.bans += 1
            self.banned_until = now + seconds
            self.strikes = policy.quarantine_after  # back from a ban: one more wrong answer bans again
            return "ban"
        if self.strikes >= policy.quarantine_after and not self.quarantined:
            self.quarantined = True
            self.vouched = False
            return "quarantine"
        return "strike"

    def view(self, now: float) -> dict:
        return {"trust": self.state, "trust_streak": self.streak, "agreements": self.agreements,
                "wrong_answers": self.strikes_total, "verify_strikes": self.strikes, "verify_bans": self.bans,
                "verify_banned_for_s": round(max(0.0, self.banned_until - now), 3)}
