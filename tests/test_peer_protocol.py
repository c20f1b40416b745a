"""A peer under malformed, oversized and out-of-order messages: it answers an error and keeps serving others."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest
import torch
from conftest import hf_greedy

from swarm import wire
from swarm.client import SwarmClient
from swarm.launch import FileServer, peer_id_of, start_bootstrap, start_peers, stop_all

pytestmark = pytest.mark.slow
PROMPT = [4, 8, 15, 16, 23, 42]


async def _raw_exchange(client: SwarmClient, peer: str, frames: list[bytes]) -> list[wire.Message]:
    """Open an inference stream, write raw frames, return every answer until the peer closes the stream."""
    from hivemind.p2p import PeerID
    _, reader, writer = await client.p2p.call_binary_stream_handler(PeerID.from_base58(peer),
                                                                    wire.INFERENCE_PROTOCOL)
    try:
        for f in frames:
            writer.write(f)
        await writer.drain()
        answers = []
        while True:
            try:
                answers.append(await asyncio.wait_for(wire.recv(reader), timeout=10))
            except ConnectionError:
                return answers
    finally:
        writer.close()


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(8, "big") + payload


def test_bad_messages_get_errors_and_other_sessions_continue(hf_models):
    model, _, knot = hf_models["tied"]
    ref, _ = hf_greedy(model, PROMPT, 10)
    with FileServer(os.path.dirname(knot)) as files:
        boot = start_bootstrap()
        peers = start_peers(files.url(os.path.basename(knot)), {"solo": "0:4"}, boot.maddrs,
                            ["--update-period", "2", "--max-sessions", "3"])
        client = SwarmClient(initial_peers=boot.maddrs)
        try:
            pid = peer_id_of(peers[0])
            with client.session() as good:
                out = good.generate(PROMPT, 5)
                d = model.config.hidden_size
                open_msg = wire.Open("evil", 0, 4, 1).pack()
                cases = {  # name -> (frames, words in the error)
                    "garbage": ([_frame(b"\xc1\xff\x00not msgpack")], "not valid msgpack"),
                    "oversized": ([(1 << 40).to_bytes(8, "big")], "exceeds"),
                    "wrong version": ([_frame(msgpack.packb({"v": 99, "t": "open", "session_id": "x", "start": 0,
                                                            "end": 4}))], "protocol version 99"),
                    "unknown type": ([_frame(msgpack.packb({"v": 1, "t": "launch_missiles"}))], "unknown message"),
                    "wrong field type": ([_frame(msgpack.packb({"v": 1, "t": "open", "session_id": 5, "start": 0,
                                                                "end": 4}))], "session_id must be str"),
                    "blocks outside": ([_frame(wire.Open("evil", 2, 9, 1).pack())], "not inside"),
                    "step first": ([_frame(wire.Step(1, 0, torch.zeros(1, 1, d), False).pack())], "must start"),
                    "bad shape": ([_frame(open_msg), _frame(wire.Step(1, 0, torch.zeros(1, 1, d + 1),
                                                                      False).pack())], "shape"),
                    "bad position": ([_frame(open_msg), _frame(wire.Step(1, 7, torch.zeros(1, 1, d),
                                                                         False).pack())], "position 7"),
                    "tensor bytes lie": ([_frame(open_msg), _frame(msgpack.packb(
                        {"v": 1, "t": "step", "seq": 1, "position": 0, "checkpoint": False,
                         "hidden": {"dtype": "F32", "shape": [1, 1, d], "data": b"\0" * 12}}))], "12 bytes"),
                }
                for name, (frames, words) in cases.items():
                    answers = client.run(_raw_exchange(client, pid, frames))
                    assert answers and isinstance(answers[-1], wire.Error), (name, answers)
                    assert words in answers[-1].message, (name, answers[-1].message)
                out += good.generate(None, 5)
            assert out == ref
            # the peer still serves new sessions, and its slots were given back
            assert client.generate(PROMPT, 3) == ref[:3]
            _, info = client.run(client.ping(pid))
            assert info.sessions == 0 and info.free_slots == 3
        finally:
            client.close()
            stop_all(peers + [boot])
