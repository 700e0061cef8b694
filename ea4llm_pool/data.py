"""Corpus → fixed token samples, and the per-iteration data subset every worker agrees on.

Every worker must score exactly the same token ids, so samples are built once, deterministically,
and carry a digest; the iteration's subset is a pure function of (seed, iteration) computed from
a fully specified random stream, identical on every platform and numpy version.

    texts = load_texts(cfg)                            # lines (files, pydoc) or rows (datasets)
    train, heldout = prepare_samples(cfg, tok, texts)  # SampleSet: int64 [n, seq_len] ids + mask
    idx = subset_indices(len(train), cfg.es.samples_per_iteration, cfg.run.seed, t)
    ids, mask = train.batch(idx)                       # padding past the longest sample cut
"""

from __future__ import annotations

import glob as globlib
import hashlib
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import UserError
from .config import Config

# ----------------------------------------------------------------------------- corpus


def _pydoc_text() -> str:
    # Python's own reference documentation: real English prose and code, on every install.
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def _looks_like_path(source: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else path-like must not silently turn into
    # a hub lookup (which retries for half a minute offline before failing).
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or source.endswith((".txt", ".md", ".text")) or "\\" in source)


def _hub_rows(cfg: Config) -> list[str]:
    name, column = cfg.data.source, cfg.data.text_column
    try:
        import datasets
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # datasets raises many types with multi-paragraph messages
        lines = str(err).strip().splitlines()
        line = (lines[0] if lines else type(err).__name__)[:200]
        raise UserError(f"data.source '{name}' is not a file, directory or glob, and cannot be "
                        f"loaded as a hub dataset: {line}") from None
    if column not in ds.column_names:
        raise UserError(f"dataset '{name}' has no column '{column}' (columns: "
                        f"{', '.join(ds.column_names)}); set data.text_column")
    return [str(x) for x in ds[column] if x is not None]


def load_texts(cfg: Config) -> list[str]:
    """The corpus as a list of non-empty text units, in corpus order.

    Files, directories, globs and pydoc give lines (trailing whitespace dropped, indentation
    kept: it is meaningful in code); a hub dataset gives one unit per row. ``max_lines`` keeps
    the first N units.
    """
    source = cfg.data.source
    path = Path(source).expanduser()
    if source == "pydoc":
        units = _pydoc_text().splitlines()
    elif path.is_file():
        units = _read(path).splitlines()
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise UserError(f"data.source {source}: directory holds no *.txt files")
        units = [line for f in files for line in _read(f).splitlines()]
    elif globlib.has_magic(source):
        files = sorted(Path(f) for f in globlib.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"data.source {source}: glob matches no files")
        units = [line for f in files for line in _read(f).splitlines()]
    elif _looks_like_path(source):
        raise UserError(f"data.source not found: {source}")
    else:
        units = _hub_rows(cfg)
    texts = [u.rstrip() for u in units if u.strip()]
    if cfg.data.max_lines is not None:
        texts = texts[: cfg.data.max_lines]
    if not texts:
        raise UserError(f"data.source {source}: the corpus is empty")
    return texts


# ----------------------------------------------------------------------------- samples


class SampleSet:
    """Immutable token samples: ``input_ids`` and ``mask`` (1 = real token), int64 [n, seq_len]."""

    def __init__(self, input_ids: np.ndarray, mask: np.ndarray):
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        m = np.ascontiguousarray(mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != m.shape:
            raise ValueError(f"input_ids {ids.shape} and mask {m.shape} must be equal 2-D shapes")
        ids.setflags(write=False)
        m.setflags(write=False)
        self.input_ids, self.mask = ids, m

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) int64 CPU tensors for ``indices``, in the order given (fresh copies).

        Columns past the longest sample of the batch are cut: they hold only padding, which a
        causal model never attends to from a real position and the fitness mask never scores, so
        each sample's fitness is unchanged (up to the last fp32 bit: kernels of another width may
        round differently) while the forward pass skips the padded width.
        """
        idx = np.asarray(indices, dtype=np.int64)
        mask = self.mask[idx]
        real = np.flatnonzero(mask.any(axis=0))
        width = int(real[-1]) + 1 if real.size else self.seq_len
        ids = np.ascontiguousarray(self.input_ids[idx, :width])
        return torch.from_numpy(ids), torch.from_numpy(np.ascontiguousarray(mask[:, :width]))

    def digest(self) -> str:
        """sha256 of shape + ids + mask as little-endian int64: equal on every platform."""
        h = hashlib.sha256()
        h.update(np.asarray(self.input_ids.shape, dtype="<i8").tobytes())
        h.update(self.input_ids.astype("<i8", copy=False).tobytes())
        h.update(self.mask.astype("<i8", copy=False).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        # .npz of plain arrays: no pickle, so loading a file from elsewhere cannot run code.
        with open(path, "wb") as f:
            np.savez(f, input_ids=self.input_ids, mask=self.mask, digest=np.array(self.digest()))

    @classmethod
    def load(cls, path: str | Path) -> "SampleSet":
        try:
            with np.load(path, allow_pickle=False) as z:
                samples = cls(z["input_ids"], z["mask"])
                stored = str(z["digest"])
        except FileNotFoundError:
            raise UserError(f"sample file not found: {path}") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
            raise UserError(f"sample file {path} is unreadable or corrupt: {err}") from None
        if samples.digest() != stored:
            raise UserError(f"sample file {path} is corrupt: digest mismatch")
        return samples


def split_heldout(texts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Cut the corpus at a unit boundary so the last ~``fraction`` of its characters are held out.

    Splitting text (not token windows) guarantees train and held-out never share a line.
    """
    sizes = np.array([len(t) + 1 for t in texts], dtype=np.int64)  # +1: the separator
    target = (1.0 - fraction) * sizes.sum()
    cut = int(np.searchsorted(np.cumsum(sizes), target, side="left")) + 1
    cut = min(max(cut, 1), len(texts) - 1)
    return texts[:cut], texts[cut:]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _windows(token_lists: list[list[int]], seq_len: int, eos: int | None) -> SampleSet:
    # One stream, eos after every unit (so the model sees where a line/document ends), cut into
    # non-overlapping windows; the remainder shorter than seq_len is dropped.
    sep = [eos] if eos is not None else []
    stream = np.fromiter((t for ids in token_lists for t in (*ids, *sep)), dtype=np.int64)
    n = len(stream) // seq_len
    ids = stream[: n * seq_len].reshape(n, seq_len)
    return SampleSet(ids, np.ones_like(ids))


def _padded(token_lists: list[list[int]], seq_len: int, eos: int | None, pad: int) -> SampleSet:
    # One unit per sample, eos appended when it fits, right-padded; a unit with fewer than two
    # tokens has no next-token prediction to score, so it is dropped.
    rows = [(ids + ([eos] if eos is not None else []))[:seq_len] for ids in token_lists]
    rows = [r for r in rows if len(r) >= 2]
    ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return SampleSet(ids, mask)


def prepare_samples(cfg: Config, tokenizer, texts: list[str]) -> tuple[SampleSet, SampleSet]:
    """Tokenize ``texts`` into (train, held-out) samples of ``cfg.data.seq_len`` tokens."""
    d = cfg.data
    if len(texts) < 2:
        raise UserError(f"the corpus has {len(texts)} line(s); at least 2 are needed "
                        f"to hold out a part for evaluation")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if not d.packing and pad is None:
        raise UserError("data.packing false needs a tokenizer with a pad or eos token")
    parts = []
    for part in split_heldout(texts, d.heldout_fraction):
        tokens = _encode(tokenizer, part)
        parts.append(_windows(tokens, d.seq_len, eos) if d.packing
                     else _padded(tokens, d.seq_len, eos, pad))
    train, heldout = parts
    for name, s in (("training", train), ("held-out", heldout)):
        if len(s) == 0:
            how = (f"{d.seq_len}-token windows" if d.packing else "lines of 2 or more tokens")
            raise UserError(f"the corpus is too small: its {name} part yields no {how} "
                            f"(lower data.seq_len, raise data.max_lines, or use a larger corpus)")
    return train, heldout


# ----------------------------------------------------------------------------- subsets

# Domain tag mixed into the subset stream's seed, so it never coincides with another stream
# derived from the same (seed, iteration) pair (e.g. member seeds).
_SUBSET_DOMAIN = 0x53554253  # "SUBS"
_TWO64 = 1 << 64


def check_subset(cfg: Config, n_train: int) -> None:
    m = cfg.es.samples_per_iteration
    if m > n_train:
        raise UserError(f"es.samples_per_iteration {m} exceeds the {n_train} training samples; "
                        f"lower it or use a larger corpus / smaller data.seq_len")


def subset_indices(n_train: int, m: int, seed: int, iteration: int) -> list[int]:
    """The iteration's M distinct sample indices in [0, n_train), sorted.

    Built only from PCG64's raw 64-bit output (fixed by the PCG64 + SeedSequence specs) with
    exact integer arithmetic — Floyd's sampling with rejection — rather than Generator.choice,
    whose algorithm numpy may change between versions.
    """
    if not 0 <= m <= n_train:
        raise UserError(f"cannot draw {m} distinct samples from {n_train}")
    bits = np.random.PCG64([seed, iteration, _SUBSET_DOMAIN])
    buffer: list[int] = []

    def below(k: int) -> int:  # uniform integer in [0, k), unbiased
        limit = _TWO64 - (_TWO64 % k)
        while True:
            if not buffer:
                buffer.extend(int(x) for x in bits.random_raw(64)[::-1])
            r = buffer.pop()
            if r < limit:
                return r % k

    chosen: set[int] = set()
    for j in range(n_train - m, n_train):  # Floyd: m draws, no rejection on collisions
        t = below(j + 1)
        chosen.add(j if t in chosen else t)
    return sorted(chosen)


def digest_indices(indices: Sequence[int]) -> str:
    """Short sha256 hex of an index list (little-endian int64), for logs and cross-checks."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]
