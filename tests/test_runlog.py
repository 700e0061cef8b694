"""The run log: chained, durable, exact, and loud about corruption."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import pytest

from ea4llm_pool import UserError
from ea4llm_pool import runlog as R
from ea4llm_pool.runlog import GENESIS, CommitLog, LogCorrupt, LogLocked, canonical_json, verify_chain


def rec(it: int, **extra) -> dict:
    return {"iteration": it, "state_hash": f"h{it}", "alpha": 5e-4 * (it + 1),
            "seeds": [it * 7, it * 7 + 1], "weights": [-(it % 3), it % 3], **extra}


def fill(path, first=1, n=5) -> list[dict]:
    with CommitLog(path) as log:
        return [log.append(rec(i)) for i in range(first, first + n)]


def lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_chains_and_reads_back(tmp_path):
    path = tmp_path / "run" / "commits.jsonl"  # parent directory is created
    out = fill(path)
    assert out[0]["prev"] == GENESIS
    for a, b in zip(out, out[1:]):
        assert b["prev"] == a["chain"]
    body = {k: v for k, v in out[2].items() if k != "chain"}
    assert out[2]["chain"] == hashlib.sha256((body["prev"] + canonical_json(body)).encode()).hexdigest()
    # one canonical JSON object per line, human readable
    text = path.read_text().splitlines()
    assert len(text) == 5 and json.loads(text[0])["iteration"] == 1
    assert text[0] == canonical_json(out[0])
    with CommitLog(path, readonly=True) as log:
        assert list(log.records()) == out
        assert [r["iteration"] for r in log.records(from_iteration=3)] == [3, 4, 5]
        assert list(log.records(from_iteration=99)) == []
        assert log.get(4) == out[3] and log.get(0) is None and log.get(6) is None
        assert log.last() == out[-1] and log.head == out[-1]["chain"]
        assert (log.first_iteration, log.last_iteration, len(log)) == (1, 5, 5)
        assert log.verify() == 5
        assert log.warnings == []
    assert verify_chain(out, prev=GENESIS, first_iteration=1) == out[-1]["chain"]


def test_empty_log(tmp_path):
    with CommitLog(tmp_path / "c.jsonl") as log:
        assert len(log) == 0 and log.last() is None and log.head == GENESIS
        assert list(log.records()) == [] and log.verify() == 0
        assert log.first_iteration is None and log.last_iteration is None
        assert log.truncate_after(3) == 0
    with pytest.raises(LogCorrupt, match="does not exist"):
        CommitLog(tmp_path / "missing.jsonl", readonly=True)


def test_reopen_and_continue(tmp_path):
    path = tmp_path / "c.jsonl"
    first = fill(path, first=0, n=3)
    with CommitLog(path) as log:
        assert log.last() == first[-1]
        nxt = log.append(rec(3))
        assert nxt["prev"] == first[-1]["chain"]
    with CommitLog(path) as log:
        assert [r["iteration"] for r in log.records()] == [0, 1, 2, 3]
        assert log.verify() == 4


def test_iterations_must_be_consecutive(tmp_path):
    with CommitLog(tmp_path / "c.jsonl") as log:
        log.append(rec(10))  # the first may be any iteration
        with pytest.raises(ValueError, match="iteration 12 does not follow 10"):
            log.append(rec(12))
        with pytest.raises(ValueError, match="does not follow"):
            log.append(rec(10))
        with pytest.raises(ValueError, match="non-negative int 'iteration'"):
            log.append({"iteration": "11"})
        with pytest.raises(ValueError, match="non-negative int 'iteration'"):
            log.append({"iteration": True})
        with pytest.raises(ValueError, match="not JSON-able"):
            log.append({"iteration": 11, "blob": b"\x00"})
        with pytest.raises(ValueError, match="keys must be str"):
            log.append({"iteration": 11, 3: "x"})
        assert log.append(rec(11))["iteration"] == 11  # failed appends left nothing behind
    with CommitLog(tmp_path / "c.jsonl", readonly=True) as log:
        assert log.verify() == 2


def test_floats_and_big_ints_round_trip_exactly(tmp_path):
    vals = [0.1 + 0.2, 1e-300, 5e-324, 2.0 ** -1074, 1.7976931348623157e308, -0.0, 1 / 3,
            float.fromhex("0x1.fffffffffffffp-1"), 3.0, float("nan"), float("inf"), -float("inf")]
    ints = [2**63 - 1, -(2**63), 2**64 - 1, 2**63, 0]
    path = tmp_path / "c.jsonl"
    with CommitLog(path) as log:
        out = log.append({"iteration": 0, "f": vals, "i": ints, "t": (1, 2)})
    assert out["t"] == [1, 2]  # the returned record equals what readers parse
    with CommitLog(path, readonly=True) as log:
        got = next(log.records())
    assert got["i"] == out["i"] and got["t"] == out["t"]  # NaN != NaN: floats compared below
    for a, b in zip(vals, got["f"]):
        assert type(b) is float
        assert a.hex() == b.hex() if not math.isnan(a) else math.isnan(b)
        assert math.copysign(1, a) == math.copysign(1, b)
    assert got["i"] == ints and all(type(x) is int for x in got["i"])


def test_fsync_on_append_and_on_create(tmp_path, monkeypatch):
    calls: list[int] = []
    real = os.fsync

    def spy(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(R.os, "fsync", spy)
    dirs: list[str] = []
    real_dir = R._fsync_dir
    monkeypatch.setattr(R, "_fsync_dir", lambda p: (dirs.append(str(p)), real_dir(p)))
    path = tmp_path / "c.jsonl"
    log = CommitLog(path)
    assert dirs == [str(tmp_path)] and len(calls) >= 2  # the file, then its directory
    n = len(calls)
    log.append(rec(1))
    assert len(calls) == n + 1 and calls[-1] == log._fd
    log.close()
    # reopening an existing log does not fsync the directory again
    CommitLog(path).close()
    assert dirs == [str(tmp_path)]


def test_durable_before_return(tmp_path):
    """The line is on disk (readable by another opener) as soon as append returns."""
    path = tmp_path / "c.jsonl"
    with CommitLog(path) as log:
        r = log.append(rec(1))
        assert path.read_bytes() == (canonical_json(r) + "\n").encode()


def test_modified_middle_record_is_detected(tmp_path):
    path = tmp_path / "c.jsonl"
    fill(path)
    ls = lines(path)
    r = json.loads(ls[2])
    r["weights"] = [5, -5]  # tamper, keep the line canonical
    ls[2] = (canonical_json(r) + "\n").encode()
    path.write_bytes(b"".join(ls))
    with pytest.raises(LogCorrupt, match=r"line 3 \(iteration 3\): chain hash mismatch") as ei:
        CommitLog(path)
    assert "\n" not in str(ei.value) and isinstance(ei.value, UserError)
    with pytest.raises(LogCorrupt, match="line 3"):
        CommitLog(path, readonly=True)


def test_recomputed_chain_breaks_the_link(tmp_path):
    """Rewriting a record *and* its chain still breaks the next record's prev."""
    path = tmp_path / "c.jsonl"
    fill(path)
    ls = lines(path)
    r = json.loads(ls[1])
    r["weights"] = [9, 9]
    r["chain"] = R.chain_hash(r)
    ls[1] = (canonical_json(r) + "\n").encode()
    path.write_bytes(b"".join(ls))
    with pytest.raises(LogCorrupt, match="line 3: 'prev' does not link"):
        CommitLog(path)


def test_reordered_and_missing_records_are_detected(tmp_path):
    path = tmp_path / "c.jsonl"
    fill(path)
    ls = lines(path)
    path.write_bytes(b"".join([ls[0], ls[2], ls[1], ls[3], ls[4]]))
    with pytest.raises(LogCorrupt, match="line 2: iteration 3 where 2 was expected"):
        CommitLog(path)
    path.write_bytes(b"".join([ls[0], ls[1], ls[3], ls[4]]))
    with pytest.raises(LogCorrupt, match="line 3: iteration 4 where 3 was expected"):
        CommitLog(path)
    path.write_bytes(b"".join(ls[1:]))  # first record removed: its successor links to nothing
    with pytest.raises(LogCorrupt, match="line 1: 'prev' does not link"):
        CommitLog(path)


def test_non_canonical_and_garbage_middle_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    fill(path)
    ls = lines(path)
    pretty = json.dumps(json.loads(ls[1]), sort_keys=True).encode() + b"\n"  # spaces added
    path.write_bytes(b"".join([ls[0], pretty, *ls[2:]]))
    with pytest.raises(LogCorrupt, match="line 2: record is not in canonical form"):
        CommitLog(path)
    path.write_bytes(b"".join([ls[0], b"{not json\n", *ls[2:]]))
    with pytest.raises(LogCorrupt, match="line 2: not valid JSON"):
        CommitLog(path)
    path.write_bytes(b"".join([ls[0], b"[1,2]\n", *ls[2:]]))
    with pytest.raises(LogCorrupt, match="line 2: record is not a JSON object"):
        CommitLog(path)


@pytest.mark.parametrize("tail", [b'{"iteration":6,"prev', b"\x00" * 40, b"{broken}\n", b"\n"])
def test_torn_tail_is_recovered(tmp_path, caplog, tail):
    path = tmp_path / "c.jsonl"
    out = fill(path)
    good = path.read_bytes()
    path.write_bytes(good + tail)
    # read-only: ignored, file untouched
    with CommitLog(path, readonly=True) as ro:
        assert len(ro) == 5 and ro.warnings and "read-only" in ro.warnings[0]
    assert path.read_bytes() == good + tail
    with caplog.at_level(logging.WARNING, logger="ea4llm_pool.runlog"):
        log = CommitLog(path)
    assert len(log.warnings) == 1 and "torn final line 6" in log.warnings[0]
    assert "torn final line" in caplog.text
    assert path.read_bytes() == good
    assert log.last() == out[-1]
    log.append(rec(6))
    log.close()
    with CommitLog(path) as log:
        assert log.verify() == 6 and log.warnings == []


def test_complete_last_line_without_newline_is_dropped(tmp_path):
    """An append that wrote its JSON but not the newline never returned: it was never announced."""
    path = tmp_path / "c.jsonl"
    fill(path, n=3)
    path.write_bytes(path.read_bytes()[:-1])
    with CommitLog(path) as log:
        assert log.last_iteration == 2 and log.warnings
        log.append(rec(3))
        assert log.verify() == 3


def test_tampering_after_open_is_caught_on_read(tmp_path):
    path = tmp_path / "c.jsonl"
    fill(path)
    with CommitLog(path, readonly=True) as log:
        ls = lines(path)
        r = json.loads(ls[3])
        r["state_hash"] = "evil"
        ls[3] = (canonical_json(r) + "\n").encode()
        path.write_bytes(b"".join(ls))
        with pytest.raises(LogCorrupt, match="line 4"):
            list(log.records())
        with pytest.raises(LogCorrupt, match="line 4"):
            list(log.records(from_iteration=4))
        with pytest.raises(LogCorrupt, match="line 4"):  # the predecessor is checked too
            list(log.records(from_iteration=5))
        assert log.get(3)["iteration"] == 3  # records before the damage still read
        with pytest.raises(LogCorrupt, match="line 4"):
            log.verify()


def test_verify_chain_for_wire_records(tmp_path):
    out = fill(tmp_path / "c.jsonl", first=1, n=4)
    assert verify_chain(out[2:], prev=out[1]["chain"], first_iteration=3) == out[-1]["chain"]
    assert verify_chain([], prev="p") == "p"
    with pytest.raises(LogCorrupt, match="record 0 .*does not link"):
        verify_chain(out[2:], prev=GENESIS)
    with pytest.raises(LogCorrupt, match="record 1: iteration 3 where 2"):
        verify_chain([out[0], out[2]])
    bad = dict(out[1], weights=[1, 1])
    with pytest.raises(LogCorrupt, match=r"record 1 \(iteration 2\): chain hash mismatch"):
        verify_chain([out[0], bad, out[2]])
    with pytest.raises(LogCorrupt, match="lacks 'prev'/'chain'"):
        verify_chain([{"iteration": 1}])


def test_mirror_append_checks_given_chain(tmp_path):
    """A second log fed records from the first (carrying prev/chain) ends byte-identical."""
    src = tmp_path / "a.jsonl"
    out = fill(src, n=3)
    dst = tmp_path / "b.jsonl"
    with CommitLog(dst) as mirror:
        for r in out:
            mirror.append(r)
        with pytest.raises(ValueError, match="does not match"):
            mirror.append(dict(rec(4), chain="0" * 64))
    assert dst.read_bytes() == src.read_bytes()


def test_truncate_after(tmp_path):
    path = tmp_path / "c.jsonl"
    out = fill(path, first=1, n=5)
    with CommitLog(path) as log:
        assert log.truncate_after(3) == 2
        assert log.last() == out[2] and len(log) == 3
        assert log.truncate_after(10) == 0
        assert log.append(rec(4)) == out[3]  # same content → same chain
        assert log.truncate_after(0) == 4 and len(log) == 0 and log.head == GENESIS
        log.append(rec(7))
    with CommitLog(path) as log:
        assert [r["iteration"] for r in log.records()] == [7]


def test_single_writer_lock_and_closed_log(tmp_path):
    path = tmp_path / "c.jsonl"
    log = CommitLog(path)
    try:
        if os.name == "posix":
            with pytest.raises(LogLocked, match="open for writing in another process"):
                CommitLog(path)
        with CommitLog(path, readonly=True) as ro:  # readers are not blocked
            with pytest.raises(ValueError, match="read-only"):
                ro.append(rec(1))
    finally:
        log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append(rec(1))
    CommitLog(path).close()  # the lock was released
