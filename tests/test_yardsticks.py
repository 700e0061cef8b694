"""Yardsticks: count models whose held-out losses can be worked out by hand, averaged as the fitness is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ea4llm_pool import UserError
from ea4llm_pool import yardsticks as Y
from ea4llm_pool.es.fitness import fitness_sums

V = 4
TRAIN = np.array([[0, 1, 0, 1], [1, 1, 2, 0]])
# Scored transitions 0→1, 1→0, 0→1 | 1→1, 1→2, 2→0: target counts c = (2, 3, 1, 0), C = 6.
P_UNI = np.array([3, 4, 2, 1]) / 10  # add-1: (c + 1) / (6 + 4)
HELD_IDS = np.array([[0, 1, 2, 3], [3, 0, 0, 0], [2, 2, 2, 2]])
HELD_MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
# Scored: row 0: 0→1, 1→2 | row 1: 3→0 | row 2: none (counts as 0, as in the fitness).


def p_bigram(a: int, b: int) -> float:
    """Witten–Bell by hand: contexts 0: c=2, T=1 (0→1 twice); 1: c=3, T=3; 2: c=1, T=1; 3 unseen."""
    pairs = {(0, 1): 2, (1, 0): 1, (1, 1): 1, (1, 2): 1, (2, 0): 1}
    c_a = sum(n for (x, _), n in pairs.items() if x == a)
    t_a = sum(1 for (x, _) in pairs if x == a)
    if c_a == 0:
        return P_UNI[b]
    return (pairs.get((a, b), 0) + t_a * P_UNI[b]) / (c_a + t_a)


def test_the_three_yardsticks_by_hand():
    ys = Y.compute(TRAIN, np.ones_like(TRAIN), HELD_IDS, HELD_MASK, V)
    assert p_bigram(0, 1) == pytest.approx(0.8) and p_bigram(1, 2) == pytest.approx(1.6 / 6)
    assert ys.uniform == pytest.approx(math.log(4) * 2 / 3)
    assert ys.unigram == pytest.approx((-(math.log(0.4) + math.log(0.2)) / 2 - math.log(0.3)) / 3)
    assert ys.bigram == pytest.approx((-(math.log(0.8) + math.log(1.6 / 6)) / 2 - math.log(0.3)) / 3)
    assert (ys.vocab_size, ys.heldout_samples) == (4, 3)


def test_the_bigram_is_a_distribution_over_the_vocabulary_for_every_context():
    bigram = Y.Bigram(TRAIN, np.ones_like(TRAIN), V)
    for a in range(V):
        p = np.exp(bigram.logp(np.full(V, a), np.arange(V)))
        assert p.sum() == pytest.approx(1.0) and (p > 0).all()
        assert p == pytest.approx([p_bigram(a, b) for b in range(V)])


def test_padding_in_the_training_windows_is_not_counted():
    padded = np.array([[0, 1, 0, 1, 3, 3], [1, 1, 2, 0, 3, 3]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    assert Y.unigram_logp(padded, mask, V) == pytest.approx(np.log(P_UNI))


class TableLM(torch.nn.Module):
    """A real model whose next-token distribution is a fixed table P(b | a)."""

    def __init__(self, logp: np.ndarray):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(logp, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_a_model_that_is_the_count_model_scores_the_yardstick_under_the_es_fitness():
    bigram = Y.Bigram(TRAIN, np.ones_like(TRAIN), V)
    table = np.array([[bigram.logp(np.array([a]), np.array([b]))[0] for b in range(V)] for a in range(V)])
    ys = Y.compute(TRAIN, np.ones_like(TRAIN), HELD_IDS, HELD_MASK, V)
    s, c = fitness_sums(TableLM(table), torch.tensor(HELD_IDS), torch.tensor(HELD_MASK), micro_batch=2)
    assert -s / c == pytest.approx(ys.bigram, rel=1e-6)
    uni = np.tile(bigram.uni, (V, 1))
    s, c = fitness_sums(TableLM(uni), torch.tensor(HELD_IDS), torch.tensor(HELD_MASK), micro_batch=3)
    assert -s / c == pytest.approx(ys.unigram, rel=1e-6)


def test_a_token_outside_the_vocabulary_is_a_user_error():
    with pytest.raises(UserError, match="vocabulary has 3"):
        Y.compute(TRAIN, np.ones_like(TRAIN), HELD_IDS, HELD_MASK, 3)


def test_verdict_says_above_or_below_and_by_how_much():
    ys = Y.Yardsticks(uniform=6.93, unigram=5.90, bigram=4.31, vocab_size=1024, heldout_samples=64)
    assert Y.verdict(6.14, ys).startswith("held-out 6.14 nats; unigram yardstick 5.90: 0.24 above")
    assert "0.40 below" in Y.verdict(5.50, ys)


def test_train_prints_the_yardsticks_in_its_banner_and_the_verdict_at_the_end(tmp_path):
    from ea4llm_pool.cli import cli

    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--workers", "0", "--iterations", "2", "--out", str(out),
                                   "--set", "data.max_lines=400", "--set", "run.eval_samples=8",
                                   "--set", "es.population=4", "--set", "es.samples_per_iteration=4"])
    assert res.exit_code == 0, res.output
    ys = Y.for_run_dir(out)
    lines = res.output.splitlines()
    banner = next(i for i, line in enumerate(lines) if line.startswith("yardsticks on the same held-out windows"))
    assert f"unigram {ys.unigram:.2f}" in lines[banner] and banner < next(
        i for i, line in enumerate(lines) if line.startswith("iteration 0"))
    final = next(line for line in lines if line.startswith("held-out "))
    assert final.startswith(f"held-out {Y.last_heldout(out):.2f} nats; unigram yardstick {ys.unigram:.2f}: ")
    # the run directory's yardsticks are those of the run's own held-out windows
    from ea4llm_pool.data import SampleSet

    train = SampleSet.load(out / "data" / "train.npz")
    ids, mask = SampleSet.load(out / "data" / "heldout.npz").batch(range(8))
    assert ys == Y.compute(train.input_ids, train.mask, ids.numpy(), mask.numpy(), 1024)
