"""The ES update (paper Eq. 8–9, 13–14), applied identically by every replica.

    θ_g ← θ_g + (α·α_g / s) · (1/N) · Σ_j w_j ε_j,g            (optimizer "sgd", the paper's rule)

Σ_j w_j ε_j is accumulated **in int64** as Σ_j W_j·Q_j (W: integer shaping weights, Q: fixed-point
noise), which is exact and independent of summation order, thread count and device. Only then is
it converted to fp32 (one conversion), multiplied by the group's fp32 scale (one kernel) and added
to the master (one kernel). A fused multiply-add or a float reduction here would make replicas on
different hardware drift apart by the last bit, and then further with every iteration.

With optimizer "adam", ĝ = scale·acc feeds Adam (Kingma & Ba) moment updates, each elementwise op
its own kernel with fp32 scalars fixed by the coordinator, so they are also bit-identical.

A commit with ``decay`` (``es.weight_decay`` > 0) first applies decoupled weight decay, AdamW's form,
θ ← θ − c_g·θ with the group's fp32 constant c_g = α_t·α_g·λ: one multiply into a buffer, one
subtract, then the step. Decaying before the step, as AdamW does, takes c_g·θ from the weights the
members were evaluated at. Decay only touches groups that step (non-zero scale).

This one function serves live training, log replay and resync.
"""

from __future__ import annotations

import torch

from .noise import NoisePack, NoiseSource
from .state import MasterState


SMALL = 1 << 16
"""Tensors up to this many elements are updated together, end to end (see ``_packs``): for a
small model the per-tensor kernel launches, not the arithmetic, would dominate the update."""


def apply_commit(state: MasterState, commit: dict, noise: NoiseSource) -> None:
    seeds = [int(s) for s in commit["seeds"]]
    weights = [int(w) for w in commit["weights"]]
    scales = commit["scales"]
    adam = commit.get("adam")
    decay = commit.get("decay")
    if (adam is not None) != (state.optimizer == "adam"):
        raise ValueError("commit optimizer does not match the replica's optimizer state")
    terms = [(s, w) for s, w in zip(seeds, weights) if w != 0]
    live = [p for p in state.params if float(scales[p.group]) != 0.0]
    small = [p for p in live if p.flat.numel() <= SMALL]
    for group in _packs(small, noise.chunk):
        _update_pack(state, group, terms, scales, adam, decay, noise)
    big = [p for p in live if p.flat.numel() > SMALL]
    if big:
        _update_large(state, big, terms, scales, adam, decay, noise)
    state.step += 1
    state.iteration = int(commit["iteration"])


def _decay(theta, c, tt) -> None:
    """θ −= c·θ in place: a multiply into ``tt``, then a subtract (``c``: an exact fp32, or a tensor
    of one per element). Only called where c ≠ 0: θ − 0·θ would turn −0.0 into +0.0 and ±inf into
    NaN, and the packed and per-tensor paths must agree bit for bit."""
    torch.mul(theta, c, out=tt)
    theta.sub_(tt)


def _step(theta, m, v, gg, tt, adam, lr) -> None:
    """θ += ĝ (sgd) or the Adam step from ĝ, in place; each elementwise op its own kernel, every
    constant an exact fp32 (a tensor ``lr`` holds one per element)."""
    if adam is None:
        theta.add_(gg)
        return
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
    torch.mul(m, lr, out=gg)                   # lr_g · m̂
    gg.div_(tt)
    theta.add_(gg)


def _update_large(state, params, terms, scales, adam, decay, noise) -> None:
    """Tensor by tensor, chunk by chunk (memory stays at a few chunk buffers). The integer
    accumulator may come from a compiled kernel (``noise.compiled``); the float steps below never
    do, see kernels.py."""
    chunk = noise.chunk
    dev = noise.device
    seeds = [s for s, _ in terms]
    weights = [w for _, w in terms]
    acc = None if noise.compiled else torch.empty(chunk, dtype=torch.int64, device=dev)
    g = torch.empty(chunk, dtype=torch.float32, device=dev)
    tmp = torch.empty(chunk, dtype=torch.float32, device=dev) if adam is not None or decay else None
    for p in params:
        scale = float(scales[p.group])
        wd = float(decay[p.group]) if decay else 0.0
        n = p.flat.numel()
        for off in range(0, n, chunk):
            k = min(chunk, n - off)
            a = noise.accumulate(seeds, weights, p.tid, off, k, None if acc is None else acc[:k])
            gg = g[:k]
            gg.copy_(a)              # int64 → fp32, one rounding
            gg.mul_(scale)           # ĝ (sgd: the whole step) in parameter units
            m = state.adam_m[p.name][off: off + k] if adam is not None else None
            v = state.adam_v[p.name][off: off + k] if adam is not None else None
            lr = adam["lr_over_bc1"][p.group] if adam is not None else None
            if wd != 0.0:
                _decay(p.flat[off: off + k], wd, tmp[:k])
            _step(p.flat[off: off + k], m, v, gg, None if tmp is None else tmp[:k], adam, lr)


def _packs(params, limit: int) -> list[list]:
    """Consecutive runs of small tensors of at most ``limit`` elements in all."""
    out, cur, size = [], [], 0
    for p in params:
        n = p.flat.numel()
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    if cur:
        out.append(cur)
    return out


def _runs(offsets, sizes, c) -> list[tuple[int, int]]:
    """[start, end) element ranges of a pack, merging neighbouring tensors whose constant is not 0."""
    out: list[list[int]] = []
    for off, k, ci in zip(offsets, sizes, c):
        if ci == 0.0:
            continue
        if out and out[-1][1] == off:
            out[-1][1] = off + k
        else:
            out.append([off, off + k])
    return [(a, b) for a, b in out]


def _update_pack(state, params, terms, scales, adam, decay, noise) -> None:
    """The same arithmetic as ``_update_large``, element for element, on several tensors laid end
    to end: noise from ``q_packed``, per-element fp32 scales, then the results copied back."""
    dev = noise.device
    cache = state.__dict__.setdefault("_pack_cache", {})
    key = tuple(p.name for p in params)
    if key not in cache:
        cache[key] = NoisePack([p.tid for p in params], [p.flat.numel() for p in params], dev)
    pack = cache[key]

    def per_element(values: list[float]) -> torch.Tensor:   # one exact fp32 constant per element
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.float32, device=dev), pack.sizes_t)

    n = pack.numel
    acc = torch.zeros(n, dtype=torch.int64, device=dev)
    q = torch.empty(n, dtype=torch.int32, device=dev)
    q64 = torch.empty(n, dtype=torch.int64, device=dev)
    for seed, w in terms:
        noise.q_packed(seed, pack, out=q)
        q64.copy_(q)
        q64.mul_(w)
        acc.add_(q64)
    gg = acc.to(torch.float32)                       # int64 → fp32, one rounding
    gg.mul_(per_element([float(scales[p.group]) for p in params]))
    theta = torch.cat([p.flat for p in params])
    m = v = lr = None
    if adam is not None:
        m = torch.cat([state.adam_m[p.name] for p in params])
        v = torch.cat([state.adam_v[p.name] for p in params])
        lr = per_element([float(adam["lr_over_bc1"][p.group]) for p in params])
    tt = torch.empty_like(gg)
    c = [float(decay[p.group]) if decay else 0.0 for p in params]
    if any(ci != 0.0 for ci in c):
        wd = per_element(c)
        for a, b in _runs(pack.offsets, [p.flat.numel() for p in params], c):
            _decay(theta[a:b], wd[a:b], tt[a:b])
    _step(theta, m, v, gg, tt, adam, lr)
    for p, off in zip(params, pack.offsets):
        k = p.flat.numel()
        p.flat.copy_(theta[off: off + k])
        if adam is not None:
            state.adam_m[p.name].copy_(m[off: off + k])
            state.adam_v[p.name].copy_(v[off: off + k])
