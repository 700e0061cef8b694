"""Per-peer policing of the control socket, without sockets: rate limits, strikes and bans.

The coordinator asks ``admit(peer)`` before it decodes a frame and calls ``strike(peer, ...)`` for a
frame that is not a valid message (or a valid one that breaks the run's bounds). Every frame a
peer sends is thus counted exactly once: decoded, dropped by the rate limit, or dropped while the
peer is banned. A peer is a key's identity when the pool uses CurveZMQ (reconnecting does not
escape a ban) or a connection otherwise.

Costs are bounded whatever peers send: the state per peer is a handful of numbers, at most
``max_peers`` peers are tracked (the least recently heard unpinned one is forgotten first; the
registered workers are pinned), and a banned or throttled frame is dropped unread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

ADMIT = "ok"
BANNED = "banned"
THROTTLED = "throttled"


@dataclass
class _Peer:
    label: str
    tokens: float
    refilled: float
    strikes: float = 0.0
    struck: float = 0.0
    malformed: int = 0
    other_strikes: int = 0
    bans: int = 0
    banned_until: float = 0.0
    throttled: int = 0
    dropped_banned: int = 0
    last_reason: str = ""


class Guard:
    """``rate``/``burst``: a token bucket of frames per peer; ``strikes_to_ban`` strikes (each
    decaying after ``strike_decay_s``) ban a peer for ``ban_s``, doubling with each ban up to
    ``max_ban_s``."""

    def __init__(self, *, rate: float = 200.0, burst: float = 400.0, strikes_to_ban: int = 10,
                 strike_decay_s: float = 10.0, ban_s: float = 10.0, max_ban_s: float = 600.0,
                 max_peers: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst = float(rate), float(burst)
        self.strikes_to_ban = int(strikes_to_ban)
        self.strike_decay_s = float(strike_decay_s)
        self.ban_s, self.max_ban_s = float(ban_s), float(max_ban_s)
        self.max_peers = int(max_peers)
        self.clock = clock
        self.counters = {"frames": 0, "malformed": 0, "strikes": 0, "throttled": 0, "dropped_banned": 0, "bans": 0}
        self._peers: "OrderedDict[str, _Peer]" = OrderedDict()
        self._pinned: set[str] = set()

    def _get(self, peer: str, label: Optional[str] = None) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            p = _Peer(label or peer, self.burst, self.clock())
            self._peers[peer] = p
            if len(self._peers) > self.max_peers:
                for old in self._peers:
                    if old not in self._pinned and old != peer:
                        del self._peers[old]
                        break
        else:
            self._peers.move_to_end(peer)
            if label:
                p.label = label
        return p

    def pin(self, peer: str, label: Optional[str] = None) -> None:
        """Keep ``peer``'s record however many others come and go (a registered worker)."""
        self._pinned.add(peer)
        self._get(peer, label)

    def unpin(self, peer: str) -> None:
        self._pinned.discard(peer)

    def admit(self, peer: str, label: Optional[str] = None) -> str:
        """ADMIT if a frame from ``peer`` may be decoded now, else BANNED or THROTTLED (counted)."""
        self.counters["frames"] += 1
        now = self.clock()
        p = self._get(peer, label)
        if now < p.banned_until:
            p.dropped_banned += 1
            self.counters["dropped_banned"] += 1
            return BANNED
        p.tokens = min(self.burst, p.tokens + (now - p.refilled) * self.rate)
        p.refilled = now
        if p.tokens < 1.0:
            p.throttled += 1
            self.counters["throttled"] += 1
            return THROTTLED
        p.tokens -= 1.0
        return ADMIT

    def strike(self, peer: str, reason: str, malformed: bool = True) -> float:
        """One strike against ``peer`` (``malformed``: the frame was not a valid message); returns
        the seconds of the ban it earned, or 0."""
        now = self.clock()
        p = self._get(peer)
        if malformed:
            p.malformed += 1
            self.counters["malformed"] += 1
        else:
            p.other_strikes += 1
        self.counters["strikes"] += 1
        p.last_reason = reason[:200]
        if self.strike_decay_s > 0 and p.strikes > 0:
            p.strikes = max(0.0, p.strikes - (now - p.struck) / self.strike_decay_s)
        p.strikes += 1.0
        p.struck = now
        if p.strikes < self.strikes_to_ban:
            return 0.0
        p.strikes = 0.0
        seconds = min(self.max_ban_s, self.ban_s * 2 ** p.bans)
        p.bans += 1
        p.banned_until = now + seconds
        self.counters["bans"] += 1
        return seconds

    def malformed_of(self, peer: str) -> int:
        p = self._peers.get(peer)
        return p.malformed if p is not None else 0

    def banned_for(self, peer: str) -> float:
        p = self._peers.get(peer)
        return max(0.0, p.banned_until - self.clock()) if p is not None else 0.0

    def view(self, peer: str) -> dict:
        """A peer's record for status (zeros for a peer never heard of)."""
        p = self._peers.get(peer)
        if p is None:
            return {"malformed": 0, "strikes": 0, "bans": 0, "banned_for_s": 0.0, "throttled": 0, "dropped_banned": 0}
        return {"malformed": p.malformed, "strikes": p.malformed + p.other_strikes, "bans": p.bans,
                "banned_for_s": round(max(0.0, p.banned_until - self.clock()), 3), "throttled": p.throttled,
                "dropped_banned": p.dropped_banned}

    def offenders(self, limit: int = 16) -> list[dict]:
        """The peers that earned strikes or drops, worst first (bounded, for status)."""
        bad = [(k, p) for k, p in self._peers.items() if p.malformed or p.other_strikes or p.throttled or p.bans]
        bad.sort(key=lambda kp: -(kp[1].malformed + kp[1].other_strikes + kp[1].throttled + kp[1].dropped_banned))
        return [{"peer": p.label, **self.view(k), "last_reason": p.last_reason} for k, p in bad[:limit]]

    def __len__(self) -> int:
        return len(self._peers)
