"""Fitness (paper Eq. 2–3): the mean log-probability of each true next token, masked.

R(x; θ) = (1/Σ_t m_t) Σ_t m_t · log softmax(z_t)[x_{t+1}], with m_t = 1 when both position t
and its target t+1 are real tokens. A work unit returns Σ R over its samples and the sample count,
so a member's subset can be split across workers and recombined exactly (F = ΣR / count).

The log-softmax runs in fp32 over slices of positions, so the full [batch, length, vocab] logits
tensor of a 150k-vocabulary model never exists at once.

``sample_rewards`` is the built-in fitness "logprob"; ``fitness_sums`` takes any function of the same
signature (a fitness plugin, see ``ea4llm_pool/fitness_plugins.py``).
"""

from __future__ import annotations

import torch

LOGIT_SLICE_TOKENS = 4096  # positions per slice of the output head


def _hidden_and_head(model, ids: torch.Tensor, mask: torch.Tensor):
    decoder = getattr(model, "get_decoder", None)
    head = getattr(model, "get_output_embeddings", None)
    if decoder is not None and head is not None:
        try:
            dec, out = decoder(), head()
        except (AttributeError, NotImplementedError):
            dec = out = None
        if dec is not None and out is not None and dec is not model:
            h = dec(input_ids=ids, attention_mask=mask).last_hidden_state
            return h, out
    return None, None


@torch.no_grad()
def sample_rewards(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample R (fp32, shape [B]) for a batch of token ids and attention mask."""
    target = ids[:, 1:]
    m = (mask[:, :-1] * mask[:, 1:]).to(torch.float32)
    h, head = _hidden_and_head(model, ids, mask)
    if h is None:  # models whose head is not a plain projection of the last hidden state
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    else:
        h = h[:, :-1]
        b, t, d = h.shape
        flat_h = h.reshape(b * t, d)
        flat_y = target.reshape(b * t)
        lp = torch.empty(b * t, dtype=torch.float32, device=h.device)
        for s in range(0, b * t, LOGIT_SLICE_TOKENS):
            z = head(flat_h[s: s + LOGIT_SLICE_TOKENS]).float()
            lse = torch.logsumexp(z, dim=-1)
            lp[s: s + LOGIT_SLICE_TOKENS] = z.gather(-1, flat_y[s: s + LOGIT_SLICE_TOKENS, None]).squeeze(-1) - lse
        lp = lp.view(b, t)
    denom = m.sum(dim=1).clamp_min(1.0)
    return (lp * m).sum(dim=1) / denom


def fitness_sums(model, ids: torch.Tensor, mask: torch.Tensor, micro_batch: int,
                 rewards=sample_rewards) -> tuple[float, int]:
    """(Σ R, number of samples) over all rows of ``ids``, in micro-batches; ``rewards(model, ids,
    mask)`` gives R per sample (default: the log-prob fitness)."""
    total = 0.0
    for s in range(0, ids.shape[0], micro_batch):
        mb_ids, mb_mask = ids[s: s + micro_batch], mask[s: s + micro_batch]
        # Right padding past this micro-batch's longest sample is never scored: skip its width.
        real = mb_mask.any(dim=0).nonzero()
        if real.numel():
            width = int(real[-1]) + 1
            mb_ids, mb_mask = mb_ids[:, :width], mb_mask[:, :width]
        r = rewards(model, mb_ids, mb_mask)
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (mb_ids.shape[0],):
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"fitness function {getattr(rewards, '__name__', rewards)!r} returned {got}, "
                             f"expected a tensor of shape ({mb_ids.shape[0]},): one reward per sample")
        total += float(r.double().sum().item())
    return total, int(ids.shape[0])
