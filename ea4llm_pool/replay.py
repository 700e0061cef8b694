"""Replaying commits: the one loop that moves a replica forward through COMMIT records.

Live training, a worker's sync and resync, the coordinator's reference replica, ``--resume`` and
``ea4llm-pool replay`` all move a replica through this function, so they all check the same things:

* records come in order: record t is applied to the state after t commits (older ones are
  skipped, a gap is an error);
* every record may *attest* a state: ``"attest": {"step": k, "state_hash": h}`` says "after k
  commits the state hash is h", as the reference replica computed it. The coordinator writes a
  commit as soon as its quorum closes, before any replica has applied it, so a record attests the
  newest state the reference had reached by then (usually the commit before it; the record itself
  when the writer applied it first, as in-process training does). Each replayed step's hash is
  computed and remembered in ``known``, and every attestation about a remembered step is checked.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from . import UserError

KEEP_HASHES = 256
"""How many recent steps' hashes ``known`` keeps (attestations lag by a step or two)."""


class ReplayMismatch(UserError):
    """A replayed state disagrees with the hash a record attests, or a record is missing."""


def replay(replica, records: Iterable[dict], known: dict[int, str], to_step: Optional[int] = None,
           on_step: Optional[Callable[[dict, str], None]] = None) -> int:
    """Apply ``records`` in order to ``replica`` (stopping at ``to_step`` commits if given).

    ``known`` maps step → state hash and must hold the replica's current step on entry; it is
    updated after every commit (and trimmed to the last KEEP_HASHES steps). ``on_step(record,
    hash)`` is called after each commit. Returns the number of commits applied.
    """
    n = 0
    for rec in records:
        step = replica.master.step
        if to_step is not None and step >= to_step:
            break
        it = int(rec["iteration"])
        if it < step:
            continue
        if it > step:
            raise ReplayMismatch(f"commit {it} arrived while the replica is at step {step}: "
                                 f"commits {step}..{it - 1} are missing")
        _check_attest(rec, known)
        replica.apply(rec)
        h = replica.state_hash()
        known[replica.master.step] = h
        _check_attest(rec, known)
        if len(known) > KEEP_HASHES:
            for k in sorted(known)[: len(known) - KEEP_HASHES]:
                del known[k]
        n += 1
        if on_step is not None:
            on_step(rec, h)
    return n


def _check_attest(rec: dict, known: dict[int, str]) -> None:
    att = rec.get("attest")
    if not att:
        return
    k, h = int(att["step"]), att["state_hash"]
    mine = known.get(k)
    if mine is not None and mine != h:
        raise ReplayMismatch(f"state hash after {k} commits is {mine[:12]}…, but commit {rec['iteration']} "
                             f"attests {h[:12]}…; this replica cannot reproduce the run")
