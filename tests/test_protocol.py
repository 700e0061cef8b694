"""The wire format: round trips of every message type and a clear error for every bad frame."""

from __future__ import annotations

import math

import msgpack
import pytest

from ea4llm_pool import UserError
from ea4llm_pool import protocol as P
from ea4llm_pool.protocol import ProtocolError, VersionMismatch, decode, encode

SYNC = {"checkpoint_iteration": 250,
        "files": [["model.safetensors", 123456, "ab" * 32], ["config.json", 10, "cd" * 32]],
        "log_from": 251}

SAMPLES: dict[str, dict] = {
    P.HELLO: dict(config_hash="c0ffee", noise_digest="d1", device="cuda:0 (H200)", dtype="bfloat16",
                  threads=16, throughput=812.5, worker_name="gpu-box", pid=4242,
                  state_iteration=-1, state_hash=""),
    P.WELCOME: dict(worker_id="w7", run_id="run-2024", config_yaml="run:\n  seed: 0\n", sync=SYNC,
                    heartbeat_s=2.0),
    P.REJECT: dict(reason="config hash differs: worker c0ffee, coordinator beef"),
    P.PING: dict(worker_id="w7", iteration=12, state_hash="h" * 16, busy=True, done_units=30),
    P.PONG: dict(iteration=12),
    P.LEASE: dict(lease_id="L-12-3", iteration=12, alpha=5e-4, sigma=1e-3,
                  units=[{"member": 0, "seed": 2**64 - 1, "sign": 1, "indices": [0, 5, 9]},
                         {"member": 0, "seed": 2**64 - 1, "sign": -1, "indices": list(range(64))}],
                  expires_s=30.0),
    P.RESULT: dict(lease_id="L-12-3", iteration=12,
                   results=[{"member": 0, "sign": 1, "sum_r": -7.625, "count": 3},
                            {"member": 0, "sign": -1, "sum_r": float("nan"), "count": 64}],
                   eval_s=1.25),
    P.COMMIT: dict(record={"iteration": 12, "state_hash": "abc", "alpha": 5e-4,
                           "seeds": [1, 2], "weights": [-3, 3], "adam": None,
                           "scales": {"emb": 1.5e-9, "attn": 0.0}}),
    P.STATE: dict(iteration=12, state_hash="abc"),
    P.RESYNC: dict(reason="state hash mismatch at iteration 12", sync=SYNC),
    P.FETCH: dict(name="model.safetensors", offset=0, length=P.CHUNK_SIZE),
    P.CHUNK: dict(name="model.safetensors", offset=1 << 20, data=b"\x00\xff" * 100, eof=False),
    P.LOG_FETCH: dict(from_iteration=251),
    P.LOG_RECORDS: dict(records=[{"iteration": 251, "state_hash": "x", "prev": "0" * 64,
                                  "chain": "1" * 64}], last=True),
    P.BYE: dict(worker_id="w7", reason="SIGTERM"),
    P.END: dict(reason="reached 1000 iterations", final_iteration=1000, final_hash="f" * 16),
    P.STATUS_REQ: dict(),
    P.STATUS: dict(snapshot={"iteration": 12, "workers": [{"id": "w7", "busy": True}],
                             "loss": 3.25, "note": None}),
    P.ERROR: dict(code="not_found", reason="no file named 'x' in checkpoint 250"),
}


def _eq(a, b):
    """Equality that treats NaN as equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_samples_cover_every_type():
    assert set(SAMPLES) == P.MESSAGE_TYPES


@pytest.mark.parametrize("msg_type", sorted(SAMPLES))
def test_round_trip(msg_type):
    fields = SAMPLES[msg_type]
    frame = encode(msg_type, **fields)
    assert isinstance(frame, bytes)
    msg = decode(frame)
    assert msg.type == msg_type
    assert _eq(msg.fields, fields)
    for name, value in fields.items():
        assert _eq(getattr(msg, name), value)
        assert _eq(msg[name], value)
        assert name in msg
    # re-encoding a decoded message gives the same bytes
    assert msg.to_bytes() == frame
    assert decode(bytearray(frame)).fields.keys() == msg.fields.keys()
    assert decode(memoryview(frame)).type == msg_type


def test_message_is_read_only_and_optional_fields_read_none():
    msg = decode(encode(P.PONG, iteration=3))
    assert msg.state_hash is None and msg.get("state_hash", "d") == "d"
    with pytest.raises(AttributeError):
        msg.iteration = 4
    with pytest.raises(AttributeError, match="no field 'nope'"):
        msg.nope
    full = decode(encode(P.PONG, iteration=3, state_hash="s"))
    assert full.state_hash == "s"
    assert decode(encode(P.RESULT, lease_id="L", iteration=1, results=[], eval_s=0.0,
                         error="CUDA out of memory")).error == "CUDA out of memory"


def test_field_names_do_not_shadow_message_attributes():
    reserved = set(dir(P.Message))
    for schema in P.SCHEMAS.values():
        assert not (set(schema.fields) & reserved)


def test_ints_are_accepted_for_floats_and_normalised():
    msg = decode(encode(P.LEASE, **{**SAMPLES[P.LEASE], "alpha": 1, "expires_s": 30}))
    assert type(msg.alpha) is float and msg.alpha == 1.0
    # a peer that packs a float field as an int is accepted too
    frame = _raw({"v": P.PROTOCOL_VERSION, "type": P.STATE, "iteration": 1, "state_hash": "h"})
    assert decode(frame).iteration == 1
    frame = _raw({"v": 1, "type": P.WELCOME, **{**SAMPLES[P.WELCOME], "heartbeat_s": 2}})
    assert type(decode(frame).heartbeat_s) is float


def test_float_and_big_int_exactness():
    x = 0.1 + 0.2
    msg = decode(encode(P.LEASE, **{**SAMPLES[P.LEASE], "alpha": x, "sigma": 5e-324}))
    assert msg.alpha == x and msg.sigma == 5e-324
    rec = {"iteration": 1, "state_hash": "", "a": -(2**63), "b": 2**64 - 1, "c": -0.0}
    got = decode(encode(P.COMMIT, record=rec)).record
    assert got == rec and math.copysign(1, got["c"]) == -1


# ------------------------------------------------------------------------------ bad frames

@pytest.mark.parametrize("frame", [b"\xc1", b"\x92\x01", b"\xde\xad\xbe\xef" * 3,
                                   b"\x85garbage", _raw({"v": 1, "type": "PONG"})[:-1]])
def test_garbage_bytes(frame):
    with pytest.raises(ProtocolError) as ei:
        decode(frame)
    assert "\n" not in str(ei.value)


def test_garbage_messages_are_clear():
    with pytest.raises(ProtocolError, match="empty frame"):
        decode(b"")
    with pytest.raises(ProtocolError, match="not a msgpack map"):
        decode(_raw([1, 2, 3]))
    with pytest.raises(ProtocolError, match="undecodable frame"):
        decode(_raw({"v": 1, "type": "PONG", "iteration": 1}) + b"\x00")  # trailing bytes
    with pytest.raises(ProtocolError, match="must be bytes"):
        decode("a string")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="undecodable"):  # int map keys (strict_map_key)
        decode(_raw({1: 2}))
    with pytest.raises(ProtocolError, match="undecodable"):  # extension types (timestamp)
        decode(_raw({"v": 1, "type": "STATUS", "snapshot": {"t": msgpack.Timestamp(1, 0)}}))


def test_protocol_errors_are_user_errors():
    assert issubclass(ProtocolError, UserError)
    assert issubclass(VersionMismatch, ProtocolError)


def test_version_mismatch_names_both_versions():
    frame = _raw({"v": 2, "type": "HELLO", "whatever": 1})
    with pytest.raises(VersionMismatch) as ei:
        decode(frame)
    err = ei.value
    assert err.peer_version == 2 and err.our_version == P.PROTOCOL_VERSION
    assert err.msg_type == "HELLO"
    assert "v2" in str(err) and f"v{P.PROTOCOL_VERSION}" in str(err) and "\n" not in str(err)
    # version is checked before anything else about the message
    with pytest.raises(VersionMismatch):
        decode(_raw({"v": 0, "type": "NO_SUCH_TYPE"}))
    with pytest.raises(ProtocolError, match="no protocol version"):
        decode(_raw({"type": "PONG", "iteration": 1}))
    with pytest.raises(ProtocolError, match="must be an int"):
        decode(_raw({"v": "1", "type": "PONG", "iteration": 1}))


def test_unknown_type():
    with pytest.raises(ProtocolError, match="unknown message type 'SHUTDOWN'"):
        decode(_raw({"v": 1, "type": "SHUTDOWN"}))
    with pytest.raises(ProtocolError, match="unknown message type"):
        encode("SHUTDOWN")
    with pytest.raises(ProtocolError, match="no message type"):
        decode(_raw({"v": 1}))
    with pytest.raises(ProtocolError, match="must be a str"):
        decode(_raw({"v": 1, "type": 7}))


def test_missing_field():
    fields = dict(SAMPLES[P.HELLO])
    del fields["noise_digest"]
    with pytest.raises(ProtocolError, match="HELLO: missing field 'noise_digest'"):
        encode(P.HELLO, **fields)
    with pytest.raises(ProtocolError, match="HELLO: missing field 'noise_digest'"):
        decode(_raw({"v": 1, "type": P.HELLO, **fields}))
    bad_unit = {"member": 0, "seed": 1, "sign": 1}  # no indices
    with pytest.raises(ProtocolError, match=r"LEASE.units\[0\]: missing field 'indices'"):
        encode(P.LEASE, **{**SAMPLES[P.LEASE], "units": [bad_unit]})


def test_unknown_field_rejected_declared_optional_accepted():
    with pytest.raises(ProtocolError, match="PONG: unknown field 'extra'"):
        decode(_raw({"v": 1, "type": P.PONG, "iteration": 1, "extra": 1}))
    with pytest.raises(ProtocolError, match="unknown field"):
        encode(P.PONG, iteration=1, extra=1)
    with pytest.raises(ProtocolError, match=r"units\[0\]: unknown field 'weight'"):
        encode(P.LEASE, **{**SAMPLES[P.LEASE],
                           "units": [{"member": 0, "seed": 1, "sign": 1, "indices": [], "weight": 2}]})
    with pytest.raises(ProtocolError, match="reserved"):
        encode(P.PONG, iteration=1, v=2)
    # free-form maps (COMMIT.record) take any extra plain keys
    assert decode(encode(P.COMMIT, record={"iteration": 1, "state_hash": "", "x": [1, {"y": b"z"}]}))


@pytest.mark.parametrize("msg_type,field,value,pattern", [
    (P.PING, "busy", 1, "PING.busy: expected bool, got int"),
    (P.PING, "iteration", True, "PING.iteration: expected int, got bool"),
    (P.PING, "iteration", 1.0, "expected int, got float"),
    (P.PING, "iteration", -2, r"outside \[-1,"),
    (P.HELLO, "threads", 0, r"outside \[1,"),
    (P.HELLO, "throughput", "fast", "expected float, got str"),
    (P.HELLO, "throughput", -1.0, "expected float ≥ 0"),
    (P.WELCOME, "heartbeat_s", 0.0, "expected float > 0"),
    (P.LEASE, "alpha", float("inf"), "finite"),
    (P.LEASE, "units", {"member": 0}, "expected list, got dict"),
    (P.LEASE, "units", [{"member": 0, "seed": -1, "sign": 1, "indices": []}], r"seed: -1 is outside"),
    (P.LEASE, "units", [{"member": 0, "seed": 1, "sign": 0, "indices": []}], r"sign: expected one of"),
    (P.LEASE, "units", [{"member": 0, "seed": 1, "sign": True, "indices": []}], r"sign: expected one of"),
    (P.LEASE, "units", [{"member": 0, "seed": 1, "sign": 1, "indices": [1, -3]}],
     r"indices\[1\]: -3 is outside"),
    (P.LEASE, "units", [{"member": 0, "seed": 2**64, "sign": 1, "indices": []}], "outside"),
    (P.RESULT, "results", [{"member": 0, "sign": 1, "sum_r": "x", "count": 1}],
     r"results\[0\].sum_r: expected float"),
    (P.WELCOME, "sync", {**SYNC, "files": [["a", 1]]}, r"sync.files\[0\]: expected 3 entries"),
    (P.WELCOME, "sync", {**SYNC, "files": [["a", "1", "h"]]}, r"sync.files\[0\]\[1\]: expected int"),
    (P.COMMIT, "record", {"iteration": 1}, "record: missing field 'state_hash'"),
    (P.COMMIT, "record", {"iteration": 1, "state_hash": "", "x": {1, 2}}, "cannot travel"),
    (P.FETCH, "length", P.CHUNK_SIZE + 1, "outside"),
    (P.CHUNK, "data", "text", "expected bytes, got str"),
    (P.CHUNK, "data", b"x" * (P.CHUNK_SIZE + 1), "exceed the limit"),
    (P.STATUS, "snapshot", [1], "expected map, got list"),
])
def test_wrong_field_type(msg_type, field, value, pattern):
    fields = {**SAMPLES[msg_type], field: value}
    with pytest.raises(ProtocolError, match=pattern) as ei:
        encode(msg_type, **fields)
    assert "\n" not in str(ei.value)
    # the same check on receipt (skip values msgpack itself cannot pack)
    try:
        raw = _raw({"v": 1, "type": msg_type, **fields})
    except (TypeError, OverflowError, ValueError):
        return
    with pytest.raises(ProtocolError, match=pattern):
        decode(raw)


def test_free_form_maps_reject_non_str_keys_and_deep_nesting():
    with pytest.raises(ProtocolError, match="not a str"):
        encode(P.STATUS, snapshot={1: "a"})
    deep: dict = {}
    node = deep
    for _ in range(P.MAX_DEPTH + 5):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ProtocolError, match="nested deeper"):
        encode(P.STATUS, snapshot=deep)
    with pytest.raises(ProtocolError, match="nested deeper"):
        decode(_raw({"v": 1, "type": P.STATUS, "snapshot": deep}))
    # bytes map keys pass msgpack's strict_map_key but are refused here
    with pytest.raises(ProtocolError, match="not a str"):
        decode(_raw({"v": 1, "type": P.STATUS, "snapshot": {b"k": 1}}))


def test_oversize():
    big = "x" * (P.MAX_MESSAGE_BYTES + 10)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        encode(P.REJECT, reason=big)
    frame = _raw({"v": 1, "type": P.REJECT, "reason": big})
    with pytest.raises(ProtocolError, match=f"frame of {len(frame)} bytes exceeds the limit"):
        decode(frame)


def test_long_index_lists_are_fast_and_checked():
    idx = list(range(200_000))
    msg = decode(encode(P.LEASE, **{**SAMPLES[P.LEASE],
                                    "units": [{"member": 1, "seed": 3, "sign": -1, "indices": idx}]}))
    assert msg.units[0]["indices"] == idx


def test_make_sync_and_schema_table():
    sync = P.make_sync(-1, [("a.bin", 3, "00" * 32)], 1)
    assert sync == {"checkpoint_iteration": -1, "files": [["a.bin", 3, "00" * 32]], "log_from": 1}
    with pytest.raises(ProtocolError):
        P.make_sync(-2, [], 0)
    table = P.schema_table()
    for name in P.MESSAGE_TYPES:
        assert name in table


def test_configure_socket_limits():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        P.configure_socket_limits(sock)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == P.MAX_MESSAGE_BYTES
        assert sock.getsockopt(zmq.LINGER) == P.DEFAULT_LINGER_MS
        P.configure_socket_limits(sock, max_bytes=1024, linger_ms=0)
        assert sock.getsockopt(zmq.MAXMSGSIZE) == 1024
        sock.close()
    finally:
        ctx.term()


def test_round_trip_over_zmq():
    """One message through a real ROUTER/DEALER pair (inproc), decoded from the payload frame."""
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    try:
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        for s in (router, dealer):
            P.configure_socket_limits(s, linger_ms=0)
        router.bind("inproc://proto-test")
        dealer.connect("inproc://proto-test")
        dealer.send(encode(P.HELLO, **SAMPLES[P.HELLO]))
        assert router.poll(5000)
        ident, payload = router.recv_multipart(copy=False)
        msg = decode(payload)  # a zmq.Frame is accepted
        assert msg.type == P.HELLO and msg.pid == 4242
        router.send_multipart([ident.bytes, encode(P.REJECT, reason="full")])
        assert dealer.poll(5000)
        assert decode(dealer.recv()).reason == "full"
        router.close()
        dealer.close()
    finally:
        ctx.term()
