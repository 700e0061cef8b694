"""The coordinator's scheduling, without sockets: leases, results, quorum, backups, expiry, hash checks.

The shell (``coordinator.py``) owns sockets, identities and the run; this ledger owns every
scheduling decision and is driven by plain calls and an injected clock, so it is tested
without processes or sleeps::

    ledger = IterationLedger(quorum=1.0, shards=2, lease_floor_s=30, worker_timeout_s=10,
                             samples_per_iteration=16, cost=WorkCost.for_run(cfg, n_params))
    ledger.join("w1", throughput=0.0); ledger.set_ready("w1", True)
    ledger.open(plan_iteration(cfg, n_train, t))
    for lease in ledger.dispatch(): send LEASE(lease)        # on a failed send: ledger.unsent(id)
    on RESULT: ledger.on_result(wid, lease_id, t, results, eval_s)   # or on_error(...)
    every loop: ledger.expire(); ledger.dispatch(); if ledger.ready_to_close(): ledger.close()

A unit is an antithetic pair (both signs of one seed; a single member without antithetic
sampling) evaluated on one data shard by one worker, in one lease. Leases are the single record of
who holds which unit: a worker's load, a unit's copies and a late result's validity are all read
from it.

With a ``TrustPolicy`` (``trust.py``), an answer is used only once it is verified (another
worker's answer agrees, or the reference replica's does) or its worker is trusted; disagreements
get a third evaluation, and wrong answers lead to strikes, quarantine and bans. The ledger reports
those as events (``take_events``) for the shell to carry out.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from .es.population import Member
from .plan import Plan
from .trust import REFERENCE, Kind, Standing, TrustPolicy, agree, tolerance

TARGET_LEASE_S = 0.5       # aim for leases that take about this long on the worker
MAX_COPIES = 2             # a unit is out on at most this many workers at once
EXPIRE_SCAN_S = 0.1        # how often leases and silent workers are checked for expiry
MIN_BACKUP_AFTER_S = 0.05  # a unit is never backed up sooner than this after it was leased
TAIL_SCAN_S = 0.05         # how often idle workers are matched with backup copies at an iteration's tail
HASH_WINDOW = 1024         # reference state hashes (and pending reports) kept, in iterations
DEPARTED_KEPT = 256        # views of departed workers kept for the run summary

Key = tuple[int, int]      # (pair, shard): the members of one antithetic pair on one data shard


@dataclass(frozen=True)
class WorkCost:
    """What work costs a worker, so deadlines follow the work: a worker busy with a 1B model is not
    a dead worker. Rates are pessimistic; a worker's own measurements replace them."""
    model_params: int                     # parameters evaluated (forward) and updated (each commit)
    seq_len: int                          # tokens per sample
    seeds_per_commit: int                 # distinct noise seeds a commit applies (antithetic pairs share one)
    flops_per_s: float = 2e9              # forward FLOP/s assumed before a worker has measured its throughput
    update_elements_per_s: float = 20e6   # noise elements/s assumed before a worker has timed a commit
    slack: float = 3.0                    # a lease expires after this many times its expected duration
    margin_s: float = 5.0                 # plus this: message latency, a busy host, a GC pause

    @classmethod
    def for_run(cls, cfg, model_params: int) -> "WorkCost":
        es = cfg.es
        seeds = es.population // 2 if es.antithetic else es.population
        return cls(model_params=int(model_params), seq_len=int(cfg.data.seq_len), seeds_per_commit=max(1, seeds))

    def eval_s(self, samples: int, throughput: float) -> float:
        """Seconds to evaluate ``samples`` at ``throughput`` samples/s (0: not measured yet)."""
        if throughput > 0:
            return samples / throughput
        return 2.0 * self.model_params * self.seq_len * samples / self.flops_per_s

    def catch_up_s(self, commits: int, update_s: float) -> float:
        """Seconds to apply ``commits`` commits at ``update_s`` each (0: not measured yet)."""
        if update_s <= 0:
            update_s = self.model_params * self.seeds_per_commit / self.update_elements_per_s
        return commits * update_s

    def expires_s(self, samples: int, throughput: float, commits: int, update_s: float, floor_s: float) -> float:
        expected = self.eval_s(samples, throughput) + self.catch_up_s(commits, update_s)
        return max(floor_s, self.slack * expected + self.margin_s)


@dataclass
class LeaseOut:
    """A lease to send as P.LEASE (``units`` is exactly the wire payload)."""
    lease_id: str
    wid: str
    iteration: int
    alpha: float
    sigma: float
    units: list[dict]   # [{"member", "seed", "sign", "indices"}]
    expires_s: float
    backup: bool


@dataclass
class Closing:
    """A closed iteration: what ``Run.close`` needs, and what the metrics line reports."""
    iteration: int
    members: list[Member]   # the members used: complete antithetic pairs, in member order
    rewards: list[float]    # mean R per used member over all its shards; NaN/inf passed through
    samples: int            # samples evaluated for the used members (tokens = samples × seq_len)
    plan: Plan              # the plan restricted to ``members``
    seconds: float          # open() to close() on the ledger's clock
    pool_answers: int = 0   # units answered by pool workers (first answers and checks)
    pool_used: int = 0      # units whose value used came from a pool worker
    reference_answers: int = 0  # units the reference replica answered


@dataclass
class _Lease:
    lease_id: str
    wid: str
    units: list[Key]
    issued: float
    deadline: float
    backup: bool
    shadow: bool = False   # a quarantined worker's copy of a settled unit: compared, never used


@dataclass
class _Worker:
    joined: float
    last_seen: float
    throughput: float = 0.0   # samples/s, measured (0: not yet)
    update_s: float = 0.0     # seconds to apply one commit, measured (0: not yet)
    ready: bool = False
    step: int = -1            # commits applied, as last reported
    state_hash: str = ""
    units_done: int = 0
    errors: int = 0
    mismatches: int = 0
    verified: int = 0         # iterations whose reported state matched the reference
    verified_from: int = -1   # the first of them
    verified_last: int = -1   # the latest of them
    verify_gaps: int = 0      # iterations skipped between two matching reports (a missed check)
    identity: Optional[str] = None  # the authenticated key it joined with (None in a plain-TCP pool)
    trust_id: str = ""        # whose standing its answers build (its key, or its name without keys)
    kind: Kind = ("cpu", "fp32")
    verifier: bool = False    # the reference replica: checks units, answers others only as a last resort


@dataclass
class _Answer:
    ident: str
    kind: Kind
    values: dict[int, tuple[float, int]]   # member -> (Σ R, count)
    means: dict[int, float]                # member -> mean R


@dataclass
class _Settled:
    answer: _Answer   # the answer the commit uses
    verified: bool    # another answer (or the reference) agreed with it


class _Iteration:
    """The units of one open iteration and what has come back for them."""

    def __init__(self, plan: Plan, shards: int, quorum: float, opened: float):
        self.plan = plan
        self.opened = opened
        self.members = {m.member: m for m in plan.members}
        n = len(plan.indices)
        k = max(1, min(shards, n))
        bounds = [round(i * n / k) for i in range(k + 1)]
        parts = [plan.indices[bounds[i]: bounds[i + 1]] for i in range(k)]
        self.n_shards = k
        groups: dict[int, list[int]] = {}
        for m in plan.members:  # antithetic pairs share a base seed; they count only together
            groups.setdefault(m.seed, []).append(m.member)
        self.pairs = list(groups.values())
        self.shard_of: dict[Key, list[int]] = {(g, s): parts[s] for g in range(len(self.pairs)) for s in range(k)}
        self.todo: deque[Key] = deque(self.shard_of)
        self.queued: set[Key] = set(self.todo)
        self.answers: dict[Key, list[_Answer]] = {}
        self.settled: dict[Key, _Settled] = {}
        self.spot: set[Key] = set()            # units picked for a spot check of a trusted worker
        self.disputed: set[Key] = set()        # units whose answers disagreed
        self.avoid: dict[Key, set[str]] = {}   # workers that reported an error on the unit
        self.durations: list[float] = []       # how long this iteration's answered leases took
        self.left = [k] * len(self.pairs)      # unsettled shards per pair
        self.pairs_needed = max(1, math.ceil(quorum * len(self.pairs) - 1e-9))

    def samples(self, key: Key) -> int:
        return len(self.shard_of[key]) * len(self.pairs[key[0]])

    def settle(self, key: Key, answer: _Answer, verified: bool) -> None:
        self.settled[key] = _Settled(answer, verified)
        self.left[key[0]] -= 1

    def unsettle(self, key: Key) -> None:
        del self.settled[key]
        self.left[key[0]] += 1

    def pairs_done(self) -> list[int]:
        return [g for g, n in enumerate(self.left) if n == 0]


class IterationLedger:
    def __init__(self, *, quorum: float, shards: int, lease_floor_s: float, worker_timeout_s: float,
                 samples_per_iteration: int, cost: WorkCost, clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, lease_prefix: str = "", hash_window: int = HASH_WINDOW,
                 policy: Optional[TrustPolicy] = None):
        if not 0 < quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {quorum}")
        if shards < 1 or samples_per_iteration < 1:
            raise ValueError("shards and samples_per_iteration must be at least 1")
        self.quorum = quorum
        self.shards = shards
        self.lease_floor_s = lease_floor_s
        self.worker_timeout_s = worker_timeout_s
        self.samples_per_iteration = samples_per_iteration
        self.cost = cost
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.lease_prefix = lease_prefix
        self.hash_window = hash_window
        self.policy = policy
        self.counters = {"stale": 0, "duplicate": 0, "invalid": 0, "nonfinite": 0, "reissued": 0, "backups": 0,
                         "expired_leases": 0, "dropped_workers": 0, "errors": 0, "mismatches": 0,
                         # verification (trust.py): comparisons of two answers, and what came of them
                         "checks": 0, "agreed": 0, "disagreements": 0, "third_evaluations": 0, "spot_checks": 0,
                         "wrong_answers": 0, "quarantines": 0, "verify_bans": 0, "discarded": 0, "unsettled": 0,
                         "shadow_checks": 0}
        self.departed: deque[dict] = deque(maxlen=DEPARTED_KEPT)
        self._workers: dict[str, _Worker] = {}
        self._standing: dict[str, Standing] = {}
        self._events: list[dict] = []
        self._leases: dict[str, _Lease] = {}
        self._it: Optional[_Iteration] = None
        self._seq = 0
        self._last_expire = -math.inf
        self._last_tail_scan = -math.inf
        self._committed = 0                           # highest state (commits applied) the run has announced
        self._hashes: dict[int, str] = {}             # reference state hash per step
        self._newest_ref = -1
        self._pending: dict[int, dict[str, str]] = {}  # step -> {wid: reported hash} awaiting the reference

    # -- workers ------------------------------------------------------------------------------------
    def join(self, wid: str, throughput: float = 0.0, identity: Optional[str] = None, *,
             trust_id: Optional[str] = None, kind: Kind = ("cpu", "fp32"), vouched: bool = False,
             verifier: bool = False) -> None:
        """A new worker; it gets no lease until ``set_ready(wid, True)``. ``identity``: the name of
        the authenticated key it joined with (several sessions may share one key); ``trust_id``:
        whose standing its answers build (default: ``identity``, else ``wid``); ``kind``: its
        (device type, dtype); ``vouched``: the operator trusts it from the start; ``verifier``: the
        reference replica (checks units; never silent-dropped; its answers are never outvoted)."""
        if wid in self._workers:
            raise ValueError(f"worker {wid} has already joined")
        now = self.clock()
        tid = REFERENCE if verifier else (trust_id or identity or wid)
        self._workers[wid] = _Worker(joined=now, last_seen=now, throughput=_positive(throughput), identity=identity,
                                     trust_id=tid, kind=tuple(kind), verifier=verifier)
        st = self._standing.setdefault(tid, Standing())
        if vouched or verifier:
            st.vouched = not st.quarantined

    def set_ready(self, wid: str, ready: bool) -> None:
        w = self._workers.get(wid)
        if w is None:
            return
        w.ready = ready
        if not ready:
            self._release(wid)

    def leave(self, wid: str, dropped: bool = False) -> Optional[dict]:
        """The worker is gone (``dropped``: not by its own choice); its leases go back in the queue.
        Returns its final view, also kept in ``departed``."""
        if wid not in self._workers:
            return None
        self._release(wid)
        view = self.worker_view(wid)
        del self._workers[wid]
        for reports in self._pending.values():
            reports.pop(wid, None)
        self.departed.append(view)
        if dropped:
            self.counters["dropped_workers"] += 1
        return view

    def is_ready(self, wid: str) -> bool:
        w = self._workers.get(wid)
        return w is not None and w.ready

    def standing(self, trust_id: str) -> Optional[Standing]:
        return self._standing.get(trust_id)

    def banned_for(self, trust_id: str) -> float:
        """Seconds left of ``trust_id``'s ban for wrong answers (0: not banned)."""
        st = self._standing.get(trust_id)
        return max(0.0, st.banned_until - self.clock()) if st is not None else 0.0

    def take_events(self) -> list[dict]:
        """Quarantines and bans since the last call: {"event", "trust_id", "wids", "reason"[, "seconds"]}."""
        events, self._events = self._events, []
        return events

    def update_seconds(self) -> Optional[float]:
        """Mean time the workers took to apply their latest commit (None before any measured it)."""
        measured = [w.update_s for w in self._workers.values() if w.update_s > 0 and not w.verifier]
        return sum(measured) / len(measured) if measured else None

    def heard(self, wid: str) -> None:
        w = self._workers.get(wid)
        if w is not None:
            w.last_seen = self.clock()

    def note_throughput(self, wid: str, samples_per_s: float) -> None:
        w = self._workers.get(wid)
        if w is not None and _positive(samples_per_s):
            w.throughput = float(samples_per_s)

    def note_update_s(self, wid: str, seconds: float) -> None:
        w = self._workers.get(wid)
        if w is not None and _positive(seconds):
            w.update_s = float(seconds)

    # -- one iteration -------------------------------------------------------------------------------
    def open(self, plan: Plan) -> None:
        if self._it is not None:
            raise RuntimeError(f"iteration {self._it.plan.iteration} is still open")
        if len(plan.indices) != self.samples_per_iteration:
            raise ValueError(f"plan has {len(plan.indices)} samples, the ledger expects {self.samples_per_iteration}")
        self._it = _Iteration(plan, self.shards, self.quorum, self.clock())
        self._committed = max(self._committed, plan.iteration)

    @property
    def iteration(self) -> Optional[int]:
        return self._it.plan.iteration if self._it is not None else None

    def dispatch(self) -> list[LeaseOut]:
        """Leases to send now: queued units to ready workers, then backups at the iteration's tail,
        then copies of settled units for quarantined workers."""
        it = self._it
        if it is None:
            return []
        now = self.clock()
        if not it.todo and now - self._last_tail_scan < TAIL_SCAN_S:
            return []
        ready = [wid for wid, w in self._workers.items() if w.ready]
        self.rng.shuffle(ready)  # equal workers take turns at being first
        # The reference replica comes last: it takes what no one else may.
        ready.sort(key=lambda wid: (self._workers[wid].verifier, -self._workers[wid].throughput))
        if self.policy is not None and it.disputed:
            self._settle_by_trust()
        out: list[LeaseOut] = []
        if it.todo:
            workers = [wid for wid in ready if not self._quarantined(wid)]
            sizes = self._sizes(workers)
            load = self._units_out()
            pick = _Picker(self, workers)
            for wid in workers:
                cap, most = sizes[wid]
                while it.todo and load.get(wid, 0) < most:
                    take = self._take(wid, min(cap, most - load.get(wid, 0)), pick)
                    if not take:
                        break
                    out.append(self._lease(wid, take, now, backup=False))
                    load[wid] = load.get(wid, 0) + len(take)
            if it.todo:
                return out + self._shadows(ready, now)
        self._last_tail_scan = now
        return out + self._backups(ready, now) + self._shadows(ready, now)

    def unsent(self, lease_id: str) -> None:
        """The LEASE could not be sent: as if it had never been issued."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.backup:
            self.counters["backups"] -= 1
        if lease.shadow:
            self.counters["shadow_checks"] -= 1
        self._requeue(lease.units, count=False)

    def on_result(self, wid: str, lease_id: str, iteration: int, results: list, eval_s: float) -> dict:
        """Take a lease's results; returns what became of them, counted per member evaluated
        (accepted, duplicate, invalid, nonfinite, stale)."""
        outcome = {"accepted": 0, "duplicate": 0, "invalid": 0, "nonfinite": 0, "stale": 0}
        lease = self._held(wid, lease_id, iteration)
        if lease is None:
            self.counters["stale"] += 1
            outcome["stale"] = 1
            return outcome
        it = self._it
        now = self.clock()
        del self._leases[lease_id]
        it.durations.append(now - lease.issued)
        w = self._workers[wid]
        expected = sum(len(it.pairs[key[0]]) for key in lease.units)
        if not isinstance(results, list) or len(results) != expected:
            results = [None] * expected
        bad, samples, pos = [], 0, 0
        for key in lease.units:
            members = it.pairs[key[0]]
            entries = results[pos: pos + len(members)]
            pos += len(members)
            if not all(self._valid(key, m, r) for m, r in zip(members, entries)):
                outcome["invalid"] += len(members)
                bad.append(key)
                continue
            samples += sum(r["count"] for r in entries)
            values = {m: (float(r["sum_r"]), r["count"]) for m, r in zip(members, entries)}
            verdict = self._answer(key, wid, values)
            if verdict == "accepted":
                outcome["accepted"] += len(members)
                outcome["nonfinite"] += sum(not math.isfinite(s) for s, _ in values.values())
                w.units_done += len(members)
            elif verdict == "duplicate":
                outcome["duplicate"] += len(members)
        for name in ("duplicate", "invalid", "nonfinite"):
            self.counters[name] += outcome[name]
        self._requeue(bad)
        if samples > 0 and _positive(eval_s):
            w.throughput = samples / eval_s  # measured on this lease
        return outcome

    def on_error(self, wid: str, lease_id: str, iteration: int, reason: str) -> None:
        """The worker could not evaluate the lease: its units go back, to other workers if any can take them."""
        self.counters["errors"] += 1
        w = self._workers.get(wid)
        if w is not None:
            w.errors += 1
        lease = self._held(wid, lease_id, iteration)
        if lease is None:
            return
        del self._leases[lease_id]
        for key in lease.units:
            self._it.avoid.setdefault(key, set()).add(wid)
        self._requeue(lease.units)

    def expire(self) -> list[tuple[str, str]]:
        """Requeue late leases and drop silent workers (at most every EXPIRE_SCAN_S);
        returns (wid, reason) for each worker dropped."""
        now = self.clock()
        if now - self._last_expire < EXPIRE_SCAN_S:
            return []
        self._last_expire = now
        late = [lease for lease in self._leases.values() if lease.deadline < now]
        for lease in late:
            del self._leases[lease.lease_id]
        self.counters["expired_leases"] += len(late)
        for lease in late:  # after all are gone, so a unit late twice is queued once
            self._requeue(lease.units)
        dropped = []
        for wid, w in list(self._workers.items()):
            silent = now - w.last_seen
            if silent > self.worker_timeout_s and not w.verifier:
                self.leave(wid, dropped=True)
                dropped.append((wid, f"silent for {silent:.0f} s; its leases go back in the queue"))
        return dropped

    def ready_to_close(self) -> bool:
        return self._it is not None and len(self._it.pairs_done()) >= self._it.pairs_needed

    def close(self) -> Closing:
        """Close on the complete pairs so far; every lease still out becomes stale."""
        if not self.ready_to_close():
            raise RuntimeError("the iteration has no quorum of complete pairs yet")
        it = self._it
        used = sorted(m for g in it.pairs_done() for m in it.pairs[g])
        g_of = {m: g for g, ms in enumerate(it.pairs) for m in ms}
        rewards, samples = [], 0
        for j in used:
            parts = [it.settled[(g_of[j], s)].answer.values[j] for s in range(it.n_shards)]
            count = sum(c for _, c in parts)
            rewards.append(sum(r for r, _ in parts) / count)
            samples += count
        members = [it.members[j] for j in used]
        answers = [a for ans in it.answers.values() for a in ans]
        ref = sum(a.ident == REFERENCE for a in answers)
        pool_used = sum(s.answer.ident != REFERENCE for s in it.settled.values())
        self._leases.clear()
        self._it = None
        self._committed = max(self._committed, it.plan.iteration + 1)
        return Closing(it.plan.iteration, members, rewards, samples, it.plan.using(members),
                       self.clock() - it.opened, len(answers) - ref, pool_used, ref)

    def progress(self) -> dict:
        """The open iteration at a glance, for status."""
        it = self._it
        if it is None:
            return {"iteration": None}
        return {"iteration": it.plan.iteration, "units": len(it.shard_of), "units_done": len(it.settled),
                "awaiting_check": sum(1 for k, a in it.answers.items() if a and k not in it.settled),
                "queued": len(it.todo), "leases": len(self._leases), "pairs_done": len(it.pairs_done()),
                "pairs_needed": it.pairs_needed}

    # -- verification ----------------------------------------------------------------------------------
    def _st(self, w: _Worker) -> Standing:
        return self._standing.setdefault(w.trust_id, Standing())

    def _quarantined(self, wid: str) -> bool:
        return self.policy is not None and self._st(self._workers[wid]).quarantined

    def _trusted(self, w: _Worker) -> bool:
        return self.policy is None or self._st(w).trusted

    def _answer(self, key: Key, wid: str, values: dict[int, tuple[float, int]]) -> str:
        """File one answer for ``key``: "accepted" (used, or awaiting its check), "duplicate" (the
        unit was settled, or this identity answered it already), or "ignored" (a quarantined worker's)."""
        it, w = self._it, self._workers[wid]
        ans = _Answer(w.trust_id, w.kind, values, {m: s / c for m, (s, c) in values.items()})
        answers = it.answers.setdefault(key, [])
        if any(a.ident == ans.ident for a in answers):
            return "duplicate"
        if self.policy is None:
            if key in it.settled:
                return "duplicate"
            answers.append(ans)
            it.settle(key, ans, verified=False)
            return "accepted"
        answers.append(ans)
        if key in it.settled:  # a backup or a quarantined worker's copy: compared with the value used
            self._judge(ans, it.settled[key].answer)
            return "duplicate"
        if self._st(w).quarantined:  # leased before its quarantine: never used
            answers.remove(ans)
            self.counters["discarded"] += 1
            self._requeue([key], count=False)
            return "ignored"
        self._try_settle(key)
        return "accepted"

    def _agree(self, a: _Answer, b: _Answer) -> bool:
        samples = next(iter(a.values.values()))[1]
        return agree(a.means, b.means, tolerance(a.kind, b.kind, self.policy.tolerance_override, samples))

    def _judge(self, ans: _Answer, used: _Answer) -> None:
        """Compare an answer with the value a unit uses; the answer's identity gains or loses by it."""
        self.counters["checks"] += 1
        if self._agree(ans, used):
            self.counters["agreed"] += 1
            self._credit(ans.ident)
        else:
            self._wrong(ans.ident)

    def _try_settle(self, key: Key) -> None:
        it, policy = self._it, self.policy
        answers = it.answers[key]
        # The value used is the earliest answer that another one confirms; the reference
        # replica's answer, when there is one, decides alone (it is never outvoted).
        decider = next((a for a in answers if a.ident == REFERENCE), None)
        if decider is not None:
            win = next(a for a in answers if a is decider or self._agree(a, decider))
        else:
            win = None
            for i in range(1, len(answers)):
                win = next((b for b in answers[:i] if self._agree(answers[i], b)), None)
                if win is not None:
                    decider = win
                    break
        if win is None and len(answers) == 1:
            st = self._standing[answers[0].ident]
            if st.trusted and key not in it.spot:
                if st.vouched or self.rng.random() >= policy.spot_check:
                    it.settle(key, answers[0], verified=False)
                    return
                it.spot.add(key)
                self.counters["spot_checks"] += 1
        if win is not None:
            it.settle(key, win, verified=len(answers) > 1)
            if len(answers) > 1:
                self._credit(win.ident)
            for a in answers:
                if a is not win and a is not decider:
                    self._judge(a, decider)
                elif a is not win:  # the reference confirmed the answer used
                    self.counters["checks"] += 1
                    self.counters["agreed"] += 1
            return
        if len(answers) >= 2 and key not in it.disputed:
            it.disputed.add(key)
            self.counters["disagreements"] += 1
        if len(answers) >= policy.max_answers:  # no two agree: start the unit over
            self.counters["unsettled"] += 1
            answers.clear()
        elif len(answers) >= 2:
            self.counters["third_evaluations"] += 1
        self._requeue([key], count=False)

    def _settle_by_trust(self) -> None:
        """A disputed unit that no other worker in the pool can evaluate a third time is settled by
        the trusted answer among its answers (when the trusted ones agree)."""
        it = self._it
        idents = {w.trust_id for w in self._workers.values() if not self._st(w).quarantined}
        for key in [k for k in it.todo if k in it.disputed]:
            answers = it.answers.get(key, [])
            if len(answers) < 2 or idents - {a.ident for a in answers}:
                continue
            trusted = [a for a in answers if self._standing[a.ident].trusted]
            if trusted and all(self._agree(trusted[0], a) for a in trusted[1:]):
                it.todo.remove(key)
                it.queued.discard(key)
                it.settle(key, trusted[0], verified=True)
                for a in answers:
                    if a is not trusted[0]:
                        self._judge(a, trusted[0])

    def _credit(self, ident: str) -> None:
        st = self._standing.get(ident)
        if st is not None and ident != REFERENCE:
            st.agreed(self.policy)

    def _wrong(self, ident: str) -> None:
        """An answer of ``ident`` lost: a strike; its unverified answers in the open iteration are
        dropped (it is no longer trusted), and a quarantine or ban is reported."""
        st = self._standing.get(ident)
        if st is None or ident == REFERENCE:
            return
        self.counters["wrong_answers"] += 1
        event = st.lost(self.policy, self.clock())
        self._drop_unverified(ident, all_unsettled=st.quarantined)
        wids = [wid for wid, w in self._workers.items() if w.trust_id == ident]
        if event == "quarantine":
            self.counters["quarantines"] += 1
            for wid in wids:
                self._release(wid)
            self._events.append({"event": "quarantine", "trust_id": ident, "wids": wids,
                                 "reason": f"{st.strikes_total} wrong answers"})
        elif event == "ban":
            self.counters["verify_bans"] += 1
            self._events.append({"event": "ban", "trust_id": ident, "wids": wids, "seconds": st.banned_until - self.clock(),
                                 "reason": f"{st.strikes_total} wrong answers"})

    def _drop_unverified(self, ident: str, all_unsettled: bool) -> None:
        """Take back ``ident``'s answers that the open iteration would use on trust alone (and, once
        it is quarantined, those awaiting their check); their units go back in the queue."""
        it = self._it
        if it is None:
            return
        back = []
        for key, answers in it.answers.items():
            s = it.settled.get(key)
            if s is not None:
                if s.answer.ident == ident and not s.verified:
                    it.unsettle(key)
                    answers.remove(s.answer)
                    back.append(key)
            elif all_unsettled and any(a.ident == ident for a in answers):
                answers[:] = [a for a in answers if a.ident != ident]
                back.append(key)
        self.counters["discarded"] += len(back)
        self._requeue(back, count=False)

    def _supplied(self) -> dict[str, int]:
        """Units of the open iteration each identity answered first or holds as a first copy."""
        it = self._it
        n: dict[str, int] = {}
        for answers in it.answers.values():
            if answers:
                n[answers[0].ident] = n.get(answers[0].ident, 0) + 1
        for lease in self._leases.values():
            if lease.backup or lease.shadow:
                continue
            ident = self._workers[lease.wid].trust_id
            for k in lease.units:
                if not it.answers.get(k):
                    n[ident] = n.get(ident, 0) + 1
        return n

    # -- state hashes (the reference may lag behind the workers) ---------------------------------------
    def report_state(self, wid: str, step: int, state_hash: str) -> str:
        """A worker's state hash after ``step`` commits: "ok", "mismatch" (its leases are released and it
        is no longer ready), or "pending" until ``reference(step, ...)`` decides it."""
        w = self._workers[wid]
        w.step, w.state_hash = step, state_hash
        ref = self._hashes.get(step)
        if ref is not None:
            return self._judge_state(wid, step, ref == state_hash)
        if step > self._committed or step < self._newest_ref - self.hash_window:
            return self._judge_state(wid, step, False)  # a state the run never announced, or too old to check
        self._pending.setdefault(step, {})[wid] = state_hash
        return "pending"

    def reference(self, step: int, state_hash: str) -> list[tuple[str, int, bool]]:
        """The reference replica's hash after ``step`` commits; returns (wid, step, agrees) for each
        pending report it decides."""
        known = self._hashes.get(step)
        if known is not None and known != state_hash:
            raise RuntimeError(f"two reference state hashes for iteration {step}: "
                               f"{known[:12]}… and {state_hash[:12]}…")
        self._hashes[step] = state_hash
        self._committed = max(self._committed, step)
        if step > self._newest_ref:
            self._newest_ref = step
            oldest = step - self.hash_window
            if len(self._hashes) > self.hash_window + 64:  # trimmed in batches, not on every call
                self._hashes = {s: h for s, h in self._hashes.items() if s >= oldest}
            for s in [s for s in self._pending if s < oldest]:
                del self._pending[s]
        decided = []
        for wid, h in self._pending.pop(step, {}).items():
            if wid in self._workers:
                decided.append((wid, step, self._judge_state(wid, step, h == state_hash) == "ok"))
        return decided

    def reference_hash(self, step: int) -> Optional[str]:
        return self._hashes.get(step)

    def _judge_state(self, wid: str, step: int, agrees: bool) -> str:
        w = self._workers[wid]
        if agrees:
            if w.verified_from < 0:
                w.verified_from = step
            elif step > w.verified_last + 1:
                w.verify_gaps += 1
            if step > w.verified_last:
                w.verified += 1
                w.verified_last = step
            return "ok"
        w.mismatches += 1
        self.counters["mismatches"] += 1
        self.set_ready(wid, False)
        return "mismatch"

    def worker_view(self, wid: str) -> dict:
        w = self._workers[wid]
        mine = [lease for lease in self._leases.values() if lease.wid == wid]
        view = {"id": wid, "identity": w.identity, "ready": w.ready, "throughput": w.throughput,
                "update_s": w.update_s, "units_done": w.units_done, "leases": len(mine),
                "units_out": sum(len(self._it.pairs[k[0]]) for x in mine for k in x.units) if self._it else 0,
                "last_seen_s": self.clock() - w.last_seen,
                "iteration": w.step, "state_agrees": self._hashes.get(w.step) == w.state_hash if w.state_hash else False,
                "verified": w.verified, "verified_from": w.verified_from, "verified_last": w.verified_last,
                "verify_gaps": w.verify_gaps, "mismatches": w.mismatches, "errors": w.errors}
        if self.policy is not None:
            view.update(self._st(w).view(self.clock()))
        return view

    # -- leases ---------------------------------------------------------------------------------------
    def _held(self, wid: str, lease_id: str, iteration: int) -> Optional[_Lease]:
        """The lease, if ``wid`` holds it and it belongs to the open ``iteration``; else None (stale)."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.wid != wid:
            return None
        if self._it is None or iteration != self._it.plan.iteration:
            # Answered for the wrong iteration: it will not be answered again, so its units go back.
            del self._leases[lease_id]
            self._requeue(lease.units)
            return None
        return lease

    def _release(self, wid: str) -> None:
        mine = [lease for lease in self._leases.values() if lease.wid == wid]
        for lease in mine:
            del self._leases[lease.lease_id]
        for lease in mine:
            self._requeue(lease.units)

    def _units_out(self) -> dict[str, int]:
        load: dict[str, int] = {}
        for lease in self._leases.values():
            load[lease.wid] = load.get(lease.wid, 0) + len(lease.units)
        return load

    def _requeue(self, keys, count: bool = True) -> None:
        """Put units back at the front of the queue unless settled, queued, or still out on another lease."""
        it = self._it
        if it is None:
            return
        out = {k for lease in self._leases.values() if not lease.shadow for k in lease.units}
        back = [k for k in dict.fromkeys(keys) if k not in it.settled and k not in it.queued and k not in out]
        it.todo.extendleft(reversed(back))
        it.queued.update(back)
        if count:
            self.counters["reissued"] += len(back)

    def _take(self, wid: str, n: int, pick: "_Picker") -> list[Key]:
        """Up to ``n`` queued units ``wid`` may evaluate, in queue order."""
        it = self._it
        take, keep = [], deque()
        while it.todo and len(take) < n:
            key = it.todo.popleft()
            if pick.may(wid, key):
                take.append(key)
                it.queued.discard(key)
                pick.took(wid, key)
            else:
                keep.append(key)
        keep.extend(it.todo)
        it.todo = keep
        return take

    def _sizes(self, ready: list[str]) -> dict[str, tuple[int, int]]:
        """(lease size, most units out at once) per ready worker.

        A lease aims to take about TARGET_LEASE_S on its worker, and a worker may hold two (so
        the next is queued while it works), but no worker is given more than its share of the
        iteration by measured throughput: with two equal workers each gets half the units.
        Workers that have not measured their throughput yet count as average ones. The reference
        replica checks units beside the pool and does not count in the shares.
        """
        per_unit = max(1, self.samples_per_iteration // self.shards) * max(len(g) for g in self._it.pairs)
        pool = [wid for wid in ready if not self._workers[wid].verifier]
        known = [self._workers[wid].throughput for wid in ready if self._workers[wid].throughput > 0]
        default = sum(known) / len(known) if known else 1.0
        tps = {wid: self._workers[wid].throughput or default for wid in ready}
        total = sum(tps[wid] for wid in pool) or 1.0
        units = len(self._it.shard_of)
        # Shares proportional to throughput, summing to the unit count (largest remainders get
        # the leftover units).
        exact = {wid: units * tps[wid] / total for wid in pool}
        share = {wid: int(x) for wid, x in exact.items()}
        for wid in sorted(exact, key=lambda k: share[k] - exact[k])[:max(0, units - sum(share.values()))]:
            share[wid] += 1
        sizes = {}
        for wid in ready:
            measured = self._workers[wid].throughput > 0
            by_time = max(1, int(tps[wid] * TARGET_LEASE_S / per_unit)) if measured else 1
            mine = max(1, share.get(wid, units))
            sizes[wid] = (min(by_time, mine), min(2 * by_time, mine))
        return sizes

    def _lease(self, wid: str, keys: list[Key], now: float, backup: bool, shadow: bool = False) -> LeaseOut:
        it, w = self._it, self._workers[wid]
        self._seq += 1
        lid = f"{self.lease_prefix}{self._seq:x}"
        # The worker evaluates its leases in order, after applying the commits it lacks: the
        # deadline covers the work queued ahead of this lease too.
        ahead = sum(it.samples(k) for lease in self._leases.values() if lease.wid == wid for k in lease.units)
        samples = sum(it.samples(k) for k in keys)
        commits = max(0, it.plan.iteration - w.step) if w.step >= 0 else 1
        expires = self.cost.expires_s(ahead + samples, w.throughput, commits, w.update_s, self.lease_floor_s)
        # The reference replica answers every lease it is given (a dead keeper ends the run).
        deadline = math.inf if w.verifier else now + expires
        self._leases[lid] = _Lease(lid, wid, list(keys), now, deadline, backup, shadow)
        if backup:
            self.counters["backups"] += 1
        if shadow:
            self.counters["shadow_checks"] += 1
        units = [{"member": m, "seed": it.members[m].seed, "sign": it.members[m].sign,
                  "indices": list(it.shard_of[key])} for key in keys for m in it.pairs[key[0]]]
        return LeaseOut(lid, wid, it.plan.iteration, it.plan.alpha, it.plan.sigma, units, expires, backup)

    def _backups(self, ready: list[str], now: float) -> list[LeaseOut]:
        """Tail of the iteration: each idle worker takes a backup copy of a unit still out elsewhere,
        the longest-outstanding first (first result wins)."""
        it = self._it
        busy = {lease.wid for lease in self._leases.values()}
        idle = [wid for wid in ready if wid not in busy and not self._quarantined(wid)
                and not self._workers[wid].verifier]
        if not idle:
            return []
        # A unit earns a backup once it has been out twice as long as this iteration's typical
        # lease took (so instant answers do not trigger a storm of pointless copies).
        durations = sorted(it.durations)
        patience = max(MIN_BACKUP_AFTER_S, 2 * durations[len(durations) // 2]) if durations else MIN_BACKUP_AFTER_S
        first: dict[Key, float] = {}
        holders: dict[Key, set[str]] = {}
        for lease in self._leases.values():
            if lease.shadow:
                continue
            for k in lease.units:
                if k not in it.settled:
                    first[k] = min(first.get(k, lease.issued), lease.issued)
                    holders.setdefault(k, set()).add(self._workers[lease.wid].trust_id)
        order = sorted((k for k in first if len(holders[k]) < MAX_COPIES and now - first[k] >= patience),
                       key=lambda k: first[k])
        out = []
        for wid in idle:
            ident = self._workers[wid].trust_id
            for i, k in enumerate(order):
                answered = {a.ident for a in it.answers.get(k, ())}
                if ident not in holders[k] and ident not in answered and wid not in it.avoid.get(k, ()):
                    out.append(self._lease(wid, [k], now, backup=True))
                    order.pop(i)
                    break
            if not order:
                break
        return out

    def _shadows(self, ready: list[str], now: float) -> list[LeaseOut]:
        """An idle quarantined worker gets a copy of a settled unit: its answer is compared with
        the value used (more wrong answers ban it), never used."""
        if self.policy is None:
            return []
        it = self._it
        busy = {lease.wid for lease in self._leases.values()}
        out = []
        for wid in ready:
            if wid in busy or not self._quarantined(wid):
                continue
            ident = self._workers[wid].trust_id
            keys = [k for k in it.settled if all(a.ident != ident for a in it.answers.get(k, ()))]
            if keys:
                out.append(self._lease(wid, [self.rng.choice(keys)], now, backup=False, shadow=True))
        return out

    def _valid(self, key: Key, member: int, r) -> bool:
        """A result answers its member: same member and sign, one count per sample of the shard, a number."""
        if not isinstance(r, dict):
            return False
        m = self._it.members[member]
        sum_r, count = r.get("sum_r"), r.get("count")
        return (r.get("member") == m.member and r.get("sign") == m.sign
                and isinstance(count, int) and not isinstance(count, bool) and count == len(self._it.shard_of[key])
                and isinstance(sum_r, (int, float)) and not isinstance(sum_r, bool))


class _Picker:
    """Which queued units each worker may take, decided once per dispatch.

    A unit with an answer is a check: it goes to another identity, and to a trusted one when a
    trusted worker could take it. A unit with no answer yet goes to anyone, except that an
    untrusted identity answers at most ``untrusted_share`` of the iteration first, and the
    reference replica only takes what no pool worker may."""

    def __init__(self, ledger: IterationLedger, ready: list[str]):
        self.ledger = ledger
        self.it = ledger._it
        self.ready = ready
        self.policy = ledger.policy
        ws = ledger._workers
        if self.policy is not None:
            self.trusted = [wid for wid in ready if ledger._trusted(ws[wid])]
            self.cap = max(1, math.ceil(self.policy.untrusted_share * len(self.it.shard_of) - 1e-9))
            self.supplied = ledger._supplied()

    def _ident(self, wid: str) -> str:
        return self.ledger._workers[wid].trust_id

    def _may_first(self, wid: str) -> bool:
        w = self.ledger._workers[wid]
        return self.ledger._trusted(w) or self.supplied.get(w.trust_id, 0) < self.cap

    def may(self, wid: str, key: Key) -> bool:
        it = self.it
        failed = it.avoid.get(key, ())
        if wid in failed and not all(r in failed for r in self.ready):
            return False
        if self.policy is None:
            return True
        answered = {a.ident for a in it.answers.get(key, ())}
        if self._ident(wid) in answered:
            return False
        w = self.ledger._workers[wid]
        if answered:  # a check: a trusted worker does it when one can
            return self.ledger._trusted(w) or not any(
                self._ident(r) not in answered and r not in failed for r in self.trusted if r != wid)
        if w.verifier:  # only while pool workers are here and none of them may take it
            pool = [r for r in self.ready if not self.ledger._workers[r].verifier]
            return bool(pool) and not any(self._may_first(r) and r not in failed for r in pool)
        return self._may_first(wid)

    def took(self, wid: str, key: Key) -> None:
        if self.policy is not None and not self.it.answers.get(key):
            ident = self._ident(wid)
            self.supplied[ident] = self.supplied.get(ident, 0) + 1


def _positive(x) -> float:
    """``x`` as a float if it is a finite positive number, else 0.0 (not measured)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) and x > 0 else 0.0
