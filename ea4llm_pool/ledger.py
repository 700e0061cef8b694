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

A unit is one member evaluated on one data shard. Leases are the single record of who holds
which unit: a worker's load, a unit's copies and a late result's validity are all read from it.
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

TARGET_LEASE_S = 0.5       # aim for leases that take about this long on the worker
MAX_COPIES = 2             # a unit is out on at most this many workers at once
EXPIRE_SCAN_S = 0.1        # how often leases and silent workers are checked for expiry
MIN_BACKUP_AFTER_S = 0.05  # a unit is never backed up sooner than this after it was leased
TAIL_SCAN_S = 0.05         # how often idle workers are matched with backup copies at an iteration's tail
HASH_WINDOW = 1024         # reference state hashes (and pending reports) kept, in iterations
DEPARTED_KEPT = 256        # views of departed workers kept for the run summary

Key = tuple[int, int]      # (member, shard)


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


@dataclass
class _Lease:
    lease_id: str
    wid: str
    units: list[Key]
    issued: float
    deadline: float
    backup: bool


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
        self.shard_of: dict[Key, list[int]] = {(m.member, s): parts[s] for m in plan.members for s in range(k)}
        self.todo: deque[Key] = deque(self.shard_of)
        self.queued: set[Key] = set(self.todo)
        self.results: dict[Key, tuple[float, int]] = {}
        self.avoid: dict[Key, set[str]] = {}   # workers that reported an error on the unit
        self.durations: list[float] = []       # how long this iteration's answered leases took
        groups: dict[int, list[int]] = {}
        for m in plan.members:  # antithetic pairs share a base seed; they count only together
            groups.setdefault(m.seed, []).append(m.member)
        self.pairs = list(groups.values())
        self.pair_of = {m: g for g, ms in enumerate(self.pairs) for m in ms}
        self.units_left = {m.member: k for m in plan.members}
        self.pairs_done: list[int] = []
        self.pairs_needed = max(1, math.ceil(quorum * len(self.pairs) - 1e-9))

    def done(self, key: Key, sum_r: float, count: int) -> None:
        self.results[key] = (sum_r, count)
        m = key[0]
        self.units_left[m] -= 1
        if self.units_left[m] == 0:
            g = self.pair_of[m]
            if all(self.units_left[j] == 0 for j in self.pairs[g]):
                self.pairs_done.append(g)


class IterationLedger:
    def __init__(self, *, quorum: float, shards: int, lease_floor_s: float, worker_timeout_s: float,
                 samples_per_iteration: int, cost: WorkCost, clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, lease_prefix: str = "", hash_window: int = HASH_WINDOW):
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
        self.counters = {"stale": 0, "duplicate": 0, "invalid": 0, "nonfinite": 0, "reissued": 0, "backups": 0,
                         "expired_leases": 0, "dropped_workers": 0, "errors": 0, "mismatches": 0}
        self.departed: deque[dict] = deque(maxlen=DEPARTED_KEPT)
        self._workers: dict[str, _Worker] = {}
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
    def join(self, wid: str, throughput: float = 0.0, identity: Optional[str] = None) -> None:
        """A new worker; it gets no lease until ``set_ready(wid, True)``. ``identity``: the name of
        the authenticated key it joined with (several sessions may share one key)."""
        if wid in self._workers:
            raise ValueError(f"worker {wid} has already joined")
        now = self.clock()
        self._workers[wid] = _Worker(joined=now, last_seen=now, throughput=_positive(throughput), identity=identity)

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

    def update_seconds(self) -> Optional[float]:
        """Mean time the workers took to apply their latest commit (None before any measured it)."""
        measured = [w.update_s for w in self._workers.values() if w.update_s > 0]
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
        """Leases to send now: queued units to ready workers, then backups at the iteration's tail."""
        it = self._it
        if it is None:
            return []
        now = self.clock()
        if not it.todo and now - self._last_tail_scan < TAIL_SCAN_S:
            return []
        ready = [wid for wid, w in self._workers.items() if w.ready]
        self.rng.shuffle(ready)  # equal workers take turns at being first
        ready.sort(key=lambda wid: -self._workers[wid].throughput)
        out: list[LeaseOut] = []
        if it.todo:
            sizes = self._sizes(ready)
            load = self._units_out()
            for wid in ready:
                cap, most = sizes[wid]
                while it.todo and load.get(wid, 0) < most:
                    take = self._take(wid, min(cap, most - load.get(wid, 0)), ready)
                    if not take:
                        break
                    out.append(self._lease(wid, take, now, backup=False))
                    load[wid] = load.get(wid, 0) + len(take)
            if it.todo:
                return out
        self._last_tail_scan = now
        return out + self._backups(ready, now)

    def unsent(self, lease_id: str) -> None:
        """The LEASE could not be sent: as if it had never been issued."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.backup:
            self.counters["backups"] -= 1
        self._requeue(lease.units, count=False)

    def on_result(self, wid: str, lease_id: str, iteration: int, results: list, eval_s: float) -> dict:
        """Take a lease's results; returns what became of them (accepted, duplicate, invalid, nonfinite, stale)."""
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
        if not isinstance(results, list) or len(results) != len(lease.units):
            results = [None] * len(lease.units)
        bad, samples = [], 0
        for key, r in zip(lease.units, results):
            if not self._valid(key, r):
                outcome["invalid"] += 1
                bad.append(key)
                continue
            samples += r["count"]
            if key in it.results:
                outcome["duplicate"] += 1
                continue
            sum_r = float(r["sum_r"])
            if not math.isfinite(sum_r):  # a valid answer: the commit ranks it last
                outcome["nonfinite"] += 1
            it.done(key, sum_r, r["count"])
            w.units_done += 1
            outcome["accepted"] += 1
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
            if silent > self.worker_timeout_s:
                self.leave(wid, dropped=True)
                dropped.append((wid, f"silent for {silent:.0f} s; its leases go back in the queue"))
        return dropped

    def ready_to_close(self) -> bool:
        return self._it is not None and len(self._it.pairs_done) >= self._it.pairs_needed

    def close(self) -> Closing:
        """Close on the complete pairs so far; every lease still out becomes stale."""
        if not self.ready_to_close():
            raise RuntimeError("the iteration has no quorum of complete pairs yet")
        it = self._it
        used = sorted(m for g in it.pairs_done for m in it.pairs[g])
        rewards, samples = [], 0
        for j in used:
            parts = [it.results[(j, s)] for s in range(it.n_shards)]
            count = sum(c for _, c in parts)
            rewards.append(sum(r for r, _ in parts) / count)
            samples += count
        members = [it.members[j] for j in used]
        self._leases.clear()
        self._it = None
        self._committed = max(self._committed, it.plan.iteration + 1)
        return Closing(it.plan.iteration, members, rewards, samples, it.plan.using(members),
                       self.clock() - it.opened)

    def progress(self) -> dict:
        """The open iteration at a glance, for status."""
        it = self._it
        if it is None:
            return {"iteration": None}
        return {"iteration": it.plan.iteration, "units": len(it.shard_of), "units_done": len(it.results),
                "queued": len(it.todo), "leases": len(self._leases), "pairs_done": len(it.pairs_done),
                "pairs_needed": it.pairs_needed}

    # -- state hashes (the reference may lag behind the workers) ---------------------------------------
    def report_state(self, wid: str, step: int, state_hash: str) -> str:
        """A worker's state hash after ``step`` commits: "ok", "mismatch" (its leases are released and it
        is no longer ready), or "pending" until ``reference(step, ...)`` decides it."""
        w = self._workers[wid]
        w.step, w.state_hash = step, state_hash
        ref = self._hashes.get(step)
        if ref is not None:
            return self._judge(wid, step, ref == state_hash)
        if step > self._committed or step < self._newest_ref - self.hash_window:
            return self._judge(wid, step, False)  # a state the run never announced, or too old to check
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
                decided.append((wid, step, self._judge(wid, step, h == state_hash) == "ok"))
        return decided

    def reference_hash(self, step: int) -> Optional[str]:
        return self._hashes.get(step)

    def _judge(self, wid: str, step: int, agrees: bool) -> str:
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
        return {"id": wid, "identity": w.identity, "ready": w.ready, "throughput": w.throughput, "update_s": w.update_s,
                "units_done": w.units_done, "leases": len(mine), "units_out": sum(len(x.units) for x in mine),
                "last_seen_s": self.clock() - w.last_seen, "iteration": w.step,
                "state_agrees": self._hashes.get(w.step) == w.state_hash if w.state_hash else False,
                "verified": w.verified, "verified_from": w.verified_from, "verified_last": w.verified_last,
                "verify_gaps": w.verify_gaps, "mismatches": w.mismatches, "errors": w.errors}

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
        """Put units back at the front of the queue unless done, queued, or still out on another lease."""
        it = self._it
        if it is None:
            return
        out = {k for lease in self._leases.values() for k in lease.units}
        back = [k for k in dict.fromkeys(keys) if k not in it.results and k not in it.queued and k not in out]
        it.todo.extendleft(reversed(back))
        it.queued.update(back)
        if count:
            self.counters["reissued"] += len(back)

    def _take(self, wid: str, n: int, ready: list[str]) -> list[Key]:
        """Up to ``n`` queued units for ``wid``, in queue order. A unit a worker failed on goes to
        another ready worker when there is one."""
        it = self._it
        take, keep = [], deque()
        while it.todo and len(take) < n:
            key = it.todo.popleft()
            failed = it.avoid.get(key, ())
            if wid not in failed or all(r in failed for r in ready):
                take.append(key)
                it.queued.discard(key)
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
        Workers that have not measured their throughput yet count as average ones.
        """
        per_unit = max(1, self.samples_per_iteration // self.shards)
        known = [self._workers[wid].throughput for wid in ready if self._workers[wid].throughput > 0]
        default = sum(known) / len(known) if known else 1.0
        tps = {wid: self._workers[wid].throughput or default for wid in ready}
        total = sum(tps.values()) or 1.0
        units = len(self._it.shard_of)
        # Shares proportional to throughput, summing to the unit count (largest remainders get
        # the leftover units).
        exact = {wid: units * tp / total for wid, tp in tps.items()}
        share = {wid: int(x) for wid, x in exact.items()}
        for wid in sorted(exact, key=lambda k: share[k] - exact[k])[:max(0, units - sum(share.values()))]:
            share[wid] += 1
        sizes = {}
        for wid in ready:
            measured = self._workers[wid].throughput > 0
            by_time = max(1, int(tps[wid] * TARGET_LEASE_S / per_unit)) if measured else 1
            mine = max(1, share[wid])
            sizes[wid] = (min(by_time, mine), min(2 * by_time, mine))
        return sizes

    def _lease(self, wid: str, keys: list[Key], now: float, backup: bool) -> LeaseOut:
        it, w = self._it, self._workers[wid]
        self._seq += 1
        lid = f"{self.lease_prefix}{self._seq:x}"
        # The worker evaluates its leases in order, after applying the commits it lacks: the
        # deadline covers the work queued ahead of this lease too.
        ahead = sum(len(it.shard_of[k]) for lease in self._leases.values() if lease.wid == wid for k in lease.units)
        samples = sum(len(it.shard_of[k]) for k in keys)
        commits = max(0, it.plan.iteration - w.step) if w.step >= 0 else 1
        expires = self.cost.expires_s(ahead + samples, w.throughput, commits, w.update_s, self.lease_floor_s)
        self._leases[lid] = _Lease(lid, wid, list(keys), now, now + expires, backup)
        if backup:
            self.counters["backups"] += 1
        units = [{"member": it.members[m].member, "seed": it.members[m].seed, "sign": it.members[m].sign,
                  "indices": list(it.shard_of[(m, s)])} for m, s in keys]
        return LeaseOut(lid, wid, it.plan.iteration, it.plan.alpha, it.plan.sigma, units, expires, backup)

    def _backups(self, ready: list[str], now: float) -> list[LeaseOut]:
        """Tail of the iteration: each idle worker takes a backup copy of a unit still out elsewhere,
        the longest-outstanding first (first result wins)."""
        it = self._it
        busy = {lease.wid for lease in self._leases.values()}
        idle = [wid for wid in ready if wid not in busy]
        if not idle:
            return []
        # A unit earns a backup once it has been out twice as long as this iteration's typical
        # lease took (so instant answers do not trigger a storm of pointless copies).
        durations = sorted(it.durations)
        patience = max(MIN_BACKUP_AFTER_S, 2 * durations[len(durations) // 2]) if durations else MIN_BACKUP_AFTER_S
        first: dict[Key, float] = {}
        holders: dict[Key, set[str]] = {}
        for lease in self._leases.values():
            for k in lease.units:
                if k not in it.results:
                    first[k] = min(first.get(k, lease.issued), lease.issued)
                    holders.setdefault(k, set()).add(lease.wid)
        order = sorted((k for k in first if len(holders[k]) < MAX_COPIES and now - first[k] >= patience),
                       key=lambda k: first[k])
        out = []
        for wid in idle:
            for i, k in enumerate(order):
                if wid not in holders[k] and wid not in it.avoid.get(k, ()):
                    out.append(self._lease(wid, [k], now, backup=True))
                    order.pop(i)
                    break
            if not order:
                break
        return out

    def _valid(self, key: Key, r) -> bool:
        """A result answers its unit: same member and sign, one count per sample of the shard, a number."""
        if not isinstance(r, dict):
            return False
        m = self._it.members[key[0]]
        sum_r, count = r.get("sum_r"), r.get("count")
        return (r.get("member") == m.member and r.get("sign") == m.sign
                and isinstance(count, int) and not isinstance(count, bool) and count == len(self._it.shard_of[key])
                and isinstance(sum_r, (int, float)) and not isinstance(sum_r, bool))


def _positive(x) -> float:
    """``x`` as a float if it is a finite positive number, else 0.0 (not measured)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) and x > 0 else 0.0
