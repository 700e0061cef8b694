"""The members of one iteration: (member index, seed, sign), a pure function of (run seed, t).

With antithetic sampling, members 2k and 2k+1 share seed b_k with signs +1 and −1 (paper Eq. 10).
Seeds are 63-bit, derived by hashing, so a resumed run or a replaying worker sees the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from .noise import splitmix64


@dataclass(frozen=True)
class Member:
    member: int
    seed: int
    sign: int


def member_seed(run_seed: int, iteration: int, k: int) -> int:
    return splitmix64(splitmix64(splitmix64(run_seed) ^ iteration) ^ k) >> 1


def population(run_seed: int, iteration: int, size: int, antithetic: bool) -> list[Member]:
    if antithetic:
        if size % 2:
            raise ValueError("antithetic population must be even")
        out = []
        for k in range(size // 2):
            s = member_seed(run_seed, iteration, k)
            out += [Member(2 * k, s, +1), Member(2 * k + 1, s, -1)]
        return out
    return [Member(j, member_seed(run_seed, iteration, j), +1) for j in range(size)]
