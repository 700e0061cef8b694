"""Verification of fitness values by replication (trust.py, applied by the ledger), driven by plain
calls and a fake clock: which answers are used, who checks whom, strikes, quarantine and bans."""

from __future__ import annotations

import math
import random

import pytest

from ea4llm_pool.ledger import IterationLedger
from ea4llm_pool.trust import CROSS_FP32, SAME_FP32, Standing, Tolerance, TrustPolicy, agree, tolerance
from test_ledger import TINY, FakeClock, make_plan


def truth(m: int) -> float:
    """The honest mean reward of member m."""
    return -2.0 - 0.01 * m


def liar(m: int) -> float:
    return -1.0


def make(clock, *, policy=None, verifier=True, samples=8, shards=1, **kw) -> IterationLedger:
    ledger = IterationLedger(quorum=1.0, shards=shards, lease_floor_s=1.0, worker_timeout_s=10.0,
                             samples_per_iteration=samples, cost=TINY, clock=clock, rng=random.Random(0),
                             policy=policy or TrustPolicy(spot_check=0.0, trust_after=3), **kw)
    if verifier:
        ledger.join("ref", verifier=True)
        ledger.set_ready("ref", True)
    return ledger


def add(ledger, wid, vouched=False, kind=("cpu", "fp32")):
    ledger.join(wid, 10.0, trust_id=wid, vouched=vouched, kind=kind)
    ledger.set_ready(wid, True)


def reply(ledger, lease, fn=truth) -> dict:
    results = [{"member": u["member"], "sign": u["sign"], "sum_r": fn(u["member"]) * len(u["indices"]),
                "count": len(u["indices"])} for u in lease.units]
    return ledger.on_result(lease.wid, lease.lease_id, lease.iteration, results, 0.1)


def drive(ledger, answers: dict, rounds: int = 50):
    """Dispatch and answer (worker → function of the member) until the iteration can close; returns
    the closing and every lease handed out."""
    leases = []
    for _ in range(rounds):
        if ledger.ready_to_close():
            return ledger.close(), leases
        out = ledger.dispatch()
        leases += out
        for lease in out:
            reply(ledger, lease, answers[lease.wid])
        if not out:
            ledger.clock.advance(0.2)
    raise AssertionError(f"the iteration never closed: {ledger.progress()}")


# -- agreement ----------------------------------------------------------------------------------------

def test_answers_agree_within_the_bounds_of_their_devices():
    tol = Tolerance(level=1e-3, diff=1e-4)
    a = {0: -2.0, 1: -2.1}
    assert agree(a, {0: -2.0005, 1: -2.1005}, tol)          # a common shift cancels in r+ - r-
    assert not agree(a, {0: -2.0005, 1: -2.0995}, tol)      # opposite shifts do not
    assert not agree(a, {0: -2.002, 1: -2.102}, tol)        # too far on each member
    assert not agree(a, {0: -2.0}, tol)                     # other members
    assert agree({0: math.nan, 1: -2.0}, {0: math.inf, 1: -2.0}, tol)
    assert not agree({0: math.nan, 1: -2.0}, {0: -2.0, 1: -2.0}, tol)
    assert tolerance(("cpu", "fp32"), ("cpu", "fp32")) == SAME_FP32
    assert tolerance(("cuda", "fp32"), ("cpu", "fp32")) == CROSS_FP32
    one, sixteen = tolerance(("cuda", "bf16"), ("cpu", "fp32")), tolerance(("cpu", "bf16"), ("cpu", "fp32"), samples=16)
    assert one.level > CROSS_FP32.level > SAME_FP32.level and sixteen.level == pytest.approx(one.level / 4)
    assert tolerance(("cpu", "fp32"), ("cpu", "fp32"), override=0.5) == Tolerance(0.5, 0.5)


def test_a_standing_earns_trust_loses_it_on_a_strike_and_bans_back_off():
    p = TrustPolicy(trust_after=2, quarantine_after=2, ban_after=4, ban_s=60, max_ban_s=100)
    st = Standing()
    st.agreed(p)
    assert st.state == "new"
    st.agreed(p)
    assert st.state == "trusted" and st.trusted
    assert st.lost(p, now=0.0) == "strike" and st.state == "new" and st.streak == 0
    assert st.lost(p, now=0.0) == "quarantine" and st.state == "quarantined" and not st.trusted
    st.agreed(p)
    assert st.state == "quarantined"  # agreeing does not lift a quarantine
    assert st.lost(p, now=0.0) == "strike"
    assert st.lost(p, now=0.0) == "ban" and st.banned_until == 60
    assert st.lost(p, now=100.0) == "strike"
    assert st.lost(p, now=100.0) == "ban" and st.banned_until == 200  # doubled, capped at max_ban_s


def test_rare_slips_of_an_honest_worker_are_forgiven():
    p = TrustPolicy(trust_after=2, quarantine_after=2, forgive_after=5)
    st = Standing()
    st.lost(p, 0.0)
    for _ in range(5):
        st.agreed(p)
    assert st.strikes == 0
    assert st.lost(p, 0.0) == "strike"  # not a quarantine: the earlier strike was forgiven


# -- who checks whom -----------------------------------------------------------------------------------

def test_a_new_workers_answers_wait_for_the_reference_and_count_once_it_agrees():
    clock = FakeClock()
    ledger = make(clock, samples=8)
    add(ledger, "w")
    ledger.open(make_plan(members=8))       # 4 units
    first = ledger.dispatch()
    mine = [x for x in first if x.wid == "w"]
    # At most half of the units are answered first by an untrusted worker; the reference takes the rest.
    assert sum(len(x.units) for x in mine) // 2 <= 2
    for lease in mine:
        reply(ledger, lease)
    assert not ledger.ready_to_close() and ledger.progress()["awaiting_check"] == len(mine)
    for lease in first:
        if lease.wid == "ref":
            reply(ledger, lease)
    closing, leases = drive(ledger, {"w": truth, "ref": truth})
    assert closing.rewards == [truth(m) for m in range(8)]
    checks = ledger.counters["checks"]
    assert checks >= 1 and ledger.counters["agreed"] == checks and ledger.counters["wrong_answers"] == 0
    assert ledger.worker_view("w")["agreements"] == sum(len(x.units) // 2 for x in leases + first if x.wid == "w")


def test_a_worker_is_trusted_after_a_streak_and_then_used_without_a_check():
    clock = FakeClock()
    ledger = make(clock, policy=TrustPolicy(trust_after=3, spot_check=0.0))
    add(ledger, "w")
    t = 0
    while ledger.worker_view("w")["trust"] != "trusted":
        ledger.open(make_plan(t, members=8))
        drive(ledger, {"w": truth, "ref": truth})
        t += 1
        assert t < 10
    checks = ledger.counters["checks"]
    ledger.open(make_plan(t, members=8))
    closing, leases = drive(ledger, {"w": truth, "ref": truth})
    assert ledger.counters["checks"] == checks           # no unit was checked
    assert {x.wid for x in leases} == {"w"}              # the reference stayed idle


def test_a_trusted_worker_is_spot_checked_and_a_vouched_one_is_not():
    clock = FakeClock()
    ledger = make(clock, policy=TrustPolicy(trust_after=1, spot_check=1.0))
    add(ledger, "w")
    add(ledger, "v", vouched=True)
    ledger.open(make_plan(0, members=16))
    drive(ledger, {"w": truth, "v": truth, "ref": truth})
    assert ledger.worker_view("w")["trust"] == "trusted"
    spot = ledger.counters["spot_checks"]
    ledger.open(make_plan(1, members=16))
    closing, leases = drive(ledger, {"w": truth, "v": truth, "ref": truth})
    w_units = sum(len(x.units) // 2 for x in leases if x.wid == "w")
    # Every unit w answered first was checked (spot_check = 1); v's were used as they came.
    assert ledger.counters["spot_checks"] - spot == w_units > 0
    assert ledger.worker_view("v")["trust"] == "vouched" and ledger.worker_view("v")["agreements"] >= 0


def test_a_liar_loses_to_the_reference_is_quarantined_and_its_values_are_never_used():
    clock = FakeClock()
    ledger = make(clock)
    add(ledger, "liar")
    add(ledger, "honest")
    for t in range(3):
        ledger.open(make_plan(t, members=8))
        closing, _ = drive(ledger, {"liar": liar, "honest": truth, "ref": truth})
        assert closing.rewards == [truth(m) for m in range(8)]
    view = ledger.worker_view("liar")
    assert view["trust"] == "quarantined" and view["wrong_answers"] >= 2
    assert ledger.worker_view("honest")["wrong_answers"] == 0
    events = ledger.take_events()
    assert [e["event"] for e in events][:1] == ["quarantine"] and events[0]["wids"] == ["liar"]
    assert ledger.counters["quarantines"] == 1


def test_a_quarantined_worker_only_gets_copies_of_settled_units_and_is_banned_with_back_off():
    clock = FakeClock()
    ledger = make(clock, policy=TrustPolicy(spot_check=0.0, trust_after=3, quarantine_after=1, ban_after=3, ban_s=60))
    add(ledger, "liar")
    add(ledger, "honest")
    bans = []
    for t in range(12):
        ledger.open(make_plan(t, members=8))
        closing, leases = drive(ledger, {"liar": liar, "honest": truth, "ref": truth})
        assert closing.rewards == [truth(m) for m in range(8)]
        bans += [e for e in ledger.take_events() if e["event"] == "ban"]
        if bans:
            break
    assert bans and bans[0]["seconds"] == pytest.approx(60) and ledger.banned_for("liar") == pytest.approx(60)
    assert ledger.counters["shadow_checks"] > 0
    # Copies are of settled units only: the quarantined worker never held a unit still open.
    assert ledger.counters["verify_bans"] == 1


def test_strangers_settle_a_disagreement_by_a_third_evaluation():
    clock = FakeClock()
    ledger = make(clock, verifier=False, policy=TrustPolicy(spot_check=0.0, trust_after=50))
    for wid in ("a", "b", "c"):
        add(ledger, wid)
    answers = {"a": truth, "b": truth, "c": liar}
    for t in range(4):
        ledger.open(make_plan(t, members=8))
        closing, _ = drive(ledger, answers)
        assert closing.rewards == [truth(m) for m in range(8)]
    assert ledger.counters["third_evaluations"] >= 1 and ledger.counters["disagreements"] >= 1
    assert ledger.worker_view("c")["wrong_answers"] >= 2 and ledger.worker_view("c")["trust"] == "quarantined"
    assert ledger.worker_view("a")["wrong_answers"] == ledger.worker_view("b")["wrong_answers"] == 0


def test_with_no_third_worker_the_trusted_answer_settles_a_dispute():
    clock = FakeClock()
    ledger = make(clock, verifier=False)
    add(ledger, "v", vouched=True)
    add(ledger, "u")
    ledger.open(make_plan(0, members=8))
    closing, _ = drive(ledger, {"v": truth, "u": liar})
    assert closing.rewards == [truth(m) for m in range(8)]
    assert ledger.worker_view("u")["wrong_answers"] >= 1


def test_an_untrusted_worker_answers_at_most_its_share_first():
    clock = FakeClock()
    ledger = make(clock, verifier=False, policy=TrustPolicy(spot_check=0.0, untrusted_share=0.25))
    add(ledger, "u")
    add(ledger, "v", vouched=True)
    ledger.open(make_plan(0, members=16))   # 8 units: u may answer 2 first
    closing, leases = drive(ledger, {"u": truth, "v": truth})
    firsts = [x for x in leases if x.wid == "u"]
    assert sum(len(x.units) // 2 for x in firsts) <= 2 + 0, firsts
    assert closing.rewards == [truth(m) for m in range(16)]


def test_answers_that_never_agree_are_dropped_and_the_unit_starts_over():
    clock = FakeClock()
    ledger = make(clock, verifier=False, policy=TrustPolicy(spot_check=0.0, max_answers=2, quarantine_after=99,
                                                             ban_after=100))
    add(ledger, "a")
    add(ledger, "b")
    ledger.open(make_plan(0, members=2))
    lease = ledger.dispatch()[0]
    reply(ledger, lease, lambda m: -1.0)
    check = [x for x in ledger.dispatch() if x.units]
    assert check and check[0].wid != lease.wid
    reply(ledger, check[0], lambda m: -3.0)
    assert ledger.counters["unsettled"] == 1 and not ledger.ready_to_close()
    assert ledger.progress()["queued"] == 1


def test_a_quarantine_discards_the_workers_unverified_answers_and_their_units_go_to_others():
    clock = FakeClock()
    ledger = make(clock, policy=TrustPolicy(trust_after=8, spot_check=0.0, quarantine_after=1, ban_after=9))
    add(ledger, "w")
    ledger.open(make_plan(0, members=16))   # 8 units: w answers 4 first; the reference checks one at a time
    out = ledger.dispatch()
    mine = [u["member"] for x in out if x.wid == "w" for u in x.units]
    lie_on = mine[-2:]                      # the last unit answered: its check comes first
    for lease in out:
        reply(ledger, lease, (lambda m: liar(m) if m in lie_on else truth(m)) if lease.wid == "w" else truth)
    second = ledger.dispatch()
    assert [[u["member"] for u in x.units] for x in second if x.wid == "ref"][0] == lie_on
    for lease in second:  # w answers its next units honestly; they await their checks too
        if lease.wid == "w":
            reply(ledger, lease)
    awaiting = ledger.progress()["awaiting_check"] - 1
    reply(ledger, next(x for x in second if x.wid == "ref"))
    assert ledger.worker_view("w")["trust"] == "quarantined"
    assert ledger.counters["discarded"] == awaiting > 0 and ledger.progress()["awaiting_check"] == 0
    # With its only pool worker quarantined the iteration waits; a newcomer finishes it.
    assert not [x for x in ledger.dispatch() if x.wid != "w"]
    add(ledger, "x", vouched=True)
    closing, _ = drive(ledger, {"w": truth, "x": truth, "ref": truth})
    assert closing.rewards == [truth(m) for m in range(16)]


def test_units_that_the_only_other_worker_fails_on_go_to_the_reference():
    """An honest newcomer at its share and a worker whose evaluations fail (out of memory): the
    reference replica answers the rest, so the iteration still closes."""
    clock = FakeClock()
    ledger = make(clock)
    add(ledger, "honest")
    add(ledger, "oom")
    ledger.open(make_plan(0, members=8))
    for _ in range(40):
        if ledger.ready_to_close():
            break
        for lease in ledger.dispatch():
            if lease.wid == "oom":
                ledger.on_error("oom", lease.lease_id, lease.iteration, "RuntimeError: CUDA out of memory")
            else:
                reply(ledger, lease)
        clock.advance(0.2)
    assert ledger.close().rewards == [truth(m) for m in range(8)]
    assert ledger.worker_view("oom")["units_done"] == 0


def test_an_invite_marked_trusted_is_vouched_for_by_the_keyring(tmp_path):
    from ea4llm_pool.auth import KeyRing, write_invite

    write_invite(tmp_path, "mine", "tcp://127.0.0.1:5555", trusted=True)
    write_invite(tmp_path, "guest", "tcp://127.0.0.1:5555")
    ring = KeyRing(tmp_path, create=False)
    assert set(ring.allowed.values()) == {"coordinator", "mine", "guest"}
    assert ring.trusted == {"mine"}
    (tmp_path / "trusted" / "mine").unlink()  # the operator withdraws it: read on the next refresh
    ring.refresh()
    assert ring.trusted == frozenset()
