"""Announce and look up swarm records over a hivemind DHT (record formats live in records.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from swarm.errors import SwarmError
from swarm.dht.records import (MODELS_KEY, ModelRecord, PeerId, ServerRecord, ServerState, block_key)

log = logging.getLogger(__name__)

__all__ = ["start_dht", "ModelRecord", "PeerId", "ServerRecord", "ServerState", "SwarmView", "announce_model",
           "announce_server", "config_digest", "lookup_models", "lookup_servers"]


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


async def announce_server(dht: Any, model: str, peer_id: str, record: ServerRecord, expiration_time: float) -> bool:
    """Store `record` under every block key of its range; True if every store was accepted."""
    value = record.to_dict()
    futures = [dht.store(block_key(model, b), subkey=peer_id, value=value, expiration_time=expiration_time,
                         return_future=True) for b in range(record.start, record.end)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    return all(r is True for r in results)


async def announce_model(dht: Any, record: ModelRecord, expiration_time: float) -> bool:
    res = await dht.store(MODELS_KEY, subkey=record.name, value=record.to_dict(), expiration_time=expiration_time,
                          return_future=True)
    return bool(res)


def _subkey_values(res: Any) -> list[tuple[Any, Any, float]]:
    """(subkey, value, expiration) triples of a DHT get() result with subkeys; [] for anything else."""
    if res is None or not isinstance(getattr(res, "value", None), dict):
        return []
    out = []
    for subkey, item in res.value.items():
        value = getattr(item, "value", None)
        out.append((subkey, value, float(getattr(item, "expiration_time", 0.0))))
    return out


async def lookup_models(dht: Any) -> tuple[dict[str, ModelRecord], int]:
    """Every model announced in the swarm, and how many malformed records were dropped."""
    res = await dht.get(MODELS_KEY, latest=True, return_future=True)
    models: dict[str, ModelRecord] = {}
    dropped = 0
    for subkey, value, _ in _subkey_values(res):
        rec = ModelRecord.parse(value)
        if rec is None or rec.name != subkey:
            dropped += 1
            continue
        models[rec.name] = rec
    return models, dropped


@dataclass
class SwarmView:
    """Who serves what: one record per peer (the freshest), plus which peers each block key listed."""

    servers: dict[PeerId, ServerRecord] = field(default_factory=dict)
    expirations: dict[PeerId, float] = field(default_factory=dict)
    dropped: int = 0

    def online(self) -> dict[PeerId, ServerRecord]:
        return {p: r for p, r in self.servers.items() if r.state == ServerState.ONLINE}

    def coverage(self, num_layers: int) -> list[int]:
        """How many ONLINE peers serve each block."""
        cov = [0] * num_layers
        for r in self.online().values():
            for b in range(r.start, min(r.end, num_layers)):
                cov[b] += 1
        return cov


async def lookup_servers(dht: Any, model: str, num_layers: int) -> SwarmView:
    """Read every block key of `model` and merge the records by peer."""
    futures = [dht.get(block_key(model, b), latest=True, return_future=True) for b in range(num_layers)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    view = SwarmView()
    for b, res in enumerate(results):
        if isinstance(res, BaseException):
            log.debug("DHT get of block %d failed: %s", b, res)
            continue
        for subkey, value, expiration in _subkey_values(res):
            rec = ServerRecord.parse(value)
            if rec is None or not isinstance(subkey, str) or not rec.start <= b < rec.end or rec.end > num_layers:
                view.dropped += 1
                continue
            peer = PeerId(subkey)
            if expiration >= view.expirations.get(peer, -1.0):
                view.servers[peer] = rec
                view.expirations[peer] = expiration
    return view


def start_dht(host: str, port: int, initial_peers: tuple[str, ...] | list[str], identity: str | None,
              client_mode: bool = False, announce_host: str | None = None) -> Any:
    """A hivemind DHT node on host:port (its own child process and p2pd)."""
    from hivemind.dht import DHT
    kw: dict[str, Any] = {}
    if identity:
        kw["identity_path"] = identity
    if announce_host:
        kw["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    try:
        return DHT(start=True, initial_peers=list(initial_peers), host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                   client_mode=client_mode, nat_port_map=False, **kw)
    except Exception as e:  # hivemind raises bare Exceptions for dial/daemon failures
        raise SwarmError(f"cannot start the DHT node on {host}:{port}: {e}") from None
