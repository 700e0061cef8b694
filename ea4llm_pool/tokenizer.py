"""Tokenizer: a Hugging Face one by name, or a byte-level BPE trained offline on the corpus.

The trained tokenizer is part of the run's identity (it decides every sample's token ids), so
training must be reproducible byte for byte; it is saved with the run via ``save_pretrained``
and loads back with ``AutoTokenizer.from_pretrained``.

    tok = load_tokenizer(cfg, texts)     # ~0.1 s for the default pydoc corpus at vocab 1024
    tok.save_pretrained(run_dir)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from . import UserError
from .config import Config

# One special token serves as end of text, beginning of text and padding (GPT-2/Qwen style);
# padding is always masked out, so sharing the id with eos costs nothing.
EOS = "<|endoftext|>"


@contextmanager
def _sequential_tokenizers() -> Iterator[None]:
    # The BPE trainer's counts are exact integer sums, and measured identical for 1..64 rayon
    # threads; training sequentially anyway removes any reduction order that could vary, costs
    # ~0.1 s, and keeps the "parallelism used before fork" warning out of forked workers.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``vocab_size`` tokens (256 bytes + EOS + merges) trained on ``texts``.

    Byte-level: every string encodes, no unknown token, and decode(encode(s)) == s.
    """
    if vocab_size < 257:
        raise UserError(f"tokenizer.vocab_size must be at least 257 (256 bytes + {EOS}), got {vocab_size}")
    if not any(t.strip() for t in texts):
        raise UserError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    with _sequential_tokenizers():
        tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=None)


def _ensure_pad(tok: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    # Padding positions are masked, so any existing token will do; adding a new token would
    # change the vocabulary size and break a pretrained model's embedding.
    if tok.pad_token is None:
        for candidate in (tok.eos_token, tok.unk_token, tok.sep_token):
            if candidate is not None:
                tok.pad_token = candidate
                break
        else:
            raise UserError(f"tokenizer '{name}' has no pad, eos, unk or sep token to pad with")
    return tok


def load_tokenizer(cfg: Config, texts_for_training: list[str]) -> PreTrainedTokenizerBase:
    """The run's tokenizer: ``cfg.tokenizer.name_or_path`` via AutoTokenizer, else train_bpe."""
    name = cfg.tokenizer.name_or_path
    if not name:
        return train_bpe(texts_for_training, cfg.tokenizer.vocab_size)
    p = Path(name).expanduser()
    if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"tokenizer directory not found: {name}")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # OSError, ValueError, HTTP errors...: summarise in one line
        lines = str(err).strip().splitlines()
        line = (lines[0] if lines else type(err).__name__)[:200]
        raise UserError(f"cannot load tokenizer '{name}': {line}") from None
    return _ensure_pad(tok, name)
