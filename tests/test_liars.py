"""Workers whose fitness values are wrong on purpose, in a real pool over loopback TCP: the real
``ea4llm-pool worker`` with its fitness computation replaced (tests/hooked_worker.py).

In each run two honest workers and one liar share the work. The liar must be quarantined after
its first ``quarantine_after`` (2) wrong answers, and the run must end on the state hash of the
same run without a liar: no wrong value reached a commit.
"""

from __future__ import annotations

import json

import pytest

from pooltools import coordinator, final_hash, free_port_pair, reference_hash, wait_until, worker, write_config

pytestmark = pytest.mark.slow

QUARANTINE_AFTER = 2  # trust.TrustPolicy.quarantine_after


@pytest.fixture(scope="module")
def pool_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("liarcfg")
    cfg = write_config(tmp / "pool.yaml", run={"iterations": 8})
    return cfg, reference_hash(tmp, cfg)


def _run_with_liar(tmp_path, cfg, lie: str, *coordinator_args):
    port = free_port_pair()
    out = tmp_path / "run"
    # One thread on the reference replica: the same bits as the workers', so the values used are
    # those of the run without a liar whoever supplied them.
    c = coordinator(tmp_path, cfg, out, port, "--threads", "1", *coordinator_args)
    liar = worker(tmp_path, port, "liar", hooks=("--fitness", lie))
    honest = []
    try:
        # The liar is in from the first iteration (the honest workers could otherwise finish the
        # run before it has synced).
        wait_until(lambda: "synced to iteration 0" in liar.text(), 120, "the liar to sync", procs=(c, liar))
        honest = [worker(tmp_path, port, f"honest-{k}") for k in range(2)]
        assert c.wait(300) == 0, c.text()[-3000:]
        for w in honest:
            assert w.wait(30) == 0, w.text()[-2000:]
        liar_rc = liar.wait(30)
    finally:
        for p in (c, *honest, liar):
            p.kill()
    pool = json.loads((out / "pool.json").read_text())
    # A worker dropped while silent (a loaded machine) and back again has a departed row for its
    # first session too: the row of its last session, which carries its standing, wins.
    rows = {r["name"]: r for r in pool["departed"] + pool["workers"]}
    return out, pool, rows, liar_rc, c.text(), liar.text()


def _check_liar_caught(pool, rows, log):
    liar = rows["liar"]
    assert liar["trust"] == "quarantined", liar
    assert liar["wrong_answers"] >= QUARANTINE_AFTER, liar
    assert f"quarantined liar after {QUARANTINE_AFTER} wrong answers" in log
    for name in ("honest-0", "honest-1"):
        assert rows[name]["wrong_answers"] == 0 and rows[name]["trust"] in ("new", "trusted"), rows[name]
    c = pool["counters"]
    assert c["quarantines"] >= 1 and c["wrong_answers"] >= QUARANTINE_AFTER and c["checks"] > 0, c


def test_a_worker_returning_random_fitness_is_quarantined_and_no_wrong_value_reaches_a_commit(tmp_path, pool_cfg):
    cfg, ref = pool_cfg
    out, pool, rows, _, log, _ = _run_with_liar(tmp_path, cfg, "random")
    _check_liar_caught(pool, rows, log)
    assert final_hash(out) == ref


def test_strangers_without_the_reference_replica_outvote_a_worker_returning_the_best_fitness(tmp_path, pool_cfg):
    """Nobody vouches (the coordinator's replica does not check): the honest workers check each
    other and the liar, and each disagreement is settled by a third evaluation."""
    cfg, ref = pool_cfg
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 8}, pool={"keeper_verifies": False})
    out, pool, rows, _, log, _ = _run_with_liar(tmp_path, cfg, "best")
    _check_liar_caught(pool, rows, log)
    assert pool["counters"]["third_evaluations"] >= QUARANTINE_AFTER, pool["counters"]
    assert pool["verify"]["keeper_verifies"] is False and "reference_units" not in pool["verify"]
    assert final_hash(out) == ref


def test_a_subtle_liar_biasing_one_sign_is_caught(tmp_path, pool_cfg):
    """+1e-3 nats on every negative member: a tenth of the antithetic signal at σ = 0.01, fifty
    times the fp32 agreement bound."""
    cfg, ref = pool_cfg
    out, pool, rows, _, log, _ = _run_with_liar(tmp_path, cfg, "bias:0.001")
    _check_liar_caught(pool, rows, log)
    assert final_hash(out) == ref
