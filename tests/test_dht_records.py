"""Owner-signed DHT records on a real two-node DHT on 127.0.0.1: only a peer can write its own records."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from swarm.dht import (ServerRecord, ServerState, announce_server, lookup_servers, signed_subkey, start_dht)
from swarm.dht.identity import load_identity
from swarm.dht.records import block_key
from swarm.errors import SwarmError

MODEL = "m"
LAYERS = 4


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two full DHT nodes: `a` with an identity file, `b` with a fresh key (an attacker, or just another peer)."""
    ident = str(tmp_path_factory.mktemp("ident") / "a.key")
    a = start_dht("127.0.0.1", 0, [], ident)
    b = start_dht("127.0.0.1", 0, [str(m) for m in a.get_visible_maddrs()], None)
    try:
        yield a, b, ident
    finally:
        b.shutdown()
        a.shutdown()


def _exp(dt: float) -> float:
    from hivemind.utils import get_dht_time
    return get_dht_time() + dt


def test_identity_file_is_private(tmp_path, caplog):
    path = str(tmp_path / "id.key")
    load_identity(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="swarm.dht.identity"):
        load_identity(path)
    assert "chmod 600" in caplog.text
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(SwarmError, match="RSA libp2p private key"):
        load_identity(str(tmp_path / "junk.key"))


async def test_signed_record_cannot_be_overwritten_or_forged(nodes):
    a, b, ident = nodes
    a_id, b_id = str(a.peer_id), str(b.peer_id)
    good = ServerRecord(ServerState.ONLINE, 0, LAYERS, 5.0, 3, public_name="owner")
    assert await announce_server(a, MODEL, a_id, good, _exp(30))
    evil = {**good.to_dict(), "public_name": "evil", "state": "offline"}
    key = block_key(MODEL, 0)
    a_subkey = signed_subkey(a_id, a.swarm_validator.local_public_key)

    # overwrite a's subkey from b (b cannot sign for a's key): both nodes refuse it
    assert not await b.store(key, subkey=a_subkey, value=evil, expiration_time=_exp(60), return_future=True)
    # forge: a's peer id with b's own key, validly signed by b, and a plain unsigned subkey: stored but ignored
    forged = signed_subkey(a_id, b.swarm_validator.local_public_key)
    assert await b.store(key, subkey=forged, value=evil, expiration_time=_exp(60), return_future=True)
    assert await b.store(key, subkey=a_id, value=evil, expiration_time=_exp(60), return_future=True)

    for reader in (a, b):
        view = await lookup_servers(reader, MODEL, LAYERS)
        assert view.servers == {a_id: good}, "a forged or overwritten record was taken for a's"
        assert view.dropped == 2  # the forged and the unsigned record under block 0
    # b's own signed record is listed under b's id
    assert await announce_server(b, MODEL, b_id, ServerRecord(ServerState.JOINING, 1, 2, 1.0, 1), _exp(30))
    view = await lookup_servers(a, MODEL, LAYERS)
    assert set(view.servers) == {a_id, b_id} and view.servers[b_id].state == ServerState.JOINING


def test_peer_id_is_the_identity_files(nodes):
    """The signing key is the libp2p key: a restarted peer with the same file owns the same records."""
    from hivemind.p2p import PeerID
    a, _, ident = nodes
    with open(ident, "rb") as f:
        assert PeerID.from_identity(f.read()) == a.peer_id


async def test_model_records_are_signed_and_voted(nodes):
    from swarm.dht import ModelRecord, announce_model, lookup_models
    from swarm.dht.records import MODELS_KEY
    a, b, _ = nodes
    honest = ModelRecord("mv", ("http://good/m.knot",), LAYERS, "d" * 64)
    assert await announce_model(a, honest, _exp(30), str(a.peer_id))
    # an unsigned record naming another location is dropped and counted
    fake = ModelRecord("mv", ("http://evil/m.knot",), LAYERS, "d" * 64).to_dict()
    await b.store(MODELS_KEY, subkey="mv", value=fake, expiration_time=_exp(30), return_future=True)
    # b cannot overwrite a's signed statement
    a_subkey = signed_subkey(str(a.peer_id), a.swarm_validator.local_public_key)
    assert not await b.store(MODELS_KEY, subkey=a_subkey, value=fake, expiration_time=_exp(40), return_future=True)
    models, dropped = await lookup_models(b)
    assert models["mv"].locations == ("http://good/m.knot",) and dropped >= 1
    # two honest peers outvote one signed dissenter
    assert await announce_model(b, ModelRecord("mv", ("http://evil/m.knot",), LAYERS, "d" * 64), _exp(30),
                                str(b.peer_id))
    c = start_dht("127.0.0.1", 0, [str(m) for m in a.get_visible_maddrs()], None)
    try:
        assert await announce_model(c, honest, _exp(30), str(c.peer_id))
        models, _ = await lookup_models(a)
        assert models["mv"].locations == ("http://good/m.knot",)
    finally:
        c.shutdown()
