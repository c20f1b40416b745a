"""Retry, backoff, banning and step deadlines: every client-side policy about failing peers lives here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from swarm.dht.records import PeerId


@dataclass
class BanList:
    """Peers that failed recently. Each failure doubles the ban, from `base` up to `cap` seconds."""

    base: float = 5.0
    cap: float = 300.0
    until: dict[PeerId, float] = field(default_factory=dict)
    failures: dict[PeerId, int] = field(default_factory=dict)

    dishonest_ban: float = 24 * 3600.0  # a peer caught returning wrong results is not retried today

    def ban(self, peer: PeerId, long: bool = False) -> float:
        n = self.failures.get(peer, 0) + 1
        self.failures[peer] = n
        duration = self.dishonest_ban if long else min(self.cap, self.base * 2 ** (n - 1))
        self.until[peer] = time.monotonic() + duration
        return duration

    def banned(self) -> set[PeerId]:
        now = time.monotonic()
        return {p for p, t in self.until.items() if t > now}

    def forgive(self, peer: PeerId) -> None:
        self.failures.pop(peer, None)


@dataclass
class StepClock:
    """A per-span deadline that follows the peer's measured step time.

    deadline(T) = max(min_timeout, factor * ema_decode) + T * per_token * factor + bytes / min_bandwidth:
    a frozen peer is caught in about `min_timeout` seconds, a slow but healthy one is not cut off.
    """

    expected_step: float  # seconds a decode step should take, before any measurement
    min_timeout: float = 2.0
    factor: float = 8.0
    min_bandwidth: float = 20e6  # bytes/s we accept for a checkpoint transfer
    ema: float | None = None

    def deadline(self, tokens: int, extra_bytes: int = 0) -> float:
        step = self.ema if self.ema is not None else self.expected_step
        per_token = step if tokens > 1 else 0.0
        return max(self.min_timeout, self.factor * step) + tokens * per_token * self.factor + \
            extra_bytes / self.min_bandwidth

    def observe(self, seconds: float, tokens: int) -> None:
        if tokens != 1:
            return
        self.ema = seconds if self.ema is None else 0.8 * self.ema + 0.2 * seconds
