"""The ES update (paper Eq. 8–9, 13–14), applied identically by every replica.

    θ_g ← θ_g + (α·α_g / s) · (1/N) · Σ_j w_j ε_j,g            (optimizer "sgd", the paper's rule)

Σ_j w_j ε_j is accumulated **in int64** as Σ_j W_j·Q_j (W: integer shaping weights, Q: fixed-point
noise), which is exact and independent of summation order, thread count and device. Only then is
it converted to fp32 (one conversion), multiplied by the group's fp32 scale (one kernel) and added
to the master (one kernel). A fused multiply-add or a float reduction here would make replicas on
different hardware drift apart by the last bit, and then further with every iteration.

With optimizer "adam", ĝ = scale·acc feeds Adam (Kingma & Ba) moment updates, each elementwise op
its own kernel with fp32 scalars fixed by the coordinator, so they are also bit-identical.

This one function serves live training, log replay and resync.
"""

from __future__ import annotations

import torch

from .noise import NoiseSource
from .state import MasterState


def apply_commit(state: MasterState, commit: dict, noise: NoiseSource) -> None:
    seeds = [int(s) for s in commit["seeds"]]
    weights = [int(w) for w in commit["weights"]]
    scales = commit["scales"]
    adam = commit.get("adam")
    if (adam is not None) != (state.optimizer == "adam"):
        raise ValueError("commit optimizer does not match the replica's optimizer state")
    terms = [(s, w) for s, w in zip(seeds, weights) if w != 0]
    chunk = noise.chunk
    dev = noise.device
    acc = torch.empty(chunk, dtype=torch.int64, device=dev)
    q = torch.empty(chunk, dtype=torch.int32, device=dev)
    q64 = torch.empty(chunk, dtype=torch.int64, device=dev)
    g = torch.empty(chunk, dtype=torch.float32, device=dev)
    tmp = torch.empty(chunk, dtype=torch.float32, device=dev)
    for p in state.params:
        scale = float(scales[p.group])
        if scale == 0.0:
            continue
        n = p.flat.numel()
        for off in range(0, n, chunk):
            k = min(chunk, n - off)
            a, qq, qw, gg, tt = acc[:k], q[:k], q64[:k], g[:k], tmp[:k]
            a.zero_()
            for seed, w in terms:
                noise.q(seed, p.tid, off, k, out=qq)
                qw.copy_(qq)
                qw.mul_(w)
                a.add_(qw)
            gg.copy_(a)              # int64 → fp32, one rounding
            gg.mul_(scale)           # ĝ (sgd: the whole step) in parameter units
            theta = p.flat[off: off + k]
            if adam is None:
                theta.add_(gg)
                continue
            m = state.adam_m[p.name][off: off + k]
            v = state.adam_v[p.name][off: off + k]
            m.mul_(adam["beta1"])
            torch.mul(gg, adam["one_minus_beta1"], out=tt)
            m.add_(tt)
            v.mul_(adam["beta2"])
            torch.mul(gg, gg, out=tt)
            tt.mul_(adam["one_minus_beta2"])
            v.add_(tt)
            torch.mul(v, adam["inv_bc2"], out=tt)      # v̂
            tt.sqrt_()
            tt.add_(adam["eps"])
            torch.mul(m, adam["lr_over_bc1"][p.group], out=gg)   # lr_g · m̂
            gg.div_(tt)
            theta.add_(gg)
    state.step += 1
    state.iteration = int(commit["iteration"])
