"""Known answers for the update and the state hash: a fixed master, fixed commits, pinned hashes.

The master is built from the noise stream itself (platform-independent integers, scaled by an
exact fp32 multiply) and the commits from fixed rewards through the coordinator's own
``close_iteration``; ``apply_commit`` and ``state_hash`` must then land on the hashes below on
every machine, thread count and torch build. A change that moves any of them changes what every
replica computes: it needs a protocol version bump, not a new pin.
"""

from __future__ import annotations

import pytest
import torch

from ea4llm_pool.config import from_dict
from ea4llm_pool.es.commit import close_iteration
from ea4llm_pool.es.noise import NoiseSource, tensor_id
from ea4llm_pool.es.population import population
from ea4llm_pool.es.schedule import alpha_at, sigma_at
from ea4llm_pool.es.state import MasterState
from ea4llm_pool.es.statehash import state_hash
from ea4llm_pool.es import kernels, update
from ea4llm_pool.es.update import apply_commit

SHAPES = {
    "model.embed_tokens.weight": (64, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (40, 16),
    "model.norm.weight": (16,),
}

EXPECTED = {
    # (optimizer, shaping, noise): [hash of the initial state, after 1, 2, 3 commits]
    ("sgd", "zscore", "gaussian"): ["43cfbc8d35a4dff17edddd19db87b943", "94ab8a264dcbbd67efbcff6c9de4dc10",
                                    "36cf7377c1dce915feb93c5aa8e7aa94", "f5090e3dd07ea0397de7ae2a39fc055e"],
    ("adam", "rank", "gaussian"): ["bcec787980440db7b4f572c6486f4895", "074d252850dd21b5db19af2346ce6f36",
                                   "ab2ada000fb92e43e607924116476a47", "ce2fe73ad216f05d31a719189c23ea80"],
    ("adam", "rank", "rademacher"): ["bcec787980440db7b4f572c6486f4895", "191f834deea782b508f296ae4e53eea4",
                                     "ca084303b0e739f12abe003c54e3aa5c", "3f7d3089663721c12e3330aa7ff54b94"],
}


def _master(optimizer: str) -> MasterState:
    src = NoiseSource("gaussian", "cpu", chunk=1 << 10)
    named = []
    for name, shape in SHAPES.items():
        n = 1
        for d in shape:
            n *= d
        eps = src.eps(7, tensor_id(name), 0, n)
        named.append((name, (eps * 0.02).view(shape)))
    return MasterState.from_named(named, optimizer)


def _trajectory(optimizer: str, shaping: str, noise: str, threads: int, compiled: bool = False) -> list[str]:
    torch.set_num_threads(threads)
    es = from_dict({"es": {"optimizer": optimizer, "shaping": shaping, "noise": noise, "population": 8,
                           "alpha": 0.01, "sigma": 0.02, "antithetic": True}}, "kat").es
    state = _master(optimizer)
    src = NoiseSource(noise, "cpu", chunk=1 << 9, compiled=compiled)  # chunk boundaries inside tensors
    hashes = [state_hash(state, compiled=compiled)]
    for t in range(3):
        members = population(11, t, es.population, es.antithetic)
        rewards = [-6.0 + 0.01 * ((7 * m.member + 3 * t) % 11) for m in members]
        rec = close_iteration(es, t, members, rewards, alpha_at(es, t), sigma_at(es, t), state.step)
        apply_commit(state, rec, src)
        hashes.append(state_hash(state, compiled=compiled))
    return hashes


@pytest.mark.parametrize("small", [update.SMALL, 0], ids=["packed", "per-tensor"])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_update_and_state_hash_known_answers(case, small, monkeypatch):
    """Both update paths (small tensors packed end to end, or one tensor at a time) and both
    thread counts land on the same pinned hashes."""
    monkeypatch.setattr(update, "SMALL", small)
    old = torch.get_num_threads()
    try:
        got = _trajectory(*case, threads=1)
        assert _trajectory(*case, threads=2) == got
    finally:
        torch.set_num_threads(old)
    assert got == EXPECTED[case], f"{case}: {got}"


@pytest.mark.skipif(not kernels.probe("cpu")[0], reason="torch.compile unavailable here")
@pytest.mark.parametrize("case", list(EXPECTED))
def test_the_compiled_kernels_land_on_the_same_known_answers(case, monkeypatch):
    """Every tensor through the compiled accumulator (SMALL = 0), one thread (the compiled kernels
    are shared across tests; another thread count would compile them again)."""
    monkeypatch.setattr(update, "SMALL", 0)
    old = torch.get_num_threads()
    try:
        got = _trajectory(*case, threads=1, compiled=True)
    finally:
        torch.set_num_threads(old)
    assert got == EXPECTED[case], f"{case}: {got}"
