"""The run log: an append-only, hash-chained file of COMMIT records, one per iteration.

Format: JSON lines, one record per line, each line the *canonical* JSON of the record (sorted
keys, no spaces, ASCII only) followed by ``\\n``, so a human can read it with ``less`` or ``jq``.
Every record is a map with at least ``"iteration"`` (int); the log adds two keys:

- ``"prev"``: the previous record's ``"chain"`` (``GENESIS`` = 64 zeros for the first record);
- ``"chain"``: ``sha256(prev + canonical_json(record without "chain"))`` as hex, where the hashed
  record includes ``"prev"``.

Iterations are strictly consecutive (the first may be any int ≥ 0). ``append`` writes the line,
flushes and ``os.fsync``s before it returns, so a commit is durable before it is announced; the
directory is fsynced when the file is created. Python's ``json`` writes floats with ``repr`` (the
shortest string that reads back bit-exactly) and ints of any size, so values round-trip exactly;
non-finite floats are written as ``NaN``/``Infinity`` (Python's JSON dialect) rather than
refused, so a diverged fitness cannot stop a run.

On open, the whole file is checked. A torn final line (no trailing newline, or not valid JSON)
is the trace of a crash in the middle of an append that never returned, so it was never
announced: it is truncated away and a warning is logged (and kept in ``CommitLog.warnings``).
Anything else wrong (a modified, missing, reordered or non-canonical record anywhere) raises
:class:`LogCorrupt` naming the line.

Receivers of records over the wire (LOG_RECORDS) check them with :func:`verify_chain`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from . import UserError

log = logging.getLogger(__name__)

GENESIS = "0" * 64
"""The ``prev`` of the first record."""

_RESERVED = ("prev", "chain")


class LogCorrupt(UserError):
    """The run log fails its checks (one line, names the file and line)."""


class LogLocked(UserError):
    """Another process holds the run log open for writing."""


def canonical_json(obj: Any) -> str:
    """The canonical text of a JSON-able value: sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def chain_hash(record: Mapping[str, Any]) -> str:
    """The ``chain`` value of a record that carries its ``prev`` (any ``chain`` key is ignored)."""
    body = {k: v for k, v in record.items() if k != "chain"}
    prev = body.get("prev")
    if not isinstance(prev, str):
        raise ValueError("record has no 'prev' str to chain from")
    return hashlib.sha256((prev + canonical_json(body)).encode("ascii")).hexdigest()


def _check_record_shape(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise LogCorrupt(f"{where}: record is not a JSON object")
    it = record.get("iteration")
    if type(it) is not int or it < 0:
        raise LogCorrupt(f"{where}: record has no non-negative int 'iteration'")
    if not isinstance(record.get("prev"), str) or not isinstance(record.get("chain"), str):
        raise LogCorrupt(f"{where}: record lacks 'prev'/'chain' strings")


def verify_chain(records: Iterable[Mapping[str, Any]], prev: str | None = None,
                 first_iteration: int | None = None) -> str | None:
    """Check a sequence of chained records (e.g. from LOG_RECORDS).

    ``prev``: the chain value the first record must link to (None: accept whatever it says);
    ``first_iteration``: the iteration the first record must carry (None: any). Raises
    :class:`LogCorrupt` naming the record index; returns the last record's chain (or ``prev``
    when there are no records).
    """
    expected_it = first_iteration
    for i, rec in enumerate(records):
        where = f"record {i}"
        if isinstance(rec, Mapping) and not isinstance(rec, dict):
            rec = dict(rec)
        _check_record_shape(rec, where)
        if expected_it is not None and rec["iteration"] != expected_it:
            raise LogCorrupt(f"{where}: iteration {rec['iteration']} where {expected_it} was expected")
        if prev is not None and rec["prev"] != prev:
            raise LogCorrupt(f"{where} (iteration {rec['iteration']}): 'prev' does not link to the "
                             f"previous record (reordered, missing or foreign record)")
        if chain_hash(rec) != rec["chain"]:
            raise LogCorrupt(f"{where} (iteration {rec['iteration']}): chain hash mismatch "
                             f"(record modified)")
        prev = rec["chain"]
        expected_it = rec["iteration"] + 1
    return prev


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a newly created file's entry is durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(fd)


def _lock(fd: int, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise LogLocked(f"run log {path} is open for writing in another process "
                        f"(another coordinator on the same run directory?)") from None


class CommitLog:
    """An append-only, hash-chained JSON-lines log of COMMIT records.

    ``CommitLog(path)`` opens (creating it and its parent directory if needed) for appending,
    verifies the whole file, recovers a torn tail and takes an exclusive advisory lock;
    ``CommitLog(path, readonly=True)`` only reads (a torn tail is ignored, not truncated). Use as
    a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.warnings: list[str] = []
        self._fd: int | None = None
        self._offsets: list[int] = []  # byte offset of each record's line
        self._end = 0  # byte length of the verified part of the file
        self._first: int | None = None
        self._last: dict | None = None

        if readonly:
            if not self.path.exists():
                raise LogCorrupt(f"run log {self.path} does not exist")
            self._scan(truncate=False)
            return

        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd, self.path)
            if created:
                os.fsync(fd)
                _fsync_dir(self.path.parent)
            self._fd = fd
            self._scan(truncate=True)
        except BaseException:
            self._fd = None
            os.close(fd)
            raise

    # ------------------------------------------------------------------ reading

    def _scan(self, truncate: bool) -> None:
        """Verify the file; record line offsets; handle a torn final line."""
        data = self.path.read_bytes()
        offsets: list[int] = []
        prev = GENESIS
        first = last_rec = None
        pos = 0
        lineno = 0
        torn_at: int | None = None
        while pos < len(data):
            lineno += 1
            nl = data.find(b"\n", pos)
            if nl < 0:  # no newline: the append never completed
                torn_at = pos
                break
            line = data[pos:nl]
            try:
                rec = self._parse_line(line, lineno, prev, None if first is None else first + len(offsets))
            except _BadJson as exc:
                if nl + 1 == len(data):  # invalid JSON on the final line only: torn write
                    torn_at = pos
                    break
                raise LogCorrupt(f"run log {self.path} line {lineno}: {exc}") from None
            if first is None:
                first = rec["iteration"]
            offsets.append(pos)
            prev = rec["chain"]
            last_rec = rec
            pos = nl + 1
        if torn_at is not None:
            msg = (f"run log {self.path}: dropped a torn final line {lineno} "
                   f"({len(data) - torn_at} bytes) left by an interrupted append")
            if truncate:
                assert self._fd is not None
                os.ftruncate(self._fd, torn_at)
                os.fsync(self._fd)
            else:
                msg += " (read-only: file left as is)"
            log.warning(msg)
            self.warnings.append(msg)
            pos = torn_at
        self._offsets = offsets
        self._end = pos
        self._first = first
        self._last = last_rec

    def _parse_line(self, line: bytes, lineno: int, prev: str | None, expected_it: int | None) -> dict:
        """Parse and check one line; ``prev`` None skips the link check. Raises _BadJson/LogCorrupt."""
        try:
            text = line.decode("ascii")
            rec = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadJson(f"not valid JSON ({type(exc).__name__})") from None
        where = f"run log {self.path} line {lineno}"
        _check_record_shape(rec, where)
        if canonical_json(rec) != text:
            raise LogCorrupt(f"{where}: record is not in canonical form (edited by hand?)")
        if expected_it is not None and rec["iteration"] != expected_it:
            raise LogCorrupt(f"{where}: iteration {rec['iteration']} where {expected_it} was "
                             f"expected (records missing or reordered)")
        if prev is not None and rec["prev"] != prev:
            raise LogCorrupt(f"{where}: 'prev' does not link to the previous record "
                             f"(records missing, reordered or modified)")
        if chain_hash(rec) != rec["chain"]:
            raise LogCorrupt(f"{where} (iteration {rec['iteration']}): chain hash mismatch "
                             f"(record modified)")
        return rec

    def _iter_from(self, index: int) -> Iterator[dict]:
        """Yield records from ``index`` on, re-verifying each line and its link as read."""
        if index >= len(self._offsets):
            return
        end = self._end
        with open(self.path, "rb") as f:
            if index > 0:
                f.seek(self._offsets[index - 1])
                prev_line = f.readline().rstrip(b"\n")
                try:
                    prev = self._parse_line(prev_line, index, None, None)["chain"]
                except _BadJson as exc:
                    raise LogCorrupt(f"run log {self.path} line {index}: {exc}") from None
            else:
                prev = GENESIS
            f.seek(self._offsets[index])
            n = len(self._offsets)
            for i in range(index, n):
                pos = f.tell()
                if pos >= end:
                    raise LogCorrupt(f"run log {self.path} line {i + 1}: file shrank while reading")
                line = f.readline()
                if not line.endswith(b"\n"):
                    raise LogCorrupt(f"run log {self.path} line {i + 1}: truncated record")
                try:
                    rec = self._parse_line(line[:-1], i + 1, prev, self._first + i)
                except _BadJson as exc:
                    raise LogCorrupt(f"run log {self.path} line {i + 1}: {exc}") from None
                prev = rec["chain"]
                yield rec

    def records(self, from_iteration: int = 0) -> Iterator[dict]:
        """Iterate the records with ``iteration >= from_iteration``, verifying the chain as read
        (raises LogCorrupt if the file was altered since it was opened)."""
        if self._first is None:
            return iter(())
        return self._iter_from(max(0, from_iteration - self._first))

    def get(self, iteration: int) -> dict | None:
        """The record of one iteration (verified against its predecessor), or None."""
        if self._first is None or not (self._first <= iteration <= self._first + len(self._offsets) - 1):
            return None
        return next(self._iter_from(iteration - self._first))

    def verify(self) -> int:
        """Re-read and check the whole file now. Returns the number of records; raises LogCorrupt."""
        data = self.path.read_bytes()
        if len(data) < self._end:
            raise LogCorrupt(f"run log {self.path}: file is shorter than its verified length "
                             f"({len(data)} < {self._end} bytes)")
        prev = GENESIS
        expected = None
        count = 0
        lines = data.split(b"\n")
        complete = lines[:-1]  # the part after the last newline is not a record
        for lineno, line in enumerate(complete, start=1):
            try:
                rec = self._parse_line(line, lineno, prev, expected)
            except _BadJson as exc:
                raise LogCorrupt(f"run log {self.path} line {lineno}: {exc}") from None
            prev = rec["chain"]
            expected = rec["iteration"] + 1
            count += 1
        if lines[-1]:
            raise LogCorrupt(f"run log {self.path} line {len(lines)}: torn final line "
                             f"(no trailing newline)")
        return count

    def last(self) -> dict | None:
        """The last record (as appended or read on open), or None when the log is empty."""
        return None if self._last is None else dict(self._last)

    @property
    def head(self) -> str:
        """The last record's chain (GENESIS when empty): what the next record's ``prev`` will be."""
        return GENESIS if self._last is None else self._last["chain"]

    @property
    def first_iteration(self) -> int | None:
        return self._first

    @property
    def last_iteration(self) -> int | None:
        return None if self._last is None else self._last["iteration"]

    def __len__(self) -> int:
        return len(self._offsets)

    # ------------------------------------------------------------------ writing

    def _require_writable(self) -> int:
        if self.readonly:
            raise ValueError(f"run log {self.path} was opened read-only")
        if self._fd is None:
            raise ValueError(f"run log {self.path} is closed")
        return self._fd

    def append(self, record: Mapping[str, Any]) -> dict:
        """Chain, write and fsync one record; return it with ``prev`` and ``chain`` added.

        ``record["iteration"]`` must be the last iteration + 1 (any int ≥ 0 for the first).
        A record that already carries ``prev``/``chain`` (mirroring another log) must carry the
        values this log computes. The returned dict is what a reader gets back from the file.
        """
        fd = self._require_writable()
        if not isinstance(record, Mapping):
            raise ValueError(f"a run-log record must be a map, got {type(record).__name__}")
        it = record.get("iteration")
        if type(it) is not int or it < 0:
            raise ValueError(f"a run-log record needs a non-negative int 'iteration', got {it!r}")
        if self._last is not None and it != self._last["iteration"] + 1:
            raise ValueError(f"run log {self.path}: iteration {it} does not follow "
                             f"{self._last['iteration']} (iterations must be consecutive)")
        for key in record:
            if not isinstance(key, str):
                raise ValueError(f"run-log record keys must be str, got {key!r}")
        body = {k: v for k, v in record.items() if k not in _RESERVED}
        body["prev"] = self.head
        try:
            text = canonical_json(body)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"run-log record for iteration {it} is not JSON-able: {exc}") from None
        # Normalise through JSON so the returned record equals what a reader parses (tuples → lists).
        body = json.loads(text)
        body["chain"] = chain_hash(body)
        for key in _RESERVED:
            if key in record and record[key] != body[key]:
                raise ValueError(f"run-log record for iteration {it}: given {key!r} does not match "
                                 f"this log's chain")
        line = (canonical_json(body) + "\n").encode("ascii")
        offset = self._end
        os.lseek(fd, offset, os.SEEK_SET)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            try:  # leave no partial line behind (e.g. disk full)
                os.ftruncate(fd, offset)
            except OSError:  # pragma: no cover
                pass
            raise
        self._offsets.append(offset)
        self._end = offset + len(line)
        if self._first is None:
            self._first = it
        self._last = body
        return dict(body)

    def truncate_after(self, iteration: int) -> int:
        """Drop every record with ``iteration`` > the given one (recovery and tests).
        Returns the number of records dropped."""
        fd = self._require_writable()
        if self._first is None:
            return 0
        keep = max(0, min(len(self._offsets), iteration - self._first + 1))
        dropped = len(self._offsets) - keep
        if dropped == 0:
            return 0
        new_end = self._offsets[keep] if keep < len(self._offsets) else self._end
        os.ftruncate(fd, new_end)
        os.fsync(fd)
        self._offsets = self._offsets[:keep]
        self._end = new_end
        if keep == 0:
            self._first = None
            self._last = None
        else:
            self._last = self.get(self._first + keep - 1)
        return dropped

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # also releases the flock

    def __enter__(self) -> "CommitLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"CommitLog({str(self.path)!r}, records={len(self)}, "
                f"iterations={self._first}..{self.last_iteration})")


class _BadJson(Exception):
    """Internal: a line that does not parse (torn tail candidate)."""

