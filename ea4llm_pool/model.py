"""The causal LM that ES trains: a built-in Qwen3 preset, or any Hugging Face model.

ES never takes a gradient, so the model is built once in fp32, put in eval mode and frozen;
the ES core owns the fp32 master weights and writes perturbed copies into it.

    model = build_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    check_seq_len(model, cfg.data.seq_len)
    print(count_parameters(model))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

from . import UserError
from .config import Config

# Qwen3Config kwargs. vocab_size is filled in from the tokenizer (see preset_config).
# Every preset: no KV cache (each ES forward is a fresh full-sequence pass), no dropout
# (fitness must be a deterministic function of the weights), tied embeddings like the paper.
_COMMON: dict[str, Any] = dict(
    use_cache=False,
    attention_dropout=0.0,
    attention_bias=False,
    tie_word_embeddings=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # 231,968 parameters at vocab 1024: the size the measurements in docs/design.md §1 used;
    # one CPU thread evaluates a 16-window population member in milliseconds.
    "tiny": dict(_COMMON, hidden_size=64, intermediate_size=224, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=2048),
    # 3,410,688 parameters at vocab 1024: still CPU-friendly, enough depth to show layered multipliers.
    "small": dict(_COMMON, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=4096),
    # The paper's Appendix A.4 (837,434,880 parameters at its vocab of 151,936). vocab_size is
    # Qwen3's padded embedding; a built model is sized to the run's tokenizer instead (see
    # preset_config), so with the offline 1,024-token BPE it has 605,634,048 parameters.
    "paper-1b": dict(_COMMON, vocab_size=151_936, hidden_size=1536, intermediate_size=4096,
                     num_hidden_layers=24, num_attention_heads=12, num_key_value_heads=4,
                     head_dim=128, max_position_embeddings=32_768),
}

# ModelCfg fields that override the preset's Qwen3Config kwargs when not None.
_OVERRIDES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")


def _preset_kwargs(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    if m.preset is None:
        raise UserError("model: set model.preset or model.name_or_path")
    kwargs = dict(PRESETS[m.preset])
    kwargs.update({k: getattr(m, k) for k in _OVERRIDES if getattr(m, k) is not None})
    return kwargs


def preset_config(cfg: Config, vocab_size: int, pad_token_id: Optional[int]) -> Qwen3Config:
    """The Qwen3Config of ``cfg.model.preset`` with the non-None overrides of ``cfg.model`` applied
    and the vocabulary sized to the tokenizer's ``vocab_size``.

    Separate from build_model so a caller (or a test) can size a model, or build it on the meta
    device, without allocating its weights.
    """
    kwargs = _preset_kwargs(cfg)
    # Embedding rows past the tokenizer are never looked up, yet ES would perturb and update them
    # every iteration (232M of paper-1b's 837M with a 1,024-token BPE), so the tokenizer decides.
    kwargs["vocab_size"] = vocab_size
    if kwargs["num_attention_heads"] % kwargs["num_key_value_heads"]:
        raise UserError(f"model: num_attention_heads ({kwargs['num_attention_heads']}) must be a multiple "
                        f"of num_key_value_heads ({kwargs['num_key_value_heads']})")
    return Qwen3Config(pad_token_id=pad_token_id, **kwargs)


def _short_count(n: int) -> str:
    for div, unit in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= div:
            value = n / div
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def vocab_note(cfg: Config, model_vocab: int, tokenizer_vocab: int) -> str:
    """One banner phrase on where the model's vocabulary size comes from, e.g. "vocab 1,024 (sized
    to the tokenizer; the paper-1b preset's 151,936 would add 232M unused parameters)"."""
    m = cfg.model
    if m.name_or_path:
        extra = f"; the tokenizer uses {tokenizer_vocab:,}" if tokenizer_vocab < model_vocab else ""
        return f"vocab {model_vocab:,} (the model's own{extra})"
    kwargs = _preset_kwargs(cfg)
    named = kwargs.get("vocab_size")
    if named is None or named <= model_vocab:
        return f"vocab {model_vocab:,} (sized to the tokenizer)"
    unused = (named - model_vocab) * kwargs["hidden_size"] * (1 if kwargs["tie_word_embeddings"] else 2)
    return (f"vocab {model_vocab:,} (sized to the tokenizer; the {m.preset} preset's {named:,} "
            f"would add {_short_count(unused)} unused parameters)")


def _one_line(err: BaseException) -> str:
    """First line of an exception, short: HF errors run to paragraphs and tracebacks."""
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _check_local(name: str) -> None:
    # Something that is clearly a path should fail as "not found", not as a hub lookup that
    # retries for a minute offline.
    p = Path(name).expanduser()
    if not p.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"model directory not found: {name}")
    if p.exists() and not p.is_dir():
        raise UserError(f"model.name_or_path must be a directory or hub name, not a file: {name}")


def _frozen(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    return model.to(torch.float32).eval().requires_grad_(False)


def build_model(cfg: Config, vocab_size: int, pad_token_id: Optional[int]) -> transformers.PreTrainedModel:
    """Build (random init) or load the model of ``cfg.model``: fp32, eval mode, no gradients.

    A built model is a pure function of (config, init_seed): every worker that builds it starts
    from the same weights before any checkpoint or log replay is applied.
    """
    m = cfg.model
    if m.name_or_path:
        _check_local(m.name_or_path)
        try:
            hf_config = AutoConfig.from_pretrained(m.name_or_path)
        except Exception as err:  # hub/network/parse errors come in many types; summarise them
            raise UserError(f"cannot load model config '{m.name_or_path}': {_one_line(err)}") from None
        model_vocab = getattr(hf_config, "vocab_size", None)
        if model_vocab is not None and vocab_size > model_vocab:
            raise UserError(f"tokenizer has {vocab_size} tokens but model '{m.name_or_path}' "
                            f"embeds only {model_vocab}")
        if m.from_scratch:
            return _build(hf_config, m.init_seed)
        return _load(m.name_or_path)
    return _build(preset_config(cfg, vocab_size, pad_token_id), m.init_seed)


def _with_attention(make, what: str) -> transformers.PreTrainedModel:
    """Call ``make(attn_implementation)`` with SDPA, falling back to eager for architectures
    without SDPA support; any other failure becomes a one-line UserError."""
    try:
        return make("sdpa")
    except Exception as err:  # HF raises many types (OSError, ValueError, HTTP errors...)
        if "sdpa" not in str(err).lower():
            raise UserError(f"cannot {what}: {_one_line(err)}") from None
    try:
        return make("eager")
    except Exception as err:
        raise UserError(f"cannot {what}: {_one_line(err)}") from None


def _build(hf_config: transformers.PretrainedConfig, init_seed: int) -> transformers.PreTrainedModel:
    def make(attn: str) -> transformers.PreTrainedModel:
        # Seed right before construction (again on the eager retry), inside fork_rng so the
        # caller's global RNG stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn,
                                                    dtype=torch.float32)

    return _frozen(_with_attention(make, f"build a {hf_config.model_type} model"))


def _load(name: str) -> transformers.PreTrainedModel:
    return _frozen(_with_attention(
        lambda attn: AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn,
                                                          dtype=torch.float32),
        f"load model '{name}'"))


def max_positions(model: transformers.PreTrainedModel) -> int:
    """Longest sequence the model's position encoding is configured for."""
    c = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(c, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30  # no stated limit


def check_seq_len(model: transformers.PreTrainedModel, seq_len: int) -> None:
    limit = max_positions(model)
    if seq_len > limit:
        raise UserError(f"data.seq_len {seq_len} exceeds the model's maximum of {limit} positions")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable scalars; a tensor shared by two modules (tied embeddings) counts once.

    Deduplicates by Parameter identity, not data_ptr, so it also works on the meta device.
    """
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())
