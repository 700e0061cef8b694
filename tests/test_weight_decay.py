"""Decoupled weight decay (``es.weight_decay``): θ ← θ − c_g·θ before the step, c_g = fp32(α_t·α_g·λ).

Its constants travel in the commit record (``decay``), only when λ > 0, and every replica applies
them with the same two kernels, so decay keeps the replica contract: bit-identical across the packed
and per-tensor update paths, chunk sizes, thread counts, compiled accumulators, evaluation dtypes,
and through log replay.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ea4llm_pool import UserError
from ea4llm_pool.config import load
from ea4llm_pool.es import kernels, update
from ea4llm_pool.es.commit import close_iteration
from ea4llm_pool.es.noise import NoiseSource, tensor_id
from ea4llm_pool.es.perturb import fp32
from ea4llm_pool.es.population import population
from ea4llm_pool.es.state import MasterState
from ea4llm_pool.es.statehash import state_hash
from ea4llm_pool.es.update import apply_commit
from test_core_es import es_cfg  # the ES settings the core tests start from

# One tensor above update.SMALL (the chunked per-tensor path) and small ones of every group (packed).
SHAPES = {
    "model.embed_tokens.weight": (1100, 64),
    "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.0.mlp.up_proj.weight": (40, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "lm_head.weight": (30, 64),
    "model.norm.weight": (64,),
}


CONFIGS = Path(__file__).resolve().parent.parent / "configs"



def _master(optimizer: str) -> MasterState:
    src = NoiseSource("gaussian", "cpu", chunk=1 << 12)
    named = []
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        eps = src.eps(5, tensor_id(name), 0, n)
        named.append((name, (eps * 0.05 + (1.0 if "norm" in name else 0.0)).view(shape)))
    return MasterState.from_named(named, optimizer)


def _records(es, rewards_of, iterations: int = 3) -> list[dict]:
    recs, alpha = [], es.alpha
    for t in range(iterations):
        members = population(4, t, es.population, es.antithetic)
        recs.append(close_iteration(es, t, members, rewards_of(t, members), alpha, es.sigma, step=t))
    return recs


def _wavy(t, members):
    return [math.sin(1.3 * m.member + t) for m in members]


def _apply_all(optimizer, recs, chunk, threads=1, compiled=False):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        state = _master(optimizer)
        src = NoiseSource("gaussian", "cpu", chunk=chunk, compiled=compiled)
        hashes = []
        for rec in recs:
            apply_commit(state, json.loads(json.dumps(rec)), src)  # as read back from the run log
            hashes.append(state_hash(state, compiled=compiled))
        return state, hashes
    finally:
        torch.set_num_threads(old)


# ================================================================================== the record

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_records_without_weight_decay_carry_no_decay_key(optimizer):
    for es in (es_cfg(f"es.optimizer={optimizer}"), es_cfg(f"es.optimizer={optimizer}", "es.weight_decay=0")):
        rec = close_iteration(es, 0, population(0, 0, 4, True), [0.1, 0.4, 0.3, 0.2], 0.01, 0.01, 0)
        assert "decay" not in rec


def test_the_default_config_hash_is_the_one_from_before_the_new_keys():
    """Existing runs keep their config hash (run id, worker check): new keys at their defaults stay
    out of it. a2221c1c2e42faae is the hash of configs/antithetic-adam.yaml's settings (the embedded
    default of that time) from before weight_decay, fitness and step_scale existed."""
    old = load(CONFIGS / "antithetic-adam.yaml", overrides=["run.iterations=900"])
    assert old.config_hash() == "a2221c1c2e42faae"
    assert load(CONFIGS / "antithetic-adam.yaml", overrides=["es.weight_decay=0.0", "es.fitness=logprob",
                                                             "es.step_scale=mean"]).config_hash() == "a2221c1c2e42faae"
    for changed in ("es.weight_decay=0.01", "es.fitness=token-accuracy", "es.step_scale=rms"):
        assert load(CONFIGS / "antithetic-adam.yaml", overrides=[changed]).config_hash() != "a2221c1c2e42faae"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_decay_constants_are_fp32_of_alpha_alpha_g_lambda_and_spare_norm_gains(optimizer):
    es = es_cfg(f"es.optimizer={optimizer}", "es.weight_decay=0.1", "es.group_alpha.attn=0.5",
                "es.group_alpha.head=0")
    rec = close_iteration(es, 0, population(0, 0, 4, True), [0.1, 0.4, 0.3, 0.2], 3e-3, 0.01, 0)
    assert rec["decay"] == {"emb": fp32(3e-3 * 0.1), "attn": fp32(3e-3 * 0.5 * 0.1), "mlp": fp32(3e-3 * 0.1),
                            "ln": 0.0, "head": 0.0}
    assert all(v == fp32(v) for v in rec["decay"].values())


def test_config_refuses_a_decay_that_would_remove_a_whole_weight_per_iteration():
    with pytest.raises(UserError, match="weight_decay 200 with alpha 0.01"):
        es_cfg("es.optimizer=sgd", "es.alpha=0.01", "es.weight_decay=200")
    with pytest.raises(UserError, match="weight_decay"):
        es_cfg("es.weight_decay=-0.1")


# ================================================================================== what it does

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_with_zero_rewards_the_commit_only_decays_by_exactly_c_theta(optimizer):
    """Equal rewards give z-score weights of 0: no step, and every decayed weight moves by −c·θ,
    computed as one fp32 product and one fp32 difference; norm gains keep their bits."""
    es = es_cfg(f"es.optimizer={optimizer}", "es.shaping=zscore", "es.weight_decay=0.5", "es.group_alpha.mlp=2")
    state = _master(optimizer)
    before = {p.name: p.flat.clone() for p in state.params}
    rec = close_iteration(es, 0, population(0, 0, 8, True), [0.0] * 8, 0.01, 0.01, 0)
    assert set(rec["weights"]) == {0}
    apply_commit(state, rec, NoiseSource(chunk=1 << 12))
    for p in state.params:
        theta0 = before[p.name]
        c = rec["decay"][p.group]
        if p.group == "ln":
            assert c == 0.0 and torch.equal(p.flat, theta0)
            continue
        assert c == fp32(0.01 * es.group_alpha.as_dict()[p.group] * 0.5)
        assert torch.equal(p.flat, theta0 - theta0 * c), p.name
        exact = theta0.double() * (1 - c)
        assert float((p.flat.double() - exact).abs().max()) <= float(theta0.abs().max()) * 2.0 ** -23
        assert bool((p.flat.abs() < theta0.abs()).all()), p.name  # no weight here is 0: all shrink
    if optimizer == "adam":
        assert all(float(m.abs().max()) == 0.0 for m in state.adam_m.values())


def test_decay_composes_with_the_sgd_step_as_theta_minus_c_theta_plus_step():
    es_off = es_cfg("es.optimizer=sgd", "es.shaping=rank")
    es_on = es_cfg("es.optimizer=sgd", "es.shaping=rank", "es.weight_decay=0.2")
    members = population(1, 0, 8, True)
    rewards = _wavy(0, members)
    plain, _ = _apply_all("sgd", [close_iteration(es_off, 0, members, rewards, 0.02, 0.01, 0)], 1 << 12)
    rec = close_iteration(es_on, 0, members, rewards, 0.02, 0.01, 0)
    assert rec["scales"] == close_iteration(es_off, 0, members, rewards, 0.02, 0.01, 0)["scales"]
    decayed, _ = _apply_all("sgd", [rec], 1 << 12)
    start = {p.name: p.flat for p in _master("sgd").params}
    for a, b in zip(plain.params, decayed.params):
        c = rec["decay"][a.group]
        want = a.flat.double() - c * start[a.name].double()
        ulp = a.flat.abs().double() * 2.0 ** -23 + start[a.name].abs().double() * 2.0 ** -23
        assert bool(((b.flat.double() - want).abs() <= 2 * ulp).all()), a.name
        assert torch.equal(a.flat, b.flat) == (c == 0.0), a.name


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_commit_with_no_finite_fitness_decays_nothing(optimizer):
    es = es_cfg(f"es.optimizer={optimizer}", "es.weight_decay=0.3")
    state = _master(optimizer)
    apply_commit(state, close_iteration(es, 0, population(0, 0, 4, True), [0.3, 0.1, 0.5, 0.2], 0.01, 0.01, 0),
                 NoiseSource())
    before = {n: t.clone() for n, t in state.tensors().items()}
    rec = close_iteration(es, 1, population(0, 1, 4, True), [math.nan] * 4, 0.01, 0.01, 1)
    assert set(rec["decay"].values()) == {0.0}
    apply_commit(state, rec, NoiseSource())
    assert all(torch.equal(t, before[n]) for n, t in state.tensors().items())


# ================================================================================== replica contract

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_decay_is_bit_identical_across_paths_chunks_threads_and_compiled_kernels(optimizer, monkeypatch):
    es = es_cfg(f"es.optimizer={optimizer}", "es.weight_decay=0.1", "es.alpha=0.01", "es.group_alpha.emb=0.5",
                "es.population=8")
    recs = _records(es, _wavy)
    ref_state, ref = _apply_all(optimizer, recs, 1 << 12, threads=1)
    runs = [dict(small=0, chunk=1 << 10, threads=2), dict(small=update.SMALL, chunk=1 << 9, threads=2)]
    if kernels.probe("cpu")[0]:
        runs.append(dict(small=0, chunk=1 << 12, threads=1, compiled=True))
    for run in runs:
        monkeypatch.setattr(update, "SMALL", run.pop("small"))
        state, hashes = _apply_all(optimizer, recs, **run)
        assert hashes == ref, run
        for name, t in ref_state.tensors().items():
            assert torch.equal(t, state.tensors()[name]), (run, name)
    monkeypatch.setattr(update, "SMALL", update.SMALL)
    off = _records(es_cfg(f"es.optimizer={optimizer}", "es.alpha=0.01", "es.group_alpha.emb=0.5",
                          "es.population=8"), _wavy)
    _, plain = _apply_all(optimizer, off, 1 << 12)
    assert all(a != b for a, b in zip(plain, ref))  # decay changed every step's state


MODEL = ["model.preset=tiny", "model.hidden_size=32", "model.num_hidden_layers=2", "model.intermediate_size=64",
         "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.init_seed=3"]


def _replica(cfg, dtype: str, chunk: int):
    from ea4llm_pool.model import build_model
    from ea4llm_pool.replica import Replica

    return Replica(build_model(cfg, vocab_size=96, pad_token_id=0), cfg.es, "cpu", dtype, chunk=chunk)


def test_two_replicas_of_a_decaying_run_stay_bit_identical_and_a_replay_lands_on_the_same_hash():
    """Replica a (fp32) scores the members; b (bf16, another chunk size) evaluates them too, as a
    worker would, and both apply every commit; a third replica replays the attested log."""
    from ea4llm_pool.replay import replay

    cfg = load(overrides=MODEL + ["es.weight_decay=0.2", "es.population=4", "es.alpha=0.01"])
    a, b = _replica(cfg, "fp32", 1 << 18), _replica(cfg, "bf16", 1024)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 96, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    log = []
    for t in range(3):
        members = population(cfg.run.seed, t, cfg.es.population, True)
        rewards = []
        for m in members:
            s, n = a.evaluate_member(m.seed, m.sign, cfg.es.sigma, ids, mask, micro_batch=2)
            b.evaluate_member(m.seed, m.sign, cfg.es.sigma, ids, mask, micro_batch=4)
            rewards.append(s / n)
        rec = close_iteration(cfg.es, t, members, rewards, cfg.es.alpha, cfg.es.sigma, a.master.step)
        assert rec["decay"]["mlp"] == fp32(0.01 * 0.2)
        a.apply(rec)
        b.apply(rec)
        assert a.state_hash() == b.state_hash()
        log.append(json.loads(json.dumps(dict(rec, attest={"step": t + 1, "state_hash": a.state_hash()}))))
    for name, t in a.master.tensors().items():
        assert torch.equal(t, b.master.tensors()[name]), name
    c = _replica(cfg, "fp32", 4096)
    assert replay(c, log, {0: c.state_hash()}) == 3
    assert c.state_hash() == a.state_hash()
