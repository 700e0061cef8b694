"""The pool's wire format: every message, its fields and their types, in one place.

One msgpack map per ZeroMQ frame::

    {"v": PROTOCOL_VERSION, "type": "<MESSAGE TYPE>", <field>: <value>, ...}

Each message type is a pydantic model below (``SCHEMAS`` maps type names to them).
``encode(msg_type, **fields) -> bytes`` and ``decode(frame) -> Message`` validate every message
against its model on *both* sides: required fields present, no undeclared field, every value of
the declared type, recursively. Types are strict: no str→int or int→bool coercion, a bool is not
an int; an int is accepted for a float (and becomes one). Every list has a bound. A frame that
fails any check raises :class:`ProtocolError` with a one-line reason; a frame from a peer
speaking another protocol version raises :class:`VersionMismatch` (a ``ProtocolError``) naming
both versions. Decoding uses ``msgpack.unpackb(raw=False, strict_map_key=True)`` with size
limits and no extension types: nothing on the wire is ever executed, unpickled or evaluated.

This module depends on msgpack and pydantic only (``zmq`` is imported lazily by
:func:`configure_socket_limits`). Routing (ROUTER identity frames) is the caller's business: a
message here is exactly one payload frame.

Message table (c = coordinator, w = worker, any = any client such as ``ea4llm-pool status``).
Types: int, float (ints accepted and converted; a float with a bound is also finite), str,
bytes, bool, map (str keys, plain values: None, bool, int, float, str, bytes, lists and maps,
at most MAX_DEPTH deep), list[...] (≤ n entries), {...} (a sub-map with fixed keys; ``...``: more
plain keys allowed); ``?`` marks an optional field (absent → None; ``encode`` drops an optional
field given as None).

=============  =====  ==========================================================================
type           dir    fields
=============  =====  ==========================================================================
HELLO          w→c    config_hash:str, selftest:map[str,str] (≤ MAX_SELFTEST; device self-test
                      part → digest), device:str, dtype:str, threads:int≥1,
                      throughput:float≥0 (samples/s estimate), worker_name:str, pid:int≥0,
                      state_iteration:int≥-1 (-1 = no state), state_hash:str ("" = none),
                      ?fitness:list[str] (≤ MAX_FITNESS; the fitness plugins installed on the
                      worker; absent = ["logprob"], what a worker without plugins has)
WELCOME        c→w    worker_id:str, run_id:str, config_yaml:str, heartbeat_s:float>0,
                      bulk_port:int 0..65535 (the bulk channel's port on the coordinator's host),
                      keep_state:bool (true: the worker's reported state is verified; it only
                      needs log records from its own step on), model_params:int≥0
REJECT         c→w    reason:str  (the worker prints it and exits)
PING           w→c    worker_id:str, iteration:int≥-1, state_hash:str, busy:bool, done_units:int≥0,
                      ?throughput:float≥0, ?update_s:float≥0 (time the last commit took to apply)
PONG           c→w    iteration:int≥-1, ?state_hash:str
LEASE          c→w    lease_id:str, iteration:int≥0, alpha:float (finite), sigma:float (finite),
                      units:list[{member:int≥0, seed:int≥0, sign:±1,
                                  indices:list[int≥0] (≤ MAX_INDICES)}] (≤ MAX_UNITS),
                      expires_s:float>0
RESULT         w→c    lease_id:str, iteration:int≥0,
                      results:list[{member:int≥0, sign:±1, sum_r:float (NaN/±inf allowed: ranked
                      worst), count:int≥0}] (≤ MAX_UNITS),
                      eval_s:float≥0, ?error:str (the lease could not be evaluated; re-lease it),
                      ?state_iteration:int≥-1, ?state_hash:str (a STATE report carried along),
                      ?update_s:float≥0
COMMIT         c→w    record:RECORD
STATE          w→c    iteration:int≥-1 (a step: commits applied), state_hash:str
RESYNC         c→w    reason:str  (your state is wrong or behind: sync again over the bulk channel)
SYNC_REQ       w→c    have_step:int≥-1, have_hash:str                         (bulk channel)
SYNC_OFFER     c→w    checkpoint_iteration:int≥0,                             (bulk channel)
                      files:list[[name:str, size:int≥0, sha256:str]] (≤ MAX_FILES),
                      log_from:int≥0 (first COMMIT iteration to replay after the checkpoint)
FETCH          w→c    name:str, offset:int≥0, length:int 1..CHUNK_SIZE        (bulk channel)
CHUNK          c→w    name:str, offset:int≥0, data:bytes (≤ CHUNK_SIZE), eof:bool (bulk channel)
LOG_FETCH      w→c    from_iteration:int≥0, ?max_records:int≥1                (bulk channel)
LOG_RECORDS    c→w    records:list[RECORD] (≤ LOG_BATCH), last:bool           (bulk channel)
BYE            w→c    worker_id:str, reason:str
END            c→w    reason:str, final_iteration:int≥-1, final_hash:str
STATUS_REQ     any→c  (no fields)
STATUS         c→any  snapshot:map
ERROR          c→any  code:str, reason:str, ?retry_s:float≥0  (a request that cannot be served;
                      codes in ERROR_CODES; with "busy": retry after retry_s seconds)
=============  =====  ==========================================================================

RECORD = {iteration:int≥0, ?attest:{step:int≥0, state_hash:str}|null, ...plain keys}
         (a run-log COMMIT record; attest: a replica's state hash after that step)

:func:`schema_table` renders the live table from the models themselves.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Iterator, Mapping, Optional

import msgpack
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, Strict,
                      ValidationError, WithJsonSchema)
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, TypedDict  # pydantic's own dependency

from . import UserError, __version__

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

PROTOCOL_VERSION = 2
"""Bump on any incompatible change to the table; peers with different versions refuse each other."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest frame either side sends or accepts (also set as the sockets' ZMQ_MAXMSGSIZE)."""

MAX_REQUEST_BYTES = 1024 * 1024
"""Largest frame the coordinator's sockets accept (ZMQ_MAXMSGSIZE there): what workers send is small."""

CHUNK_SIZE = 1024 * 1024
"""Largest payload of one CHUNK (and largest FETCH length) on the bulk channel."""

MAX_UNITS = 4096
"""Most units in one LEASE (and results in one RESULT)."""

MAX_INDICES = 1 << 20
"""Most sample indices in one unit."""

LOG_BATCH = 256
"""Most run-log records in one LOG_RECORDS."""

MAX_FILES = 64
"""Most files in one SYNC_OFFER."""

MAX_SELFTEST = 32
"""Most entries in HELLO.selftest."""

MAX_FITNESS = 256
"""Most names in HELLO.fitness."""

MAX_CONTAINER_LEN = 1 << 22
"""Largest msgpack array accepted by the decoder (entries)."""

MAX_MAP_LEN = 1 << 16
"""Largest msgpack map accepted by the decoder (keys), and by free-form maps on encode."""

MAX_DEPTH = 32
"""Deepest nesting accepted inside free-form maps (COMMIT.record, STATUS.snapshot, ...)."""

DEFAULT_LINGER_MS = 1000
"""Socket LINGER set by :func:`configure_socket_limits` (ms a closing socket keeps trying to send)."""

ERROR_CODES = ("unknown_worker", "bad_request", "not_found", "busy", "banned", "unauthorized")
"""Codes of ERROR: unknown_worker → send HELLO again; bad_request/not_found → fatal for that
request; busy → retry the request after ERROR.retry_s (or a back-off); banned → the sender's
messages are dropped unread for retry_s seconds (too many bad ones); unauthorized → the bulk
channel refuses a key that is no longer admitted."""

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
SYNC_REQ = "SYNC_REQ"
SYNC_OFFER = "SYNC_OFFER"
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
# Field types
# --------------------------------------------------------------------------------------------

def _plain_error(reason: str, subpath: str) -> PydanticCustomError:
    return PydanticCustomError("plain_value", "{reason}", {"reason": reason, "subpath": subpath})


def _check_plain(value: Any, path: str, depth: int) -> Any:
    """Free-form data: None, bool, int, float, str, bytes, lists and str-keyed maps, bounded
    depth. ``path`` is relative to the field being checked."""
    if value is None or isinstance(value, (bool, str, float)):
        return value
    if isinstance(value, int):
        if value < INT_MIN or value > INT_MAX:
            raise _plain_error(f"integer {_short(value)} does not fit in 64 bits", path)
        return int(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if depth >= MAX_DEPTH:
        raise _plain_error(f"nested deeper than {MAX_DEPTH} levels", path)
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_CONTAINER_LEN:
            raise _plain_error(f"{len(value)} entries exceed the limit of {MAX_CONTAINER_LEN}", path)
        return [_check_plain(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return _check_plain_map(value, path, depth + 1)
    raise _plain_error(f"{_tname(value)} cannot travel on the wire", path)


def _check_plain_map(value: Any, path: str, depth: int) -> dict:
    if not isinstance(value, Mapping):
        raise _plain_error(f"expected map, got {_tname(value)}", path)
    if len(value) > MAX_MAP_LEN:
        raise _plain_error(f"{len(value)} keys exceed the limit of {MAX_MAP_LEN}", path)
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise _plain_error(f"map key {_short(k)} is not a str", path)
        out[k] = _check_plain(v, f"{path}.{k}", depth)
    return out


def _sign(value: int) -> int:
    if value != 1 and value != -1:
        raise PydanticCustomError("sign", "expected +1 or -1, got {value}", {"value": value})
    return value


def _record_extras(value: dict) -> dict:
    for key, v in value.items():
        if key not in _RECORD_KEYS:
            value[key] = _check_plain(v, f".{key}", 1)
    return value


# Strictness comes from the config below; these add bounds. Floats with a bound are finite.
Nat = Annotated[int, Field(ge=0, le=INT_MAX)]
Step = Annotated[int, Field(ge=-1, le=INT_MAX)]  # an iteration or step where -1 means "none yet"
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False),
                   WithJsonSchema({"type": "number", "finite": True})]
Sign = Annotated[int, AfterValidator(_sign), WithJsonSchema({"type": "integer", "enum": [1, -1]})]
NatList = Annotated[list[Nat], Field(max_length=MAX_INDICES)]
FreeMap = Annotated[dict, PlainValidator(lambda v: _check_plain_map(v, "", 1)),
                    WithJsonSchema({"type": "object"})]
# [name, size, sha256]: an array on the wire, so a list is as good as a tuple here.
FileEntry = Annotated[tuple[str, Nat, str], Strict(False)]

_CONFIG = ConfigDict(strict=True, extra="forbid", protected_namespaces=())

# Sub-maps are TypedDicts: they validate straight into plain dicts, which is what a Message
# holds, so no second pass turns model instances back into dicts.


class Unit(TypedDict):
    """One member-sign evaluation over the listed sample indices."""
    __pydantic_config__ = _CONFIG  # type: ignore[misc]
    member: Nat
    seed: Nat
    sign: Sign
    indices: NatList


class UnitResult(TypedDict):
    """A unit's sum of per-sample R and its sample count."""
    __pydantic_config__ = _CONFIG  # type: ignore[misc]
    member: Nat
    sign: Sign
    sum_r: float  # NaN/inf are meaningful: the coordinator ranks them worst
    count: Nat


class Attest(TypedDict):
    """A replica's state hash after ``step`` commits."""
    __pydantic_config__ = _CONFIG  # type: ignore[misc]
    step: Nat
    state_hash: str


class _RecordFields(TypedDict):
    """A run-log COMMIT record: the fields every reader needs, plus any plain keys."""
    __pydantic_config__ = ConfigDict(strict=True, extra="allow")  # type: ignore[misc]
    iteration: Nat
    attest: NotRequired[Optional[Attest]]


_RECORD_KEYS = frozenset(_RecordFields.__annotations__)
Record = Annotated[_RecordFields, AfterValidator(_record_extras)]


# --------------------------------------------------------------------------------------------
# The message table
# --------------------------------------------------------------------------------------------

class MessageModel(BaseModel):
    """A message's fields; TYPE and DIRECTION name it in the table."""
    model_config = _CONFIG
    TYPE: ClassVar[str]
    DIRECTION: ClassVar[str]


class Hello(MessageModel):
    """register; state_iteration -1 / state_hash '' when the worker holds no state"""
    TYPE, DIRECTION = HELLO, "w→c"
    config_hash: str
    selftest: Annotated[dict[str, str], Field(max_length=MAX_SELFTEST)]
    device: str
    dtype: str
    threads: Annotated[int, Field(ge=1, le=INT_MAX)]
    throughput: Seconds
    worker_name: str
    pid: Nat
    state_iteration: Step
    state_hash: str
    fitness: Annotated[list[str], Field(max_length=MAX_FITNESS)] = None


class Welcome(MessageModel):
    """accepted: the run's resolved config, the bulk channel's port, what the worker must keep"""
    TYPE, DIRECTION = WELCOME, "c→w"
    worker_id: str
    run_id: str
    config_yaml: str
    heartbeat_s: PositiveSeconds
    bulk_port: Port
    keep_state: bool
    model_params: Nat


class Reject(MessageModel):
    """refused: the worker prints the reason and exits"""
    TYPE, DIRECTION = REJECT, "c→w"
    reason: str


class Ping(MessageModel):
    """heartbeat from a thread a forward pass cannot starve"""
    TYPE, DIRECTION = PING, "w→c"
    worker_id: str
    iteration: Step
    state_hash: str
    busy: bool
    done_units: Nat
    throughput: Seconds = None
    update_s: Seconds = None


class Pong(MessageModel):
    """heartbeat answer: the coordinator's committed iteration"""
    TYPE, DIRECTION = PONG, "c→w"
    iteration: Step
    state_hash: str = None


class Lease(MessageModel):
    """work: evaluate each unit (member seed, sign, sample indices) at sigma"""
    TYPE, DIRECTION = LEASE, "c→w"
    lease_id: str
    iteration: Nat
    alpha: Finite
    sigma: Finite
    units: Annotated[list[Unit], Field(max_length=MAX_UNITS)]
    expires_s: PositiveSeconds


class Result(MessageModel):
    """per unit: sum of per-sample R and the sample count; the state a pending STATE would report"""
    TYPE, DIRECTION = RESULT, "w→c"
    lease_id: str
    iteration: Nat
    results: Annotated[list[UnitResult], Field(max_length=MAX_UNITS)]
    eval_s: Seconds
    error: str = None
    state_iteration: Step = None
    state_hash: str = None
    update_s: Seconds = None


class Commit(MessageModel):
    """the iteration's update record (as written in the run log)"""
    TYPE, DIRECTION = COMMIT, "c→w"
    record: Record


class State(MessageModel):
    """the worker's state (step = commits applied) after a commit or a sync"""
    TYPE, DIRECTION = STATE, "w→c"
    iteration: Step
    state_hash: str


class Resync(MessageModel):
    """your state is wrong or behind: sync again over the bulk channel"""
    TYPE, DIRECTION = RESYNC, "c→w"
    reason: str


class SyncReq(MessageModel):
    """bulk channel: how do I reach the current state from the one I hold?"""
    TYPE, DIRECTION = SYNC_REQ, "w→c"
    have_step: Step
    have_hash: str


class SyncOffer(MessageModel):
    """bulk channel: load this checkpoint's files, then replay COMMITs from log_from"""
    TYPE, DIRECTION = SYNC_OFFER, "c→w"
    checkpoint_iteration: Nat
    files: Annotated[list[FileEntry], Field(max_length=MAX_FILES)]
    log_from: Nat


class Fetch(MessageModel):
    """bulk channel: ask for bytes of a checkpoint file"""
    TYPE, DIRECTION = FETCH, "w→c"
    name: str
    offset: Nat
    length: Annotated[int, Field(ge=1, le=CHUNK_SIZE)]


class Chunk(MessageModel):
    """bulk channel: bytes of a checkpoint file; eof on the last one"""
    TYPE, DIRECTION = CHUNK, "c→w"
    name: str
    offset: Nat
    data: Annotated[bytes, Field(max_length=CHUNK_SIZE)]
    eof: bool


class LogFetch(MessageModel):
    """bulk channel: ask for COMMIT records from an iteration on"""
    TYPE, DIRECTION = LOG_FETCH, "w→c"
    from_iteration: Nat
    max_records: Annotated[int, Field(ge=1, le=INT_MAX)] = None


class LogRecords(MessageModel):
    """bulk channel: consecutive run-log records; last when up to date"""
    TYPE, DIRECTION = LOG_RECORDS, "c→w"
    records: Annotated[list[Record], Field(max_length=LOG_BATCH)]
    last: bool


class Bye(MessageModel):
    """graceful leave: release my leases now"""
    TYPE, DIRECTION = BYE, "w→c"
    worker_id: str
    reason: str


class End(MessageModel):
    """the run is over"""
    TYPE, DIRECTION = END, "c→w"
    reason: str
    final_iteration: Step
    final_hash: str


class StatusReq(MessageModel):
    """ask for a status snapshot"""
    TYPE, DIRECTION = STATUS_REQ, "any→c"


class Status(MessageModel):
    """a status snapshot"""
    TYPE, DIRECTION = STATUS, "c→any"
    snapshot: FreeMap


class Error(MessageModel):
    """a request that cannot be served (see ERROR_CODES); busy: retry after retry_s"""
    TYPE, DIRECTION = ERROR, "c→any"
    code: str
    reason: str
    retry_s: Seconds = None


SCHEMAS: dict[str, type[MessageModel]] = {m.TYPE: m for m in (
    Hello, Welcome, Reject, Ping, Pong, Lease, Result, Commit, State, Resync, SyncReq, SyncOffer,
    Fetch, Chunk, LogFetch, LogRecords, Bye, End, StatusReq, Status, Error)}

MESSAGE_TYPES = frozenset(SCHEMAS)

# Optional top-level fields per type (absent reads as None).
_OPTIONAL = {t: frozenset(n for n, f in m.model_fields.items() if not f.is_required())
             for t, m in SCHEMAS.items()}


# --------------------------------------------------------------------------------------------
# The rendered table
# --------------------------------------------------------------------------------------------

def _describe(schema: dict, defs: dict) -> str:
    """A short type string from a JSON schema node (the notation of the module docstring)."""
    if "$ref" in schema:
        return _describe(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        return "|".join(_describe(s, defs) for s in schema["anyOf"])
    if "enum" in schema:
        return "|".join(f"{v:+d}" if isinstance(v, int) else repr(v) for v in schema["enum"])
    kind = schema.get("type")
    if kind in ("integer", "number"):
        text = "int" if kind == "integer" else "float"
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if "exclusiveMinimum" in schema:
            text += f">{schema['exclusiveMinimum']:g}"
        elif lo is not None and lo != INT_MIN and hi is not None and hi != INT_MAX:
            text += f" {lo}..{hi}"
        elif lo is not None and lo != INT_MIN:
            text += f"≥{lo:g}"
        if schema.get("finite"):
            text += " (finite)"
        return text
    if kind == "string":
        text = "bytes" if schema.get("format") == "binary" else "str"
        return text + (f"(≤{schema['maxLength']})" if "maxLength" in schema else "")
    if kind == "boolean":
        return "bool"
    if kind == "null":
        return "null"
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_describe(s, defs) for s in schema["prefixItems"]) + "]"
        bound = f"(≤{schema['maxItems']})" if "maxItems" in schema else ""
        return f"list[{_describe(schema.get('items', {}), defs)}]{bound}"
    if kind == "object":
        if "properties" in schema:
            return "{" + _describe_fields(schema, defs) + "}"
        values = schema.get("additionalProperties")
        bound = f"(≤{schema['maxProperties']})" if "maxProperties" in schema else ""
        if isinstance(values, dict) and values:
            return f"map[str,{_describe(values, defs)}]{bound}"
        return "map" + bound
    return "plain"


def _describe_fields(schema: dict, defs: dict) -> str:
    required = set(schema.get("required", ()))
    parts = [f"{'' if n in required else '?'}{n}:{_describe(s, defs)}"
             for n, s in schema.get("properties", {}).items()]
    if schema.get("additionalProperties") not in (None, False):
        parts.append("...")
    return ", ".join(parts)


def schema_table() -> str:
    """The message table as text, rendered from the models (for docs and ``--help``)."""
    lines = []
    for name, model in SCHEMAS.items():
        schema = model.model_json_schema()
        fields = _describe_fields(schema, schema.get("$defs", {}))
        lines.append(f"{name:<12} {model.DIRECTION:<6} {fields or '(no fields)'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

class Message:
    """A decoded, validated message: ``msg.type`` plus read-only field access.

    ``msg.lease_id`` / ``msg["lease_id"]`` / ``msg.get("error")``; a declared optional field that
    is absent reads as None through attribute access. Fields hold plain python values (lists,
    dicts, and tuples for fixed-shape entries such as SYNC_OFFER.files); treat them as read-only.
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
            if name in _OPTIONAL.get(object.__getattribute__(self, "type"), ()):
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


_EXPECTED = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
             "bytes_type": "bytes", "list_type": "list", "tuple_type": "list", "dict_type": "map",
             "model_type": "map", "model_attributes_type": "map"}
_BOUNDS = {"greater_than_equal": ("ge", "≥"), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "≤"), "less_than": ("lt", "<")}


def _where(root: str, loc: tuple) -> str:
    return root + "".join(f".{p}" if isinstance(p, str) else f"[{_short(p)}]" for p in loc)


def _reason(root: str, exc: ValidationError) -> str:
    """One line for the first error pydantic found, in this module's own words."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    kind, loc, value, ctx = err["type"], tuple(err["loc"]), err.get("input"), err.get("ctx") or {}
    path = _where(root, loc)
    if kind == "invalid_key" or (loc and loc[-1] == "[key]"):  # a bytes key (strict_map_key lets them by)
        key_at = loc if kind == "invalid_key" else loc[:-1]
        key = key_at[-1]  # models report the key's repr, TypedDicts the key itself
        text = f"{_where(root, key_at[:-1])}: map key {key if isinstance(key, str) else _short(key)} is not a str"
    elif kind == "missing":
        what = f"field {loc[-1]!r}" if isinstance(loc[-1], str) else f"entry [{loc[-1]}]"
        text = f"{_where(root, loc[:-1])}: missing {what}"
    elif kind == "extra_forbidden":
        text = f"{_where(root, loc[:-1])}: unknown field {_short(loc[-1])}"
    elif kind in _EXPECTED:
        text = f"{path}: expected {_EXPECTED[kind]}, got {_tname(value)}"
    elif kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        text = f"{path}: expected {_tname(value)} {op} {bound}, got {_short(value)}"
    elif kind == "finite_number":
        text = f"{path}: expected a finite float, got {value!r}"
    elif kind == "too_long":
        text = f"{path}: {ctx['actual_length']} entries exceed the limit of {ctx['max_length']}"
    elif kind == "bytes_too_long":
        text = f"{path}: {len(value)} bytes exceed the limit of {ctx['max_length']}"
    elif kind == "plain_value":
        text = f"{path}{ctx['subpath']}: {ctx['reason']}"
    else:
        text = f"{path}: {err['msg']}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return text.replace("\n", "\\n")


def _model(msg_type: Any) -> type[MessageModel]:
    if not isinstance(msg_type, str):
        raise ProtocolError(f"message type must be a str, got {_tname(msg_type)}")
    model = SCHEMAS.get(msg_type)
    if model is None:
        raise ProtocolError(f"unknown message type {_short(msg_type)}")
    return model


def _validate(msg_type: str, model: type[MessageModel], fields: Mapping[str, Any]) -> dict:
    try:
        checked = model.model_validate(fields)
    except ValidationError as exc:
        raise ProtocolError(_reason(msg_type, exc)) from None
    # The validated values, not the input: ints given for floats are floats. Sub-maps are
    # already plain dicts; only the fields that were sent, in declaration order.
    sent = checked.model_fields_set
    return {k: v for k, v in checked.__dict__.items() if k in sent}


def validate(msg_type: str, fields: Mapping[str, Any]) -> dict:
    """Check ``fields`` against ``msg_type``'s model; return the normalised fields."""
    return _validate(msg_type, _model(msg_type), fields)


def encode(msg_type: str, **fields: Any) -> bytes:
    """Validate and pack one message into one frame. An optional field given as None is left out."""
    model = _model(msg_type)
    for name in _ENVELOPE:
        if name in fields:
            raise ProtocolError(f"{msg_type}: field {name!r} is reserved for the envelope")
    optional = _OPTIONAL[msg_type]
    if optional:
        fields = {k: v for k, v in fields.items() if v is not None or k not in optional}
    envelope = {"v": PROTOCOL_VERSION, "type": msg_type}
    envelope.update(_validate(msg_type, model, fields))
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
    version = obj.pop("v")
    msg_type = obj.pop("type", None)
    if type(version) is not int:
        raise ProtocolError(f"protocol version field 'v' must be an int, got {_tname(version)}")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version, msg_type if isinstance(msg_type, str) else None)
    if msg_type is None:
        raise ProtocolError("frame has no message type field 'type'")
    return Message(msg_type, _validate(msg_type, _model(msg_type), obj))


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
