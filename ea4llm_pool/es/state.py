"""The fp32 master weights (and optimizer state) that every replica keeps bit-identical.

Why fp32 masters on every worker, even one that evaluates in bf16: a bf16 master rounds about a third
of a typical ES update to zero, and restoring bf16 weights by subtracting the noise drifts by about
as much as one update. The master is never perturbed in place; members are evaluated on a separate
working copy rebuilt from it (``perturb.write_member``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from .groups import group_of
from .noise import tensor_id


@dataclass
class Param:
    name: str
    tid: int
    group: str
    shape: tuple[int, ...]
    flat: torch.Tensor  # fp32, contiguous, 1-D


@dataclass
class MasterState:
    params: list[Param]
    optimizer: str = "sgd"
    adam_m: dict[str, torch.Tensor] = field(default_factory=dict)
    adam_v: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0            # commits applied
    iteration: int = -1      # iteration of the last commit applied (-1: initial weights)

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, torch.Tensor]], optimizer: str = "sgd",
                   device: str | torch.device = "cpu") -> "MasterState":
        params = []
        for name, t in sorted(named, key=lambda kv: kv[0]):
            flat = t.detach().to(device=device, dtype=torch.float32).reshape(-1).clone()
            params.append(Param(name, tensor_id(name), group_of(name), tuple(t.shape), flat))
        state = cls(params, optimizer)
        if optimizer == "adam":
            state.adam_m = {p.name: torch.zeros_like(p.flat) for p in params}
            state.adam_v = {p.name: torch.zeros_like(p.flat) for p in params}
        return state

    def numel(self) -> int:
        return sum(p.flat.numel() for p in self.params)

    def by_name(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the state hash covers, by name (optimizer moments prefixed)."""
        out = {p.name: p.flat for p in self.params}
        for n, t in self.adam_m.items():
            out["adam.m." + n] = t
        for n, t in self.adam_v.items():
            out["adam.v." + n] = t
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Overwrite master (and moments) from saved fp32 tensors, bit for bit."""
        for name, dst in self.tensors().items():
            if name not in tensors:
                raise KeyError(name)
            src = tensors[name].reshape(-1)
            if src.dtype != torch.float32 or src.numel() != dst.numel():
                raise ValueError(f"saved tensor {name} has the wrong dtype or size")
            dst.copy_(src)
