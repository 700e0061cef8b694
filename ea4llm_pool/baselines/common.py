"""What the baselines share with ES: the loss, the batches, the held-out loss, the memory probe."""

from __future__ import annotations

import resource
import sys

import torch

from ..data import SampleSet, subset_indices
from ..es.fitness import fitness_sums


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−F on a batch, differentiable: the mean over samples of each sample's mean next-token NLL
    over positions with m_t = mask_t·mask_{t+1} (paper Eq. 2–3, exactly the ES fitness negated)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = (mask[:, :-1] * mask[:, 1:]).to(torch.float32)
    per_sample = (lp * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return -per_sample.mean()


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, mask: torch.Tensor, micro_batch: int) -> float:
    """−F with the ES fitness code itself (what ``Run.heldout_loss`` computes)."""
    s, c = fitness_sums(model, ids, mask, micro_batch)
    return -s / c


def batch_at(train: SampleSet, batch: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: drawn by the same function as ES's data subset D_t."""
    return train.batch(subset_indices(len(train), batch, seed, step))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (tracemalloc does not see torch's allocations)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB
