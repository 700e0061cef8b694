"""Fitness plugin ``token-accuracy``: the fraction of next tokens the model's argmax gets right.

R(x; θ) = (1/Σ_t m_t) Σ_t m_t · [argmax z_t = x_{t+1}], with the same mask m_t as the log-prob
fitness (both position t and its target real tokens). It has no gradient anywhere (a step
function of the weights), which is what ES can optimise and backpropagation cannot.

Registered in the project's own ``pyproject.toml`` (entry-point group ``ea4llm_pool.fitness``), as a
worked example of a plugin; docs/fitness-plugins.md shows how a separate package registers one.
"""

from __future__ import annotations

import torch

from .fitness import LOGIT_SLICE_TOKENS, _hidden_and_head


@torch.no_grad()
def token_accuracy(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample next-token accuracy in [0, 1] (fp32, shape [B])."""
    target = ids[:, 1:]
    m = (mask[:, :-1] * mask[:, 1:]).to(torch.float32)
    h, head = _hidden_and_head(model, ids, mask)
    if h is None:  # models whose head is not a plain projection of the last hidden state
        pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(dim=-1)
    else:
        # The head runs over slices of positions, as in the log-prob fitness: a 150k-vocabulary
        # model's full [batch, length, vocab] logits never exist at once.
        h = h[:, :-1]
        b, t, d = h.shape
        flat_h = h.reshape(b * t, d)
        pred = torch.empty(b * t, dtype=torch.long, device=h.device)
        for s in range(0, b * t, LOGIT_SLICE_TOKENS):
            pred[s: s + LOGIT_SLICE_TOKENS] = head(flat_h[s: s + LOGIT_SLICE_TOKENS]).argmax(dim=-1)
        pred = pred.view(b, t)
    hit = (pred == target).to(torch.float32)
    return (hit * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
