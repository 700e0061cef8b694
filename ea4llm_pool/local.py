"""In-process training: the coordinator's Run with members evaluated on a local replica.

Used by tests and by ``train --workers 0``; the pool path (``coordinator.py``) evaluates the same
plan on worker processes and closes it through the same ``Run.close``.
"""

from __future__ import annotations

import time

from .replica import Replica
from .run import Run


def train_inprocess(run: Run, replica: Replica, progress=None, stop=None) -> dict:
    """Run iterations until the last one, ``run.max_minutes`` or ``stop()``; a run that stops
    early is checkpointed so that ``--resume`` continues it."""
    es = run.cfg.es
    line = {}
    t_start = time.perf_counter()
    while run.step < run.cfg.run.iterations:
        t0 = time.perf_counter()
        plan = run.plan(run.step)
        ids, mask = run.train.batch(plan.indices)
        rewards = []
        for m in plan.members:
            s, c = replica.evaluate_member(m.seed, m.sign, plan.sigma, ids, mask, es.micro_batch)
            rewards.append(s / c)
        record = run.close(plan, rewards)
        replica.apply(record)
        if replica.state_hash() != run.state_hash:
            raise RuntimeError("local replica diverged from the coordinator's state")
        tokens = int(mask.sum().item()) * len(plan.members)
        line = run.report(record, time.perf_counter() - t0, tokens)
        if progress is not None:
            progress(line)
        if run.cfg.run.max_minutes and time.perf_counter() - t_start > 60 * run.cfg.run.max_minutes:
            break
        if stop is not None and stop():
            break
    if run.step < run.cfg.run.iterations and run.step > 0:
        run.checkpoint(final=False)
    return line
