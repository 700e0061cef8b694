"""Building a member's working copy: w = cast(master + s·ε), tensor by tensor, chunk by chunk.

The noise is multiplied by the scale and added to the master in separate kernels (no fused
multiply-add, whose last bit differs between CPUs and GPUs), and the result is written into the
model's own parameter storage in the evaluation dtype. The master is only read, so evaluating any
number of members leaves it bit-identical — nothing is ever "restored" by subtraction.
"""

from __future__ import annotations

import struct

import torch

from .noise import NoiseSource
from .state import MasterState


def fp32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (so every device multiplies by the same number)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def write_center(state: MasterState, working: dict[str, torch.Tensor]) -> None:
    for p in state.params:
        working[p.name].view(-1).copy_(p.flat)


def write_member(state: MasterState, working: dict[str, torch.Tensor], noise: NoiseSource,
                 seed: int, sign: int, sigma: float, group_sigma: dict[str, float]) -> None:
    # A compiled source hands back its kernel's own ε (exact table values); the scaling and the add
    # below stay separate eager kernels either way (see kernels.py on fused multiply-adds).
    buf = None if noise.compiled else torch.empty(noise.chunk, dtype=torch.float32, device=noise.device)
    for p in state.params:
        dst = working[p.name].view(-1)
        s = fp32(sign * sigma * group_sigma[p.group])
        if s == 0.0:
            dst.copy_(p.flat)
            continue
        n = p.flat.numel()
        for off in range(0, n, noise.chunk):
            k = min(noise.chunk, n - off)
            e = noise.eps(seed, p.tid, off, k, out=None if buf is None else buf[:k])
            e.mul_(s)
            e.add_(p.flat[off: off + k])
            dst[off: off + k].copy_(e)
