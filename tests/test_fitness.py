"""Specification of ea4llm_pool.es.fitness: the fitness is the model's own log-likelihood (paper Eq. 2).

R(x; θ) = mean over unmasked positions t of log softmax(z_t)[x_{t+1}], i.e. minus the per-sample
cross-entropy of the shifted logits, which these tests compute independently with
``torch.nn.functional.cross_entropy`` and Hugging Face's own ``labels=`` loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from ea4llm_pool.config import load
from ea4llm_pool.es.fitness import LOGIT_SLICE_TOKENS, fitness_sums, sample_rewards
from ea4llm_pool.model import build_model

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    cfg = load(overrides=["model.preset=tiny", "model.hidden_size=32", "model.num_hidden_layers=2",
                          "model.intermediate_size=64", "model.init_seed=3"])
    return build_model(cfg, vocab_size=VOCAB, pad_token_id=0)


def random_ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (b, t), generator=g)


def right_padded(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids(b, t, seed)
    lengths = [t, t - 1, 2, t // 2, 5, t - 7][:b]
    mask = torch.zeros(b, t, dtype=torch.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0
    return ids, mask


def reference_rewards(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−(masked mean per sample of the cross-entropy of logits[:, :-1] against ids[:, 1:])."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    ce = ce.view(ids.shape[0], -1)
    m = (mask[:, :-1] * mask[:, 1:]).float()  # both the position and its target are real tokens
    return -(ce * m).sum(1) / m.sum(1)


def test_fitness_is_the_negated_masked_per_sample_cross_entropy_on_a_right_padded_batch(model):
    ids, mask = right_padded(6, 40)
    got = sample_rewards(model, ids, mask)
    assert got.shape == (6,) and got.dtype == torch.float32
    assert torch.allclose(got, reference_rewards(model, ids, mask), atol=1e-5, rtol=0)
    assert bool((got < 0).all())


def test_padding_does_not_change_a_samples_fitness(model):
    ids, mask = right_padded(6, 40)
    got = sample_rewards(model, ids, mask)
    # the sample with 5 real tokens scores the same alone and unpadded
    alone = sample_rewards(model, ids[4:5, :5], mask[4:5, :5])
    assert float(got[4]) == pytest.approx(float(alone[0]), abs=1e-5)
    # and the pad tokens' identity does not matter
    other_pad = ids.masked_fill(mask == 0, 7)
    assert torch.allclose(sample_rewards(model, other_pad, mask), got, atol=1e-6, rtol=0)


def test_mean_fitness_of_an_unpadded_batch_is_minus_hugging_faces_own_loss(model):
    ids = random_ids(4, 32, seed=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, labels=ids).loss)
    assert float(sample_rewards(model, ids, mask).mean()) == pytest.approx(-hf_loss, abs=1e-5)


def test_fitness_over_more_positions_than_one_logit_slice_is_unchanged(model):
    """The head runs over slices of LOGIT_SLICE_TOKENS positions; a batch spanning several agrees."""
    b, t = 70, 64
    assert b * (t - 1) > LOGIT_SLICE_TOKENS
    ids = random_ids(b, t, seed=2)
    mask = torch.ones_like(ids)
    mask[::3, 50:] = 0
    assert torch.allclose(sample_rewards(model, ids, mask), reference_rewards(model, ids, mask), atol=1e-5, rtol=0)


def test_a_model_that_predicts_nothing_has_fitness_minus_log_vocab():
    flat = build_model(load(overrides=["model.hidden_size=32", "model.num_hidden_layers=1",
                                       "model.intermediate_size=64"]), vocab_size=VOCAB, pad_token_id=0)
    flat.get_output_embeddings().weight.zero_()  # tied: embeddings and head are zero → uniform logits
    ids, mask = right_padded(3, 12)
    assert torch.allclose(sample_rewards(flat, ids, mask), torch.full((3,), -math.log(VOCAB)), atol=1e-6)


def test_fitness_of_a_gpt2_model_is_its_cross_entropy_too():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    ids, mask = right_padded(5, 24, seed=4)
    assert torch.allclose(sample_rewards(gpt2, ids, mask), reference_rewards(gpt2, ids, mask), atol=1e-5, rtol=0)


def test_fitness_sums_of_two_halves_add_up_to_the_whole(model):
    ids, mask = right_padded(6, 40, seed=5)
    whole, n = fitness_sums(model, ids, mask, micro_batch=6)
    a, na = fitness_sums(model, ids[:4], mask[:4], micro_batch=3)
    b, nb = fitness_sums(model, ids[4:], mask[4:], micro_batch=1)
    assert (n, na, nb) == (6, 4, 2)
    assert a + b == pytest.approx(whole, abs=1e-5)
    assert whole == pytest.approx(float(reference_rewards(model, ids, mask).double().sum()), abs=1e-5)


def test_micro_batch_size_does_not_change_the_sum(model):
    ids, mask = right_padded(6, 40, seed=6)
    sums = [fitness_sums(model, ids, mask, micro_batch=k)[0] for k in (1, 2, 4, 16)]
    assert max(sums) - min(sums) < 1e-5
