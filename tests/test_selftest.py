"""The start-up self-test (ea4llm_pool.es.selftest): known answers shipped in the package.

The expected digests below are this test's own copy: the package file must agree with them, so a
changed package file is caught as well as a changed computation. Regenerate the package file
(only when the noise, update or hash definition changes on purpose, which breaks every run log)
with ``python tests/test_selftest.py``.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from ea4llm_pool.es import kernels, selftest
from ea4llm_pool.es.selftest import (KNOWN_ANSWERS_PATH, LARGE_SHAPES, PARTS, SMALL_SHAPES, check,
                                     expected_digest, known_answers, run_selftest,
                                     selftest_digest)
from ea4llm_pool.es.update import SMALL

EXPECTED = {
    "noise gaussian": "20b053890625fda527a14d8b3c009f3bdebe1d6c9a31b7b02e6971b8d1ce9f12",
    "noise rademacher": "feb8f4d2c89c0707fe13b040f0c7b4363ea3de1ff4023973414e2b2ddaf2dda7",
    "noise packed": "b5868a4ee600281bb1c1ef16fe60dc90867bc1fb81110468056f7f06f013ba21",
    "update sgd packed": "5d40ee043a9b2e587046ee08f700bf567c560a11932b36a814651bba64319ffb",
    "update sgd large": "adc323246f639a6bdc835627f42533aa8a5d8fd816b58482b435b664753a28c6",
    "update adam": "9dcbdc2ad7edbe8d8573eb021e78367ccf954d7ebc27c5c371d5f7a357131de0",
    "state hash": "474bb6edef23719afbfd0df8e3aa9d307c6a6318d6aeb9a63a182b5e8e4d9932",
}


def test_the_shipped_known_answers_are_the_pinned_ones():
    assert set(known_answers()) == set(PARTS)
    assert known_answers() == EXPECTED


def test_the_inputs_cover_both_update_paths():
    numel = [torch.Size(s).numel() for s in {**SMALL_SHAPES, **LARGE_SHAPES}.values()]
    assert all(torch.Size(s).numel() <= SMALL for s in SMALL_SHAPES.values())
    assert max(numel) > SMALL and max(numel) % 4 and max(numel) > 4 * selftest.CHUNK


def test_eager_selftest_passes_on_this_cpu_quickly_and_at_any_thread_count():
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            ok, line = check("cpu")
            assert time.perf_counter() - t0 < 2.0
            assert ok, line
    finally:
        torch.set_num_threads(old)
    assert "\n" not in line


@pytest.mark.skipif(not kernels.probe("cpu")[0], reason="torch.compile unavailable here")
def test_compiled_selftest_gives_the_same_digests():
    assert run_selftest("cpu", compiled=True) == EXPECTED
    assert check("cpu", compiled=True)[0]
    assert selftest_digest("cpu", compiled=True) == selftest_digest("cpu")


def test_a_wrong_answer_is_reported_by_part(tmp_path, monkeypatch):
    doc = json.loads(KNOWN_ANSWERS_PATH.read_text())
    doc["digests"]["update adam"] = "0" * 64
    doc["digests"]["noise packed"] = "1" * 64
    bad = tmp_path / "selftest.json"
    bad.write_text(json.dumps(doc))
    monkeypatch.setattr(selftest, "KNOWN_ANSWERS_PATH", bad)
    ok, line = check("cpu")
    assert not ok and line == "self-test failed on cpu: noise packed, update adam"


def test_a_device_that_cannot_run_the_test_fails_with_one_line():
    ok, line = check("meta")
    assert not ok and "eager run failed" in line and "\n" not in line


def test_a_correct_device_announces_the_expected_digest():
    assert selftest_digest("cpu") == expected_digest()
    assert len(expected_digest()) == 64


def _write_known_answers() -> None:
    digests = run_selftest("cpu", compiled=False)
    doc = {"comment": "SHA-256 digests of ea4llm_pool.es.selftest.run_selftest on a CPU with the eager kernels; "
                      "every correct device and kernel gives the same. Regenerate with python tests/test_selftest.py.",
           "digests": digests}
    KNOWN_ANSWERS_PATH.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {KNOWN_ANSWERS_PATH}")
    print(json.dumps(digests, indent=4))


if __name__ == "__main__":
    _write_known_answers()
