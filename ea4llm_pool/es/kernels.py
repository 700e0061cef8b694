"""Compiled integer kernels for the noise, the update accumulator and the state hash.

Only integer arithmetic is compiled: the SplitMix64 hash, the 16-bit lane extraction, the table
gather, the multiply-accumulate Σ_j W_j·Q_j over the seeds of a commit (int64, wrapping) and the
state hash's mix-sum. Integer results do not depend on how a compiler schedules, vectorises or
parallelises them, so a compiled kernel gives exactly the bits of the eager one.

Every float step (int64→fp32, ×scale, +master, the Adam ops, ε·s + master) stays in separate eager
kernels on purpose: inside generated code the compiler may contract ``a*b + c`` into one fused
multiply-add, which rounds once instead of twice and changes the last bit on machines that have
FMA and not on those that don't (gcc's default is ``-ffp-contract=fast``; inductor passes ``off``
today, but that is a setting, and LLVM for CUDA contracts by default). Never move a float
operation into this module.

One graph serves every commit: the number of seeds and the slice length are symbolic sizes
(``dynamic=True``), the slice start is a 0-d tensor, and the two sizes are padded to at least 2
(sizes 0 and 1 would otherwise be specialised into extra graphs). The counter is made inside the
graph from the length: a slice of a preallocated counter recompiled whenever it happened to be
the whole buffer.

Each entry point is one fused kernel (on the CPU, C++ from inductor; on CUDA, Triton). On the CPU
vector code is turned off: without AVX-512 a vector int64 multiply is emulated and a gather is
done lane by lane, which measured 2–6× slower than scalar code.
"""

from __future__ import annotations

import torch

from .noise import _C1, _C2, _GOLDEN, _signed

_G, _M1, _M2 = _signed(_GOLDEN), _signed(_C1), _signed(_C2)

THRESHOLD_PARAMS = 20_000_000
"""``compile: auto`` compiles for models with at least this many parameters: below it the update
takes well under a second eagerly and the compile time (seconds) would not pay back."""

_OPTIONS = {"cpp.simdlen": 1, "assert_indirect_indexing": False}


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser; ``>>`` on int64 is arithmetic, so the mask makes it logical."""
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * _M1
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * _M2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _hashes(keys: torch.Tensor, h0: torch.Tensor, m: int) -> torch.Tensor:
    """z[i, j] = SplitMix64 of stream ``keys[j]`` at hash h0 + i, i < m (state = key + (h+1)·golden)."""
    counter = torch.arange(1, m + 1, dtype=torch.int64, device=keys.device)
    return _mix(keys[None, :] + (counter[:, None] + h0) * _G)


def _lane(z: torch.Tensor, lane: int) -> torch.Tensor:
    """Table index of 16-bit lane ``lane`` of z, sign bit flipped: (lane + 2^15) mod 2^16 equals
    lane ^ 2^15, written so the compiler can see the index is never negative."""
    return ((z >> (16 * lane)) + (1 << 15)) & 0xFFFF


def _mac(keys, weights, h0, m, table) -> torch.Tensor:
    """int64[4m]: Σ_j W_j·table[lane l of z[i, j]] at element 4i + l.

    One reduction over the seeds per lane, stacked: the four reductions share their loops, so
    the compiled kernel hashes each (i, j) once and keeps four accumulators (a [m, 4, S] form
    recomputes the hash per lane, measured 1.3–1.5× slower)."""
    z = _hashes(keys, h0, m)
    lanes = [(table[_lane(z, k)].to(torch.int64) * weights).sum(-1) for k in range(4)]
    return torch.stack(lanes, dim=1).reshape(-1)


def _lookup(key, h0, m, table) -> torch.Tensor:
    """table values (exact, the table's dtype) of the 4m lanes of one stream (``key``: int64[1])."""
    z = _hashes(key, h0, m)[:, 0]
    shift = torch.arange(0, 64, 16, device=z.device)
    return table[((z[:, None] >> shift) + (1 << 15)) & 0xFFFF].reshape(-1)


def _state_sum(bits: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Σ mix(index+1, bits) as wrapping int64 (see statehash.py); ``first`` = index of bits[0]."""
    i = torch.arange(bits.numel(), device=bits.device) + (first + 1)
    z = i * _G + bits.to(torch.int64)
    z = (z ^ ((z >> 29) & ((1 << 35) - 1))) * _M1
    z = z ^ ((z >> 32) & ((1 << 32) - 1))
    return z.sum()


_compiled: dict[str, object] = {}


def _c(fn):
    """The compiled form of ``fn``, made on first use (importing the compiler takes seconds, which a
    small run that never compiles should not pay)."""
    if fn.__name__ not in _compiled:
        _wrapping_cpp()
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True, options=_OPTIONS)
    return _compiled[fn.__name__]


def _wrapping_cpp() -> None:
    """Make inductor's C++ builds use ``-fwrapv``.

    The hash relies on int64 multiplies and sums that wrap around, and inductor emits them as
    signed C++ arithmetic, where overflow is undefined behaviour: gcc 12 at -O3 miscompiled the
    state-hash sum (a different total) until ``-fwrapv`` made wrapping the defined result. Inductor
    has no option for extra compiler flags, so its private flag function is wrapped; the flag only
    defines what overflow does (what torch promises for integer tensors anyway), so other code
    compiled in this process is unaffected. If the function is missing (another torch version),
    compiling is refused and the eager kernels are used."""
    from torch._inductor import cpp_builder

    fn = getattr(cpp_builder, "_get_optimization_cflags", None)
    if fn is None or getattr(cpp_builder, "_IS_WINDOWS", True):
        raise RuntimeError("cannot make this torch's C++ compiler wrap on integer overflow (-fwrapv)")
    if getattr(fn, "_wraps_ints", False):
        return

    def with_wrapv(*args, **kwargs):
        cflags, ldflags = fn(*args, **kwargs)
        return [*cflags, "fwrapv"], ldflags

    with_wrapv._wraps_ints = True
    cpp_builder._get_optimization_cflags = with_wrapv


def mac(keys: torch.Tensor, weights: torch.Tensor, h0: int, m: int, table: torch.Tensor) -> torch.Tensor:
    """int64[4m]: Σ_j weights[j]·Q_j for hashes h0 … h0+m−1 of the streams ``keys``.
    Needs m ≥ 2 and len(keys) ≥ 2 (pad with weight 0)."""
    h = torch.tensor(h0, dtype=torch.int64, device=keys.device)
    return _c(_mac)(keys, weights, h, m, table)


def lookup(key: torch.Tensor, h0: int, m: int, table: torch.Tensor) -> torch.Tensor:
    """table values of the 4m lanes of hashes h0 … h0+m−1 of one stream (``key``: int64[1]); m ≥ 2."""
    h = torch.tensor(h0, dtype=torch.int64, device=key.device)
    return _c(_lookup)(key, h, m, table)


def state_sum(bits: torch.Tensor, first: int) -> int:
    """Wrapping int64 mix-sum of int32 ``bits`` whose first element has index ``first`` (≥ 2 elements)."""
    s = _c(_state_sum)(bits, torch.tensor(first, dtype=torch.int64, device=bits.device))
    return int(s.item()) & ((1 << 64) - 1)


# -- choosing ------------------------------------------------------------------------------------

_probed: dict[str, tuple[bool, str]] = {}


def probe(device: str | torch.device) -> tuple[bool, str]:
    """Compile the kernels on ``device`` and check them against the eager noise; (ok, reason).
    Cached per device for the life of the process."""
    dev = torch.device(device)
    key = str(dev)
    if key not in _probed:
        _probed[key] = _probe(dev)
    return _probed[key]


def _probe(dev: torch.device) -> tuple[bool, str]:
    # noise.py and statehash.py import this module lazily, so there is no cycle at import time
    from .noise import NoiseSource
    from .statehash import tensor_sum

    try:
        eager = NoiseSource("gaussian", dev, chunk=1 << 12)
        fast = NoiseSource("gaussian", dev, chunk=1 << 12, compiled=True)
        seeds, weights = [3, 1 << 40, 77], [5, -2, 0]
        a = torch.empty(1001, dtype=torch.int64, device=dev)
        b = torch.empty_like(a)
        eager.accumulate(seeds, weights, 9, 8, 1001, a)
        fast.accumulate(seeds, weights, 9, 8, 1001, b)
        same = torch.equal(a, b) and torch.equal(eager.eps(3, 9, 0, 999), fast.eps(3, 9, 0, 999))
        x = eager.eps(5, 9, 0, 777)
        same = same and tensor_sum(x) == tensor_sum(x, compiled=True)
    except Exception as err:  # no C compiler, no Triton, an unsupported backend: run eagerly
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return False, f"{type(err).__name__}: {first[:100]}"
    if not same:
        return False, "compiled noise differs from the eager noise"
    return True, "ok"


def resolve(mode: str, n_params: int, device: str | torch.device, say=print) -> bool:
    """Whether a replica of ``n_params`` parameters on ``device`` uses the compiled kernels, for
    ``runtime.compile`` = auto | on | off. When compiling is wanted but fails, says so in one line
    and returns False (the eager kernels give the same bits, only slower)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off (got {mode!r})")
    if mode == "off" or (mode == "auto" and n_params < THRESHOLD_PARAMS):
        return False
    ok, why = probe(device)
    if not ok:
        say(f"note: compiled noise kernels unavailable on {device} ({why}); using the eager kernels")
    return ok
