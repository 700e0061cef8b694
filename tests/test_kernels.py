"""The compiled integer kernels (ea4llm_pool.es.kernels) give exactly the eager bits.

Forced on, on tensors larger than update.SMALL, with odd lengths, slices that start past 2^32 and
chunks small enough that every tensor spans several of them. The compiled kernels are cached per
process, so only the first test here pays the compile time.
"""

from __future__ import annotations

import pytest
import torch

from ea4llm_pool.config import from_dict
from ea4llm_pool import UserError
from ea4llm_pool.es import kernels
from ea4llm_pool.es.noise import KNOWN_ANSWER_DIGEST, NoiseSource, known_answer_digest, tensor_id
from ea4llm_pool.es.perturb import write_member
from ea4llm_pool.es.state import MasterState
from ea4llm_pool.es.statehash import state_hash, tensor_sum
from ea4llm_pool.es.update import SMALL, apply_commit

CHUNK = 1 << 14

ok, why = kernels.probe("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"torch.compile unavailable here: {why}")


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_compiled_accumulator_equals_eager_for_any_seed_count_start_and_length(kind):
    eager, fast = NoiseSource(kind, chunk=1000), NoiseSource(kind, chunk=1000, compiled=True)
    tid = tensor_id("model.layers.0.mlp.up_proj.weight")
    for n_seeds in (1, 2, 7):
        seeds = [(1 << 63) - 5 + j if j % 2 else 11 * j for j in range(n_seeds)]
        weights = [3 * j - 4 for j in range(n_seeds)]
        for start, n in ((0, 1), (4, 3), (8, 4999), ((1 << 40) + 4, 2501)):
            want = eager.accumulate(seeds, weights, tid, start, n)
            assert torch.equal(fast.accumulate(seeds, weights, tid, start, n), want), (n_seeds, start, n)
            out = torch.full((n,), -1, dtype=torch.int64)
            assert torch.equal(fast.accumulate(seeds, weights, tid, start, n, out=out), want)
            assert torch.equal(out, want)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_compiled_noise_values_equal_eager_and_the_known_answers(kind):
    eager, fast = NoiseSource(kind, chunk=CHUNK), NoiseSource(kind, chunk=CHUNK, compiled=True)
    tid = tensor_id("lm_head.weight")
    for start, n in ((0, 5), (12, 70_001), (1 << 36, 3 * CHUNK + 3)):
        assert torch.equal(fast.eps(9, tid, start, n), eager.eps(9, tid, start, n))
        assert torch.equal(fast.q(9, tid, start, n), eager.q(9, tid, start, n))
    assert known_answer_digest(kind, "cpu", compiled=True) == KNOWN_ANSWER_DIGEST[kind]


SHAPES = {"model.embed_tokens.weight": (257, 301), "model.layers.0.mlp.up_proj.weight": (70_003,),
          "model.layers.0.input_layernorm.weight": (37,), "model.norm.weight": (1, 5)}


def _master(optimizer: str) -> MasterState:
    src = NoiseSource(chunk=CHUNK)
    named = []
    for name, shape in SHAPES.items():
        n = 1
        for d in shape:
            n *= d
        named.append((name, (src.eps(5, tensor_id(name), 0, n) * 0.02).view(shape)))
    return MasterState.from_named(named, optimizer)


def _commit(it: int, adam: bool) -> dict:
    rec = {"iteration": it, "seeds": [100 + it, 7, (1 << 64) - 1], "weights": [5, -3 + it, 1],
           "scales": {g: 2.0 ** -20 for g in ("emb", "attn", "mlp", "ln", "head")}}
    if adam:
        rec["adam"] = {"beta1": 0.9, "one_minus_beta1": 0.1, "beta2": 0.999, "one_minus_beta2": 0.001,
                       "inv_bc2": 1000.0, "eps": 1e-8, "lr_over_bc1": {g: 0.01 for g in rec["scales"]}}
    return rec


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_compiled_update_gives_the_eager_bits_and_state_hash(optimizer):
    a, b = _master(optimizer), _master(optimizer)
    assert max(p.flat.numel() for p in a.params) > SMALL and min(p.flat.numel() for p in a.params) <= SMALL
    eager, fast = NoiseSource(chunk=CHUNK), NoiseSource(chunk=CHUNK, compiled=True)
    for it in range(2):
        apply_commit(a, _commit(it, optimizer == "adam"), eager)
        apply_commit(b, _commit(it, optimizer == "adam"), fast)
    for name, t in a.tensors().items():
        assert torch.equal(t.view(torch.int32), b.tensors()[name].view(torch.int32)), name
    assert state_hash(b, compiled=True) == state_hash(a)
    assert state_hash(a) != state_hash(_master(optimizer))   # the commits did move the weights


def test_compiled_member_weights_equal_eager():
    state = _master("sgd")
    gs = {g: 1.0 for g in ("emb", "attn", "mlp", "ln", "head")}
    out = []
    for compiled in (False, True):
        working = {p.name: torch.empty(p.shape) for p in state.params}
        write_member(state, working, NoiseSource(chunk=CHUNK, compiled=compiled), 42, -1, 0.01, gs)
        out.append(working)
    for name in out[0]:
        assert torch.equal(out[0][name].view(torch.int32), out[1][name].view(torch.int32)), name


def test_compiled_state_sum_equals_eager_for_any_length_and_chunk():
    x = torch.randn(3 * CHUNK + 5)
    for chunk in (None, CHUNK, 4097):
        assert tensor_sum(x, chunk, compiled=True) == tensor_sum(x, chunk)
    assert tensor_sum(x[:1], compiled=True) == tensor_sum(x[:1])


def test_compile_switch_auto_on_off():
    assert kernels.resolve("off", 10 ** 10, "cpu") is False
    assert kernels.resolve("auto", kernels.THRESHOLD_PARAMS - 1, "cpu") is False
    assert kernels.resolve("auto", kernels.THRESHOLD_PARAMS, "cpu") is True
    assert kernels.resolve("on", 1, "cpu") is True
    with pytest.raises(ValueError, match="auto, on or off"):
        kernels.resolve("yes", 1, "cpu")


def test_a_device_the_kernels_cannot_run_on_falls_back_with_one_line():
    said = []
    assert kernels.resolve("on", 1, "meta", say=said.append) is False
    assert len(said) == 1 and "\n" not in said[0] and "using the eager kernels" in said[0]


def test_runtime_config_compile_and_chunk_keys():
    rt = from_dict({"runtime": {"compile": "off", "chunk_elements": 0}}).runtime
    assert rt.compile == "off" and NoiseSource(chunk=rt.chunk_elements).chunk == 1 << 18
    assert NoiseSource("gaussian", "meta", chunk=rt.chunk_elements).chunk == 1 << 18
    with pytest.raises(UserError, match="chunk_elements"):
        from_dict({"runtime": {"chunk_elements": 100}})
    with pytest.raises(UserError, match="runtime.compile"):
        from_dict({"runtime": {"compile": "maybe"}})
