"""Start-up self-test: can this device reproduce the run's noise, updates and state hash bit for bit?

A worker runs it on its own device, with the kernels it will use (eager or compiled), before it
joins; a device that fails must not vote, since it would perturb and update differently from the
rest of the pool. Each part computes a SHA-256 digest of fixed inputs and compares it with the
known answers shipped in ``data/selftest.json`` (computed on a CPU with the eager kernels, and
equal on every correct device). The inputs are small: the eager test takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .noise import NoisePack, NoiseSource, known_answer_digest, tensor_id
from .state import MasterState
from .statehash import state_hash, tensor_sum
from .update import SMALL, apply_commit

KNOWN_ANSWERS_PATH = Path(__file__).with_name("data") / "selftest.json"
PARTS = ("noise gaussian", "noise rademacher", "noise packed", "update sgd packed", "update sgd large",
         "update adam", "state hash")
CHUNK = 1 << 14
"""Small chunks, so the large-tensor path crosses chunk boundaries and ends on an odd tail."""

SMALL_SHAPES = {"model.embed_tokens.weight": (64, 16), "model.layers.0.input_layernorm.weight": (16,),
                "model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.mlp.up_proj.weight": (40, 16),
                "model.norm.weight": (5,)}
LARGE_SHAPES = {"model.layers.0.mlp.down_proj.weight": (233, 301),          # 70,133 elements > SMALL
                "model.layers.0.post_attention_layernorm.weight": (7,)}
_GROUPS = ("emb", "attn", "mlp", "ln", "head")


def _commits(optimizer: str) -> list[dict]:
    """Two fixed commits: seeds beyond 2^63, negative and zero weights, a group left out (scale 0),
    exact fp32 scales (powers of two times small integers)."""
    out = []
    for it in range(2):
        rec = {"iteration": it, "seeds": [11 + it, (1 << 64) - 1 - it, 123456789, 5],
               "weights": [7, -3 - it, 0, 1],
               "scales": {g: (0.0 if g == "head" else (3 + k) * 2.0 ** -22) for k, g in enumerate(_GROUPS)},
               "adam": None}
        if optimizer == "adam":
            rec["scales"] = {g: (0.0 if g == "head" else 2.0 ** -18) for g in _GROUPS}
            rec["adam"] = {"beta1": 0.875, "one_minus_beta1": 0.125, "beta2": 0.9990234375,
                           "one_minus_beta2": 0.0009765625, "inv_bc2": 512.0 if it else 1024.0,
                           "eps": 2.0 ** -27, "lr_over_bc1": {g: 2.0 ** -7 for g in _GROUPS}}
        out.append(rec)
    return out


def _master(shapes: dict, optimizer: str, device: torch.device) -> MasterState:
    """Weights from the noise itself times an exact fp32 constant: the same bits on every device."""
    src = NoiseSource("gaussian", device, chunk=CHUNK)
    named = []
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        named.append((name, (src.eps(3, tensor_id(name), 0, n) * 0.02).view(shape)))
    return MasterState.from_named(named, optimizer, device)


def _bytes_digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().reshape(-1).view(torch.int32).cpu().numpy().astype("<i4").tobytes())
    return h.hexdigest()


def _update_digest(shapes: dict, optimizer: str, device: torch.device, compiled: bool) -> tuple[str, MasterState]:
    state = _master(shapes, optimizer, device)
    src = NoiseSource("gaussian", device, chunk=CHUNK, compiled=compiled)
    for rec in _commits(optimizer):
        apply_commit(state, rec, src)
    return _bytes_digest(state.tensors()[k] for k in sorted(state.tensors())), state


def run_selftest(device: str | torch.device, compiled: bool | None = None) -> dict[str, str]:
    """Digest of each part (see PARTS) computed on ``device``; ``compiled`` True runs the compiled
    kernels wherever the replica would (None or False: eager)."""
    dev = torch.device(device)
    fast = bool(compiled)
    out = {f"noise {kind}": known_answer_digest(kind, dev, compiled=fast) for kind in ("gaussian", "rademacher")}

    names = list(SMALL_SHAPES) + ["x"]
    pack = NoisePack([tensor_id(n) for n in names], [1024, 16, 256, 3, 5, 1], dev)
    src = NoiseSource("gaussian", dev, chunk=CHUNK)
    q = torch.empty(pack.numel, dtype=torch.int32, device=dev)
    out["noise packed"] = _bytes_digest([src.q_packed(s, pack, q).clone() for s in (0, (1 << 64) - 1)])

    out["update sgd packed"], _ = _update_digest(SMALL_SHAPES, "sgd", dev, fast)
    out["update sgd large"], _ = _update_digest(LARGE_SHAPES, "sgd", dev, fast)
    out["update adam"], adam = _update_digest({**SMALL_SHAPES, **LARGE_SHAPES}, "adam", dev, fast)

    big = next(p.flat for p in adam.params if p.flat.numel() > SMALL)
    sums = [tensor_sum(big, chunk=CHUNK + 4, compiled=fast), tensor_sum(big, compiled=fast)]
    out["state hash"] = hashlib.sha256(f"{sums[0]:016x};{sums[1]:016x};{state_hash(adam, compiled=fast)}"
                                       .encode()).hexdigest()
    return out


def known_answers() -> dict[str, str]:
    return json.loads(KNOWN_ANSWERS_PATH.read_text())["digests"]


def check(device: str | torch.device, compiled: bool | None = None) -> tuple[bool, str]:
    """(ok, one line): the device reproduces every known answer with the eager kernels and, when
    ``compiled``, with the compiled ones too. The line names the failing parts."""
    want = known_answers()
    modes = [False, True] if compiled else [False]
    bad = []
    for fast in modes:
        try:
            got = run_selftest(device, fast)
        except Exception as err:   # a device that cannot even run the test must not join either
            bad.append(f"{'compiled' if fast else 'eager'} run failed ({type(err).__name__}: {err})".splitlines()[0])
            continue
        bad += [f"{part}{' (compiled)' if fast else ''}" for part in PARTS if got.get(part) != want[part]]
    if bad:
        return False, f"self-test failed on {device}: " + ", ".join(bad)
    return True, f"self-test passed on {device} ({'eager and compiled' if compiled else 'eager'} kernels)"


def _combined(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{p}={digests.get(p, '')};" for p in PARTS).encode()).hexdigest()


def selftest_digest(device: str | torch.device = "cpu", compiled: bool | None = None) -> str:
    """One digest over all parts, computed on ``device`` (what a worker announces in HELLO). A
    correct device gives :func:`expected_digest`."""
    return _combined(run_selftest(device, compiled))


def expected_digest() -> str:
    """The digest every correct device announces, from the shipped known answers (a coordinator
    needs to compute nothing to check a worker's)."""
    return _combined(known_answers())
