"""Specification of ea4llm_pool.model: presets, deterministic init, HF round trip, clear errors."""

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM

from ea4llm_pool import UserError
from ea4llm_pool.config import load
from ea4llm_pool.model import (PRESETS, build_model, check_seq_len, count_parameters, max_positions,
                               preset_config, vocab_note)


def cfg_with(*overrides):
    return load(overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny():
    return build_model(cfg_with(), vocab_size=1024, pad_token_id=0)


@pytest.fixture
def offline(monkeypatch):
    # Without this, an unknown hub name retries the network for about a minute before failing.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_tiny_preset_has_about_230k_parameters(tiny):
    assert count_parameters(tiny) == 231_968


def test_small_preset_has_a_few_million_parameters():
    model = build_model(cfg_with("model.preset=small"), vocab_size=1024, pad_token_id=0)
    assert count_parameters(model) == 3_410_688


def meta_parameters(config) -> int:
    with torch.device("meta"):  # shapes only: no multi-GB allocation
        return count_parameters(AutoModelForCausalLM.from_config(config))


def test_paper_1b_preset_is_the_papers_appendix_a4_and_has_837m_parameters_at_its_vocab():
    c = preset_config(cfg_with("model.preset=paper-1b"), vocab_size=151_936, pad_token_id=0)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (151_936, 1536, 4096, 24)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (12, 4, 128)
    assert c.max_position_embeddings == 32_768 and c.attention_bias is False
    assert c.tie_word_embeddings and c.use_cache is False and c.attention_dropout == 0.0
    assert PRESETS["paper-1b"]["vocab_size"] == 151_936
    assert meta_parameters(c) == 837_434_880


def test_paper_1b_with_a_small_tokenizer_drops_the_232m_embedding_rows_it_could_never_use():
    c = preset_config(cfg_with("model.preset=paper-1b"), vocab_size=1024, pad_token_id=0)
    assert c.vocab_size == 1024 and c.hidden_size == 1536 and c.num_hidden_layers == 24
    assert meta_parameters(c) == 837_434_880 - (151_936 - 1024) * 1536 == 605_634_048


def test_every_preset_is_cache_free_dropout_free_and_tied():
    for kwargs in PRESETS.values():
        assert kwargs["use_cache"] is False and kwargs["attention_dropout"] == 0.0
        assert kwargs["tie_word_embeddings"] is True


def test_a_preset_takes_its_vocabulary_from_the_tokenizer():
    assert preset_config(cfg_with(), vocab_size=4000, pad_token_id=0).vocab_size == 4000
    # smaller or larger than the table paper-1b names: the tokenizer decides either way
    assert preset_config(cfg_with("model.preset=paper-1b"), 151_669, 0).vocab_size == 151_669
    assert preset_config(cfg_with("model.preset=paper-1b"), 160_000, 0).vocab_size == 160_000


def test_a_built_preset_model_embeds_exactly_the_tokenizers_vocabulary():
    # small layers so a real model is cheap; the preset still names its own 151,936-row table
    cfg = cfg_with("model.preset=paper-1b", "model.hidden_size=32", "model.intermediate_size=64",
                   "model.num_hidden_layers=1", "model.head_dim=8")
    model = build_model(cfg, vocab_size=300, pad_token_id=0)
    assert model.model.embed_tokens.weight.shape == (300, 32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size == 300


def test_the_vocab_note_says_what_a_larger_preset_table_would_have_cost():
    paper = cfg_with("model.preset=paper-1b")
    assert vocab_note(paper, 1024, 1024) == ("vocab 1,024 (sized to the tokenizer; the paper-1b preset's "
                                             "151,936 would add 232M unused parameters)")
    assert vocab_note(paper, 151_669, 151_669).endswith("151,936 would add 410k unused parameters)")
    untied = cfg_with("model.preset=paper-1b", "model.tie_word_embeddings=false", "model.hidden_size=8")
    assert vocab_note(untied, 151_935, 151_935).endswith("would add 16 unused parameters)")  # embedding + head
    assert vocab_note(paper, 160_000, 160_000) == "vocab 160,000 (sized to the tokenizer)"
    assert vocab_note(cfg_with(), 1024, 1024) == "vocab 1,024 (sized to the tokenizer)"


def test_a_pretrained_model_keeps_its_own_vocabulary(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    cfg = cfg_with(f"model.name_or_path={tmp_path}")
    assert build_model(cfg, vocab_size=600, pad_token_id=0).config.vocab_size == 1024
    assert vocab_note(cfg, 1024, 600) == "vocab 1,024 (the model's own; the tokenizer uses 600)"
    assert vocab_note(cfg, 1024, 1024) == "vocab 1,024 (the model's own)"


def test_the_built_model_is_fp32_frozen_in_eval_mode_with_tied_embeddings(tiny):
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in tiny.parameters())
    assert not tiny.training
    assert tiny.lm_head.weight is tiny.model.embed_tokens.weight
    assert tiny.config._attn_implementation == "sdpa"
    assert tiny.config.pad_token_id == 0


def test_init_is_a_pure_function_of_init_seed_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_model(cfg_with(), vocab_size=1024, pad_token_id=0)
    assert torch.equal(torch.rand(3), expected_next)
    for (name, a), b in zip(tiny.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    other = build_model(cfg_with("model.init_seed=1"), vocab_size=1024, pad_token_id=0)
    assert not torch.equal(other.model.embed_tokens.weight, tiny.model.embed_tokens.weight)


def test_overrides_replace_preset_fields():
    cfg = cfg_with("model.num_hidden_layers=1", "model.intermediate_size=32", "model.tie_word_embeddings=false")
    model = build_model(cfg, vocab_size=512, pad_token_id=0)
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 32
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert count_parameters(model) == 2 * 512 * 64 + (12_288 + 160 + 3 * 64 * 32) + 64


def test_bad_head_grouping_is_a_user_error():
    with pytest.raises(UserError, match="multiple of num_key_value_heads"):
        build_model(cfg_with("model.num_key_value_heads=3"), vocab_size=1024, pad_token_id=0)


def test_save_pretrained_round_trips_through_auto_model(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.arange(32).reshape(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, tiny(input_ids=ids).logits)
    # build_model loads the directory frozen and fp32 ...
    via_cfg = build_model(cfg_with(f"model.name_or_path={tmp_path}"), vocab_size=1024, pad_token_id=0)
    assert not via_cfg.training and not any(p.requires_grad for p in via_cfg.parameters())
    assert torch.equal(via_cfg.model.embed_tokens.weight, tiny.model.embed_tokens.weight)
    # ... and from_scratch re-initialises its config with init_seed: the same weights as the preset
    scratch = build_model(cfg_with(f"model.name_or_path={tmp_path}", "model.from_scratch=true"), 1024, 0)
    for (name, a), b in zip(tiny.state_dict().items(), scratch.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_tokenizer_larger_than_a_pretrained_embedding_is_a_user_error(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="tokenizer has 2000 tokens but model .* embeds only 1024"):
        build_model(cfg_with(f"model.name_or_path={tmp_path}"), vocab_size=2000, pad_token_id=0)


def test_seq_len_beyond_the_position_table_is_a_user_error(tiny):
    assert max_positions(tiny) == 2048
    check_seq_len(tiny, 2048)
    with pytest.raises(UserError, match="data.seq_len 4096 exceeds the model's maximum of 2048 positions"):
        check_seq_len(tiny, 4096)


def test_a_missing_model_directory_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="model directory not found") as err:
        build_model(cfg_with(f"model.name_or_path={tmp_path}/nope"), 1024, 0)
    assert "\n" not in str(err.value)


def test_a_directory_without_a_model_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load model config") as err:
        build_model(cfg_with(f"model.name_or_path={tmp_path}"), 1024, 0)
    assert "\n" not in str(err.value)


def test_an_unknown_hub_model_offline_is_a_one_line_user_error(offline):
    with pytest.raises(UserError, match="cannot load model config 'no-such-org/no-such-model'") as err:
        build_model(cfg_with("model.name_or_path=no-such-org/no-such-model"), 1024, 0)
    assert "\n" not in str(err.value)
