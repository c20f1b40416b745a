"""Result verification: a peer that corrupts its outputs is caught by re-running steps on other peers, and banned."""

from __future__ import annotations

import os

import pytest
from conftest import hf_greedy

from swarm.client import ClientConfig, SwarmClient
from swarm.launch import FileServer, peer_id_of, start_bootstrap, start_peers, stop_all

pytestmark = pytest.mark.slow
PROMPT = [4, 8, 15, 16, 23, 42]


def test_corrupting_peer_is_detected_banned_and_never_used(hf_models):
    model, _, knot = hf_models["tied"]
    ref, _ = hf_greedy(model, PROMPT, 16)
    with FileServer(os.path.dirname(knot)) as files:
        url = files.url(os.path.basename(knot))
        boot = start_bootstrap()
        peers = start_peers(url, {"honest1": "0:4", "honest2": "0:4"}, boot.maddrs, ["--update-period", "2"])
        peers += start_peers(url, {"liar": "0:4"}, boot.maddrs, ["--update-period", "2", "--corrupt-outputs", "0.3"])
        liar = peer_id_of(peers[-1])
        client = SwarmClient(initial_peers=boot.maddrs, config=ClientConfig(verify_rate=1.0))
        try:
            with client.session() as s:
                out = s.generate(PROMPT, 16)
                assert s.stats["verifications"] >= 16
            assert out == ref  # a corrupted output was never used
            assert client.dishonest.get(liar, 0) >= 1
            assert liar in client.bans.banned()
            assert all(p not in client.dishonest for p in map(peer_id_of, peers[:2]))
        finally:
            client.close()
            stop_all(peers + [boot])
