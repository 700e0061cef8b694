"""Yardsticks: what a held-out loss means, measured by count models on the same windows.

Three reference losses, each in nats per token and averaged exactly as the fitness is (paper
Eq. 2–3, ``es/fitness.py``): the positions scored are those with m_t = mask_t · mask_{t+1} = 1,
each sample's loss is the mean over its scored positions (a sample with none counts as 0), and the
loss is the mean over samples. They are fitted on the run's training samples only.

* **uniform**: log V, where V is the model's vocabulary (what a fresh random init scores).
* **unigram**: add-k smoothing, P(b) = (c(b) + k) / (C + k·V), k = 1 (Laplace), over the targets
  of the training windows (the tokens the model is asked to predict).
* **bigram**: interpolated Witten–Bell (Chen & Goodman 1998), no tuned constant:
  P(b|a) = (c(a,b) + T(a)·P_uni(b)) / (c(a) + T(a)), with T(a) the number of distinct tokens seen
  after a; a context never seen in training falls back to P_uni.

A model that scores above the unigram line has not yet learned token frequencies; one below the
bigram line uses more than the previous token.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import UserError

UNIGRAM_K = 1.0
CACHE_NAME = "yardsticks.json"


@dataclass(frozen=True)
class Yardsticks:
    uniform: float
    unigram: float
    bigram: float
    vocab_size: int
    heldout_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def _scored(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(previous token, target token, row) of every scored position, row-major."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(mask, dtype=np.int64)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"ids {ids.shape} and mask {mask.shape} must be equal 2-D shapes")
    m = (mask[:, :-1] * mask[:, 1:]).astype(bool)
    rows = np.nonzero(m)[0]
    return ids[:, :-1][m], ids[:, 1:][m], rows


def _check_vocab(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise UserError(f"token ids span [{tokens.min()}, {tokens.max()}] but the vocabulary has {vocab_size} entries")


def unigram_logp(train_ids, train_mask, vocab_size: int, k: float = UNIGRAM_K) -> np.ndarray:
    """log P_uni(b) for every b < vocab_size (add-k over the training targets)."""
    _, target, _ = _scored(train_ids, train_mask)
    _check_vocab(target, vocab_size)
    counts = np.bincount(target, minlength=vocab_size).astype(np.float64)
    return np.log(counts + k) - math.log(counts.sum() + k * vocab_size)


class Bigram:
    """Interpolated Witten–Bell bigram over the training windows (see the module docstring)."""

    def __init__(self, train_ids, train_mask, vocab_size: int, k: float = UNIGRAM_K):
        self.vocab_size = vocab_size
        self.uni = unigram_logp(train_ids, train_mask, vocab_size, k)
        prev, target, _ = _scored(train_ids, train_mask)
        _check_vocab(prev, vocab_size)
        # Sparse counts keyed by a·V + b: a dense V×V table is 22 GB for a 150k vocabulary.
        self.keys, self.pair_counts = np.unique(prev * vocab_size + target, return_counts=True)
        self.context_counts = np.bincount(prev, minlength=vocab_size).astype(np.float64)
        self.types = np.bincount(self.keys // vocab_size, minlength=vocab_size).astype(np.float64)

    def logp(self, prev: np.ndarray, target: np.ndarray) -> np.ndarray:
        prev = np.asarray(prev, dtype=np.int64)
        target = np.asarray(target, dtype=np.int64)
        _check_vocab(prev, self.vocab_size)
        _check_vocab(target, self.vocab_size)
        q = prev * self.vocab_size + target
        pos = np.searchsorted(self.keys, q)
        found = pos < self.keys.size
        found[found] = self.keys[pos[found]] == q[found]
        c_ab = np.zeros(q.shape, dtype=np.float64)
        c_ab[found] = self.pair_counts[pos[found]]
        c_a, t_a = self.context_counts[prev], self.types[prev]
        p_uni = np.exp(self.uni[target])
        seen = c_a > 0
        p = p_uni.copy()
        p[seen] = (c_ab[seen] + t_a[seen] * p_uni[seen]) / (c_a[seen] + t_a[seen])
        return np.log(p)


def mean_nll(position_logp: np.ndarray, rows: np.ndarray, n_samples: int) -> float:
    """−(1/n)·Σ_samples mean_t log p: the fitness's averaging, negated (nats per token)."""
    sums = np.bincount(rows, weights=position_logp, minlength=n_samples)
    counts = np.bincount(rows, minlength=n_samples)
    per_sample = sums / np.maximum(counts, 1)
    return float(-per_sample.sum() / n_samples)


def compute(train_ids, train_mask, heldout_ids, heldout_mask, vocab_size: int) -> Yardsticks:
    """The three yardsticks, fitted on the training windows and scored on the held-out ones."""
    heldout_ids = np.asarray(heldout_ids, dtype=np.int64)
    n = heldout_ids.shape[0]
    if n == 0:
        raise UserError("no held-out samples to score the yardsticks on")
    prev, target, rows = _scored(heldout_ids, heldout_mask)
    bigram = Bigram(train_ids, train_mask, vocab_size)
    has_positions = np.bincount(rows, minlength=n) > 0
    # uniform: every scored position costs log V; samples without positions count as 0, as in the fitness
    uniform = math.log(vocab_size) * float(has_positions.sum()) / n
    return Yardsticks(uniform=uniform, unigram=mean_nll(bigram.uni[target], rows, n),
                      bigram=mean_nll(bigram.logp(prev, target), rows, n), vocab_size=int(vocab_size),
                      heldout_samples=int(n))


def _np(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def for_run(run) -> Yardsticks:
    """Yardsticks on exactly the windows and mask ``run.heldout_loss`` uses."""
    return compute(run.train.input_ids, run.train.mask, _np(run.ids_heldout), _np(run.mask_heldout),
                   int(run.replica.model.config.vocab_size))


def for_run_dir(out: str | Path) -> Yardsticks:
    """Yardsticks of a run directory (its saved samples, its eval_samples, its model's vocabulary),
    cached in ``out/yardsticks.json`` next to the digests they were computed from."""
    from .checkpoint import list_checkpoints
    from .config import load as load_config
    from .data import SampleSet

    out = Path(out)
    cfg = load_config(out / "config.yaml")
    train = SampleSet.load(out / "data" / "train.npz")
    heldout = SampleSet.load(out / "data" / "heldout.npz")
    ckpts = list_checkpoints(out)
    if not ckpts:
        raise UserError(f"{out} has no checkpoint (the model's vocabulary size is read from one)")
    vocab = int(json.loads((ckpts[0][1] / "config.json").read_text())["vocab_size"])
    n = min(len(heldout), cfg.run.eval_samples)
    key = {"train": train.digest(), "heldout": heldout.digest(), "samples": n, "vocab_size": vocab}
    cache = out / CACHE_NAME
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return Yardsticks(**stored["yardsticks"])
        except (ValueError, TypeError, KeyError):
            pass  # unreadable cache: recompute
    ids, mask = heldout.batch(range(n))
    ys = compute(train.input_ids, train.mask, ids.numpy(), mask.numpy(), vocab)
    cache.write_text(json.dumps({"key": key, "yardsticks": ys.as_dict()}, indent=1))
    return ys


def banner_line(ys: Yardsticks) -> str:
    return (f"yardsticks on the same held-out windows (nats/token): uniform {ys.uniform:.2f}, "
            f"unigram {ys.unigram:.2f}, bigram {ys.bigram:.2f}; a loss above unigram has not yet learned "
            f"token frequencies")


def verdict(loss: float, ys: Yardsticks) -> str:
    """'held-out 6.14 nats; unigram yardstick 5.90: 0.24 above' (or below)."""
    gap = loss - ys.unigram
    side = "above" if gap > 0 else "below"
    return (f"held-out {loss:.2f} nats; unigram yardstick {ys.unigram:.2f}: {abs(gap):.2f} {side} "
            f"(bigram {ys.bigram:.2f}, uniform {ys.uniform:.2f})")


def last_heldout(out: str | Path) -> float | None:
    """The last held-out loss in a run's metrics.jsonl (None when there is none)."""
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            value = json.loads(line).get("heldout_loss")
        except ValueError:
            continue  # a line cut by a crash
        if value is not None:
            last = float(value)
    return last


def run_dir_lines(out: str | Path, final: bool) -> list[str]:
    """Lines ``train`` prints: the yardsticks at the start, the verdict at the end. Empty when the
    run directory lacks what they need; a yardstick must never be the reason a run fails."""
    try:
        ys = for_run_dir(out)
    except (UserError, OSError, ValueError, KeyError):
        return []
    if not final:
        return [banner_line(ys)]
    loss = last_heldout(out)
    return [verdict(loss, ys)] if loss is not None and math.isfinite(loss) else []
