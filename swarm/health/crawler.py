"""The dashboard's crawler: read every model and server record from the DHT, then ping each peer's info RPC."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from swarm import wire
from swarm.dht import ModelRecord, PeerId, ServerState, SwarmView, lookup_models, lookup_servers
from swarm.errors import ProtocolError
from swarm.health.snapshot import CrawlResult, PingResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrawlConfig:
    ping_timeout: float = 3.0  # one info RPC, dial included
    lookup_timeout: float = 20.0  # one DHT read (the model list, or one model's block keys)
    max_parallel_pings: int = 32  # pings in flight at once
    max_models: int = 64  # a hostile swarm could announce thousands of fake models: crawl at most this many


class Crawler:
    """Owns nothing but borrows a DHT node and its P2P: `crawl()` returns one CrawlResult and never raises."""

    def __init__(self, dht: Any, p2p: Any, config: CrawlConfig | None = None):
        self.dht, self.p2p = dht, p2p
        self.config = config or CrawlConfig()

    async def crawl(self) -> CrawlResult:
        started, t0 = time.time(), time.perf_counter()
        try:
            models, views, dropped = await self._read_dht()
            pings = await self._ping_all(views)
        except Exception as e:  # hivemind raises bare Exceptions when its DHT process fails: report, crawl again
            log.warning("crawl failed: %s", _one_line(e))
            return CrawlResult(started, time.perf_counter() - t0, error=_one_line(e))
        return CrawlResult(started, time.perf_counter() - t0, models, views, pings, dropped)

    async def _read_dht(self) -> tuple[dict[str, ModelRecord], dict[str, SwarmView], int]:
        cfg = self.config
        models, dropped = await asyncio.wait_for(lookup_models(self.dht), cfg.lookup_timeout)
        if len(models) > cfg.max_models:
            log.warning("%d models announced: crawling the first %d by name", len(models), cfg.max_models)
            dropped += len(models) - cfg.max_models
            models = {k: models[k] for k in sorted(models)[:cfg.max_models]}
        names = sorted(models)
        views = await asyncio.gather(*(asyncio.wait_for(lookup_servers(self.dht, n, models[n].num_layers),
                                                        cfg.lookup_timeout) for n in names))
        out: dict[str, SwarmView] = {}
        for name, view in zip(names, views):
            bad = [p for p in view.servers if not _valid_peer_id(p)]
            for p in bad:  # nobody can dial it: a record under a made-up subkey
                del view.servers[p]
                view.expirations.pop(p, None)
            dropped += view.dropped + len(bad)
            out[name] = view
        return models, out, dropped

    async def _ping_all(self, views: dict[str, SwarmView]) -> dict[PeerId, PingResult]:
        """Ping every peer that is not OFFLINE once, however many models list it."""
        todo = sorted({p for v in views.values() for p, r in v.servers.items() if r.state != ServerState.OFFLINE})
        sem = asyncio.Semaphore(self.config.max_parallel_pings)

        async def one(peer: PeerId) -> PingResult:
            async with sem:
                return await self.ping(peer)

        results = await asyncio.gather(*(one(p) for p in todo))
        return dict(zip(todo, results))

    async def ping(self, peer: PeerId) -> PingResult:
        """One info RPC with a deadline; a failure comes back as a value, never raised."""
        t0 = time.perf_counter()
        try:
            msg = await asyncio.wait_for(wire.request_info(self.p2p, peer), timeout=self.config.ping_timeout)
        except asyncio.TimeoutError:
            return PingResult(False, error=f"no answer within {self.config.ping_timeout:g}s")
        except Exception as e:  # hivemind raises bare Exceptions for dial failures; any failure is "unreachable"
            return PingResult(False, error=_one_line(e))
        rtt = time.perf_counter() - t0
        if not isinstance(msg, wire.Info):
            return PingResult(False, rtt, error=f"answered {msg.TAG!r} to an info request")
        if msg.peer_id != peer:
            return PingResult(False, rtt, error="answered with another peer's ID")
        return PingResult(True, rtt, msg.version, msg.sessions)


def _valid_peer_id(peer: str) -> bool:
    """A base58 multihash as libp2p makes peer IDs: identity (0x00) or sha2-256 (0x12), with a matching length."""
    from hivemind.p2p import PeerID
    try:
        raw = PeerID.from_base58(peer).to_bytes()
    except (ValueError, TypeError, KeyError):
        return False
    return len(raw) >= 3 and raw[0] in (0x00, 0x12) and raw[1] == len(raw) - 2


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    kind = "protocol error" if isinstance(e, ProtocolError) else "timeout" if isinstance(e, asyncio.TimeoutError) \
        else type(e).__name__
    return f"{kind}: {first}"[:200] if first else kind
