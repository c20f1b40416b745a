"""The dashboard's state: one crawl's DHT view and pings -> a JSON-ready dict. Pure logic, no I/O.

Everything here treats its input as hostile: strings are truncated, numbers that are not finite become None, and
nothing raises on odd values, so one bad record can never break the page or the JSON (docs/HEALTH_API.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from swarm.dht import ModelRecord, PeerId, ServerRecord, ServerState, SwarmView

SCHEMA_VERSION = 1
MAX_TEXT = 128  # longest string the dashboard shows from a record or an info reply
GONE = "gone"  # the state of a peer whose records have expired (kept for a while so operators see who left)


@dataclass(frozen=True)
class PingResult:
    """One info RPC: how long it took and what the peer said, or why it failed."""

    reachable: bool
    rtt: float | None = None  # seconds, when reachable
    version: str = ""  # the swarm version the peer reports
    sessions: int | None = None  # open inference sessions the peer reports
    error: str = ""  # one line, when not reachable


@dataclass(frozen=True)
class CrawlResult:
    """What one crawl saw: the models, each model's servers, and the pings."""

    started_at: float  # unix time
    duration: float  # seconds
    models: dict[str, ModelRecord] = field(default_factory=dict)
    views: dict[str, SwarmView] = field(default_factory=dict)  # model name -> its servers
    pings: dict[PeerId, PingResult] = field(default_factory=dict)
    dropped: int = 0  # malformed, hostile or unreachable-by-construction records ignored in this crawl
    error: str = ""  # why the crawl failed, if it did (the previous snapshot's models are kept then)


@dataclass(frozen=True)
class PeerHistory:
    """What the dashboard remembers about a (model, peer) pair across crawls."""

    model: str
    peer_id: PeerId
    record: ServerRecord
    expires_at: float  # DHT expiration of its freshest record
    first_seen: float  # unix time of the first crawl that found its record
    last_announced: float  # unix time of the last crawl that found its record
    last_seen: float | None = None  # unix time of its last answer to a ping
    ping: PingResult | None = None  # the last crawl's ping (None: not pinged)
    present: bool = True  # its record was in the last crawl's view


@dataclass(frozen=True)
class Totals:
    """Counters since the dashboard started."""

    crawls: int = 0
    crawl_errors: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class ModelHistory:
    """A model the dashboard has seen, kept a while after its record expires so that a dead model shows as broken."""

    record: ModelRecord
    last_announced: float  # unix time of the last crawl that found its record
    present: bool = True  # its record was in the last crawl


History = dict[tuple[str, PeerId], PeerHistory]
Models = dict[str, ModelHistory]


def update_models(models: Models, crawl: CrawlResult, forget_after: float) -> Models:
    """A new model list: this crawl's records, plus earlier ones not yet forgotten (all of them if it failed)."""
    now = crawl.started_at
    out: Models = {name: ModelHistory(rec, now) for name, rec in crawl.models.items()}
    for name, old in models.items():
        if name in out:
            continue
        if crawl.error:  # a failed crawl says nothing about who left
            out[name] = old
        elif now - old.last_announced <= forget_after:
            out[name] = replace(old, present=False)
    return out


def update_history(history: History, crawl: CrawlResult, forget_after: float) -> History:
    """A new history: peers in this crawl refreshed, absent ones marked gone, long-gone ones forgotten."""
    now = crawl.started_at
    out: History = {}
    for model, view in crawl.views.items():
        for peer, rec in view.servers.items():
            old = history.get((model, peer))
            ping = crawl.pings.get(peer)
            last_seen = now if ping is not None and ping.reachable else (old.last_seen if old else None)
            out[(model, peer)] = PeerHistory(model, peer, rec, view.expirations.get(peer, 0.0),
                                             old.first_seen if old else now, now, last_seen, ping)
    for key, old in history.items():
        if key in out:
            continue
        if crawl.error and key[0] not in crawl.views:  # a failed crawl says nothing about who left
            out[key] = old
        elif now - old.last_announced <= forget_after:
            out[key] = replace(old, present=False, ping=None)
    return out


def build_snapshot(crawl: CrawlResult | None, history: History, models: Models, totals: Totals, refresh: float,
                   now: float) -> dict[str, Any]:
    """The whole state as a JSON-ready dict (schema: docs/HEALTH_API.md). `crawl` None: none has finished yet."""
    peers = sorted(history.values(), key=lambda h: (h.model, not h.present, h.record.start, h.record.end,
                                                    h.record.public_name, h.peer_id))
    model_objs = [_model_json(models[name], [h for h in peers if h.model == name]) for name in sorted(models)]
    states = {s.value: 0 for s in ServerState} | {GONE: 0}
    for h in peers:
        states[_state(h)] += 1
    return {
        "schema": SCHEMA_VERSION,
        "generated_at": _num(now),
        "crawl": {
            "count": totals.crawls,
            "errors": totals.crawl_errors,
            "started_at": _num(crawl.started_at) if crawl else None,
            "duration_s": _num(crawl.duration, 4) if crawl else None,
            "error": _text(crawl.error) if crawl and crawl.error else None,
            "refresh_s": _num(refresh),
        },
        "dropped_records": {"last_crawl": crawl.dropped if crawl else 0, "total": totals.dropped},
        "peer_states": states,
        "models": model_objs,
        "peers": [_peer_json(h, now) for h in peers],
    }


def find_peer(snapshot: dict[str, Any], peer_id: str) -> dict[str, Any] | None:
    """One peer's object from a snapshot (the first listed, if it serves several models), or None."""
    return next((p for p in snapshot.get("peers", []) if p.get("peer_id") == peer_id), None)


# ---------------------------------------------------------------------------------------------------------------


def _model_json(model: ModelHistory, peers: list[PeerHistory]) -> dict[str, Any]:
    rec = model.record
    n = rec.num_layers
    live = [h for h in peers if h.present and h.record.state == ServerState.ONLINE]
    coverage, reachable, capacity = [0] * n, [0] * n, [0.0] * n
    for h in live:
        r = h.record
        per_block = r.throughput / (r.end - r.start)  # the span runs at throughput / its length tokens/s
        for b in range(r.start, min(r.end, n)):
            coverage[b] += 1
            capacity[b] += per_block
            if h.ping is not None and h.ping.reachable:
                reachable[b] += 1
    uncovered = _ranges([b for b in range(n) if coverage[b] == 0])
    return {
        "name": _text(rec.name, 256),
        "announced": model.present,  # False: its record has expired (every peer left)
        "last_announced": _num(model.last_announced),
        "num_blocks": n,
        "state": "broken" if uncovered else "healthy",
        "uncovered": uncovered,
        "blocks_covered": sum(1 for c in coverage if c),
        "min_coverage": min(coverage) if coverage else 0,
        "coverage": coverage,
        "coverage_reachable": reachable,
        "throughput": _num(min(capacity) if capacity else 0.0, 2),
        "locations": [_text(x, 512) for x in rec.locations],
        "config_digest": _text(rec.config_digest),
        "peer_ids": [str(h.peer_id) for h in peers],
    }


def _peer_json(h: PeerHistory, now: float) -> dict[str, Any]:
    r, ping = h.record, h.ping
    return {
        "peer_id": str(h.peer_id),
        "short_id": "…" + str(h.peer_id)[-8:],
        "model": _text(h.model, 256),
        "public_name": _text(r.public_name),
        "start": r.start,
        "end": r.end,
        "state": _state(h),
        "throughput": _num(r.throughput, 2),
        "free_slots": r.free_slots,
        "device": _text(r.device),
        "dtype": _text(r.dtype),
        "version": _text(ping.version if ping is not None and ping.version else r.version),
        "protocol": r.protocol,
        "reachable": None if ping is None else ping.reachable,
        "ping_ms": _num(ping.rtt * 1000, 2) if ping is not None and ping.rtt is not None else None,
        "ping_error": _text(ping.error) if ping is not None and ping.error else None,
        "sessions": ping.sessions if ping is not None else None,
        "first_seen": _num(h.first_seen),
        "last_announced": _num(h.last_announced),
        "last_seen": _num(h.last_seen) if h.last_seen is not None else None,
        "expires_in_s": _num(h.expires_at - now, 1) if h.present else None,
    }


def _state(h: PeerHistory) -> str:
    return h.record.state.value if h.present else GONE


def _ranges(blocks: list[int]) -> list[list[int]]:
    """Sorted block indices -> [[start, end), ...] runs."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return out


def _text(v: Any, limit: int = MAX_TEXT) -> str:
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _num(v: Any, digits: int = 3) -> float | None:
    """A finite float rounded for display, or None (JSON has no NaN or infinity)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return round(float(v), digits)
