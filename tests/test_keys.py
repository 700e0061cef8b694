"""Who may join: CurveZMQ keys, invites and revocation, with real processes over loopback TCP.

Fast tests cover the key files, the allow-list and the refusals of the command line; the slow ones
run a keyed pool: a stranger is refused while the run goes on, an invited worker contributes, a
revoked one is cut off within a heartbeat and the run still ends on the reference state hash, and
a relay between a worker and the coordinator finds no plaintext on the wire.
"""

from __future__ import annotations

import json
import selectors
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import zmq

from ea4llm_pool import UserError
from ea4llm_pool.auth import (AUTHORIZED, COORDINATOR, Credentials, KeyRing, client_credentials, is_loopback,
                              keygen, write_invite)
from pooltools import (cli, coordinator, final_hash, free_port_pair, invite, reference_hash, status, wait_until,
                       worker, write_config)


# -- key files, invites, the allow-list -----------------------------------------------------------------
def test_keygen_writes_a_pyzmq_pair_with_a_private_secret(tmp_path):
    public, secret = keygen(tmp_path / "k", "w1")
    assert public.name == "w1.key" and secret.name == "w1.key_secret"
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert len(pub) == 40 and len(sec) == 40 and zmq.auth.load_certificate(str(public)) == (pub, None)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(UserError, match="already exists"):
        keygen(tmp_path / "k", "w1")
    with pytest.raises(UserError, match="not a key name"):
        keygen(tmp_path / "k", "../evil")


def test_an_invite_admits_its_worker_and_carries_everything_it_needs(tmp_path):
    keys = tmp_path / "keys"
    path = write_invite(keys, "alice", "tcp://lab:5555")
    assert path == keys / "invites" / "alice.invite" and stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = Credentials.from_invite(path)
    ring = KeyRing(keys)
    assert creds.connect == "tcp://lab:5555" and creds.name == "alice"
    assert creds.server == ring.public
    assert ring.name_of(creds.public.decode()) == "alice"
    assert (keys / AUTHORIZED / "alice.key").is_file()
    # The secret exists only in the invite.
    assert not list(keys.rglob("alice.key_secret"))
    with pytest.raises(UserError, match="already exists"):
        write_invite(keys, "alice", "tcp://lab:5555")
    assert write_invite(keys, "alice", "tcp://lab:5555", reuse=True) == path
    with pytest.raises(UserError, match="coordinator's own"):
        write_invite(keys, COORDINATOR, "tcp://lab:5555")


def test_the_allow_list_follows_the_folder(tmp_path):
    keys = tmp_path / "keys"
    ring = KeyRing(keys)
    assert list(ring.allowed.values()) == [COORDINATOR]  # its own key, for status on its host
    write_invite(keys, "bob", "tcp://lab:5555")
    assert ring.refresh() and "bob" in ring.allowed.values()
    assert not ring.refresh()  # nothing changed: nothing re-read
    (keys / AUTHORIZED / "junk.key").write_text("not a key\n")
    ring.refresh()
    assert "junk" not in ring.allowed.values() and ring.skipped == ["junk.key"]
    (keys / AUTHORIZED / "bob.key").unlink()
    assert ring.refresh() and "bob" not in ring.allowed.values()
    assert ring.callback("*", ring.public) and not ring.callback("*", b"x" * 40)


@pytest.mark.parametrize("content, message", [
    ("hello: world\n", "not an ea4llm-pool invite"),
    ("format: ea4llm-pool-invite-1\nname: x\n", "incomplete"),
    ("format: ea4llm-pool-invite-1\nconnect: tcp://a:1\nworker_public_key: short\nworker_secret_key: s\n"
     "coordinator_public_key: c\n", "damaged key"),
])
def test_a_bad_invite_gets_one_line(tmp_path, content, message):
    p = tmp_path / "bad.invite"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        Credentials.from_invite(p)


def test_client_options_go_together(tmp_path):
    assert client_credentials(None, None, None) is None
    with pytest.raises(UserError, match="go together"):
        client_credentials(None, str(tmp_path / "a.key_secret"), None)
    with pytest.raises(UserError, match="either --invite"):
        client_credentials("x.invite", "a", "b")
    public, _ = keygen(tmp_path, "w")
    with pytest.raises(UserError, match="holds no secret key"):
        client_credentials(None, str(public), str(public))


@pytest.mark.parametrize("bind, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:0", True), ("tcp://[::1]:5555", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://10.0.0.5:5555", False),
    ("tcp://lab-host:5555", False)])
def test_loopback_addresses(bind, loopback):
    assert is_loopback(bind) is loopback


def test_a_coordinator_open_to_the_network_without_keys_refuses_to_start(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml")
    res = subprocess.run(cli("coordinator", "--config", cfg, "--out", tmp_path / "run", "--bind", "tcp://0.0.0.0:0"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no --keys were given" in lines[0] and "--insecure" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


def test_insecure_warns_on_start(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml")
    p = subprocess.Popen(cli("coordinator", "--config", cfg, "--out", tmp_path / "run", "--bind", "tcp://0.0.0.0:0",
                             "--insecure"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()
    finally:
        p.kill()
        p.wait()
    assert first.startswith("WARNING: --insecure") and "without authentication or encryption" in first


def test_keygen_and_invite_commands(tmp_path):
    res = subprocess.run(cli("keygen", "--out", tmp_path / "k", "--name", "w9"), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and (tmp_path / "k" / "w9.key_secret").is_file(), res.stderr
    res = subprocess.run(cli("invite", "carol", "--keys", tmp_path / "keys", "--connect", "tcp://lab:7000"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ea4llm-pool worker --invite carol.invite --device cpu" in res.stdout
    assert Credentials.from_invite(tmp_path / "keys" / "invites" / "carol.invite").connect == "tcp://lab:7000"
    res = subprocess.run(cli("invite", "dave", "--keys", tmp_path / "keys", "--connect", "lab:7000"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "is not a coordinator address" in res.stderr


# -- a keyed pool -------------------------------------------------------------------------------------------
HEARTBEAT_S = 1.0


@pytest.mark.slow
def test_only_invited_workers_join_and_a_revoked_one_is_cut_off_within_a_heartbeat(tmp_path):
    cfg = write_config(tmp_path / "pool.yaml", run={"iterations": 12},
                       pool={"heartbeat_s": HEARTBEAT_S, "worker_timeout_s": 6.0, "lease_s": 4.0})
    ref = reference_hash(tmp_path, cfg)
    keys, port, out = tmp_path / "keys", free_port_pair(), tmp_path / "run"
    inv1, inv2 = invite(keys, "w1", port), invite(keys, "w2", port)
    keygen(tmp_path / "stranger", "s1")
    c = coordinator(tmp_path, cfg, out, port, "--keys", keys)
    procs = [c]
    try:
        # Slowed down (the sleep changes no result) so the run outlasts the steps below.
        w1 = worker(tmp_path, port, "w1", "--invite", inv1, hooks=("--slowdown", 5))
        w2 = worker(tmp_path, port, "w2", "--invite", inv2, hooks=("--slowdown", 5))
        stranger = worker(tmp_path, port, "s1", "--key", tmp_path / "stranger" / "s1.key_secret",
                          "--server-key", keys / "coordinator.key")
        procs += [w1, w2, stranger]
        # A stranger's key is refused at the handshake: it says so and exits; the run goes on.
        assert stranger.wait(120) != 0
        assert "the coordinator refused this worker's key" in stranger.text()
        admin = ("--key", keys / "coordinator.key_secret", "--server-key", keys / "coordinator.key")

        def w2_contributed() -> bool:
            rows = [w for w in status(port, *admin)["workers"] if w["key"] == "w2"]
            return bool(rows) and rows[0]["units_done"] > 0

        wait_until(w2_contributed, 180, "w2 to contribute", procs)
        snap = status(port, *admin)
        assert snap["iteration"] < 12, "the run ended before the revocation could be tested"
        assert {w["identity"] for w in snap["workers"]} == {"w1", "w2"}
        assert snap["security"]["keys"] and snap["security"]["authorized_keys"] == 2
        (keys / "authorized" / "w2.key").unlink()
        t0 = time.monotonic()
        while "its key w2 was revoked" not in c.text():
            assert time.monotonic() - t0 < 10, c.text()[-2000:]
            time.sleep(0.01)
        cut_after = time.monotonic() - t0
        assert cut_after < HEARTBEAT_S, f"revoked worker cut off after {cut_after:.2f} s"
        assert w2.wait(60) == 2  # told, it exits: rejected
        assert "was removed from the coordinator's authorized keys" in w2.text()
        assert c.wait(240) == 0, c.text()[-3000:]
        assert w1.wait(30) == 0, w1.text()[-2000:]
    finally:
        for p in procs:
            p.kill()
    assert final_hash(out) == ref  # the same final state as a clean run
    pool = json.loads((out / "pool.json").read_text())
    assert pool["counters"]["revoked"] == 1
    assert [w["identity"] for w in pool["workers"]] == ["w1"]
    print(f"revoked worker cut off {cut_after * 1000:.0f} ms after its key file was removed")


class Relay(threading.Thread):
    """A TCP relay that records every byte passing between clients and ``target_port``."""

    def __init__(self, target_port: int):
        super().__init__(daemon=True)
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.recorded = bytearray()
        self.halt = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ, None)
        while not self.halt.is_set():
            for key, _ in sel.select(0.1):
                if key.data is None:
                    client, _ = self.server.accept()
                    upstream = socket.create_connection(self.target)
                    sel.register(client, selectors.EVENT_READ, upstream)
                    sel.register(upstream, selectors.EVENT_READ, client)
                    continue
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for s in (key.fileobj, key.data):
                        try:
                            sel.unregister(s)
                        except (KeyError, ValueError):
                            pass
                        s.close()
                    continue
                self.recorded += data
                key.data.sendall(data)
        sel.close()
        self.server.close()


def _relayed_run(tmp_path: Path, tag: str, keys: bool) -> tuple[bytes, str]:
    """A coordinator whose one worker talks to it through a Relay; what the relay saw once the worker
    synced, and the canary: a string found only in the config (sent in WELCOME)."""
    canary = f"canary-{uuid.uuid4().hex}"
    cfg = write_config(tmp_path / f"{tag}.yaml", run={"iterations": 50}, data={"text_column": canary})
    port, out = free_port_pair(), tmp_path / f"run-{tag}"
    extra = ("--keys", tmp_path / f"keys-{tag}") if keys else ()
    c = coordinator(tmp_path, cfg, out, port, *extra, name=f"coordinator-{tag}")
    relay = Relay(port)
    relay.start()
    w = None
    try:
        wait_until(lambda: "listening on" in c.text(), 120, "the coordinator to listen", [c])
        if keys:
            inv = write_invite(tmp_path / f"keys-{tag}", "w1", f"tcp://127.0.0.1:{relay.port}")
            w = worker(tmp_path, relay.port, f"w-{tag}", "--invite", inv)
        else:
            w = worker(tmp_path, relay.port, f"w-{tag}")
        wait_until(lambda: "synced to iteration" in w.text(), 120, "the worker to sync", [c, w])
        wait_until(lambda: len(relay.recorded) > 2000, 30, "traffic", [c, w])
    finally:
        for p in (w, c):
            if p is not None:
                p.kill()
        relay.halt.set()
        relay.join(5)
    assert canary in (out / "config.yaml").read_text()  # the config does hold it
    return bytes(relay.recorded), canary


@pytest.mark.slow
def test_the_wire_holds_no_plaintext_with_keys_and_does_without(tmp_path):
    wire, canary = _relayed_run(tmp_path, "curve", keys=True)
    # (CurveZMQ's own handshake commands, HELLO among them, are in clear by design; ours are not.)
    for known in (canary.encode(), b"config_yaml", b"worker_name", b"selftest", b"state_hash", b"w-curve"):
        assert known not in wire, f"{known!r} crossed the wire in clear"
    # The same relay on a plain-TCP pool sees all of it: the check above can fail.
    plain, canary = _relayed_run(tmp_path, "plain", keys=False)
    assert canary.encode() in plain and b"worker_name" in plain
