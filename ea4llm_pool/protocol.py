"""The pool's wire format: every message, its fields and their types, in one place.

One msgpack map per ZeroMQ frame::

    {"v": PROTOCOL_VERSION, "type": "<MESSAGE TYPE>", <field>: <value>, ...}

``encode(msg_type, **fields) -> bytes`` and ``decode(frame) -> Message`` check every message
against the table below on *both* sides: required fields present, no undeclared field, every
value of the declared type (recursively for lists and sub-maps). A frame that fails any check
raises :class:`ProtocolError` with a one-line reason; a frame from a peer speaking another
protocol version raises :class:`VersionMismatch` (a ``ProtocolError``) naming both versions.
Decoding uses ``msgpack.unpackb(raw=False, strict_map_key=True)`` with size limits and no
extension types: nothing on the wire is ever executed, unpickled or evaluated.

This module depends on msgpack only (``zmq`` is imported lazily by
:func:`configure_socket_limits`). Routing (ROUTER identity frames) is the caller's business: a
message here is exactly one payload frame.

Message table (c = coordinator, w = worker, any = any client such as ``ea4llm-pool status``).
Types: int, float (ints accepted and converted), str, bytes, bool, map (str keys, plain values),
list[...], {...} (a sub-map with fixed keys); ``?`` marks an optional field (absent → None).

=============  =====  ==========================================================================
type           dir    fields
=============  =====  ==========================================================================
HELLO          w→c    config_hash:str, noise_digest:str, device:str, dtype:str, threads:int≥1,
                      throughput:float (samples/s estimate), worker_name:str, pid:int≥0,
                      state_iteration:int≥-1 (-1 = no state), state_hash:str ("" = none)
WELCOME        c→w    worker_id:str, run_id:str, config_yaml:str, sync:SYNC, heartbeat_s:float>0,
                      ?bulk_port:int (the bulk channel's port on the coordinator's host)
REJECT         c→w    reason:str  (the worker prints it and exits)
PING           w→c    worker_id:str, iteration:int≥-1, state_hash:str, busy:bool, done_units:int≥0,
                      ?throughput:float
PONG           c→w    iteration:int≥-1, ?state_hash:str
LEASE          c→w    lease_id:str, iteration:int≥0, alpha:float, sigma:float,
                      units:list[{member:int≥0, seed:int≥0, sign:±1, indices:list[int≥0]}],
                      expires_s:float>0
RESULT         w→c    lease_id:str, iteration:int≥0,
                      results:list[{member:int≥0, sign:±1, sum_r:float, count:int≥0}],
                      eval_s:float≥0, ?error:str (the lease could not be evaluated; re-queue it),
                      ?state_iteration:int≥-1, ?state_hash:str (a STATE report carried along)
COMMIT         c→w    record:map with at least {iteration:int≥0, state_hash:str}
STATE          w→c    iteration:int≥-1, state_hash:str  (after a sync, or after a COMMIT when no
                      RESULT is about to carry the report)
RESYNC         c→w    reason:str, sync:SYNC
FETCH          w→c    name:str, offset:int≥0, length:int 1..CHUNK_SIZE        (bulk channel)
CHUNK          c→w    name:str, offset:int≥0, data:bytes (≤ CHUNK_SIZE), eof:bool (bulk channel)
LOG_FETCH      w→c    from_iteration:int≥0, ?max_records:int≥1                (bulk channel)
LOG_RECORDS    c→w    records:list[map], last:bool                            (bulk channel)
BYE            w→c    worker_id:str, reason:str
END            c→w    reason:str, final_iteration:int≥-1, final_hash:str
STATUS_REQ     any→c  (no fields)
STATUS         c→any  snapshot:map
ERROR          c→any  code:str, reason:str  (a request that cannot be served; codes in ERROR_CODES)
=============  =====  ==========================================================================

SYNC = {checkpoint_iteration:int≥-1 (-1 = none: build the initial model from the config),
        files:list[[name:str, size:int≥0, sha256:str]] (files of that checkpoint, fetch by name),
        log_from:int≥0 (first COMMIT iteration to replay after the checkpoint)}

:func:`schema_table` renders the live table from the schemas themselves.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import msgpack

from . import UserError, __version__

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

PROTOCOL_VERSION = 1
"""Bump on any incompatible change to the table; peers with different versions refuse each other."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest frame either side sends or accepts (also set as the sockets' ZMQ_MAXMSGSIZE)."""

CHUNK_SIZE = 1024 * 1024
"""Largest payload of one CHUNK (and largest FETCH length) on the bulk channel."""

MAX_CONTAINER_LEN = 1 << 22
"""Largest msgpack array accepted by the decoder (entries)."""

MAX_MAP_LEN = 1 << 16
"""Largest msgpack map accepted by the decoder (keys)."""

MAX_DEPTH = 32
"""Deepest nesting accepted inside free-form maps (COMMIT.record, STATUS.snapshot, ...)."""

DEFAULT_LINGER_MS = 1000
"""Socket LINGER set by :func:`configure_socket_limits` (ms a closing socket keeps trying to send)."""

ERROR_CODES = ("unknown_worker", "bad_request", "not_found", "busy")
"""Codes of ERROR: unknown_worker → send HELLO again; bad_request/not_found → fatal for that
request; busy → retry the request after a back-off."""

INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1  # msgpack's integer range: int64 ∪ uint64

# Message type names (use these constants rather than string literals).
HELLO = "HELLO"
WELCOME = "WELCOME"
REJECT = "REJECT"
PING = "PING"
PONG = "PONG"
LEASE = "LEASE"
RESULT = "RESULT"
COMMIT = "COMMIT"
STATE = "STATE"
RESYNC = "RESYNC"
FETCH = "FETCH"
CHUNK = "CHUNK"
LOG_FETCH = "LOG_FETCH"
LOG_RECORDS = "LOG_RECORDS"
BYE = "BYE"
END = "END"
STATUS_REQ = "STATUS_REQ"
STATUS = "STATUS"
ERROR = "ERROR"

_ENVELOPE = ("v", "type")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

class ProtocolError(UserError):
    """A frame that is not a valid message of this protocol (one-line reason)."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version."""

    def __init__(self, peer_version: Any, msg_type: str | None = None):
        self.peer_version = peer_version
        self.our_version = PROTOCOL_VERSION
        self.msg_type = msg_type
        what = f" in a {msg_type} message" if msg_type else ""
        super().__init__(
            f"protocol version mismatch{what}: peer speaks v{_short(peer_version)}, this side "
            f"(ea4llm-pool {__version__}) speaks v{PROTOCOL_VERSION}; install the same ea4llm-pool "
            f"version on the coordinator and every worker")


def _short(value: Any, limit: int = 60) -> str:
    """A one-line, bounded repr for error messages."""
    text = repr(value).replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tname(value: Any) -> str:
    return type(value).__name__


# --------------------------------------------------------------------------------------------
# Schema language
# --------------------------------------------------------------------------------------------

class Spec:
    """A field type. ``check(value, path)`` returns the normalised value or raises ProtocolError."""

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class Int(Spec):
    def __init__(self, min: int = INT_MIN, max: int = INT_MAX):
        self.min, self.max = min, max

    def check(self, value, path):
        if type(value) is not int:  # rejects bool too
            if isinstance(value, int) and not isinstance(value, bool):
                value = int(value)  # int subclasses (IntEnum) travel as plain ints
            else:
                raise ProtocolError(f"{path}: expected int, got {_tname(value)}")
        if value < self.min or value > self.max:
            raise ProtocolError(f"{path}: {_short(value)} is outside [{self.min}, {self.max}]")
        return value

    def describe(self):
        if self.min == INT_MIN and self.max == INT_MAX:
            return "int"
        if self.max == INT_MAX:
            return f"int≥{self.min}"
        return f"int {self.min}..{self.max}"


class Float(Spec):
    def __init__(self, min: float | None = None, exclusive_min: bool = False, finite: bool = False):
        self.min, self.exclusive_min, self.finite = min, exclusive_min, finite

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (float, int)):
            raise ProtocolError(f"{path}: expected float, got {_tname(value)}")
        value = float(value)
        if (self.finite or self.min is not None) and not math.isfinite(value):
            raise ProtocolError(f"{path}: expected a finite float, got {value!r}")
        if self.min is not None:
            if value < self.min or (self.exclusive_min and value == self.min):
                op = ">" if self.exclusive_min else "≥"
                raise ProtocolError(f"{path}: expected float {op} {self.min}, got {value!r}")
        return value

    def describe(self):
        if self.min is None:
            return "float" + (" (finite)" if self.finite else "")
        return f"float{'>' if self.exclusive_min else '≥'}{self.min:g}"


class Str(Spec):
    def check(self, value, path):
        if not isinstance(value, str):
            raise ProtocolError(f"{path}: expected str, got {_tname(value)}")
        return str(value)

    def describe(self):
        return "str"


class Bytes(Spec):
    def __init__(self, max_len: int | None = None):
        self.max_len = max_len

    def check(self, value, path):
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if not isinstance(value, bytes):
            raise ProtocolError(f"{path}: expected bytes, got {_tname(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise ProtocolError(f"{path}: {len(value)} bytes exceed the limit of {self.max_len}")
        return value

    def describe(self):
        return "bytes" if self.max_len is None else f"bytes(≤{self.max_len})"


class Bool(Spec):
    def check(self, value, path):
        if not isinstance(value, bool):
            raise ProtocolError(f"{path}: expected bool, got {_tname(value)}")
        return value

    def describe(self):
        return "bool"


class OneOf(Spec):
    """An int from a fixed set (e.g. the sign ±1)."""

    def __init__(self, *values: int):
        self.values = values

    def check(self, value, path):
        if type(value) is not int or value not in self.values:
            raise ProtocolError(f"{path}: expected one of {self.values}, got {_short(value)}")
        return value

    def describe(self):
        return "|".join(f"{v:+d}" for v in self.values)


class ListOf(Spec):
    def __init__(self, item: Spec, max_len: int | None = None):
        self.item, self.max_len = item, max_len

    def check(self, value, path):
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{path}: expected list, got {_tname(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise ProtocolError(f"{path}: {len(value)} entries exceed the limit of {self.max_len}")
        item = self.item
        if isinstance(item, Int) and item.min == 0 and item.max == INT_MAX:
            # Fast path for long index lists.
            for v in value:
                if type(v) is not int or v < 0 or v > INT_MAX:
                    break
            else:
                return list(value)
        return [item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def describe(self):
        return f"list[{self.item.describe()}]"


class TupleOf(Spec):
    """A fixed-length list with one spec per position (e.g. [name, size, sha256])."""

    def __init__(self, *items: tuple[str, Spec]):
        self.items = items

    def check(self, value, path):
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{path}: expected list, got {_tname(value)}")
        if len(value) != len(self.items):
            raise ProtocolError(f"{path}: expected {len(self.items)} entries, got {len(value)}")
        return [spec.check(v, f"{path}[{i}]") for i, ((_, spec), v) in enumerate(zip(self.items, value))]

    def describe(self):
        return "[" + ", ".join(f"{n}:{s.describe()}" for n, s in self.items) + "]"


def _check_plain(value: Any, path: str, depth: int) -> Any:
    """Free-form data: None, bool, int, float, str, bytes, lists and str-keyed maps, bounded depth."""
    if value is None or isinstance(value, (bool, str, float)):
        return value
    if isinstance(value, int):
        if value < INT_MIN or value > INT_MAX:
            raise ProtocolError(f"{path}: integer {_short(value)} does not fit in 64 bits")
        return int(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if depth >= MAX_DEPTH:
        raise ProtocolError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        return [_check_plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError(f"{path}: map key {_short(k)} is not a str")
            out[k] = _check_plain(v, f"{path}.{k}", depth + 1)
        return out
    raise ProtocolError(f"{path}: {_tname(value)} cannot travel on the wire")


class Map(Spec):
    """A map. With no declared keys: free-form (str keys, plain values). With declared keys:
    required keys must be present and typed; undeclared keys are rejected unless ``extra``."""

    def __init__(self, required: Mapping[str, Spec] | None = None,
                 optional: Mapping[str, Spec] | None = None, extra: bool = False):
        self.required = dict(required or {})
        self.optional = dict(optional or {})
        self.extra = extra if (self.required or self.optional) else True

    def check(self, value, path, depth: int = 1):
        if not isinstance(value, Mapping):
            raise ProtocolError(f"{path}: expected map, got {_tname(value)}")
        out = {}
        for name, spec in self.required.items():
            if name not in value:
                raise ProtocolError(f"{path}: missing field {name!r}")
            out[name] = spec.check(value[name], f"{path}.{name}")
        for name, v in value.items():
            if name in self.required:
                continue
            if not isinstance(name, str):
                raise ProtocolError(f"{path}: map key {_short(name)} is not a str")
            spec = self.optional.get(name)
            if spec is not None:
                out[name] = spec.check(v, f"{path}.{name}")
            elif self.extra:
                out[name] = _check_plain(v, f"{path}.{name}", depth)
            else:
                raise ProtocolError(f"{path}: unknown field {_short(name)}")
        return out

    def describe(self):
        if not (self.required or self.optional):
            return "map"
        parts = [f"{n}:{s.describe()}" for n, s in self.required.items()]
        parts += [f"?{n}:{s.describe()}" for n, s in self.optional.items()]
        if self.extra:
            parts.append("...")
        return "{" + ", ".join(parts) + "}"


class MessageSchema:
    """The top-level fields of one message type."""

    def __init__(self, direction: str, required: Mapping[str, Spec],
                 optional: Mapping[str, Spec] | None = None, doc: str = ""):
        self.direction = direction
        self.required = dict(required)
        self.optional = dict(optional or {})
        self.doc = doc
        for name in list(self.required) + list(self.optional):
            if name in _ENVELOPE:
                raise ValueError(f"field name {name!r} is reserved for the envelope")
        self._map = Map(self.required, self.optional, extra=False)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.required) + tuple(self.optional)

    def check(self, msg_type: str, fields: Mapping[str, Any]) -> dict:
        return self._map.check(fields, msg_type)


# --------------------------------------------------------------------------------------------
# The message table
# --------------------------------------------------------------------------------------------

_int = Int()
_nat = Int(min=0)
_iter = Int(min=-1)  # an iteration where -1 means "none yet"
_str = Str()
_bool = Bool()
_float = Float()
_sign = OneOf(1, -1)

SYNC = Map({
    "checkpoint_iteration": _iter,
    "files": ListOf(TupleOf(("name", _str), ("size", _nat), ("sha256", _str))),
    "log_from": _nat,
})
"""How a worker reaches the current state: load checkpoint ``checkpoint_iteration`` (-1: build
the initial model from the config) whose files are ``files``, then replay COMMITs from ``log_from``."""

UNIT = Map({"member": _nat, "seed": _nat, "sign": _sign, "indices": ListOf(_nat)})
UNIT_RESULT = Map({"member": _nat, "sign": _sign, "sum_r": _float, "count": _nat})
COMMIT_RECORD = Map({"iteration": _nat, "state_hash": _str}, extra=True)

SCHEMAS: dict[str, MessageSchema] = {
    HELLO: MessageSchema("w→c", {
        "config_hash": _str, "noise_digest": _str, "device": _str, "dtype": _str,
        "threads": Int(min=1), "throughput": Float(min=0.0), "worker_name": _str, "pid": _nat,
        "state_iteration": _iter, "state_hash": _str,
    }, doc="register; state_iteration -1 / state_hash '' when the worker holds no state"),
    WELCOME: MessageSchema("c→w", {
        "worker_id": _str, "run_id": _str, "config_yaml": _str, "sync": SYNC,
        "heartbeat_s": Float(min=0.0, exclusive_min=True),
    }, {"bulk_port": Int(min=0, max=65535)},
        doc="accepted: the run's resolved config, how to reach the current state, the bulk channel's port"),
    REJECT: MessageSchema("c→w", {"reason": _str},
                          doc="refused: the worker prints the reason and exits"),
    PING: MessageSchema("w→c", {
        "worker_id": _str, "iteration": _iter, "state_hash": _str, "busy": _bool,
        "done_units": _nat,
    }, {"throughput": Float(min=0.0)}, doc="heartbeat from a thread a forward pass cannot starve"),
    PONG: MessageSchema("c→w", {"iteration": _iter}, {"state_hash": _str},
                        doc="heartbeat answer: the coordinator's committed iteration"),
    LEASE: MessageSchema("c→w", {
        "lease_id": _str, "iteration": _nat, "alpha": Float(finite=True),
        "sigma": Float(finite=True), "units": ListOf(UNIT),
        "expires_s": Float(min=0.0, exclusive_min=True),
    }, doc="work: evaluate each unit (member seed, sign, sample indices) at sigma"),
    RESULT: MessageSchema("w→c", {
        "lease_id": _str, "iteration": _nat, "results": ListOf(UNIT_RESULT),
        "eval_s": Float(min=0.0),
    }, {"error": _str, "state_iteration": _iter, "state_hash": _str},
        doc="per unit: sum of per-sample R and the sample count; the state a pending STATE would report"),
    COMMIT: MessageSchema("c→w", {"record": COMMIT_RECORD},
                          doc="the iteration's update record (as written in the run log)"),
    STATE: MessageSchema("w→c", {"iteration": _iter, "state_hash": _str},
                         doc="the worker's state after applying a commit or a sync"),
    RESYNC: MessageSchema("c→w", {"reason": _str, "sync": SYNC},
                          doc="your state is wrong or behind: sync as described"),
    FETCH: MessageSchema("w→c", {"name": _str, "offset": _nat, "length": Int(min=1, max=CHUNK_SIZE)},
                         doc="bulk channel: ask for bytes of a checkpoint file"),
    CHUNK: MessageSchema("c→w", {"name": _str, "offset": _nat, "data": Bytes(max_len=CHUNK_SIZE),
                                 "eof": _bool},
                         doc="bulk channel: bytes of a checkpoint file; eof on the last one"),
    LOG_FETCH: MessageSchema("w→c", {"from_iteration": _nat}, {"max_records": Int(min=1)},
                             doc="bulk channel: ask for COMMIT records from an iteration on"),
    LOG_RECORDS: MessageSchema("c→w", {"records": ListOf(COMMIT_RECORD), "last": _bool},
                               doc="bulk channel: consecutive run-log records; last when up to date"),
    BYE: MessageSchema("w→c", {"worker_id": _str, "reason": _str},
                       doc="graceful leave: release my leases now"),
    END: MessageSchema("c→w", {"reason": _str, "final_iteration": _iter, "final_hash": _str},
                       doc="the run is over"),
    STATUS_REQ: MessageSchema("any→c", {}, doc="ask for a status snapshot"),
    STATUS: MessageSchema("c→any", {"snapshot": Map()}, doc="a status snapshot"),
    ERROR: MessageSchema("c→any", {"code": _str, "reason": _str},
                         doc="a request that cannot be served (see ERROR_CODES)"),
}

MESSAGE_TYPES = frozenset(SCHEMAS)


def schema_table() -> str:
    """The message table as text, rendered from the schemas (for docs and ``--help``)."""
    lines = []
    for name, schema in SCHEMAS.items():
        parts = [f"{n}:{s.describe()}" for n, s in schema.required.items()]
        parts += [f"?{n}:{s.describe()}" for n, s in schema.optional.items()]
        lines.append(f"{name:<12} {schema.direction:<6} {', '.join(parts) or '(no fields)'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

class Message:
    """A decoded, validated message: ``msg.type`` plus read-only field access.

    ``msg.lease_id`` / ``msg["lease_id"]`` / ``msg.get("error")``; a declared optional field that
    is absent reads as None through attribute access. Fields hold plain python values (lists,
    dicts); treat them as read-only.
    """

    __slots__ = ("type", "_fields")

    def __init__(self, msg_type: str, fields: Mapping[str, Any]):
        object.__setattr__(self, "type", msg_type)
        object.__setattr__(self, "_fields", dict(fields))

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        try:
            return fields[name]
        except KeyError:
            schema = SCHEMAS.get(object.__getattribute__(self, "type"))
            if schema is not None and name in schema.optional:
                return None
            raise AttributeError(f"{self.type} message has no field {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Message is read-only")

    def __delattr__(self, name):
        raise AttributeError("Message is read-only")

    def __getitem__(self, name: str) -> Any:
        return self._fields[name]

    def __contains__(self, name: object) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def get(self, name: str, default: Any = None) -> Any:
        return self._fields.get(name, default)

    @property
    def fields(self) -> dict:
        """A shallow copy of the fields (without the envelope)."""
        return dict(self._fields)

    def to_bytes(self) -> bytes:
        return encode(self.type, **self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.type == other.type and self._fields == other._fields

    __hash__ = None  # type: ignore[assignment]  # fields hold lists

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={_short(v, 40)}" for k, v in self._fields.items())
        return f"Message({self.type}: {body})"


def validate(msg_type: str, fields: Mapping[str, Any]) -> dict:
    """Check ``fields`` against ``msg_type``'s schema; return the normalised fields."""
    if not isinstance(msg_type, str):
        raise ProtocolError(f"message type must be a str, got {_tname(msg_type)}")
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError(f"unknown message type {_short(msg_type)}")
    return schema.check(msg_type, fields)


def encode(msg_type: str, **fields: Any) -> bytes:
    """Validate and pack one message into one frame."""
    for name in _ENVELOPE:
        if name in fields:
            raise ProtocolError(f"{msg_type}: field {name!r} is reserved for the envelope")
    body = validate(msg_type, fields)
    envelope = {"v": PROTOCOL_VERSION, "type": msg_type}
    envelope.update(body)
    try:
        frame = msgpack.packb(envelope, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # pragma: no cover - validated above
        raise ProtocolError(f"{msg_type}: cannot pack: {_short(str(exc), 120)}") from None
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{msg_type}: encoded message of {len(frame)} bytes exceeds "
                            f"the limit of {MAX_MESSAGE_BYTES}")
    return frame


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Unpack and validate one frame. Raises ProtocolError / VersionMismatch with a one-line reason."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raw = getattr(frame, "bytes", None)  # a zmq.Frame
        if not isinstance(raw, bytes):
            raise ProtocolError(f"frame must be bytes, got {_tname(frame)}")
        frame = raw
    size = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
    if size == 0:
        raise ProtocolError("empty frame")
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"frame of {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    try:
        obj = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_MESSAGE_BYTES, max_bin_len=MAX_MESSAGE_BYTES,
            max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_MAP_LEN, max_ext_len=0)
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, TypeError...
        reason = _short(str(exc) or type(exc).__name__, 120)
        raise ProtocolError(f"undecodable frame ({type(exc).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is not a msgpack map (got {_tname(obj)})")
    if "v" not in obj:
        raise ProtocolError("frame has no protocol version field 'v'")
    version = obj["v"]
    msg_type = obj.get("type")
    if type(version) is not int:
        raise ProtocolError(f"protocol version field 'v' must be an int, got {_tname(version)}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version, msg_type if isinstance(msg_type, str) else None)
    if "type" not in obj:
        raise ProtocolError("frame has no message type field 'type'")
    if not isinstance(msg_type, str):
        raise ProtocolError(f"message type must be a str, got {_tname(msg_type)}")
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError(f"unknown message type {_short(msg_type)}")
    body = {k: v for k, v in obj.items() if k not in _ENVELOPE}
    return Message(msg_type, schema.check(msg_type, body))


def make_sync(checkpoint_iteration: int, files: list, log_from: int) -> dict:
    """Build (and check) the SYNC map of WELCOME/RESYNC. ``files``: [(name, size, sha256), ...]."""
    return SYNC.check({"checkpoint_iteration": checkpoint_iteration,
                       "files": [list(f) for f in files], "log_from": log_from}, "sync")


# --------------------------------------------------------------------------------------------
# Sockets
# --------------------------------------------------------------------------------------------

def configure_socket_limits(sock: Any, max_bytes: int = MAX_MESSAGE_BYTES,
                            linger_ms: int = DEFAULT_LINGER_MS) -> None:
    """Cap inbound message size (ZMQ_MAXMSGSIZE: a larger message drops the peer's connection
    before it is buffered) and bound how long a closing socket lingers on unsent messages.
    Works for every socket type (ROUTER/DEALER control, the bulk channel, status clients).
    """
    import zmq  # lazily: the wire format itself does not need zmq

    sock.setsockopt(zmq.MAXMSGSIZE, int(max_bytes))
    sock.setsockopt(zmq.LINGER, int(linger_ms))
