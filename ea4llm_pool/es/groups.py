"""Parameter groups of paper Eq. 13–14: emb, attn, mlp, ln, head.

Names are matched by pattern so Qwen3, Llama, Mistral and GPT-2 style models all map. A norm inside
attention (Qwen3's q_norm/k_norm) counts as ``ln``: it is a normalisation gain, and ln is where the
paper puts those. With tied embeddings the shared tensor is registered once, under its input
embedding name, so the **emb** multipliers win for the tied head (the ``head`` multipliers then
apply to nothing). Anything unmatched counts as ``mlp``.
"""

from __future__ import annotations

import re

GROUPS = ("emb", "attn", "mlp", "ln", "head")

_RULES = (
    ("ln", re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln_f|ln\d*)\.")),
    ("emb", re.compile(r"(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|embeddings)\.")),
    ("head", re.compile(r"(^|\.)(lm_head|output|head)\.")),
    ("attn", re.compile(r"(self_attn|attention|attn)\.")),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|fc\d?)\.")),
)


def group_of(name: str) -> str:
    for group, pattern in _RULES:
        if pattern.search(name):
            return group
    return "mlp"
