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
"""Eager chunk (the eager sum keeps a few int64 temporaries of this size). The compiled kernel
keeps none and sums a whole tensor in one call unless given a chunk."""
COMPILED_MIN = 1 << 16
"""``state_hash(compiled=True)`` sums tensors above this size with the compiled kernel."""


def tensor_sum(flat: torch.Tensor, chunk: int | None = None, compiled: bool = False) -> int:
    """Wrapping int64 sum over elements of mix(index + 1, fp32 bits); eager or compiled
    (``kernels.state_sum``, integer-only, same value)."""
    bits = flat.view(torch.int32)
    n = bits.numel()
    chunk = chunk or (max(n, 1) if compiled else HASH_CHUNK)
    total = 0
    for off in range(0, n, chunk):
        k = min(chunk, n - off)
        if compiled and k >= 2:          # size 1 would be a separate compiled graph; eager is cheap
            from . import kernels

            total = (total + kernels.state_sum(bits[off: off + k], off)) & ((1 << 64) - 1)
            continue
        z = torch.arange(off + 1, off + k + 1, dtype=torch.int64, device=flat.device)
        z.mul_(_signed(_GOLDEN))
        z.add_(bits[off: off + k].to(torch.int64))
        t = torch.bitwise_right_shift(z, 29).bitwise_and_((1 << 35) - 1)
        z.bitwise_xor_(t).mul_(_signed(_C1))
        t = torch.bitwise_right_shift(z, 32).bitwise_and_((1 << 32) - 1)
        z.bitwise_xor_(t)
        total = (total + int(z.sum().item())) & ((1 << 64) - 1)
    return total


def state_hash(state: MasterState, compiled: bool = False) -> str:
    """Hash of the master (and Adam moments) and the step counter. ``compiled`` sums the large
    tensors with the compiled kernel (same value); small ones stay eager, where a kernel call
    would cost more than the arithmetic."""
    h = hashlib.sha256()
    h.update(f"step={state.step};iter={state.iteration};".encode())
    for name, t in sorted(state.tensors().items()):
        s = tensor_sum(t, compiled=compiled and t.numel() > COMPILED_MIN)
        h.update(f"{name}:{t.numel()}:{s:016x};".encode())
    return h.hexdigest()[:32]
