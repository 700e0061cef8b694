"""AdamW with backpropagation: the baseline a user would otherwise reach for."""

from __future__ import annotations

import torch

from .common import lm_loss

FORWARDS_PER_STEP = 3  # forward + backward (≈ 2 forwards) per token, the usual accounting


class AdamWTrainer:
    def __init__(self, model, lr: float, beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.01,
                 clip: float = 1.0):
        self.model = model.requires_grad_(True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
        self.clip = clip

    def step(self, ids: torch.Tensor, mask: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = lm_loss(self.model, ids, mask)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
