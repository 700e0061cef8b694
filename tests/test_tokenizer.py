"""Specification of ea4llm_pool.tokenizer: reproducible offline BPE that loads back through HF."""

import hashlib
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ea4llm_pool import UserError
from ea4llm_pool.config import load
from ea4llm_pool.data import load_texts
from ea4llm_pool.tokenizer import EOS, load_tokenizer, train_bpe

SAMPLE = "def f(x):\n    return x ** 2  # naïve — 😀 café\n"


@pytest.fixture(scope="module")
def texts():
    return load_texts(load(overrides=["data.max_lines=3000"]))


@pytest.fixture(scope="module")
def tok(texts):
    return train_bpe(texts, 512)


def tokenizer_json_sha(tok, directory):
    tok.save_pretrained(directory)
    return hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()


def test_trained_bpe_has_the_requested_vocabulary_and_one_special_token(tok):
    assert len(tok) == 512
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS
    assert tok.eos_token_id == tok.pad_token_id == 0
    assert tok("x = 1", add_special_tokens=True)["input_ids"] == tok("x = 1", add_special_tokens=False)["input_ids"]


def test_byte_level_encoding_is_lossless_for_any_unicode(tok):
    ids = tok(SAMPLE)["input_ids"]
    assert tok.decode(ids) == SAMPLE


def test_same_texts_give_a_byte_identical_tokenizer_json(texts, tok, tmp_path):
    again = train_bpe(list(texts), 512)
    assert tokenizer_json_sha(tok, tmp_path / "a") == tokenizer_json_sha(again, tmp_path / "b")


def test_training_is_identical_in_another_process_with_another_thread_count(texts, tok):
    # A fresh process has fresh hash-map seeds; RAYON_NUM_THREADS changes any parallel split.
    script = ("import sys; from ea4llm_pool.config import load; from ea4llm_pool.data import load_texts;"
              "from ea4llm_pool.tokenizer import train_bpe;"
              "sys.stdout.write(train_bpe(load_texts(load(overrides=['data.max_lines=3000'])), 512)"
              ".backend_tokenizer.to_str())")
    env = dict(os.environ, RAYON_NUM_THREADS="5")
    env.pop("TOKENIZERS_PARALLELISM", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == tok.backend_tokenizer.to_str()


def test_training_leaves_tokenizers_parallelism_setting_as_it_was(texts, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    train_bpe(texts[:50], 300)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


def test_save_pretrained_round_trips_through_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert len(back) == len(tok)
    assert (back.eos_token_id, back.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert back(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]


def test_load_tokenizer_trains_by_default_and_loads_a_directory_when_named(texts, tok, tmp_path):
    cfg = load(overrides=["tokenizer.vocab_size=512"])
    assert load_tokenizer(cfg, texts).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    tok.save_pretrained(tmp_path)
    named = load_tokenizer(load(overrides=[f"tokenizer.name_or_path={tmp_path}"]), [])
    assert named(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]


def test_a_named_tokenizer_without_pad_pads_with_eos(tmp_path):
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=base, eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(load(overrides=[f"tokenizer.name_or_path={tmp_path}"]), [])
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id


def test_an_empty_corpus_cannot_train_a_tokenizer():
    with pytest.raises(UserError, match="empty corpus"):
        train_bpe(["", "  "], 512)


def test_a_missing_tokenizer_directory_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer directory not found"):
        load_tokenizer(load(overrides=[f"tokenizer.name_or_path={tmp_path}/nope"]), [])


def test_an_unknown_hub_tokenizer_offline_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(UserError, match="cannot load tokenizer 'no-such-org/no-such-tok'") as err:
        load_tokenizer(load(overrides=["tokenizer.name_or_path=no-such-org/no-such-tok"]), [])
    assert "\n" not in str(err.value)
