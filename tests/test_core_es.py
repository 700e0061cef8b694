"""Specification of the ES core (paper §3): shaping, schedules, population, groups, closing an
iteration into a commit record, and the integer-accumulated update that every replica applies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM

from ea4llm_pool.config import load
from ea4llm_pool.es.commit import close_iteration
from ea4llm_pool.es.groups import GROUPS, group_of
from ea4llm_pool.es.noise import NoiseSource
from ea4llm_pool.es.population import Member, member_seed, population
from ea4llm_pool.es.schedule import alpha_at, sigma_at, step_decay
from ea4llm_pool.es.shaping import ZSCORE_BITS, centered_weights, rank_weights, shape, zscore_weights
from ea4llm_pool.es.state import MasterState
from ea4llm_pool.es.statehash import state_hash
from ea4llm_pool.es.update import apply_commit


def f32(x: float) -> float:
    return float(np.float32(x))


# The ES settings these tests start from (antithetic pairs, ranks, Adam: configs/antithetic-adam.yaml);
# each test overrides what it is about.
BASE_ES = ["es.antithetic=true", "es.shaping=rank", "es.optimizer=adam", "es.alpha=0.003", "es.population=16"]


def es_cfg(*overrides):
    return load(overrides=[*BASE_ES, *overrides]).es


def tiny_qwen3(tied: bool = True, seed: int = 0) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied,
                      use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval().requires_grad_(False)


# ================================================================================== shaping

def test_rank_weights_are_the_centred_ranks_times_n_minus_1():
    rewards = [0.3, -1.0, 2.5, 0.0, 0.7]
    w, scale = rank_weights(rewards)
    n = len(rewards)
    ranks = [sorted(rewards).index(r) for r in rewards]
    assert w == [2 * r - (n - 1) for r in ranks] == [0, -4, 4, -2, 2]
    assert scale == 1.0 / (n - 1)
    # the paper's Eq. 7: w_j = 2·rank/(N−1) − 1 ∈ [−1, 1]
    assert [wi * scale for wi in w] == pytest.approx([2 * r / (n - 1) - 1 for r in ranks])
    assert sum(w) == 0


def test_rank_ties_are_broken_by_member_index():
    w, _ = rank_weights([1.0, 1.0, 0.0, 1.0])
    # ranks: member 2 → 0, then the tied members in index order 0 → 1, 1 → 2, 3 → 3
    assert w == [2 * 1 - 3, 2 * 2 - 3, 2 * 0 - 3, 2 * 3 - 3]


def test_rank_weights_need_two_members():
    with pytest.raises(ValueError):
        rank_weights([1.0])


def test_zscore_weights_quantise_the_z_score_to_2_pow_minus_20_with_error_at_most_2_pow_minus_21():
    rng = np.random.default_rng(0)
    for n in (2, 7, 30, 256):
        rewards = (rng.standard_normal(n) * 3.7 - 11.0).tolist()
        w, scale = zscore_weights(rewards)
        assert scale == 2.0 ** -ZSCORE_BITS == 2.0 ** -20
        mu = sum(rewards) / n
        sd = math.sqrt(sum((r - mu) ** 2 for r in rewards) / n)  # population σ_r (paper Eq. 6)
        for wi, r in zip(w, rewards):
            assert isinstance(wi, int)
            assert abs(wi * scale - (r - mu) / (sd + 1e-8)) <= 2.0 ** -21 + 1e-12


def test_zscore_of_equal_rewards_is_zero_not_nan():
    w, _ = zscore_weights([-2.5] * 6)
    assert w == [0] * 6


def test_shaping_rejects_non_finite_rewards_and_dispatches_by_name():
    with pytest.raises(ValueError, match="non-finite"):
        shape([0.0, float("nan")], "rank")
    assert shape([1.0, 0.0], "rank") == rank_weights([1.0, 0.0])
    assert shape([1.0, 0.0], "zscore") == zscore_weights([1.0, 0.0])


def test_centered_weights_are_the_reward_minus_the_leave_one_out_mean_quantised_to_2_pow_minus_20():
    rng = np.random.default_rng(1)
    for n in (2, 5, 30):
        rewards = (rng.standard_normal(n) * 0.01 - 6.9).tolist()
        w, scale = centered_weights(rewards)
        assert scale == 2.0 ** -20
        for j, (wi, r) in enumerate(zip(w, rewards)):
            others = (sum(rewards) - r) / (n - 1)
            assert isinstance(wi, int) and abs(wi * scale - (r - others)) <= 2.0 ** -21 + 1e-12
    # No division by the spread: ten times the differences, ten times the weights (unlike z-scores).
    small, _ = centered_weights([-6.90, -6.91, -6.93])
    big, _ = centered_weights([-6.9, -7.0, -7.2])
    assert big == pytest.approx([10 * x for x in small], rel=1e-4)
    assert zscore_weights([-6.90, -6.91, -6.93])[0] == pytest.approx(zscore_weights([-6.9, -7.0, -7.2])[0], rel=1e-4)
    assert centered_weights([-2.5] * 4)[0] == [0] * 4


def test_centered_weights_of_huge_fitness_differences_keep_fewer_bits_and_cannot_overflow_int64():
    n = 1024
    rewards = [1e12 * (j % 2) for j in range(n)]
    w, scale = centered_weights(rewards)
    assert scale > 2.0 ** -20 and math.log2(scale) == int(math.log2(scale))  # an exact power of two
    assert max(abs(x) for x in w) * n * 2 ** 24 < 2 ** 63
    assert [x * scale for x in w[:2]] == pytest.approx([-1e12 * n / (n - 1) / 2, 1e12 * n / (n - 1) / 2], rel=1e-6)
    with pytest.raises(ValueError):
        centered_weights([1.0])


# ================================================================================== schedules

def test_step_decay_is_eq_15():
    assert [step_decay(1.0, 0.5, 10, t) for t in (0, 9, 10, 19, 20, 35)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_a_step_of_zero_means_constant():
    assert [step_decay(3e-4, 0.1, 0, t) for t in (0, 1, 1000)] == [3e-4] * 3


def test_alpha_and_sigma_follow_their_own_schedules():
    es = es_cfg("es.alpha=0.01", "es.sigma=0.001", "es.schedule.alpha_gamma=0.5", "es.schedule.alpha_step=100",
                "es.schedule.sigma_gamma=0.9", "es.schedule.sigma_step=0")
    assert alpha_at(es, 0) == 0.01 and alpha_at(es, 99) == 0.01
    assert alpha_at(es, 100) == 0.005 and alpha_at(es, 250) == 0.0025
    assert sigma_at(es, 0) == sigma_at(es, 10_000) == 0.001


# ================================================================================== population

def test_antithetic_pairs_share_a_seed_with_opposite_signs():
    pop = population(run_seed=3, iteration=17, size=8, antithetic=True)
    assert [m.member for m in pop] == list(range(8))
    for k in range(4):
        plus, minus = pop[2 * k], pop[2 * k + 1]
        assert plus.seed == minus.seed and (plus.sign, minus.sign) == (+1, -1)
    assert len({m.seed for m in pop}) == 4


def test_population_is_a_pure_function_of_run_seed_and_iteration():
    assert population(3, 17, 8, True) == population(3, 17, 8, True)
    assert {m.seed for m in population(3, 17, 8, True)}.isdisjoint({m.seed for m in population(3, 18, 8, True)})
    assert {m.seed for m in population(3, 17, 8, True)}.isdisjoint({m.seed for m in population(4, 17, 8, True)})
    # a bigger population extends, not reshuffles, the smaller one
    assert population(3, 17, 16, True)[:8] == population(3, 17, 8, True)


def test_plain_population_has_distinct_63_bit_seeds_all_positive_sign():
    pop = population(0, 0, 30, antithetic=False)
    assert all(m.sign == +1 for m in pop)
    assert len({m.seed for m in pop}) == 30
    assert all(0 <= m.seed < 1 << 63 for m in pop)
    assert pop[5].seed == member_seed(0, 0, 5)


def test_antithetic_population_must_be_even():
    with pytest.raises(ValueError):
        population(0, 0, 7, antithetic=True)


# ================================================================================== groups

def test_qwen3_parameters_map_to_the_papers_groups():
    names = {n: group_of(n) for n, _ in tiny_qwen3(tied=False).named_parameters()}
    assert names == {
        "model.embed_tokens.weight": "emb",
        "model.layers.0.self_attn.q_proj.weight": "attn",
        "model.layers.0.self_attn.k_proj.weight": "attn",
        "model.layers.0.self_attn.v_proj.weight": "attn",
        "model.layers.0.self_attn.o_proj.weight": "attn",
        "model.layers.0.self_attn.q_norm.weight": "ln",   # a norm inside attention is a norm
        "model.layers.0.self_attn.k_norm.weight": "ln",
        "model.layers.0.mlp.gate_proj.weight": "mlp",
        "model.layers.0.mlp.up_proj.weight": "mlp",
        "model.layers.0.mlp.down_proj.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "ln",
        "model.layers.0.post_attention_layernorm.weight": "ln",
        "model.norm.weight": "ln",
        "lm_head.weight": "head",
    }


def test_with_tied_embeddings_the_shared_tensor_is_in_the_emb_group_once():
    state = MasterState.from_named(tiny_qwen3(tied=True).named_parameters())
    names = [p.name for p in state.params]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    assert {p.group for p in state.params} == {"emb", "attn", "mlp", "ln"}


def test_gpt2_style_parameters_map_to_the_same_groups():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    got = {n: group_of(n) for n, _ in model.named_parameters()}
    expected = {"wte": "emb", "wpe": "emb", "ln_1": "ln", "ln_2": "ln", "ln_f": "ln",
                "c_attn": "attn", "attn.c_proj": "attn", "c_fc": "mlp", "mlp.c_proj": "mlp"}
    for name, group in got.items():
        key = next(k for k in expected if f".{k}." in f".{name}")
        assert group == expected[key], name
    assert group_of("lm_head.weight") == "head"
    assert group_of("transformer.h.3.mlp.c_fc.bias") == "mlp"


def test_every_group_name_is_one_of_the_five():
    assert GROUPS == ("emb", "attn", "mlp", "ln", "head")
    assert group_of("some.unknown.thing.weight") in GROUPS


# ================================================================================== close_iteration

def test_antithetic_rewards_are_signed_before_shaping():
    es = es_cfg("es.antithetic=true", "es.shaping=rank", "es.optimizer=sgd")
    members = population(0, 0, 6, antithetic=True)
    rewards = [-3.0, -3.5, -2.0, -2.2, -4.0, -1.0]
    rec = close_iteration(es, 0, members, rewards, alpha=0.1, sigma=0.01, step=0)
    signed = [m.sign * r for m, r in zip(members, rewards)]
    w_member, _ = rank_weights(signed)
    assert rec["seeds"] == [members[0].seed, members[2].seed, members[4].seed]
    assert rec["weights"] == [w_member[0] + w_member[1], w_member[2] + w_member[3], w_member[4] + w_member[5]]
    assert rec["rewards"] == rewards
    assert rec["members"] == [[m.member, m.seed, m.sign] for m in members]


def test_the_better_side_of_a_pair_pulls_the_update_towards_it():
    es = es_cfg("es.antithetic=true", "es.shaping=zscore", "es.optimizer=sgd")
    members = population(0, 0, 4, antithetic=True)
    # pair 0: +ε better; pair 1: −ε better
    rec = close_iteration(es, 0, members, [-1.0, -2.0, -2.0, -1.0], alpha=0.1, sigma=0.01, step=0)
    assert rec["weights"][0] > 0 and rec["weights"][1] < 0


def test_without_antithetic_rewards_are_shaped_as_they_are():
    es = es_cfg("es.antithetic=false", "es.population=4", "es.shaping=zscore", "es.optimizer=sgd")
    members = population(0, 0, 4, antithetic=False)
    rewards = [0.1, 0.4, -0.2, 0.3]
    rec = close_iteration(es, 0, members, rewards, alpha=0.1, sigma=0.01, step=0)
    assert rec["weights"] == zscore_weights(rewards)[0]


@pytest.mark.parametrize("shaping", ["rank", "zscore"])
@pytest.mark.parametrize("nes", [False, True])
def test_sgd_scales_are_fp32_of_alpha_alpha_g_w_scale_over_n_s_times_2_pow_minus_16(shaping, nes):
    es = es_cfg("es.optimizer=sgd", f"es.shaping={shaping}", f"es.nes_scaling={str(nes).lower()}",
                "es.group_alpha.emb=0.25", "es.group_alpha.ln=0.0", "es.group_alpha.head=3.0")
    n, alpha, sigma = 10, 3e-3, 2e-2
    members = population(1, 4, n, antithetic=True)
    rec = close_iteration(es, 4, members, [float(i % 3) for i in range(n)], alpha, sigma, step=0)
    w_scale = 1.0 / (n - 1) if shaping == "rank" else 2.0 ** -20
    s = sigma if nes else 1.0
    ga = {"emb": 0.25, "attn": 1.0, "mlp": 1.0, "ln": 0.0, "head": 3.0}
    for g in GROUPS:
        expected = f32(alpha * ga[g] * w_scale / (n * s) * 2.0 ** -16)
        assert rec["scales"][g] == pytest.approx(expected, rel=2 ** -22)
        assert rec["scales"][g] == f32(rec["scales"][g])  # exactly representable in fp32
    assert rec["scales"]["ln"] == 0.0
    assert rec["adam"] is None
    assert (rec["alpha"], rec["sigma"], rec["iteration"]) == (alpha, sigma, 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rms_step_scale_divides_the_sum_by_root_n_instead_of_n(optimizer):
    members = population(0, 0, 16, antithetic=True)
    rewards = [math.cos(j) for j in range(16)]
    mean = close_iteration(es_cfg(f"es.optimizer={optimizer}"), 0, members, rewards, 1e-3, 1e-2, 0)
    rms = close_iteration(es_cfg(f"es.optimizer={optimizer}", "es.step_scale=rms"), 0, members, rewards, 1e-3, 1e-2, 0)
    assert rms["weights"] == mean["weights"]
    for g in GROUPS:
        assert rms["scales"][g] == pytest.approx(mean["scales"][g] * 4.0, rel=1e-6)  # N / √N = 4


def test_under_rms_step_scale_a_zscore_step_moves_each_weight_by_about_alpha_whatever_n():
    model = tiny_qwen3()
    for n in (8, 32):
        state = MasterState.from_named(model.named_parameters())
        before = torch.cat([p.flat.clone() for p in state.params])
        es = es_cfg("es.optimizer=sgd", "es.shaping=zscore", "es.antithetic=false", "es.step_scale=rms")
        rewards = [math.sin(2.3 * j) for j in range(n)]
        apply_commit(state, close_iteration(es, 0, population(3, 0, n, False), rewards, 0.01, 0.01, 0),
                     NoiseSource(chunk=1 << 10))
        step = torch.cat([p.flat for p in state.params]) - before
        assert float(step.pow(2).mean().sqrt()) == pytest.approx(0.01, rel=0.05)


def test_nes_scaling_divides_the_step_by_sigma():
    members = population(0, 0, 8, antithetic=True)
    rewards = [0.5, 0.1, -0.3, 0.2, 0.9, -0.9, 0.0, 0.4]
    plain = close_iteration(es_cfg("es.optimizer=sgd"), 0, members, rewards, 1e-3, 1e-2, 0)
    nes = close_iteration(es_cfg("es.optimizer=sgd", "es.nes_scaling=true"), 0, members, rewards, 1e-3, 1e-2, 0)
    assert plain["weights"] == nes["weights"]
    for g in GROUPS:
        assert nes["scales"][g] == pytest.approx(plain["scales"][g] / 1e-2, rel=1e-6)


def test_weights_of_members_sharing_a_seed_are_summed():
    es = es_cfg("es.antithetic=false", "es.shaping=rank", "es.optimizer=sgd")
    members = [Member(0, 111, +1), Member(1, 222, +1), Member(2, 111, +1), Member(3, 333, +1)]
    rec = close_iteration(es, 0, members, [4.0, 1.0, 3.0, 2.0], 0.1, 0.1, 0)
    # ranks 3, 0, 2, 1 → W = 3, -3, 1, -1; seed 111 gets 3 + 1
    assert rec["seeds"] == [111, 222, 333] and rec["weights"] == [4, -3, -1]


def test_adam_record_carries_fp32_constants_with_bias_correction_for_the_step():
    es = es_cfg("es.optimizer=adam", "es.group_alpha.ln=0.0", "es.group_alpha.attn=0.5")
    members = population(0, 0, 4, True)
    rec = close_iteration(es, 0, members, [0.1, 0.2, 0.3, 0.0], alpha=1e-3, sigma=0.01, step=9)
    a = rec["adam"]
    t = 10
    assert a["beta1"] == f32(0.9) and a["one_minus_beta1"] == f32(0.1)
    assert a["beta2"] == f32(0.999) and a["one_minus_beta2"] == f32(1 - 0.999)
    assert a["inv_bc2"] == f32(1 / (1 - 0.999 ** t)) and a["eps"] == f32(1e-8)
    assert a["lr_over_bc1"]["attn"] == f32(1e-3 * 0.5 / (1 - 0.9 ** t))
    assert rec["scales"]["ln"] == 0.0  # a frozen group gets no gradient, so its moments stay put
    assert rec["scales"]["mlp"] == f32(1.0 / 3 / 4 * 2.0 ** -16)


# ================================================================================== non-finite fitness

def _update_fields(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("rewards", "nonfinite")}


@pytest.mark.parametrize("shaping", ["rank", "zscore"])
@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_fitness_counts_as_the_lowest_finite_fitness_of_the_iteration(shaping, antithetic, bad):
    es = es_cfg(f"es.shaping={shaping}", f"es.antithetic={str(antithetic).lower()}", "es.optimizer=sgd")
    members = population(4, 2, 6, antithetic)
    rewards = [-2.0, bad, -2.5, -1.2, bad, -3.0]
    rec = close_iteration(es, 2, members, rewards, 0.1, 0.01, step=0)
    as_worst = close_iteration(es, 2, members, [-2.0, -3.0, -2.5, -1.2, -3.0, -3.0], 0.1, 0.01, step=0)
    assert _update_fields(rec) == _update_fields(as_worst)
    assert rec["nonfinite"] == 2 and as_worst["nonfinite"] == 0
    assert rec["rewards"][0] == -2.0 and not math.isfinite(rec["rewards"][1])  # kept as reported
    assert any(rec["weights"]) and all(v > 0 for v in rec["scales"].values())


def test_an_infinite_fitness_is_the_worst_not_the_best_and_ties_go_by_member_index():
    es = es_cfg("es.shaping=rank", "es.antithetic=false", "es.optimizer=sgd")
    members = population(0, 0, 4, antithetic=False)
    # +inf → 0.0 (the lowest finite), tied with member 1: member 0 ranks first by index
    assert close_iteration(es, 0, members, [math.inf, 0.0, 1.0, 2.0], 0.1, 0.1, 0)["weights"] == [-3, -1, 1, 3]
    assert close_iteration(es, 0, members, [1.0, 0.0, math.nan, 2.0], 0.1, 0.1, 0)["weights"] == [1, -3, -1, 3]


def test_under_zscore_a_nonfinite_member_gets_the_weight_of_the_lowest_finite_one():
    es = es_cfg("es.shaping=zscore", "es.antithetic=false", "es.optimizer=sgd")
    rec = close_iteration(es, 0, population(0, 0, 5, False), [0.4, math.nan, -0.7, 0.1, math.nan], 0.1, 0.1, 0)
    w = rec["weights"]
    assert w[1] == w[4] == w[2] == min(w) < 0 and rec["nonfinite"] == 2


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_when_every_fitness_is_nonfinite_the_commit_changes_nothing(optimizer, antithetic):
    es = es_cfg(f"es.optimizer={optimizer}", f"es.antithetic={str(antithetic).lower()}")
    state = MasterState.from_named(tiny_qwen3().named_parameters(), optimizer=optimizer)
    good = close_iteration(es, 0, population(0, 0, 4, True), [0.3, 0.1, 0.5, 0.2], 1e-3, 0.01, step=0)
    apply_commit(state, good, NoiseSource())  # non-zero Adam moments, which must then stay put
    before = {n: t.clone() for n, t in state.tensors().items()}
    rec = close_iteration(es, 1, population(0, 1, 4, antithetic), [math.nan, math.inf, -math.inf, math.nan],
                          1e-3, 0.01, step=1)
    assert rec["nonfinite"] == 4 and set(rec["weights"]) == {0}
    assert set(rec["scales"].values()) == {0.0}
    apply_commit(state, rec, NoiseSource())
    assert all(torch.equal(t, before[n]) for n, t in state.tensors().items())
    assert state.step == 2 and state.iteration == 1


def test_a_finite_iteration_reports_zero_nonfinite_members():
    es = es_cfg("es.shaping=rank")
    assert close_iteration(es, 0, population(0, 0, 4, True), [0.1, 0.2, 0.3, 0.4], 0.1, 0.1, 0)["nonfinite"] == 0


# ================================================================================== the update

def _reference_update(state0: dict[str, torch.Tensor], groups: dict[str, str], tids: dict[str, int],
                      members, paper_w, alpha, ga, n, s, kind="gaussian") -> dict[str, torch.Tensor]:
    """θ + α·α_g/(N·s) · Σ_j w_j ε_j in float64, with the paper's (float) weights per member."""
    src = NoiseSource(kind)
    out = {}
    for name, theta in state0.items():
        acc = torch.zeros(theta.numel(), dtype=torch.float64)
        for m, w in zip(members, paper_w):
            acc += w * m.sign * src.eps(m.seed, tids[name], 0, theta.numel()).double()
        out[name] = theta.double() + alpha * ga[groups[name]] / (n * s) * acc
    return out


@pytest.mark.parametrize("shaping,nes", [("rank", False), ("zscore", False), ("rank", True), ("centered", True)])
def test_applying_a_commit_equals_the_float64_es_update_within_fp32_rounding(shaping, nes):
    es = es_cfg("es.optimizer=sgd", f"es.shaping={shaping}", f"es.nes_scaling={str(nes).lower()}",
                "es.group_alpha.emb=0.5", "es.group_alpha.attn=2.0", "es.group_alpha.ln=0.0")
    model = tiny_qwen3(tied=False)
    state = MasterState.from_named(model.named_parameters())
    before = {p.name: p.flat.clone() for p in state.params}
    n, alpha, sigma = 12, 0.02, 0.05
    members = population(5, 0, n, antithetic=True)
    rewards = [math.sin(1.7 * j) for j in range(n)]
    rec = close_iteration(es, 0, members, rewards, alpha, sigma, step=0)
    apply_commit(state, rec, NoiseSource(chunk=1 << 10))

    signed = [m.sign * r for m, r in zip(members, rewards)]
    if shaping == "rank":
        w_int, c = rank_weights(signed)
        paper_w = [wi * c for wi in w_int]  # exact: the integer weights lose nothing
    elif shaping == "zscore":
        mu = sum(signed) / n
        sd = math.sqrt(sum((r - mu) ** 2 for r in signed) / n)
        paper_w = [(r - mu) / (sd + 1e-8) for r in signed]
    else:
        paper_w = [r - (sum(signed) - r) / (n - 1) for r in signed]
    # Shaped weights belong to the *signed* rewards s_j·r_j and multiply the base noise ε_b of the
    # member's seed (paper Eq. 10 + the implementation note beneath it), so the reference uses +ε_b.
    base_members = [Member(m.member, m.seed, +1) for m in members]
    ga = es.group_alpha.as_dict()
    ref = _reference_update(before, {p.name: p.group for p in state.params}, {p.name: p.tid for p in state.params},
                            base_members, paper_w, alpha, ga, n, sigma if nes else 1.0)
    for p in state.params:
        upd = ref[p.name] - before[p.name].double()
        err = (p.flat.double() - ref[p.name]).abs()
        # add rounding (½ ulp of θ) + the update's own fp32 roundings (acc→fp32, scale, product)
        tol = ref[p.name].abs() * 2.0 ** -24 + upd.abs() * 2.0 ** -21 + 1e-30
        if shaping in ("zscore", "centered"):  # weights quantised to 2^-20: ≤ 2^-21 per member
            eps_abs = sum(NoiseSource().eps(m.seed, p.tid, 0, p.flat.numel()).double().abs()
                          for m in base_members)
            tol = tol + alpha * ga[p.group] / (n * (sigma if nes else 1.0)) * 2.0 ** -21 * eps_abs
        assert bool((err <= tol).all()), (p.name, float((err - tol).max()))
        if ga[p.group] == 0.0:
            assert torch.equal(p.flat, before[p.name])
        else:
            assert float(upd.abs().max()) > 1e-4 * float(before[p.name].abs().max())  # it moved
    assert state.step == 1 and state.iteration == 0


def test_update_bits_do_not_depend_on_chunk_size_or_thread_count():
    es = es_cfg("es.optimizer=sgd", "es.shaping=zscore")
    model = tiny_qwen3()
    recs = [close_iteration(es, t, population(0, t, 8, True), [math.cos(t + j) for j in range(8)], 0.01, 0.01, t)
            for t in range(3)]
    hashes = []
    before = torch.get_num_threads()
    try:
        for chunk, threads in ((1 << 18, 2), (1024, 1), (4100, 2)):
            torch.set_num_threads(threads)
            state = MasterState.from_named(model.named_parameters())
            for rec in recs:
                apply_commit(state, rec, NoiseSource(chunk=chunk))
            hashes.append((state_hash(state), [p.flat.clone() for p in state.params]))
    finally:
        torch.set_num_threads(before)
    for h, flats in hashes[1:]:
        assert h == hashes[0][0]
        assert all(torch.equal(a, b) for a, b in zip(flats, hashes[0][1]))


def test_zero_weights_and_zero_scales_leave_the_master_alone():
    es = es_cfg("es.optimizer=sgd", "es.group_alpha.emb=0", "es.group_alpha.attn=0", "es.group_alpha.mlp=0",
                "es.group_alpha.ln=0", "es.group_alpha.head=0")
    state = MasterState.from_named(tiny_qwen3().named_parameters())
    before = [p.flat.clone() for p in state.params]
    rec = close_iteration(es, 0, population(0, 0, 4, True), [1.0, 0.0, 0.5, 0.2], 0.1, 0.1, 0)
    apply_commit(state, rec, NoiseSource())
    assert all(torch.equal(a, p.flat) for a, p in zip(before, state.params))


def test_a_commit_for_the_other_optimizer_is_refused():
    state = MasterState.from_named(tiny_qwen3().named_parameters(), optimizer="sgd")
    rec = close_iteration(es_cfg("es.optimizer=adam"), 0, population(0, 0, 4, True), [1.0, 0.0, 0.5, 0.2],
                          0.1, 0.1, 0)
    with pytest.raises(ValueError, match="optimizer"):
        apply_commit(state, rec, NoiseSource())


def _adam_run(model, recs, chunk, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        state = MasterState.from_named(model.named_parameters(), optimizer="adam")
        hashes = []
        for rec in recs:
            apply_commit(state, rec, NoiseSource(chunk=chunk))
            hashes.append(state_hash(state))
        return state, hashes
    finally:
        torch.set_num_threads(before)


def test_adam_on_the_es_gradient_is_bit_reproducible():
    es = es_cfg("es.optimizer=adam", "es.shaping=rank", "es.group_alpha.ln=0.5")
    model = tiny_qwen3()
    recs = []
    for t in range(4):
        recs.append(close_iteration(es, t, population(9, t, 8, True), [math.sin(3 * t + j) for j in range(8)],
                                    1e-3, 0.01, step=t))
    a, ha = _adam_run(model, recs, 1 << 18, 2)
    b, hb = _adam_run(model, recs, 777 * 4, 1)
    assert ha == hb and len(set(ha)) == 4
    for n, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[n]), n
    assert a.adam_m and all(float(m.abs().max()) > 0 for m in a.adam_m.values())


def test_the_first_adam_step_moves_each_weight_by_the_learning_rate_times_the_sign_of_g_hat():
    """Bias-corrected Adam at t = 1: m̂/√v̂ = ĝ/|ĝ|, so |Δθ| = lr·α_g wherever |ĝ| ≫ eps."""
    es = es_cfg("es.optimizer=adam", "es.shaping=rank", "es.group_alpha.attn=0.5")
    model = tiny_qwen3()
    state = MasterState.from_named(model.named_parameters(), optimizer="adam")
    before = {p.name: p.flat.clone() for p in state.params}
    members = population(2, 0, 6, True)
    rec = close_iteration(es, 0, members, [0.3, 0.1, 0.5, 0.2, -0.4, 0.0], alpha=1e-3, sigma=0.01, step=0)
    apply_commit(state, rec, NoiseSource())
    src = NoiseSource()
    for p in state.params:
        ghat = sum(w * src.eps(s, p.tid, 0, p.flat.numel()).double() for s, w in zip(rec["seeds"], rec["weights"]))
        delta = (p.flat - before[p.name]).double()
        lr = 1e-3 * es.group_alpha.as_dict()[p.group]
        big = ghat.abs() > 1e-3 * ghat.abs().max()
        assert torch.allclose(delta[big], lr * ghat[big].sign(), rtol=1e-4, atol=1e-9), p.name
    m = state.adam_m["model.norm.weight"]
    assert float(m.abs().max()) > 0


# ================================================================================== paired antithetic shaping

def test_paired_rank_shaping_ranks_all_raw_rewards_and_weights_a_seed_by_the_difference():
    from ea4llm_pool.es.shaping import shape_paired

    es = es_cfg("es.pairing=paired", "es.shaping=rank", "es.optimizer=sgd")
    members = population(0, 0, 4, antithetic=True)
    rewards = [0.1, 0.4, 0.3, 0.2]  # (r+0, r-0, r+1, r-1)
    # ranks of the raw rewards 0.1→0, 0.2→1, 0.3→2, 0.4→3; W = 2·rank − 3 = −3, +3, +1, −1
    assert shape_paired(rewards, [1, -1, 1, -1], "rank") == ([-3, -3, 1, 1], 1 / 3)
    rec = close_iteration(es, 0, members, rewards, alpha=0.1, sigma=0.01, step=0)
    assert rec["weights"] == [-3 - 3, 1 - (-1)]
    assert all(type(w) is int for w in rec["weights"])
    # the paper's Eq. 10 (signed rewards 0.1, −0.4, 0.3, −0.2 ranked together) gives other weights
    signed = close_iteration(es_cfg("es.shaping=rank", "es.optimizer=sgd"), 0, members, rewards, 0.1, 0.01, 0)
    assert signed["weights"] == [1 + (-3), 3 + (-1)]
    assert rec["scales"] == signed["scales"]  # same c: only the integers differ


def test_paired_zscore_weights_are_integers_that_ignore_the_loss_level_unlike_signed_ones():
    members = population(3, 0, 8, antithetic=True)
    spread = [0.03, -0.01, 0.02, 0.00, -0.02, 0.01, 0.04, -0.03]
    weights = {}
    for pairing in ("signed", "paired"):
        es = es_cfg("es.shaping=zscore", f"es.pairing={pairing}", "es.optimizer=sgd")
        for level in (-7.0, -2.0):
            rec = close_iteration(es, 0, members, [level + s for s in spread], 0.1, 0.01, 0)
            assert all(type(w) is int for w in rec["weights"])
            weights[pairing, level] = rec["weights"]
    # paired: z-scores of the raw rewards do not move with the level (up to the last quantum)
    assert all(abs(a - b) <= 1 for a, b in zip(weights["paired", -7.0], weights["paired", -2.0]))
    # signed: σ_r measures the gap between the ±r̄ clusters, so the weights follow the level
    ratio = [a / b for a, b in zip(weights["signed", -2.0], weights["signed", -7.0])]
    assert min(ratio) > 3.0


def test_paired_shaping_needs_antithetic_pairs():
    from ea4llm_pool import UserError

    with pytest.raises(UserError, match="pairing 'paired'.*antithetic"):
        es_cfg("es.pairing=paired", "es.antithetic=false", "es.population=4")


def test_a_paired_commit_applies_exactly_like_any_other():
    es = es_cfg("es.pairing=paired", "es.shaping=zscore", "es.optimizer=sgd")
    model = tiny_qwen3()
    a = MasterState.from_named(model.named_parameters(), optimizer="sgd")
    b = MasterState.from_named(model.named_parameters(), optimizer="sgd")
    rec = close_iteration(es, 0, population(1, 0, 6, True), [-6.9, -6.8, -7.1, -6.95, -7.0, -6.85], 1e-3, 0.01, 0)
    apply_commit(a, rec, NoiseSource())
    apply_commit(b, rec, NoiseSource(chunk=1024))
    assert state_hash(a) == state_hash(b)
    before = {n: t.detach().reshape(-1) for n, t in model.named_parameters()}
    assert any(not torch.equal(p.flat, before[p.name]) for p in a.params)


# ================================================================================== warm-up and decay of α

def test_warmup_then_cosine_or_linear_decay_to_the_floor():
    from ea4llm_pool.es.schedule import warmup_decay

    assert warmup_decay(0, 10, "cosine", 110, 0.1) == pytest.approx(0.1)
    assert warmup_decay(9, 10, "cosine", 110, 0.1) == 1.0
    assert warmup_decay(10, 10, "cosine", 110, 0.1) == 1.0
    assert warmup_decay(60, 10, "cosine", 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_decay(35, 10, "linear", 110, 0.2) == pytest.approx(0.2 + 0.8 * 0.75)
    assert warmup_decay(110, 10, "cosine", 110, 0.1) == warmup_decay(10 ** 6, 10, "linear", 110, 0.1) == 0.1
    assert warmup_decay(5, 0, "none", 0, 0.1) == 1.0


def test_alpha_at_composes_the_step_decay_with_warmup_and_decay():
    es = es_cfg("es.alpha=0.01", "es.schedule.alpha_step=50", "es.schedule.alpha_gamma=0.5",
                "es.alpha_warmup=4", "es.alpha_decay=linear", "es.alpha_decay_end=104", "es.alpha_decay_floor=0.0")
    assert alpha_at(es, 0) == pytest.approx(0.01 * 0.25)
    assert alpha_at(es, 54) == pytest.approx(0.01 * 0.5 * 0.5)
    assert alpha_at(es, 104) == 0.0
    plain = es_cfg("es.alpha=0.01", "es.schedule.alpha_step=50", "es.schedule.alpha_gamma=0.5")
    assert [alpha_at(plain, t) for t in (0, 49, 50, 120)] == [step_decay(0.01, 0.5, 50, t) for t in (0, 49, 50, 120)]


def test_a_decay_must_end_after_the_warmup():
    from ea4llm_pool import UserError

    with pytest.raises(UserError, match="alpha_decay_end"):
        es_cfg("es.alpha_warmup=10", "es.alpha_decay=cosine", "es.alpha_decay_end=10")
