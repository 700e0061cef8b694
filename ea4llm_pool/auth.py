"""Who may join a pool: CurveZMQ keys, the coordinator's allow-list and invite files.

Layout of a coordinator's keys folder (``--keys DIR``)::

    DIR/coordinator.key          the coordinator's public key (give it to workers)
    DIR/coordinator.key_secret   its secret key (mode 0600; never leaves this machine)
    DIR/authorized/NAME.key      one public key per admitted worker; adding a file admits it,
                                 removing it cuts that worker off (the folder is re-read while
                                 the coordinator runs)
    DIR/invites/NAME.invite      what ``ea4llm-pool invite NAME`` wrote for worker NAME (holds the
                                 worker's secret key: hand it over privately, then delete it)
    DIR/trusted/NAME             the operator vouches for key NAME: its fitness values are used
                                 without replication from the start (``invite --trusted``)

Key files are pyzmq's certificate format (``zmq.auth.create_certificates``). An invite is a small
YAML file (every value a JSON string, so Z85's punctuation needs no escaping)::

    format: ea4llm-pool-invite-1
    name: "NAME"
    connect: "tcp://lab-host:5555"
    coordinator_public_key: "<40 Z85 characters>"
    worker_public_key: "<40 Z85 characters>"
    worker_secret_key: "<40 Z85 characters>"

A worker's identity is its authenticated public key: the ZAP handler admits a key only if it is
in ``authorized/`` (or is the coordinator's own, for ``status`` and health checks on its host), and
libzmq stamps every message from that connection with the key as its ``User-Id``. Names in message
payloads are labels, never identities.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import UserError

COORDINATOR = "coordinator"
AUTHORIZED = "authorized"
TRUSTED = "trusted"
INVITES = "invites"
INVITE_FORMAT = "ea4llm-pool-invite-1"
ZAP_DOMAIN = b"ea4llm-pool"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_name(name: str) -> str:
    if not name or set(name) - _NAME_OK or name.startswith(".") or len(name) > 64:
        raise UserError(f"'{name}' is not a key name (use letters, digits, '-', '_' and '.', at most 64)")
    return name


def keygen(out: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A new key pair ``out/NAME.key`` (public) and ``out/NAME.key_secret`` (0600)."""
    import zmq.auth

    check_name(name)
    out = Path(out)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not overwrite and (public.exists() or secret.exists()):
        raise UserError(f"{public} already exists; choose another --name or remove the old pair first")
    out.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    public.chmod(0o644)
    return public, secret


def _load(path: Path, want_secret: bool) -> tuple[bytes, Optional[bytes]]:
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError, IndexError) as err:
        raise UserError(f"{path}: not a key file ({str(err).splitlines()[0] if str(err) else 'unreadable'})") from None
    if not public or len(public) != 40:
        raise UserError(f"{path}: holds no CURVE public key")
    if want_secret and (not secret or len(secret) != 40):
        raise UserError(f"{path}: holds no secret key (pass the .key_secret file)")
    return public, secret


def public_key(path: str | Path) -> bytes:
    """The Z85 public key in a ``.key`` (or ``.key_secret``) file."""
    return _load(Path(path), want_secret=False)[0]


def key_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file."""
    public, secret = _load(Path(path), want_secret=True)
    return public, secret


def is_loopback(bind: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    host = bind.split("//", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: reachable from elsewhere


# -- the coordinator's side ------------------------------------------------------------------------
class KeyRing:
    """The coordinator's key pair and its allow-list, re-read from disk when the folder changes.

    ``allowed`` maps each admitted Z85 public key (as str) to its name; ``refresh()`` is cheap
    (one directory listing) and swaps the whole map at once, so the ZAP thread reading it
    through ``callback`` never sees a half-built one.
    """

    def __init__(self, keys_dir: str | Path, create: bool = True):
        self.dir = Path(keys_dir)
        secret_file = self.dir / f"{COORDINATOR}.key_secret"
        if not secret_file.is_file():
            if not create:
                raise UserError(f"--keys {self.dir}: no {secret_file.name} (run `ea4llm-pool keygen --out {self.dir} "
                                f"--name {COORDINATOR}` or `ea4llm-pool invite NAME --keys {self.dir}`)")
            keygen(self.dir, COORDINATOR)
            self.created = True
        else:
            self.created = False
        self.public, self.secret = key_pair(secret_file)
        self.authorized = self.dir / AUTHORIZED
        self.authorized.mkdir(parents=True, exist_ok=True)
        self.allowed: dict[str, str] = {}
        self.skipped: list[str] = []  # files in authorized/ that hold no key (named once by refresh)
        self.trusted: frozenset[str] = frozenset()  # key names the operator vouches for (trusted/)
        self._signature: Optional[tuple] = None
        self.refresh()

    def _scan(self) -> tuple:
        try:
            with os.scandir(self.authorized) as it:
                return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                                    for e in it if e.name.endswith(".key") and e.is_file()))
        except OSError:
            return ()

    def refresh(self) -> bool:
        """Re-read ``authorized/`` if it changed; True if the set of admitted keys changed."""
        try:
            with os.scandir(self.dir / TRUSTED) as it:
                self.trusted = frozenset(e.name.removesuffix(".key") for e in it if e.is_file())
        except OSError:
            self.trusted = frozenset()
        sig = self._scan()
        if sig == self._signature:
            return False
        self._signature = sig
        allowed = {self.public.decode(): COORDINATOR}
        skipped = []
        for name, _, _ in sig:
            try:
                allowed[public_key(self.authorized / name).decode()] = name[:-4]
            except UserError:
                skipped.append(name)  # half-written or not a key: not admitted
        changed = set(allowed) != set(self.allowed)
        self.allowed = allowed
        self.skipped = skipped
        return changed

    def name_of(self, user_id: Optional[str]) -> Optional[str]:
        """The name of an admitted key, or None if the key is not (or no longer) admitted."""
        return self.allowed.get(user_id) if user_id else None

    # The ZAP handler's credentials provider: is this client key admitted?
    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode("ascii", "replace") in self.allowed

    def serve(self, sock) -> None:
        """Make ``sock`` a CURVE server with this key pair (before bind)."""
        import zmq

        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def start_authenticator(self, ctx):
        """A ZAP handler thread on ``ctx`` that admits exactly the keys in ``allowed``."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(domain=ZAP_DOMAIN.decode(), credentials_provider=self)
        return auth


def user_id(frame) -> Optional[str]:
    """The authenticated key of the connection a received ``zmq.Frame`` came from."""
    try:
        uid = frame.get("User-Id")
    except Exception:  # no ZAP on this socket: the property does not exist
        return None
    return uid or None


# -- the worker's side -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    """A worker's (or status client's) key pair and the coordinator's public key."""
    public: bytes
    secret: bytes
    server: bytes
    connect: Optional[str] = None   # from an invite: where the coordinator listens
    name: Optional[str] = None

    @classmethod
    def from_files(cls, key: str | Path, server_key: str | Path) -> "Credentials":
        public, secret = key_pair(key)
        return cls(public, secret, public_key(server_key))

    @classmethod
    def from_invite(cls, path: str | Path) -> "Credentials":
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as err:
            raise UserError(f"{path}: cannot read the invite ({err.strerror})") from None
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict) or data.get("format") != INVITE_FORMAT:
            raise UserError(f"{path}: not an ea4llm-pool invite file")
        try:
            keys = [data[k].encode("ascii") for k in
                    ("worker_public_key", "worker_secret_key", "coordinator_public_key")]
            connect, name = str(data["connect"]), str(data.get("name") or "")
        except (KeyError, AttributeError, UnicodeEncodeError):
            raise UserError(f"{path}: the invite is incomplete (write a new one with `ea4llm-pool invite`)") from None
        if any(len(k) != 40 for k in keys):
            raise UserError(f"{path}: the invite holds a damaged key")
        return cls(keys[0], keys[1], keys[2], connect, name or None)

    def apply(self, sock) -> None:
        """Make ``sock`` a CURVE client of the coordinator (before connect)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


def client_credentials(invite: Optional[str], key: Optional[str], server_key: Optional[str]) -> Optional[Credentials]:
    """Credentials from ``--invite`` or ``--key`` + ``--server-key`` (None: a plain-TCP pool)."""
    if invite and (key or server_key):
        raise UserError("give either --invite or --key with --server-key, not both")
    if invite:
        return Credentials.from_invite(invite)
    if bool(key) != bool(server_key):
        raise UserError("--key and --server-key go together (the worker's .key_secret and the coordinator's .key)")
    if key:
        return Credentials.from_files(key, server_key)
    return None


def write_invite(keys_dir: str | Path, name: str, connect: str, out: Optional[str | Path] = None,
                 reuse: bool = False, trusted: bool = False) -> Path:
    """A new worker key pair, admitted (its public key goes to ``authorized/``), and the invite
    file that carries it to the worker. ``reuse``: an existing invite of that name is kept;
    ``trusted``: the operator vouches for the worker (``trusted/NAME``)."""
    from .link import check_endpoint

    check_name(name)
    check_endpoint(connect)
    ring = KeyRing(keys_dir, create=True)
    path = Path(out) if out else ring.dir / INVITES / f"{name}.invite"
    if trusted:
        (ring.dir / TRUSTED).mkdir(exist_ok=True)
        (ring.dir / TRUSTED / name).write_text("# the operator vouches for this worker's fitness values\n")
    if path.exists():
        if reuse:
            return path
        raise UserError(f"{path} already exists (remove it, or pass --reuse to keep it)")
    if name == COORDINATOR:
        raise UserError(f"'{COORDINATOR}' is the coordinator's own key name")
    pairs = ring.dir / INVITES / "keys"
    public, secret = keygen(pairs, name, overwrite=True)
    worker_public, worker_secret = key_pair(secret)
    body = "\n".join([
        f"# ea4llm-pool invite for worker {name}: it holds the worker's SECRET key, so hand it over privately.",
        f"# On the worker: ea4llm-pool worker --invite {path.name} --device cpu",
        f"# Revoke: delete {ring.authorized / (name + '.key')} (the coordinator cuts the worker off at once).",
        f"format: {INVITE_FORMAT}",
        f"name: {json.dumps(name)}",
        f"connect: {json.dumps(connect)}",
        f"coordinator_public_key: {json.dumps(ring.public.decode())}",
        f"worker_public_key: {json.dumps(worker_public.decode())}",
        f"worker_secret_key: {json.dumps(worker_secret.decode())}",
        f"created: {json.dumps(time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))}",
        ""])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    # Admit last, by an atomic rename (the reloader never sees a half-written key): a key is
    # never authorized without its invite existing.
    os.replace(public, ring.authorized / f"{name}.key")
    secret.unlink(missing_ok=True)  # the invite is the only copy of the secret
    try:
        pairs.rmdir()
    except OSError:
        pass
    return path


def default_connect() -> str:
    return f"tcp://{socket.getfqdn()}:5555"
