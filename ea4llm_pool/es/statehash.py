"""State hash: a fingerprint of the master bits that no thread count or device can change.

Per tensor, each element's fp32 bit pattern is mixed with its index (so swapped elements change
the hash) and the mixes are summed in int64 with wraparound. Integer wraparound addition is
associative, so any reduction order — any thread count, CPU or GPU — gives the same sum. The
per-tensor sums are then combined with SHA-256 in name order, with the step counter.
"""

from __future__ import annotations

import hashlib

import torch

from .noise import _C1, _GOLDEN, _signed
from .state import MasterState

HASH_CHUNK = 1 << 20


def tensor_sum(flat: torch.Tensor, chunk: int = HASH_CHUNK) -> int:
    bits = flat.view(torch.int32)
    total = 0
    n = bits.numel()
    for off in range(0, n, chunk):
        k = min(chunk, n - off)
        z = torch.arange(off + 1, off + k + 1, dtype=torch.int64, device=flat.device)
        z.mul_(_signed(_GOLDEN))
        z.add_(bits[off: off + k].to(torch.int64))
        t = torch.bitwise_right_shift(z, 29).bitwise_and_((1 << 35) - 1)
        z.bitwise_xor_(t).mul_(_signed(_C1))
        t = torch.bitwise_right_shift(z, 32).bitwise_and_((1 << 32) - 1)
        z.bitwise_xor_(t)
        total = (total + int(z.sum().item())) & ((1 << 64) - 1)
    return total


def state_hash(state: MasterState) -> str:
    h = hashlib.sha256()
    h.update(f"step={state.step};iter={state.iteration};".encode())
    for name, t in sorted(state.tensors().items()):
        h.update(f"{name}:{t.numel()}:{tensor_sum(t):016x};".encode())
    return h.hexdigest()[:32]
