"""MeZO-style zeroth-order SGD (Malladi et al. 2023, Algorithm 1).

Each step draws one seed s, and with z ~ N(0, I) generated from s:

    θ ← θ + εz;  L₊ = L(θ);  θ ← θ − 2εz;  L₋ = L(θ);  θ ← θ + εz      (in place)
    g = (L₊ − L₋) / (2ε);  θ ← θ − lr·g·z                                  (z regenerated from s)

z is never stored: every pass regenerates it tensor by tensor from s, so the memory is that of
inference plus one tensor's worth of noise. The price is that θ is restored by arithmetic, not
copied back: θ + εz − 2εz + εz differs from θ by a few fp32 roundings (tests/test_baselines.py
measures the bound).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .common import eval_loss

FORWARDS_PER_STEP = 2


def step_seed(run_seed: int, step: int) -> int:
    return int(np.random.SeedSequence([run_seed, step, 0x4D655A4F]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def perturb(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """θ ← θ + scale·z for z regenerated from ``seed`` (same z for the same seed, tensor by tensor)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in params:
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.add_(z.to(device=p.device, dtype=p.dtype), alpha=scale)


@torch.no_grad()
def mezo_step(params: Sequence[torch.Tensor], loss_fn: Callable[[], float], seed: int, eps: float,
              lr: float) -> tuple[float, float, float]:
    """One two-point step; returns (projected gradient g, L₊, L₋)."""
    perturb(params, seed, eps)
    loss_plus = loss_fn()
    perturb(params, seed, -2.0 * eps)
    loss_minus = loss_fn()
    perturb(params, seed, eps)
    g = (loss_plus - loss_minus) / (2.0 * eps)
    perturb(params, seed, -lr * g)
    return g, loss_plus, loss_minus


class MeZOTrainer:
    def __init__(self, model, lr: float, eps: float = 1e-3, seed: int = 0, micro_batch: int = 16):
        self.model = model.requires_grad_(False)
        self.params = list(model.parameters())  # deduplicated: a tied embedding is perturbed once
        self.lr, self.eps, self.seed, self.micro_batch = lr, eps, seed, micro_batch
        self.t = 0

    def step(self, ids: torch.Tensor, mask: torch.Tensor) -> float:
        _, lp, lm = mezo_step(self.params, lambda: eval_loss(self.model, ids, mask, self.micro_batch),
                              step_seed(self.seed, self.t), self.eps, self.lr)
        self.t += 1
        return 0.5 * (lp + lm)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.t = int(state["t"])
