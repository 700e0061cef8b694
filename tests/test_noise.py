"""Specification of ea4llm_pool.es.noise: ε(seed, tensor, element) is a pure, platform-free function.

The noise is checked three ways: against an independent pure-Python reference written from the
definition (SplitMix64 on Python ints, 16-bit lanes, table lookup), against known answers committed
in ``tests/data/noise_known_answers.json``, and statistically (zero mean, unit variance, no
correlation between tensors or seeds). Regenerate the JSON (only if the definition changes on
purpose, which breaks every existing run log) with ``python tests/test_noise.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import struct
from pathlib import Path

import pytest
import torch

from ea4llm_pool.es.noise import (FRAC_BITS, KNOWN_ANSWER_CASES, KNOWN_ANSWER_DIGEST, ONE, TABLE_PATH,
                                  TABLE_SHA256, NoiseSource, default_chunk, known_answer_digest, self_test,
                                  stream_key, tensor_id)

KNOWN_ANSWERS = Path(__file__).parent / "data" / "noise_known_answers.json"

# ------------------------------------------------------------------------------ reference
# Written from the definition in noise.py's docstring, sharing no code with it.

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _ref_tensor_id(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _ref_table() -> tuple[int, ...]:
    return struct.unpack("<65536i", TABLE_PATH.read_bytes())


def reference_q(seed: int, name: str, start: int, n: int, kind: str = "gaussian",
                table: tuple[int, ...] | None = None) -> list[int]:
    """Q values of elements start … start+n−1: element e uses hash h = e // 4 and lane j = e % 4 of
    z = SplitMix64(key + h·golden); the lane's 16 bits, sign bit flipped, index the table."""
    table = table or _ref_table()
    key = _splitmix64(_splitmix64(seed & _M64) ^ _ref_tensor_id(name))
    out = []
    for e in range(start, start + n):
        h, j = divmod(e, 4)
        z = _splitmix64((key + h * _GOLDEN) & _M64)
        index = ((z >> (16 * j)) & 0xFFFF) ^ 0x8000
        if kind == "gaussian":
            out.append(table[index])
        else:
            out.append(-ONE if index < 0x8000 else ONE)
    return out


REFERENCE_CASES = [
    (0, "model.embed_tokens.weight", 0, 37),
    (1, "model.layers.0.mlp.up_proj.weight", 4, 50),
    ((1 << 63) - 1, "lm_head.weight", 1 << 20, 21),
    ((1 << 64) - 1, "model.norm.weight", 0, 16),          # largest unsigned 64-bit seed
    (2 ** 62 + 12345, "model.layers.17.self_attn.q_proj.weight", 123_456_788, 40),
    (987654321, "x", (1 << 40) + 8, 13),                   # element index beyond 2^32
]


@pytest.fixture(scope="module")
def known():
    return json.loads(KNOWN_ANSWERS.read_text())


# ------------------------------------------------------------------------------ exact answers

@pytest.mark.parametrize("seed,name,start,n", REFERENCE_CASES)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_noise_equals_the_pure_python_reference_for_every_seed_and_offset(kind, seed, name, start, n):
    got = NoiseSource(kind, chunk=16).q(seed, tensor_id(name), start, n)
    assert got.dtype == torch.int32
    assert got.tolist() == reference_q(seed, name, start, n, kind)


def test_stream_key_and_tensor_id_match_the_reference_definitions():
    for seed, name, *_ in REFERENCE_CASES:
        assert tensor_id(name) == _ref_tensor_id(name)
        expected = _splitmix64(_splitmix64(seed & _M64) ^ _ref_tensor_id(name))
        assert stream_key(seed, tensor_id(name)) & _M64 == expected


def test_a_slice_is_the_same_elements_as_the_whole_stream():
    src = NoiseSource(chunk=64)
    tid = tensor_id("model.layers.3.mlp.down_proj.weight")
    whole = src.q(7, tid, 0, 1000)
    assert torch.equal(src.q(7, tid, 400, 333), whole[400:733])


def test_a_slice_must_start_on_a_whole_hash():
    with pytest.raises(ValueError, match="multiple of 4"):
        NoiseSource().q(0, 0, 2, 8)


def test_first_values_of_the_known_answer_cases_match_the_committed_file(known):
    assert [tuple(c[k] for k in ("seed", "name", "start", "n")) for c in known["cases"]] == \
        [tuple(c) for c in KNOWN_ANSWER_CASES]
    for kind in ("gaussian", "rademacher"):
        src = NoiseSource(kind)
        for case in known["cases"]:
            got = src.q(case["seed"], tensor_id(case["name"]), case["start"], 16).tolist()
            assert got == case["first16"][kind], (kind, case["name"])


def test_committed_known_answers_agree_with_the_reference_and_the_module_constants(known):
    assert known["table_sha256"] == TABLE_SHA256
    assert known["frac_bits"] == FRAC_BITS
    assert known["digests"] == KNOWN_ANSWER_DIGEST
    table = _ref_table()
    for kind in ("gaussian", "rademacher"):
        h = hashlib.sha256()
        for case in known["cases"]:
            q = reference_q(case["seed"], case["name"], case["start"], case["n"], kind, table)
            assert q[:16] == case["first16"][kind]
            h.update(struct.pack(f"<{len(q)}i", *q))
        assert h.hexdigest() == known["digests"][kind]


@pytest.mark.parametrize("chunk", [4, 12, 1 << 10, 1 << 12, 1 << 18])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_known_answer_digest_is_the_published_one_for_any_chunk_size(kind, chunk):
    assert known_answer_digest(kind, "cpu", chunk=chunk) == KNOWN_ANSWER_DIGEST[kind]


def test_the_worker_start_self_test_passes_on_this_cpu():
    for kind in ("gaussian", "rademacher"):
        ok, digest = self_test(kind, "cpu")
        assert ok, digest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reproduces_the_cpu_noise_bit_for_bit():
    for kind in ("gaussian", "rademacher"):
        assert known_answer_digest(kind, "cuda") == KNOWN_ANSWER_DIGEST[kind]
        tid = tensor_id("model.layers.0.self_attn.v_proj.weight")
        cpu = NoiseSource(kind).eps(3, tid, 0, 100_003)
        gpu = NoiseSource(kind, "cuda").eps(3, tid, 0, 100_003).cpu()
        assert torch.equal(cpu, gpu)


@pytest.mark.parametrize("chunk", [12, 1000])
def test_accumulate_is_the_weighted_sum_of_the_streams_in_int64(chunk):
    src = NoiseSource(chunk=chunk)
    tid = tensor_id("model.layers.2.mlp.up_proj.weight")
    seeds, weights = [5, (1 << 64) - 1, 9], [3, -(1 << 40), 0]
    want = sum(w * src.q(s, tid, 8, 2503).to(torch.int64) for s, w in zip(seeds, weights))
    assert torch.equal(src.accumulate(seeds, weights, tid, 8, 2503), want)
    assert torch.equal(src.accumulate([], [], tid, 8, 7), torch.zeros(7, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of 4"):
        src.accumulate(seeds, weights, tid, 6, 10)


def test_the_chunk_defaults_to_the_devices_own():
    assert NoiseSource().chunk == NoiseSource(chunk=0).chunk == default_chunk("cpu") == 1 << 18
    assert default_chunk("cuda:0") == 1 << 24
    assert NoiseSource(chunk=1030).chunk == 1028      # whole hashes


# ------------------------------------------------------------------------------ the table

def test_the_shipped_table_has_its_published_checksum():
    assert hashlib.sha256(TABLE_PATH.read_bytes()).hexdigest() == TABLE_SHA256
    assert TABLE_PATH.stat().st_size == 65536 * 4


def test_the_table_is_mirror_symmetric_and_sorted():
    q = _ref_table()
    assert all(q[65535 - k] == -q[k] for k in range(65536))
    assert all(q[k] <= q[k + 1] for k in range(65535))
    assert 0 not in q  # every lane moves the weight


def test_the_table_is_the_normal_inverse_cdf_at_bin_midpoints_rounded_to_2_pow_minus_16():
    q = _ref_table()
    nd = statistics.NormalDist()
    worst = max(abs(q[k] - nd.inv_cdf((k + 0.5) / 65536) * ONE) for k in range(0, 65536, 7))
    assert worst <= 0.5 + 1e-6


# ------------------------------------------------------------------------------ invariance

def test_noise_does_not_depend_on_chunk_size():
    tid = tensor_id("model.layers.1.mlp.gate_proj.weight")
    n = 50_001
    base = NoiseSource(chunk=1 << 18).eps(42, tid, 8, n)
    for chunk in (4, 100, 4096, 12_345):
        assert torch.equal(NoiseSource(chunk=chunk).eps(42, tid, 8, n), base), chunk


def test_noise_does_not_depend_on_torch_thread_count():
    tid = tensor_id("model.embed_tokens.weight")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(NoiseSource(chunk=1 << 16).q(99, tid, 0, 300_000))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_eps_is_exactly_q_times_2_pow_minus_16():
    for kind in ("gaussian", "rademacher"):
        src = NoiseSource(kind, chunk=1 << 12)
        tid = tensor_id("model.layers.0.input_layernorm.weight")
        q = src.q(5, tid, 0, 20_000)
        e = src.eps(5, tid, 0, 20_000)
        assert e.dtype == torch.float32
        assert torch.equal(e, q.to(torch.float32) * 2.0 ** -16)
        assert torch.equal(e.double() * 65536, q.double())  # the conversion lost nothing


def test_eps_writes_into_a_caller_buffer():
    src = NoiseSource()
    buf = torch.full((64,), float("nan"))
    out = src.eps(1, 2, 0, 64, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, src.eps(1, 2, 0, 64))


# ------------------------------------------------------------------------------ statistics

N_STAT = 100_000


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_gaussian_noise_has_zero_mean_and_unit_variance():
    e = NoiseSource().eps(2024, tensor_id("model.layers.0.mlp.up_proj.weight"), 0, 1_000_000).double()
    n = e.numel()
    assert abs(e.mean().item()) < 4 / math.sqrt(n)
    # var of the sample variance of a normal ≈ 2/n
    assert abs(e.var().item() - 1.0) < 4 * math.sqrt(2 / n)
    # the tails exist (a 16-bit table reaches ±4.3σ) and kurtosis is normal (3)
    assert e.abs().max().item() > 4.0
    assert abs(((e - e.mean()) ** 4).mean().item() / e.var().item() ** 2 - 3.0) < 0.05


def test_rademacher_noise_is_exactly_plus_or_minus_one_and_balanced():
    e = NoiseSource("rademacher").eps(1, tensor_id("lm_head.weight"), 0, N_STAT)
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    assert abs(e.double().mean().item()) < 4 / math.sqrt(N_STAT)


def test_two_same_shaped_tensors_under_one_seed_get_uncorrelated_noise():
    """The bug of reusing one seed for every tensor: q_proj of layer 0 and layer 1 would share noise."""
    src = NoiseSource()
    a = src.eps(7, tensor_id("model.layers.0.self_attn.q_proj.weight"), 0, N_STAT)
    b = src.eps(7, tensor_id("model.layers.1.self_attn.q_proj.weight"), 0, N_STAT)
    assert not torch.equal(a, b)
    assert abs(_corr(a, b)) < 4 / math.sqrt(N_STAT)


def test_different_seeds_give_uncorrelated_noise_for_the_same_tensor():
    src = NoiseSource()
    tid = tensor_id("model.layers.0.self_attn.q_proj.weight")
    base = src.eps(7, tid, 0, N_STAT)
    for other in (8, 7 + (1 << 32), (1 << 63) - 1):
        assert abs(_corr(base, src.eps(other, tid, 0, N_STAT))) < 4 / math.sqrt(N_STAT)


def test_neighbouring_elements_are_uncorrelated():
    """Four lanes of one hash fill four neighbours; they must still be independent."""
    e = NoiseSource().eps(11, tensor_id("w"), 0, 4 * N_STAT)
    for lag in (1, 2, 3, 4):
        assert abs(_corr(e[:-lag], e[lag:])) < 4 / math.sqrt(e.numel()), lag


# ------------------------------------------------------------------------------ regeneration

def _write_known_answers() -> None:
    table = _ref_table()
    cases, digests = [], {}
    for kind in ("gaussian", "rademacher"):
        h = hashlib.sha256()
        for i, (seed, name, start, n) in enumerate(KNOWN_ANSWER_CASES):
            q = reference_q(seed, name, start, n, kind, table)
            h.update(struct.pack(f"<{n}i", *q))
            if kind == "gaussian":
                cases.append({"seed": seed, "name": name, "start": start, "n": n, "first16": {}})
            cases[i]["first16"][kind] = q[:16]
        digests[kind] = h.hexdigest()
    doc = {"comment": "Q = eps * 2^16 (int32) of ea4llm_pool.es.noise.KNOWN_ANSWER_CASES, computed by the "
                      "pure-Python reference in tests/test_noise.py; digests are sha256 over all n "
                      "values of every case as little-endian int32.",
           "frac_bits": FRAC_BITS, "table_sha256": hashlib.sha256(TABLE_PATH.read_bytes()).hexdigest(),
           "digests": digests, "cases": cases}
    KNOWN_ANSWERS.parent.mkdir(exist_ok=True)
    KNOWN_ANSWERS.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {KNOWN_ANSWERS}")


if __name__ == "__main__":
    _write_known_answers()
