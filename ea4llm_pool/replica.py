"""A replica: the model's working copy, the fp32 master, the noise source and the data.

Workers evaluate members on a replica and apply every commit to it; the coordinator keeps one too
(for held-out evaluation and checkpoints). All replicas of a run hold bit-identical masters.

Members are scored with the run's fitness (``es.fitness``: the built-in log-prob or an installed
plugin, ``fitness_plugins.py``); the held-out loss is always the log-prob loss, so runs with
different fitness functions stay comparable.
"""

from __future__ import annotations

import torch

from .es.fitness import fitness_sums
from .es.kernels import resolve as resolve_compile
from .es.noise import NoiseSource
from .es.perturb import write_center, write_member
from .es.state import MasterState
from .es.statehash import state_hash
from .es.update import apply_commit
from .fitness_plugins import load as load_fitness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    from . import UserError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{device}' (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device '{device}' does not exist (this machine has {torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but MPS is not available on this machine")
    return dev


class Replica:
    def __init__(self, model: torch.nn.Module, es, device: str | torch.device = "cpu", dtype: str = "fp32",
                 chunk: int = 0, compile: str = "off", say=print):
        """``chunk``: noise/update chunk in elements (0: the device's default); ``compile``: "auto",
        "on" or "off" for the compiled integer kernels (``es/kernels.py``)."""
        self.es = es
        # Resolved before any weights are touched: a missing plugin is a one-line error, not a
        # failure on the first lease.
        self.rewards = load_fitness(es.fitness)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        model.requires_grad_(False)
        # The master is taken from the fp32 weights *before* the model is cast to the eval dtype.
        self.master = MasterState.from_named(model.named_parameters(), es.optimizer, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.working = {n: p.data for n, p in self.model.named_parameters()}
        if set(self.working) != {p.name for p in self.master.params}:
            raise RuntimeError("model parameters changed while building the replica")
        self.compiled = resolve_compile(compile, self.master.numel(), self.device, say=say)
        self.noise = NoiseSource(es.noise, self.device, chunk=chunk, compiled=self.compiled)
        self.group_sigma = es.group_sigma.as_dict()
        self._center_fresh = False

    # -- evaluation -------------------------------------------------------------------------------
    def _to_device(self, ids: torch.Tensor, mask: torch.Tensor):
        return ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

    def evaluate_member(self, seed: int, sign: int, sigma: float, ids: torch.Tensor, mask: torch.Tensor,
                        micro_batch: int) -> tuple[float, int]:
        """Σ R (the run's fitness) and sample count of member (seed, sign) on the given samples."""
        write_member(self.master, self.working, self.noise, seed, sign, sigma, self.group_sigma)
        self._center_fresh = False
        ids, mask = self._to_device(ids, mask)
        return fitness_sums(self.model, ids, mask, micro_batch, self.rewards)

    def evaluate_center(self, ids: torch.Tensor, mask: torch.Tensor, micro_batch: int) -> tuple[float, int]:
        """Σ R (always the log-prob fitness) and count of the unperturbed master: the held-out loss."""
        if not self._center_fresh:
            write_center(self.master, self.working)
            self._center_fresh = True
        ids, mask = self._to_device(ids, mask)
        return fitness_sums(self.model, ids, mask, micro_batch)

    # -- state ----------------------------------------------------------------------------------
    def apply(self, commit: dict) -> None:
        apply_commit(self.master, commit, self.noise)
        self._center_fresh = False

    def state_hash(self) -> str:
        return state_hash(self.master, compiled=self.compiled)

    def use_eager(self) -> None:
        """Fall back to the eager kernels (same bits, slower)."""
        self.compiled = False
        self.noise = NoiseSource(self.es.noise, self.device, chunk=self.noise.chunk, compiled=False)

    @property
    def iteration(self) -> int:
        return self.master.iteration

    def master_tensors_cpu(self) -> dict[str, torch.Tensor]:
        """Master weights reshaped to the model's shapes, on the CPU (for checkpoints)."""
        return {p.name: p.flat.detach().cpu().view(p.shape) for p in self.master.params}
