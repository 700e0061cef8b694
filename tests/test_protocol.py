"""The wire format: round trips of every message type and a clear error for every bad frame."""

from __future__ import annotations

import math

import msgpack
import pytest

from ea4llm_pool import UserError
from ea4llm_pool import protocol as P
from ea4llm_pool.protocol import ProtocolError, VersionMismatch, decode, encode

FILES = [("model.safetensors", 123456, "ab" * 32), ("config.json", 10, "cd" * 32)]

SAMPLES: dict[str, dict] = {
    P.HELLO: dict(config_hash="c0ffee", selftest={"noise": "d1", "update": "d2", "hash": "d3"},
                  device="cuda:0 (H200)", dtype="bfloat16", threads=16, throughput=812.5,
                  worker_name="gpu-box", pid=4242, state_iteration=-1, state_hash=""),
    P.WELCOME: dict(worker_id="w7", run_id="run-2024", config_yaml="run:\n  seed: 0\n",
                    heartbeat_s=2.0, bulk_port=5556, keep_state=True, model_params=837_000_000),
    P.REJECT: dict(reason="config hash differs: worker c0ffee, coordinator beef"),
    P.PING: dict(worker_id="w7", iteration=12, state_hash="h" * 16, busy=True, done_units=30,
                 update_s=4.0),
    P.PONG: dict(iteration=12),
    P.LEASE: dict(lease_id="L-12-3", iteration=12, alpha=5e-4, sigma=1e-3,
                  units=[{"member": 0, "seed": 2**64 - 1, "sign": 1, "indices": [0, 5, 9]},
                         {"member": 0, "seed": 2**64 - 1, "sign": -1, "indices": list(range(64))}],
                  expires_s=30.0),
    P.RESULT: dict(lease_id="L-12-3", iteration=12,
                   results=[{"member": 0, "sign": 1, "sum_r": -7.625, "count": 3},
                            {"member": 0, "sign": -1, "sum_r": float("nan"), "count": 64},
                            {"member": 1, "sign": 1, "sum_r": float("-inf"), "count": 1}],
                   eval_s=1.25, update_s=0.5),
    P.COMMIT: dict(record={"iteration": 12, "attest": {"step": 11, "state_hash": "abc"},
                           "alpha": 5e-4, "seeds": [1, 2], "weights": [-3, 3], "adam": None,
                           "scales": {"emb": 1.5e-9, "attn": 0.0}}),
    P.STATE: dict(iteration=12, state_hash="abc"),
    P.RESYNC: dict(reason="state hash mismatch at iteration 12"),
    P.SYNC_REQ: dict(have_step=-1, have_hash=""),
    P.SYNC_OFFER: dict(checkpoint_iteration=250, files=FILES, log_from=251),
    P.FETCH: dict(name="model.safetensors", offset=0, length=P.CHUNK_SIZE),
    P.CHUNK: dict(name="model.safetensors", offset=1 << 20, data=b"\x00\xff" * 100, eof=False),
    P.LOG_FETCH: dict(from_iteration=251),
    P.LOG_RECORDS: dict(records=[{"iteration": 251, "attest": None, "prev": "0" * 64,
                                  "chain": "1" * 64}, {"iteration": 252}], last=True),
    P.BYE: dict(worker_id="w7", reason="SIGTERM"),
    P.END: dict(reason="reached 1000 iterations", final_iteration=1000, final_hash="f" * 16),
    P.STATUS_REQ: dict(),
    P.STATUS: dict(snapshot={"iteration": 12, "workers": [{"id": "w7", "busy": True}],
                             "loss": 3.25, "note": None}),
    P.ERROR: dict(code="busy", reason="the checkpoint is being written", retry_s=2.5),
}


V = P.PROTOCOL_VERSION


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
    for model in P.SCHEMAS.values():
        assert model.TYPE in P.MESSAGE_TYPES
        assert not (set(model.model_fields) & reserved)
        assert not (set(model.model_fields) & {"v", "type"})


def test_ints_are_accepted_for_floats_and_normalised():
    msg = decode(encode(P.LEASE, **{**SAMPLES[P.LEASE], "alpha": 1, "expires_s": 30}))
    assert type(msg.alpha) is float and msg.alpha == 1.0
    # a peer that packs a float field as an int is accepted too
    frame = _raw({"v": P.PROTOCOL_VERSION, "type": P.STATE, "iteration": 1, "state_hash": "h"})
    assert decode(frame).iteration == 1
    frame = _raw({"v": P.PROTOCOL_VERSION, "type": P.WELCOME, **{**SAMPLES[P.WELCOME], "heartbeat_s": 2}})
    assert type(decode(frame).heartbeat_s) is float
    # nested too
    results = [{"member": 0, "sign": 1, "sum_r": -7, "count": 3}]
    got = decode(encode(P.RESULT, **{**SAMPLES[P.RESULT], "results": results})).results[0]["sum_r"]
    assert type(got) is float and got == -7.0


def test_no_silent_coercion():
    """Strict types: a str is never an int, a bool never an int, an int never a bool or str."""
    for msg_type, field, value in [(P.STATE, "iteration", "1"), (P.STATE, "iteration", True),
                                   (P.STATE, "state_hash", 7), (P.PING, "busy", 0),
                                   (P.CHUNK, "data", bytearray(b"x")), (P.LEASE, "alpha", "0.1"),
                                   (P.LEASE, "alpha", False), (P.LEASE, "units", (  )),
                                   (P.HELLO, "selftest", {"noise": 1})]:
        with pytest.raises(ProtocolError):
            encode(msg_type, **{**SAMPLES[msg_type], field: value})


def test_float_and_big_int_exactness():
    x = 0.1 + 0.2
    msg = decode(encode(P.LEASE, **{**SAMPLES[P.LEASE], "alpha": x, "sigma": 5e-324}))
    assert msg.alpha == x and msg.sigma == 5e-324
    rec = {"iteration": 1, "a": -(2**63), "b": 2**64 - 1, "c": -0.0}
    got = decode(encode(P.COMMIT, record=rec)).record
    assert got == rec and math.copysign(1, got["c"]) == -1


# ------------------------------------------------------------------------------ bad frames

@pytest.mark.parametrize("frame", [b"\xc1", b"\x92\x01", b"\xde\xad\xbe\xef" * 3,
                                   b"\x85garbage", _raw({"v": V, "type": "PONG"})[:-1]])
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
        decode(_raw({"v": V, "type": "PONG", "iteration": 1}) + b"\x00")  # trailing bytes
    with pytest.raises(ProtocolError, match="must be bytes"):
        decode("a string")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="undecodable"):  # int map keys (strict_map_key)
        decode(_raw({1: 2}))
    with pytest.raises(ProtocolError, match="undecodable"):  # extension types (timestamp)
        decode(_raw({"v": V, "type": "STATUS", "snapshot": {"t": msgpack.Timestamp(1, 0)}}))


def test_protocol_errors_are_user_errors():
    assert issubclass(ProtocolError, UserError)
    assert issubclass(VersionMismatch, ProtocolError)


def test_version_mismatch_names_both_versions():
    frame = _raw({"v": 1, "type": "HELLO", "whatever": 1})  # a peer of the previous release
    with pytest.raises(VersionMismatch) as ei:
        decode(frame)
    err = ei.value
    assert err.peer_version == 1 and err.our_version == P.PROTOCOL_VERSION == 2
    assert err.msg_type == "HELLO"
    assert "v1" in str(err) and f"v{P.PROTOCOL_VERSION}" in str(err) and "\n" not in str(err)
    # version is checked before anything else about the message
    with pytest.raises(VersionMismatch):
        decode(_raw({"v": 0, "type": "NO_SUCH_TYPE"}))
    with pytest.raises(ProtocolError, match="no protocol version"):
        decode(_raw({"type": "PONG", "iteration": 1}))
    with pytest.raises(ProtocolError, match="must be an int"):
        decode(_raw({"v": "1", "type": "PONG", "iteration": 1}))


def test_unknown_type():
    with pytest.raises(ProtocolError, match="unknown message type 'SHUTDOWN'"):
        decode(_raw({"v": V, "type": "SHUTDOWN"}))
    with pytest.raises(ProtocolError, match="unknown message type"):
        encode("SHUTDOWN")
    with pytest.raises(ProtocolError, match="no message type"):
        decode(_raw({"v": V}))
    with pytest.raises(ProtocolError, match="must be a str"):
        decode(_raw({"v": V, "type": 7}))


def test_missing_field():
    fields = dict(SAMPLES[P.HELLO])
    del fields["selftest"]
    with pytest.raises(ProtocolError, match="HELLO: missing field 'selftest'"):
        encode(P.HELLO, **fields)
    with pytest.raises(ProtocolError, match="HELLO: missing field 'selftest'"):
        decode(_raw({"v": P.PROTOCOL_VERSION, "type": P.HELLO, **fields}))
    bad_unit = {"member": 0, "seed": 1, "sign": 1}  # no indices
    with pytest.raises(ProtocolError, match=r"LEASE.units\[0\]: missing field 'indices'"):
        encode(P.LEASE, **{**SAMPLES[P.LEASE], "units": [bad_unit]})


def test_unknown_field_rejected_declared_optional_accepted():
    with pytest.raises(ProtocolError, match="PONG: unknown field 'extra'"):
        decode(_raw({"v": P.PROTOCOL_VERSION, "type": P.PONG, "iteration": 1, "extra": 1}))
    with pytest.raises(ProtocolError, match="unknown field"):
        encode(P.PONG, iteration=1, extra=1)
    with pytest.raises(ProtocolError, match=r"units\[0\]: unknown field 'weight'"):
        encode(P.LEASE, **{**SAMPLES[P.LEASE],
                           "units": [{"member": 0, "seed": 1, "sign": 1, "indices": [], "weight": 2}]})
    with pytest.raises(ProtocolError, match="reserved"):
        encode(P.PONG, iteration=1, v=2)
    with pytest.raises(ProtocolError, match="WELCOME: unknown field 'sync'"):  # removed in v2
        encode(P.WELCOME, **SAMPLES[P.WELCOME], sync={})
    # free-form maps (COMMIT.record) take any extra plain keys
    rec = {"iteration": 1, "state_hash": "", "x": [1, {"y": b"z"}]}
    assert decode(encode(P.COMMIT, record=rec)).record == rec
    # an optional field given as None is left out; on the wire, nil is not a value for it
    frame = encode(P.PONG, iteration=1, state_hash=None)
    assert frame == encode(P.PONG, iteration=1) and decode(frame).state_hash is None
    with pytest.raises(ProtocolError, match="PONG.state_hash: expected str, got NoneType"):
        decode(_raw({"v": P.PROTOCOL_VERSION, "type": P.PONG, "iteration": 1, "state_hash": None}))
    with pytest.raises(ProtocolError, match="PONG.iteration: expected int, got NoneType"):
        encode(P.PONG, iteration=None)


@pytest.mark.parametrize("msg_type,field,value,pattern", [
    (P.PING, "busy", 1, "PING.busy: expected bool, got int"),
    (P.PING, "iteration", True, "PING.iteration: expected int, got bool"),
    (P.PING, "iteration", 1.0, "expected int, got float"),
    (P.PING, "iteration", -2, "PING.iteration: expected int ≥ -1, got -2"),
    (P.PING, "update_s", -0.5, "PING.update_s: expected float ≥ 0, got -0.5"),
    (P.PING, "update_s", float("inf"), "PING.update_s: expected a finite float"),
    (P.HELLO, "threads", 0, "expected int ≥ 1, got 0"),
    (P.HELLO, "throughput", "fast", "expected float, got str"),
    (P.HELLO, "throughput", -1.0, "expected float ≥ 0"),
    (P.HELLO, "selftest", {"noise": 1}, "HELLO.selftest.noise: expected str, got int"),
    (P.HELLO, "selftest", {f"p{i}": "d" for i in range(P.MAX_SELFTEST + 1)},
     f"HELLO.selftest: {P.MAX_SELFTEST + 1} entries exceed the limit of {P.MAX_SELFTEST}"),
    (P.WELCOME, "heartbeat_s", 0.0, "expected float > 0"),
    (P.WELCOME, "bulk_port", 70000, "expected int ≤ 65535"),
    (P.WELCOME, "keep_state", "yes", "WELCOME.keep_state: expected bool, got str"),
    (P.WELCOME, "model_params", -1, "WELCOME.model_params: expected int ≥ 0"),
    (P.LEASE, "alpha", float("inf"), "finite"),
    (P.LEASE, "alpha", float("nan"), "finite"),
    (P.LEASE, "units", {"member": 0}, "expected list, got dict"),
    (P.LEASE, "units", [[0, 1, 1, []]], r"LEASE.units\[0\]: expected map, got list"),
    (P.LEASE, "units", [{"member": 0, "seed": -1, "sign": 1, "indices": []}],
     r"units\[0\].seed: expected int ≥ 0, got -1"),
    (P.LEASE, "units", [{"member": 0, "seed": 1, "sign": 0, "indices": []}],
     r"units\[0\].sign: expected \+1 or -1, got 0"),
    (P.LEASE, "units", [{"member": 0, "seed": 1, "sign": True, "indices": []}],
     r"sign: expected int, got bool"),
    (P.LEASE, "units", [{"member": 0, "seed": 1, "sign": 1, "indices": [1, -3]}],
     r"indices\[1\]: expected int ≥ 0, got -3"),
    (P.LEASE, "units", [{"member": 0, "seed": 2**64, "sign": 1, "indices": []}],
     r"seed: expected int ≤ 18446744073709551615"),
    (P.LEASE, "units", [{"member": 0, "seed": 1, "sign": 1, "indices": []}] * (P.MAX_UNITS + 1),
     f"LEASE.units: {P.MAX_UNITS + 1} entries exceed the limit of {P.MAX_UNITS}"),
    (P.RESULT, "results", [{"member": 0, "sign": 1, "sum_r": "x", "count": 1}],
     r"results\[0\].sum_r: expected float"),
    (P.RESULT, "update_s", float("nan"), "RESULT.update_s: expected a finite float"),
    (P.SYNC_OFFER, "files", [["a", 1]], r"SYNC_OFFER.files\[0\]: missing entry \[2\]"),
    (P.SYNC_OFFER, "files", [["a", 1, "h", "x"]], r"SYNC_OFFER.files\[0\]: 4 entries exceed the limit of 3"),
    (P.SYNC_OFFER, "files", [["a", "1", "h"]], r"SYNC_OFFER.files\[0\]\[1\]: expected int"),
    (P.SYNC_OFFER, "files", [["a", 1, "h"]] * (P.MAX_FILES + 1), "exceed the limit of 64"),
    (P.SYNC_OFFER, "checkpoint_iteration", -1, "expected int ≥ 0"),
    (P.SYNC_REQ, "have_step", -2, "SYNC_REQ.have_step: expected int ≥ -1"),
    (P.COMMIT, "record", {"state_hash": "x"}, "COMMIT.record: missing field 'iteration'"),
    (P.COMMIT, "record", {"iteration": 1, "attest": {"step": 1}},
     "COMMIT.record.attest: missing field 'state_hash'"),
    (P.COMMIT, "record", {"iteration": 1, "attest": {"step": 1, "state_hash": "h", "x": 1}},
     "COMMIT.record.attest: unknown field 'x'"),
    (P.COMMIT, "record", {"iteration": 1, "attest": "h"}, "COMMIT.record.attest: expected map, got str"),
    (P.COMMIT, "record", {"iteration": 1, "x": {1, 2}}, "COMMIT.record.x: set cannot travel"),
    (P.COMMIT, "record", {"iteration": 1, "x": [0, {"y": 2**64}]},
     r"COMMIT.record.x\[1\].y: integer 18446744073709551616 does not fit"),
    (P.LOG_RECORDS, "records", [{"iteration": 1}] * (P.LOG_BATCH + 1), "exceed the limit of 256"),
    (P.LOG_RECORDS, "records", [{"iteration": 1}, {"iteration": -1}],
     r"LOG_RECORDS.records\[1\].iteration: expected int ≥ 0"),
    (P.FETCH, "length", P.CHUNK_SIZE + 1, "expected int ≤ 1048576"),
    (P.CHUNK, "data", "text", "expected bytes, got str"),
    (P.CHUNK, "data", b"x" * (P.CHUNK_SIZE + 1), "exceed the limit"),
    (P.STATUS, "snapshot", [1], "expected map, got list"),
    (P.ERROR, "retry_s", -1, "ERROR.retry_s: expected int ≥ 0"),
])
def test_wrong_field_type(msg_type, field, value, pattern):
    fields = {**SAMPLES[msg_type], field: value}
    with pytest.raises(ProtocolError, match=pattern) as ei:
        encode(msg_type, **fields)
    assert "\n" not in str(ei.value)
    # the same check on receipt (skip values msgpack itself cannot pack)
    try:
        raw = _raw({"v": V, "type": msg_type, **fields})
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
        decode(_raw({"v": V, "type": P.STATUS, "snapshot": deep}))
    # bytes map keys pass msgpack's strict_map_key but are refused here, at every level
    with pytest.raises(ProtocolError, match="STATUS.snapshot: map key b'k' is not a str"):
        decode(_raw({"v": V, "type": P.STATUS, "snapshot": {b"k": 1}}))
    with pytest.raises(ProtocolError, match="^PONG: map key b'x' is not a str$"):
        decode(_raw({"v": V, "type": P.PONG, "iteration": 1, b"x": 1}))
    with pytest.raises(ProtocolError, match="^COMMIT.record: map key b'k' is not a str$"):
        decode(_raw({"v": V, "type": P.COMMIT, "record": {"iteration": 1, b"k": 1}}))
    with pytest.raises(ProtocolError, match=r"^LEASE.units\[0\]: map key b'k' is not a str$"):
        unit = {"member": 0, "seed": 0, "sign": 1, "indices": [], b"k": 1}
        decode(_raw({"v": V, "type": P.LEASE, **{**SAMPLES[P.LEASE], "units": [unit]}}))
    with pytest.raises(ProtocolError, match="^HELLO.selftest: map key b'k' is not a str$"):
        decode(_raw({"v": V, "type": P.HELLO, **{**SAMPLES[P.HELLO], "selftest": {b"k": "d"}}}))


def test_oversize():
    big = "x" * (P.MAX_MESSAGE_BYTES + 10)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        encode(P.REJECT, reason=big)
    frame = _raw({"v": V, "type": P.REJECT, "reason": big})
    with pytest.raises(ProtocolError, match=f"frame of {len(frame)} bytes exceeds the limit"):
        decode(frame)


def test_long_index_lists_are_fast_and_checked():
    idx = list(range(200_000))
    msg = decode(encode(P.LEASE, **{**SAMPLES[P.LEASE],
                                    "units": [{"member": 1, "seed": 3, "sign": -1, "indices": idx}]}))
    assert msg.units[0]["indices"] == idx


def test_schema_table_and_module_doc_match_the_models():
    table = P.schema_table().splitlines()
    assert [line.split()[0] for line in table] == list(P.SCHEMAS)
    assert "sign:+1|-1" in P.schema_table() and "?retry_s:float≥0" in P.schema_table()
    # the hand-written table in the module docstring names every field of every type
    doc = P.__doc__
    rows = [line for line in doc.splitlines()]
    starts = {line.split()[0]: i for i, line in enumerate(rows) if line.split()[:1] and line.split()[0] in P.SCHEMAS}
    assert set(starts) == P.MESSAGE_TYPES
    order = sorted(starts.values()) + [len(rows)]
    for name, model in P.SCHEMAS.items():
        i = starts[name]
        block = "\n".join(rows[i:order[order.index(i) + 1]])
        assert model.DIRECTION in block.splitlines()[0], name
        for field in model.model_fields:
            assert f"{field}:" in block, (name, field)


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
