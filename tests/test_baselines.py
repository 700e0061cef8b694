"""Baselines: the AdamW loss is the ES fitness negated, MeZO regenerates z from its seed (and
restores θ to within a few fp32 roundings), budgets count forward tokens, and runs resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from ea4llm_pool.baselines import adamw, mezo
from ea4llm_pool.baselines.common import batch_at, eval_loss, lm_loss
from ea4llm_pool.baselines.loop import Budget, read_curve, run_baseline
from ea4llm_pool.data import SampleSet

U = 2.0 ** -24  # unit roundoff of fp32


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                      use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).eval().requires_grad_(False)


def samples(n: int = 40, seq: int = 12, seed: int = 0) -> SampleSet:
    rng = np.random.default_rng(seed)
    # a learnable pattern: each token is the previous one + 1 (mod 16), from a random start
    start = rng.integers(0, 16, size=(n, 1))
    ids = (start + np.arange(seq)) % 16 + 1
    return SampleSet(ids, np.ones_like(ids))


def test_the_backprop_loss_is_the_es_fitness_negated():
    model = tiny_model()
    ids = torch.randint(1, 64, (5, 10))
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    mask[4, 1:] = 0  # a sample with no scored position counts as 0, as in the fitness
    with torch.no_grad():
        assert float(lm_loss(model, ids, mask)) == pytest.approx(eval_loss(model, ids, mask, micro_batch=2), rel=1e-6)


def test_perturb_regenerates_the_same_z_from_the_seed():
    zeros = [torch.zeros(3, 5), torch.zeros(7)]
    again = [torch.zeros(3, 5), torch.zeros(7)]
    other = [torch.zeros(3, 5), torch.zeros(7)]
    mezo.perturb(zeros, 1234, 1.0)
    mezo.perturb(again, 1234, 1.0)
    mezo.perturb(other, 1235, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(zeros, again))
    assert not torch.equal(zeros[0], other[0])
    assert 0.5 < float(torch.cat([z.flatten() for z in zeros]).std()) < 1.6  # N(0, 1)


def test_mezo_restores_the_weights_to_within_a_few_roundings_not_bit_for_bit():
    model = tiny_model()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    seed, eps = 77, 1e-3
    z = [torch.zeros_like(p) for p in params]
    mezo.perturb(z, seed, 1.0)
    mezo.perturb(params, seed, eps)
    mezo.perturb(params, seed, -2 * eps)
    mezo.perturb(params, seed, eps)
    changed = 0
    for p, b, zz in zip(params, before, z):
        err = (p - b).abs()
        # three roundings of sums and three of products, each at most u times its magnitude
        bound = 4 * U * (b.abs() + 2 * eps * zz.abs())
        assert bool((err <= bound).all()), float((err - bound).max())
        changed += int((err > 0).sum())
    assert changed > 0  # restoring by arithmetic is not exact: that is the price of not storing z


def test_a_mezo_step_is_the_central_difference_along_z_times_z():
    theta = torch.tensor([0.5, -1.0, 2.0, 0.25])
    target = torch.tensor([0.0, 1.0, 1.0, 0.0])

    def loss() -> float:
        return 0.5 * float(((theta.double() - target.double()) ** 2).sum())

    z = torch.zeros(4)
    mezo.perturb([z], 5, 1.0)
    start = theta.clone()
    g, lp, lm = mezo.mezo_step([theta], loss, 5, eps=1e-3, lr=0.1)
    # a quadratic's central difference is its directional derivative z·(θ − c)
    assert g == pytest.approx(float((z.double() * (start.double() - target.double())).sum()), rel=1e-3)
    assert lp != lm
    assert torch.allclose(theta, start - 0.1 * g * z, atol=1e-6)


def test_mezo_descends_a_quadratic():
    theta = torch.full((50,), 1.0)
    loss = lambda: 0.5 * float((theta.double() ** 2).sum())  # noqa: E731
    start = loss()
    for t in range(300):
        mezo.mezo_step([theta], loss, mezo.step_seed(0, t), eps=1e-3, lr=0.01)
    assert loss() < 0.2 * start


def test_adamw_lowers_the_loss_on_a_fixed_batch():
    model = tiny_model()
    trainer = adamw.AdamWTrainer(model, lr=1e-2)
    ids, mask = samples().batch(range(8))
    losses = [trainer.step(ids, mask) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.5


def test_the_budget_counts_forward_tokens_three_per_backprop_token(tmp_path):
    train, held = samples(), samples(n=6, seed=1)
    ids_h, mask_h = held.batch(range(6))
    trainer = adamw.AdamWTrainer(tiny_model(), lr=1e-2)
    per_step = 3 * 4 * 12
    res = run_baseline(trainer, adamw.FORWARDS_PER_STEP, train, ids_h, mask_h, batch=4, seed=0,
                       budget=Budget(tokens=10 * per_step + per_step - 1), eval_every=4, checkpoint_every=3,
                       micro_batch=4, out=tmp_path, say=lambda _: None)
    assert (res["steps"], res["tokens"], res["stopped"]) == (10, 10 * per_step, "budget")
    curve = read_curve(tmp_path)
    assert [p["step"] for p in curve] == [0, 4, 8, 10]
    assert [p["tokens"] for p in curve] == [0, 4 * per_step, 8 * per_step, 10 * per_step]
    assert curve[0]["wall_s"] == 0.0 and curve[-1]["heldout_loss"] < curve[0]["heldout_loss"]


@pytest.mark.parametrize("kind", ["adamw", "mezo"])
def test_a_resumed_run_ends_on_the_weights_of_an_uninterrupted_one(tmp_path, kind):
    train, held = samples(), samples(n=6, seed=1)
    ids_h, mask_h = held.batch(range(6))

    def make():
        if kind == "adamw":
            return adamw.AdamWTrainer(tiny_model(), lr=1e-2), adamw.FORWARDS_PER_STEP
        return mezo.MeZOTrainer(tiny_model(), lr=1e-3, eps=1e-3, seed=0, micro_batch=4), mezo.FORWARDS_PER_STEP

    def go(out, steps):
        trainer, fwd = make()
        run_baseline(trainer, fwd, train, ids_h, mask_h, batch=4, seed=0, budget=Budget(tokens=steps * fwd * 48),
                     eval_every=2, checkpoint_every=2, micro_batch=4, out=out, say=lambda _: None)
        return trainer

    go(tmp_path / "a", 5)
    resumed = go(tmp_path / "a", 9)
    straight = go(tmp_path / "b", 9)
    for (n, p), q in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        assert torch.equal(p, q), n
    assert [p["step"] for p in read_curve(tmp_path / "a")] == [0, 2, 4, 5, 6, 8, 9]


def test_baseline_batches_are_drawn_like_the_es_subsets():
    from ea4llm_pool.data import subset_indices

    train = samples()
    ids, _ = batch_at(train, 4, 3, 7)
    assert torch.equal(ids, train.batch(subset_indices(len(train), 4, 3, 7))[0])
