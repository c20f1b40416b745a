"""Announce and look up swarm records over a hivemind DHT (record formats live in records.py).

Server records are owner-signed: each is stored under the subkey `<peer id>[owner:<ssh-rsa public key>]`, which
hivemind's RSASignatureValidator only accepts with a signature by that key. The key is the peer's libp2p identity
key, so lookup_servers also checks that the peer id is the one that key hashes to: nobody can write, overwrite or
forge a record for another peer (identity.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from swarm.errors import SwarmError
from swarm.dht.identity import load_identity, owner_of_subkey, signed_subkey
from swarm.dht.records import (MODELS_KEY, ModelRecord, PeerId, ServerRecord, ServerState, block_key)

log = logging.getLogger(__name__)

__all__ = ["start_dht", "ModelRecord", "PeerId", "ServerRecord", "ServerState", "SwarmView", "announce_model",
           "announce_server", "config_digest", "lookup_models", "lookup_servers", "make_validator", "owner_of_subkey", "signed_subkey"]


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


async def announce_server(dht: Any, model: str, peer_id: str, record: ServerRecord, expiration_time: float) -> bool:
    """Store `record`, signed, under every block key of its range; True if every store was accepted.

    `dht` must come from start_dht(..., signed=True) as a full node: its validator holds the signing key.
    """
    validator = getattr(dht, "swarm_validator", None)
    if validator is None:
        raise SwarmError("this DHT node cannot sign records: start it with start_dht(..., signed=True)")
    subkey = signed_subkey(peer_id, validator.local_public_key)
    value = record.to_dict()
    futures = [dht.store(block_key(model, b), subkey=subkey, value=value, expiration_time=expiration_time,
                         return_future=True) for b in range(record.start, record.end)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    return all(r is True for r in results)


async def announce_model(dht: Any, record: ModelRecord, expiration_time: float, peer_id: str) -> bool:
    """Store this peer's signed statement of where `record.name`'s KNOT lives (one subkey per announcing peer)."""
    validator = getattr(dht, "swarm_validator", None)
    if validator is None:
        raise SwarmError("this DHT node cannot sign records: start it with start_dht(..., signed=True)")
    res = await dht.store(MODELS_KEY, subkey=signed_subkey(peer_id, validator.local_public_key),
                          value=record.to_dict(), expiration_time=expiration_time, return_future=True)
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
    """Every model announced in the swarm, and how many malformed or unsigned records were dropped.

    Model records are signed by the announcing peer (nobody can overwrite another peer's); when peers disagree
    about a model's locations or config digest, the statement made by the most peers wins.
    """
    res = await dht.get(MODELS_KEY, latest=True, return_future=True)
    votes: dict[str, dict[tuple, tuple[int, ModelRecord]]] = {}
    dropped = 0
    for subkey, value, _ in _subkey_values(res):
        rec = ModelRecord.parse(value)
        if rec is None or owner_of_subkey(subkey) is None:
            dropped += 1
            continue
        key = (rec.locations, rec.num_layers, rec.config_digest)
        count, _ = votes.setdefault(rec.name, {}).get(key, (0, rec))
        votes[rec.name][key] = (count + 1, rec)
    models = {name: max(options.values(), key=lambda v: v[0])[1] for name, options in votes.items()}
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
            peer = owner_of_subkey(subkey)  # None: unsigned, or signed by a key that is not this peer's
            rec = ServerRecord.parse(value)
            if rec is None or peer is None or not rec.start <= b < rec.end or rec.end > num_layers:
                view.dropped += 1
                continue
            if expiration >= view.expirations.get(peer, -1.0):
                view.servers[peer] = rec
                view.expirations[peer] = expiration
    return view


def make_validator(identity: str | None) -> Any:
    """An RSASignatureValidator signing with the identity file's key (created, mode 0600, if missing), or with a
    fresh process-wide key when `identity` is None (enough for nodes that only read and relay records)."""
    from hivemind.dht.crypto import RSASignatureValidator
    return RSASignatureValidator(load_identity(identity) if identity else None)


def start_dht(host: str, port: int, initial_peers: tuple[str, ...] | list[str], identity: str | None,
              client_mode: bool = False, announce_host: str | None = None, signed: bool = True) -> Any:
    """A hivemind DHT node on host:port (its own child process and p2pd).

    signed: validate owner-signed records (every node of a swarm must, or it would hold forged ones) and, for a
    full node, sign its own with its identity key; a full node with no identity file gets a fresh key.
    The returned DHT carries the validator as `swarm_validator` (None when not signed).
    """
    from hivemind.dht import DHT
    kw: dict[str, Any] = {}
    validator, tmpdir = None, None
    if signed:
        if identity is None and not client_mode:  # the signing key must be the libp2p key: write a fresh one
            tmpdir = tempfile.mkdtemp(prefix="swarm-identity-")
            identity = os.path.join(tmpdir, "identity.key")
        if identity and not os.path.exists(identity):
            kw["check_if_identity_free"] = False  # a key made just now: nobody else can hold it
        validator = make_validator(identity)
        kw["record_validators"] = [validator]
    if identity:
        kw["identity_path"] = identity
    if announce_host:
        kw["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    try:
        dht = DHT(start=True, initial_peers=list(initial_peers), host_maddrs=[f"/ip4/{host}/tcp/{port}"],
                  client_mode=client_mode, nat_port_map=False, **kw)
    except Exception as e:  # hivemind raises bare Exceptions for dial/daemon failures
        raise SwarmError(f"cannot start the DHT node on {host}:{port}: {e}") from None
    finally:
        if tmpdir:  # p2pd read the key at start; the validator holds it in memory
            shutil.rmtree(tmpdir, ignore_errors=True)
    dht.swarm_validator = validator
    return dht
