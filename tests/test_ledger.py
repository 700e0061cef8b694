"""The coordinator's scheduling, driven by plain calls and a fake clock: no processes, sockets or sleeps."""

from __future__ import annotations

import math
import random

import pytest

from ea4llm_pool.config import Config
from ea4llm_pool.data import digest_indices, subset_indices
from ea4llm_pool.es.population import population
from ea4llm_pool.ledger import (EXPIRE_SCAN_S, MAX_COPIES, MIN_BACKUP_AFTER_S, TAIL_SCAN_S, IterationLedger,
                                WorkCost)
from ea4llm_pool.plan import Plan, plan_iteration

TINY = WorkCost(model_params=232_000, seq_len=64, seeds_per_commit=2)
PAPER_1B = WorkCost(model_params=837_000_000, seq_len=256, seeds_per_commit=15)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_plan(t: int = 0, members: int = 4, samples: int = 8, antithetic: bool = True) -> Plan:
    return Plan(t, 0.01, 0.001, population(7, t, members, antithetic), list(range(samples)), "digest")


def make_ledger(clock, workers=(), *, samples=8, **kw) -> IterationLedger:
    opts = dict(quorum=1.0, shards=1, lease_floor_s=1.0, worker_timeout_s=10.0, samples_per_iteration=samples,
                cost=TINY, clock=clock, rng=random.Random(0))
    opts.update(kw)
    ledger = IterationLedger(**opts)
    for wid, throughput in workers:
        ledger.join(wid, throughput)
        ledger.set_ready(wid, True)
    return ledger


def results_for(lease, reward=-2.0) -> list[dict]:
    """What an honest worker answers: one entry per member entry of the lease, mean R = ``reward``
    (a number, or a function of the member) on every sample."""
    mean = reward if callable(reward) else (lambda m: reward)
    return [{"member": u["member"], "sign": u["sign"], "sum_r": mean(u["member"]) * len(u["indices"]),
             "count": len(u["indices"])} for u in lease.units]


def answer(ledger, lease, reward=-2.0, eval_s: float = 0.1) -> dict:
    return ledger.on_result(lease.wid, lease.lease_id, lease.iteration, results_for(lease, reward), eval_s)


def units_of(leases, pair: int = 2) -> list[tuple[tuple[int, ...], int]]:
    """(members, first sample index) of every unit in ``leases``. A unit is listed on the wire as
    ``pair`` consecutive entries of one seed on one shard: both signs of an antithetic pair (2), or
    one member without antithetic sampling (1)."""
    out = []
    for lease in leases:
        assert len(lease.units) % pair == 0, lease.units
        for i in range(0, len(lease.units), pair):
            group = lease.units[i: i + pair]
            assert all(u["seed"] == group[0]["seed"] and u["indices"] == group[0]["indices"] for u in group), group
            assert pair == 1 or [u["sign"] for u in group] == [1, -1], group
            out.append((tuple(u["member"] for u in group), group[0]["indices"][0]))
    return sorted(out)


def entries(leases) -> int:
    """Member entries (results expected) in ``leases``."""
    return sum(len(lease.units) for lease in leases)


# -- lease sizes ---------------------------------------------------------------------------------------

def test_a_lease_holds_about_half_a_second_of_a_measured_workers_work_and_at_most_two_are_out():
    clock = FakeClock()
    # 8 samples in 8 shards: a unit is a pair on one sample, 2 samples; 10 samples/s → 2 units
    # (4 samples, 0.4 s) fit in 0.5 s, a third would not.
    ledger = make_ledger(clock, [("w", 10.0)], shards=8, samples=8)
    ledger.open(make_plan(members=20))
    first = ledger.dispatch()
    assert [len(units_of([lease])) for lease in first] == [2, 2]
    assert [len(lease.units) for lease in first] == [4, 4]  # both members of each pair on the wire
    assert ledger.dispatch() == []  # two leases' worth is out: the next waits for an answer
    answer(ledger, first[0], eval_s=0.4)  # 4 samples in 0.4 s: still 10 samples/s
    again = ledger.dispatch()
    assert [len(units_of([lease])) for lease in again] == [2]
    assert ledger.worker_view("w")["units_out"] == 8  # member entries: 4 units (pairs on a shard)
    assert ledger.worker_view("w")["leases"] == 2


def test_without_antithetic_sampling_a_unit_is_one_member_and_leases_size_by_it():
    clock = FakeClock()
    # A unit is one member on one sample: 10 samples/s → 5 units take 0.5 s.
    ledger = make_ledger(clock, [("w", 10.0)], shards=8, samples=8)
    ledger.open(make_plan(members=10, antithetic=False))
    first = ledger.dispatch()
    assert [len(units_of([lease], pair=1)) for lease in first] == [5, 5]
    assert [len(lease.units) for lease in first] == [5, 5]
    assert answer(ledger, first[0], eval_s=0.5)["accepted"] == 5


def test_an_unmeasured_worker_gets_one_unit_at_a_time():
    clock = FakeClock()
    ledger = make_ledger(clock, [("w", 0.0)], shards=4)
    ledger.open(make_plan(members=4))  # 2 pairs × 4 shards: 8 units
    leases = ledger.dispatch()
    assert [len(units_of([lease])) for lease in leases] == [1, 1]
    assert [len(lease.units) for lease in leases] == [2, 2]  # one pair: both signs of its seed


def test_a_lease_never_exceeds_the_workers_share_of_the_iteration():
    clock = FakeClock()
    # 2 pairs × 4 shards: 8 units of 2 samples; throughputs 3:1 → shares 6 and 2, although 0.5 s
    # of work would be 75 and 25 units.
    ledger = make_ledger(clock, [("fast", 300.0), ("slow", 100.0)], shards=4, samples=4)
    ledger.open(make_plan(members=4, samples=4))
    leases = ledger.dispatch()
    by_worker = {lease.wid: len(units_of([lease])) for lease in leases}
    assert by_worker == {"fast": 6, "slow": 2}
    assert {lease.wid: len(lease.units) for lease in leases} == {"fast": 12, "slow": 4}
    assert len(leases) == 2


def test_shares_take_largest_remainders_so_every_unit_has_a_worker():
    clock = FakeClock()
    # 2 units (2 pairs on one shard) for three equal workers: two of them get one each, and no
    # unit is left unplanned.
    ledger = make_ledger(clock, [("a", 100.0), ("b", 100.0), ("c", 100.0)])
    ledger.open(make_plan(members=4))
    leases = ledger.dispatch()
    assert sorted(len(units_of([lease])) for lease in leases) == [1, 1]
    assert len(units_of(leases)) == 2
    assert len({lease.wid for lease in leases}) == 2


def test_two_workers_split_an_iteration_by_throughput_and_close_it():
    clock = FakeClock()
    # 6 pairs × 8 shards: 48 units of 2 samples; 0.5 s of work is 6 units on fast, 2 on slow.
    ledger = make_ledger(clock, [("fast", 24.0), ("slow", 8.0)], shards=8, samples=8)
    ledger.open(make_plan(members=12))
    rounds = 0
    while not ledger.ready_to_close() and rounds < 10:  # bounded: a ledger that never settles fails, not hangs
        leases = ledger.dispatch()
        assert leases, "work left but nothing leased"
        for lease in leases:
            tp = 24.0 if lease.wid == "fast" else 8.0
            answer(ledger, lease, eval_s=len(lease.units) / tp)  # one sample per member entry
        clock.advance(0.5)
        rounds += 1
    assert rounds == 3
    # units_done counts member entries: 36 and 12 units, both signs each.
    done = {wid: ledger.worker_view(wid)["units_done"] for wid in ("fast", "slow")}
    assert done == {"fast": 72, "slow": 24}
    closing = ledger.close()
    assert len(closing.members) == 12 and closing.samples == 96
    assert closing.rewards == [-2.0] * 12
    assert ledger.iteration is None


# -- expiry ----------------------------------------------------------------------------------------------

def test_an_expired_lease_is_requeued_and_its_late_answer_is_stale():
    clock = FakeClock()
    ledger = make_ledger(clock, [("w", 0.0)])
    ledger.open(make_plan(members=4))  # 2 pairs: 2 units, one per lease
    first, second = ledger.dispatch()
    assert second.expires_s > first.expires_s + EXPIRE_SCAN_S  # it also waits for the first
    clock.advance(first.expires_s - 0.01)
    ledger.heard("w")
    assert ledger.expire() == [] and ledger.counters["expired_leases"] == 0
    clock.advance(EXPIRE_SCAN_S + 0.01)
    ledger.heard("w")
    assert ledger.expire() == []  # the worker is alive: only its lease is late
    assert ledger.counters["expired_leases"] == 1 and ledger.counters["reissued"] == 1
    again = ledger.dispatch()
    assert units_of(again) == units_of([first])
    assert answer(ledger, first)["stale"] == 1 and ledger.counters["stale"] == 1
    for lease in [second, *again]:
        answer(ledger, lease)
    assert ledger.ready_to_close()


def test_expiry_is_scanned_at_most_every_interval():
    clock = FakeClock()
    ledger = make_ledger(clock, [("w", 0.0)], worker_timeout_s=1e9)
    ledger.open(make_plan(members=4))
    first, _ = ledger.dispatch()
    clock.advance(first.expires_s - EXPIRE_SCAN_S / 2)
    ledger.expire()
    clock.advance(EXPIRE_SCAN_S * 0.6)  # overdue, but the last scan was too recent
    ledger.expire()
    assert ledger.counters["expired_leases"] == 0
    clock.advance(EXPIRE_SCAN_S * 0.5)
    ledger.expire()
    assert ledger.counters["expired_leases"] == 1


def test_a_silent_worker_is_dropped_and_its_units_go_to_another():
    clock = FakeClock()
    ledger = make_ledger(clock, [("quiet", 0.0), ("alive", 0.0)], lease_floor_s=1000.0)
    ledger.open(make_plan(members=4))  # 2 units: one each
    leases = ledger.dispatch()
    assert {lease.wid for lease in leases} == {"quiet", "alive"}
    lost = [lease for lease in leases if lease.wid == "quiet"]
    clock.advance(5.0)
    ledger.heard("alive")
    clock.advance(5.5)  # quiet: 10.5 s of silence > 10 s; alive: 5.5 s
    dropped = ledger.expire()
    assert [wid for wid, _ in dropped] == ["quiet"] and "silent for 10 s" in dropped[0][1]
    assert ledger.counters["dropped_workers"] == 1 and ledger.departed[-1]["id"] == "quiet"
    for lease in leases:
        if lease.wid == "alive":
            answer(ledger, lease)
    again = ledger.dispatch()
    assert [lease.wid for lease in again] == ["alive"]
    assert units_of(again) == units_of(lost)


def test_a_worker_that_leaves_or_is_not_ready_hands_its_units_back():
    clock = FakeClock()
    ledger = make_ledger(clock, [("a", 0.0), ("b", 0.0)])
    ledger.open(make_plan(members=8))  # 4 pairs: 4 units, two leases of one each per worker
    first = ledger.dispatch()
    a_units = units_of(lease for lease in first if lease.wid == "a")
    assert len(a_units) == 2
    ledger.set_ready("a", False)
    assert ledger.worker_view("a")["leases"] == 0 and ledger.counters["reissued"] == len(a_units)
    b_leases = [lease for lease in first if lease.wid == "b"]
    for lease in b_leases:
        answer(ledger, lease)
    again = ledger.dispatch()
    assert {lease.wid for lease in again} == {"b"} and units_of(again) == a_units  # a is not ready
    assert not ledger.is_ready("a") and ledger.is_ready("b")
    view = ledger.leave("b")
    # units_done counts member entries answered: both signs of each of b's 2 units.
    assert view["units_done"] == entries(b_leases) == 4 and ledger.counters["dropped_workers"] == 0
    assert ledger.leave("b") is None


def test_a_failed_send_undoes_the_lease():
    clock = FakeClock()
    ledger = make_ledger(clock, [("w", 0.0)])
    ledger.open(make_plan(members=2))
    first = ledger.dispatch()
    for lease in first:
        ledger.unsent(lease.lease_id)
    assert ledger.worker_view("w")["leases"] == 0 and ledger.counters["reissued"] == 0
    again = ledger.dispatch()
    assert units_of(again) == units_of(first)
    assert {lease.lease_id for lease in again}.isdisjoint(lease.lease_id for lease in first)


# -- backups at the tail -------------------------------------------------------------------------------------

def _tail(workers=("a", "b", "c")):
    """Two antithetic pairs on one shard (two units) leased to the first two workers; the rest are idle."""
    clock = FakeClock()
    ledger = make_ledger(clock, [(w, 0.0) for w in workers], lease_floor_s=1000.0)
    ledger.open(make_plan(members=4))
    leases = ledger.dispatch()
    assert len(leases) == 2
    return clock, ledger, leases


def test_backups_go_to_idle_workers_only_after_twice_the_median_lease():
    clock, ledger, (quick, stuck) = _tail()
    clock.advance(1.0)
    answer(ledger, quick)  # one lease took 1 s: a unit out for 2 s earns a backup
    idle = {"a", "b", "c"} - {stuck.wid}
    clock.advance(0.9)  # stuck has been out 1.9 s
    assert ledger.dispatch() == []
    clock.advance(0.1)
    backups = ledger.dispatch()
    assert len(backups) == 1 and backups[0].backup and backups[0].wid in idle
    assert units_of(backups) == units_of([stuck])
    assert ledger.counters["backups"] == 1


def test_before_any_answer_a_backup_waits_the_minimum_patience():
    clock, ledger, leases = _tail(("a", "b", "c"))
    clock.advance(MIN_BACKUP_AFTER_S / 2)
    assert ledger.dispatch() == []
    clock.advance(MIN_BACKUP_AFTER_S)
    backups = ledger.dispatch()
    assert len(backups) == 1  # one idle worker, one backup: longest outstanding (both equal) first
    assert backups[0].wid not in {lease.wid for lease in leases}


def test_a_unit_is_never_backed_up_to_its_holder_and_never_beyond_max_copies():
    clock, ledger, (quick, stuck) = _tail(("a", "b", "c", "d", "e"))
    clock.advance(1.0)
    answer(ledger, quick)
    clock.advance(5.0)
    backups = ledger.dispatch()
    for _ in range(10):
        clock.advance(TAIL_SCAN_S)
        backups += ledger.dispatch()
    assert len(backups) == MAX_COPIES - 1
    assert all(b.wid != stuck.wid for b in backups)


def test_a_lone_holder_never_gets_its_own_unit_again():
    clock = FakeClock()
    ledger = make_ledger(clock, [("only", 0.0)], lease_floor_s=1000.0)
    ledger.open(make_plan(members=2))
    ledger.dispatch()
    for _ in range(20):
        clock.advance(1.0)
        assert ledger.dispatch() == []


def test_the_first_answer_wins_and_the_copy_counts_as_duplicate():
    clock, ledger, (quick, stuck) = _tail()
    clock.advance(1.0)
    answer(ledger, quick)
    clock.advance(2.0)
    (backup,) = ledger.dispatch()
    assert units_of([backup]) == units_of([stuck])
    assert answer(ledger, backup, reward=-1.0)["accepted"] == 2  # counted per member: both signs
    assert ledger.ready_to_close()
    late = answer(ledger, stuck, reward=-5.0)
    assert late["duplicate"] == 2 and late["accepted"] == 0 and ledger.counters["duplicate"] == 2
    closing = ledger.close()
    (copied, _), = units_of([stuck])
    expect = [-1.0 if m.member in copied else -2.0 for m in closing.members]
    assert [m.member for m in closing.members] == [0, 1, 2, 3] and closing.rewards == expect


# -- quorum ----------------------------------------------------------------------------------------------------

def test_a_quorum_of_complete_pairs_closes_and_partial_pairs_are_left_out():
    clock = FakeClock()
    ledger = make_ledger(clock, [(f"w{i}", 0.0) for i in range(8)], quorum=0.5, shards=2)
    ledger.open(make_plan(members=8))  # 4 pairs on 2 shards (samples 0-3, 4-7): the quorum is 2 complete pairs
    by_unit = {}
    for lease in ledger.dispatch():
        (unit,) = units_of([lease])
        by_unit[unit] = lease
    pair = {g: (2 * g, 2 * g + 1) for g in range(4)}
    assert sorted(by_unit) == sorted((pair[g], first) for g in range(4) for first in (0, 4))

    def by_member(m: int) -> float:
        return -float(m)

    for unit in [(pair[0], 0), (pair[0], 4), (pair[1], 0), (pair[2], 4)]:
        answer(ledger, by_unit[unit], reward=by_member)
    # Answered: pair 0 on both shards (complete), pairs 1 and 2 on one shard each (partial).
    assert not ledger.ready_to_close() and ledger.progress()["pairs_done"] == 1
    answer(ledger, by_unit[(pair[2], 0)], reward=by_member)  # pair 2 complete
    assert ledger.ready_to_close()
    closing = ledger.close()
    assert [m.member for m in closing.members] == [0, 1, 4, 5]
    assert closing.rewards == [-0.0, -1.0, -4.0, -5.0]
    assert closing.samples == 4 * 8
    assert [m.member for m in closing.plan.members] == [0, 1, 4, 5] and closing.plan.indices == list(range(8))
    # Leases still out for the closed iteration are stale now.
    assert answer(ledger, by_unit[(pair[3], 0)])["stale"] == 1


@pytest.mark.parametrize("quorum,pairs,needed", [(1.0, 4, 4), (0.6, 4, 3), (0.5, 4, 2), (0.01, 4, 1), (0.3, 10, 3)])
def test_the_quorum_is_a_rounded_up_fraction_of_pairs(quorum, pairs, needed):
    ledger = make_ledger(FakeClock(), quorum=quorum)
    ledger.open(make_plan(members=2 * pairs))
    assert ledger.progress()["pairs_needed"] == needed


def test_without_antithetic_pairs_every_member_is_its_own_pair():
    ledger = make_ledger(FakeClock(), quorum=0.5)
    ledger.open(make_plan(members=5, antithetic=False))
    assert ledger.progress()["pairs_needed"] == 3


def test_a_shard_split_member_is_complete_only_with_every_shard_and_its_reward_is_the_mean_over_samples():
    clock = FakeClock()
    ledger = make_ledger(clock, [("w", 1000.0)], shards=3, samples=8)  # shards of 3, 2, 3 samples
    ledger.open(make_plan(members=2))
    (lease,) = ledger.dispatch()
    assert units_of([lease]) == [((0, 1), 0), ((0, 1), 3), ((0, 1), 5)]
    # Member 0 does better on the second shard, member 1 on the third.
    bonus = {(0, 3): 3.0, (1, 5): 2.0}

    def honest(lease):
        results = results_for(lease)
        for u, r in zip(lease.units, results):
            r["sum_r"] += bonus.get((u["member"], u["indices"][0]), 0.0)
        return results

    results = honest(lease)
    results[5]["count"] -= 1  # the third shard's answer is invalid: two of three shards settle
    assert ledger.on_result("w", lease.lease_id, 0, results, 0.1)["accepted"] == 4
    assert ledger.progress()["units_done"] == 2 and not ledger.ready_to_close()
    (redo,) = ledger.dispatch()
    assert units_of([redo]) == [((0, 1), 5)]
    ledger.on_result("w", redo.lease_id, 0, honest(redo), 0.1)
    closing = ledger.close()
    assert closing.rewards == [(-16.0 + 3.0) / 8, (-16.0 + 2.0) / 8]
    assert closing.samples == 16


# -- stale, invalid, errors, NaN ------------------------------------------------------------------------------

def test_stale_results_are_dropped_and_counted():
    clock = FakeClock()
    ledger = make_ledger(clock, [("a", 1000.0), ("b", 1000.0)])
    ledger.open(make_plan(members=2))
    leases = ledger.dispatch()
    a = next(lease for lease in leases if lease.wid == "a")
    # A lease nobody issued, a lease held by another worker, a lease of another iteration.
    assert ledger.on_result("a", "nope", 0, results_for(a), 0.1)["stale"] == 1
    assert ledger.on_result("b", a.lease_id, 0, results_for(a), 0.1)["stale"] == 1
    assert ledger.on_result("a", a.lease_id, 1, results_for(a), 0.1)["stale"] == 1
    assert ledger.counters["stale"] == 3
    # The lease answered for the wrong iteration will not be answered again: its units are back.
    assert units_of(ledger.dispatch()) == units_of([a])
    # An answer arriving after the iteration closed is stale too.
    ledger2 = make_ledger(clock, [("a", 0.0)])
    ledger2.open(make_plan(t=3, members=2))
    old = ledger2.dispatch()
    for lease in old:
        answer(ledger2, lease)
    ledger2.close()
    ledger2.open(make_plan(t=4, members=2))
    assert answer(ledger2, old[0])["stale"] == 1


@pytest.mark.parametrize("spoil", [
    lambda rs: rs[0].update(member=rs[0]["member"] + 1),
    lambda rs: rs[0].update(sign=-rs[0]["sign"]),
    lambda rs: rs[0].update(count=rs[0]["count"] - 1),
    lambda rs: rs[0].update(sum_r="high"),
    lambda rs: rs.pop(),
    lambda rs: rs.append(dict(rs[0])),
], ids=["wrong member", "wrong sign", "wrong count", "not a number", "one result short", "one result extra"])
def test_an_invalid_result_is_dropped_and_its_unit_leased_again(spoil):
    clock = FakeClock()
    ledger = make_ledger(clock, [("w", 1000.0)], shards=2)
    ledger.open(make_plan(members=2))
    (lease,) = ledger.dispatch()
    assert len(lease.units) == 4
    results = results_for(lease)
    spoil(results)
    outcome = ledger.on_result("w", lease.lease_id, 0, results, 0.1)
    # A unit's entries are dropped together: a spoilt entry takes its pair partner with it.
    assert outcome["invalid"] in (2, 4) and ledger.counters["invalid"] == outcome["invalid"]
    assert outcome["accepted"] == 4 - outcome["invalid"]
    assert not ledger.ready_to_close()
    again = ledger.dispatch()
    assert sum(len(x.units) for x in again) == outcome["invalid"]
    for x in again:
        answer(ledger, x)
    assert ledger.ready_to_close()


def test_a_worker_error_sends_its_units_to_another_worker():
    clock = FakeClock()
    ledger = make_ledger(clock, [("oom", 100.0), ("ok", 100.0)])
    ledger.open(make_plan(members=4))  # 2 units: one each
    leases = ledger.dispatch()
    bad = next(lease for lease in leases if lease.wid == "oom")
    ledger.on_error("oom", bad.lease_id, 0, "CUDA out of memory")
    assert ledger.counters["errors"] == 1 and ledger.worker_view("oom")["errors"] == 1
    assert ledger.dispatch() == []  # "ok" is busy; the unit waits for it rather than going back to "oom"
    for lease in leases:
        if lease.wid == "ok":
            answer(ledger, lease)
    again = ledger.dispatch()
    assert [lease.wid for lease in again] == ["ok"] and units_of(again) == units_of([bad])


def test_a_lone_worker_gets_its_failed_units_back():
    clock = FakeClock()
    ledger = make_ledger(clock, [("only", 0.0)])
    ledger.open(make_plan(members=2))
    first = ledger.dispatch()
    ledger.on_error("only", first[0].lease_id, 0, "transient")
    again = ledger.dispatch()
    assert units_of(again) == units_of(first[:1])


def test_a_nan_result_is_accepted_counted_and_closes_the_iteration():
    clock = FakeClock()
    ledger = make_ledger(clock, [("w", 0.0)])
    ledger.open(make_plan(members=4))  # 2 units, one per lease
    leases = ledger.dispatch()
    assert [units_of([lease])[0][0] for lease in leases] == [(0, 1), (2, 3)]
    # Counted per member: one non-finite member in each pair.
    first = answer(ledger, leases[0], reward=lambda m: math.nan if m == 0 else -2.0)
    assert first["nonfinite"] == 1 and first["accepted"] == 2
    second = answer(ledger, leases[1], reward=lambda m: -math.inf if m == 3 else -2.0)
    assert second["nonfinite"] == 1 and second["accepted"] == 2
    assert ledger.counters["nonfinite"] == 2 and ledger.counters["invalid"] == 0
    closing = ledger.close()
    assert math.isnan(closing.rewards[0]) and closing.rewards[1:] == [-2.0, -2.0, -math.inf]


# -- deadlines follow the work ----------------------------------------------------------------------------------

def test_a_first_lease_on_a_1b_model_gets_a_deadline_far_longer_than_on_a_tiny_one():
    leases = {}
    for name, cost in (("tiny", TINY), ("1b", PAPER_1B)):
        ledger = make_ledger(FakeClock(), [("new", 0.0)], cost=cost, lease_floor_s=30.0)
        ledger.open(make_plan(members=2, samples=8))
        leases[name] = ledger.dispatch()[0]
    assert leases["tiny"].expires_s == 30.0  # the floor: a tiny model's work is well under it
    # One pair on 8 samples: 16 samples × 256 tokens forward at 2 GFLOP/s, plus one 15-seed commit at
    # 20 M elements/s: minutes.
    assert leases["1b"].expires_s > 100 * leases["tiny"].expires_s
    assert leases["1b"].expires_s == pytest.approx(PAPER_1B.expires_s(16, 0.0, 1, 0.0, 30.0))


def test_a_measured_fast_worker_gets_short_deadlines():
    clock = FakeClock()
    ledger = make_ledger(clock, [("fast", 0.0)], cost=PAPER_1B, lease_floor_s=2.0, samples=8)
    ledger.open(make_plan(members=2, samples=8))
    slow_first = ledger.dispatch()
    for lease in slow_first:
        answer(ledger, lease, eval_s=0.016)  # one pair on 8 samples: 16 samples in 16 ms, 1000 samples/s
    ledger.note_update_s("fast", 0.05)
    ledger.report_state("fast", 0, "h0")
    ledger.close()
    ledger.open(make_plan(t=1, members=2, samples=8))
    (lease,) = ledger.dispatch()  # fast and measured: the whole share in one lease
    expected = 16 / 1000 + 1 * 0.05  # one pair on 8 samples, plus one commit
    assert lease.expires_s == pytest.approx(PAPER_1B.slack * expected + PAPER_1B.margin_s)
    assert lease.expires_s < slow_first[0].expires_s / 100


def test_measured_update_times_are_averaged_over_workers():
    ledger = make_ledger(FakeClock(), [("a", 0.0), ("b", 0.0), ("c", 0.0)])
    assert ledger.update_seconds() is None
    ledger.note_update_s("a", 2.0)
    ledger.note_update_s("b", 4.0)
    ledger.note_update_s("c", math.nan)  # not a measurement
    assert ledger.update_seconds() == 3.0


def test_a_second_lease_allows_for_the_work_queued_ahead_of_it():
    ledger = make_ledger(FakeClock(), [("w", 0.0)], cost=PAPER_1B)
    ledger.open(make_plan(members=4))  # 2 units of one pair on 8 samples: 16 samples each
    first, second = ledger.dispatch()
    assert first.expires_s == pytest.approx(PAPER_1B.expires_s(16, 0.0, 1, 0.0, 1.0))
    assert second.expires_s == pytest.approx(PAPER_1B.expires_s(32, 0.0, 1, 0.0, 1.0))
    assert second.expires_s > first.expires_s


def test_work_cost_for_a_run_counts_one_seed_per_antithetic_pair():
    cfg = Config()
    cost = WorkCost.for_run(cfg, 1000)
    assert cost.seq_len == cfg.data.seq_len
    assert cost.seeds_per_commit == (cfg.es.population // 2 if cfg.es.antithetic else cfg.es.population)


# -- state hashes checked when the reference has them ------------------------------------------------------

def test_a_report_ahead_of_the_reference_is_pending_until_the_reference_decides_it():
    clock = FakeClock()
    ledger = make_ledger(clock, [("good", 0.0), ("bad", 0.0)])
    ledger.reference(0, "h0")
    assert ledger.report_state("good", 0, "h0") == "ok"
    ledger.open(make_plan(t=0, members=2))
    for lease in ledger.dispatch():
        answer(ledger, lease)
    ledger.close()  # commit 0 announced: state 1 exists, its hash not known yet
    assert ledger.report_state("good", 1, "h1") == "pending"
    assert ledger.report_state("bad", 1, "hX") == "pending"
    assert ledger.reference_hash(1) is None
    ledger.open(make_plan(t=1, members=2))
    assert ledger.dispatch()  # pending workers keep working
    decided = ledger.reference(1, "h1")
    assert sorted(decided) == [("bad", 1, False), ("good", 1, True)]
    assert ledger.reference_hash(1) == "h1"
    good, bad = ledger.worker_view("good"), ledger.worker_view("bad")
    assert (good["verified"], good["verified_from"], good["verified_last"], good["verify_gaps"]) == (2, 0, 1, 0)
    assert good["state_agrees"] and good["ready"]
    assert bad["mismatches"] == 1 and not bad["ready"] and bad["leases"] == 0
    assert ledger.reference(1, "h1") == []  # decided once


def test_a_state_the_run_never_reached_is_a_mismatch_at_once():
    ledger = make_ledger(FakeClock(), [("w", 0.0)])
    ledger.reference(0, "h0")
    assert ledger.report_state("w", 5, "h5") == "mismatch"
    assert ledger.report_state("w", 0, "other") == "mismatch"
    assert ledger.counters["mismatches"] == 2


def test_a_skipped_check_counts_as_a_gap():
    ledger = make_ledger(FakeClock(), [("w", 0.0)])
    for step in range(4):
        ledger.reference(step, f"h{step}")
    assert [ledger.report_state("w", s, f"h{s}") for s in (0, 1, 3)] == ["ok", "ok", "ok"]
    view = ledger.worker_view("w")
    assert (view["verified"], view["verified_from"], view["verified_last"], view["verify_gaps"]) == (3, 0, 3, 1)


def test_old_reference_hashes_and_pending_reports_are_forgotten():
    ledger = make_ledger(FakeClock(), [("w", 0.0)], hash_window=4)
    ledger.reference(0, "h0")
    ledger.open(make_plan(t=50, members=2))  # the run has announced 50 commits
    assert ledger.report_state("w", 10, "h10") == "pending"
    for step in range(1, 100):
        ledger.reference(step, f"h{step}")
    assert ledger.reference_hash(0) is None and ledger.reference_hash(99) == "h99"
    assert ledger.report_state("w", 3, "h3") == "mismatch"  # too old to check
    with pytest.raises(RuntimeError, match="two reference state hashes"):
        ledger.reference(99, "other")


# -- the plan ------------------------------------------------------------------------------------------------

def test_the_plan_is_a_pure_function_of_the_run_seed_and_the_iteration():
    cfg = Config()
    a, b = plan_iteration(cfg, 1000, 7), plan_iteration(cfg, 1000, 7)
    assert a == b and a.iteration == 7
    assert a.indices == subset_indices(1000, cfg.es.samples_per_iteration, cfg.run.seed, 7)
    assert a.subset_digest == digest_indices(a.indices)
    assert a.members == population(cfg.run.seed, 7, cfg.es.population, cfg.es.antithetic)
    assert plan_iteration(cfg, 1000, 8).indices != a.indices


def test_the_ledger_refuses_to_open_a_second_iteration_or_close_without_quorum():
    ledger = make_ledger(FakeClock(), [("w", 0.0)])
    ledger.open(make_plan(members=2))
    with pytest.raises(RuntimeError, match="still open"):
        ledger.open(make_plan(t=1, members=2))
    with pytest.raises(RuntimeError, match="quorum"):
        ledger.close()
    with pytest.raises(ValueError, match="already joined"):
        ledger.join("w")
